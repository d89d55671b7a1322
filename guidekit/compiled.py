"""Compiled modules: the original network behind ``torch.compile`` and where to hook a call.

``torch.compile(m)`` returns an ``OptimizedModule`` whose ``_orig_mod`` is ``m`` and whose
instance ``forward`` is the compiled call; ``m.compile()`` compiles in place, storing the
compiled ``_call_impl`` in ``m._compiled_call_impl``, which ``m(...)`` then runs (tracing
``m.forward``, and so whatever guidekit would put there). guidekit reads names, signatures
and layers on the original module, and installs its guided call where the module's caller
reaches it *before* compiled code: the instance ``forward`` of an ``OptimizedModule``, the
``_compiled_call_impl`` of a module compiled in place, else the instance ``forward``. The
batched model calls guidekit makes then go through the compiled callable it replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: the attribute ``nn.Module.compile`` sets (``None`` when not compiled in place)
COMPILED_CALL = "_compiled_call_impl"


def original_module(model: Any) -> Any:
    """``model`` without its ``torch.compile`` wrappers (``_orig_mod``, nested ones too)."""
    seen = 0
    while isinstance(model, torch.nn.Module) and "_orig_mod" in model.__dict__.get("_modules", {}):
        model = model._orig_mod
        seen += 1
        if seen > 16:  # a module that names a child _orig_mod in a cycle: stop, not hang
            break
    return model


def compiled_in_place(model: Any) -> bool:
    """True when ``model.compile()`` was called (``model(...)`` runs compiled code)."""
    return isinstance(model, torch.nn.Module) and model.__dict__.get(COMPILED_CALL) is not None


def is_compiled(model: Any) -> bool:
    """True when calling ``model`` runs ``torch.compile``d code (a wrapper or in place)."""
    return original_module(model) is not model or compiled_in_place(model)


def call_slot(model: torch.nn.Module) -> str:
    """The instance attribute through which ``model(...)`` reaches its forward first:
    ``"_compiled_call_impl"`` for a module compiled in place, else ``"forward"``."""
    return COMPILED_CALL if compiled_in_place(model) else "forward"


def current_call(model: torch.nn.Module) -> Callable[..., Any]:
    """What :func:`call_slot` holds now: the (compiled) callable a replacement calls on."""
    call: Callable[..., Any] = getattr(model, call_slot(model))
    return call


def swap(obj: Any, name: str, value: Any) -> Callable[[], None]:
    """Set ``obj.name`` as an instance attribute; return the undo, which puts back exactly
    what the instance ``__dict__`` held (or removes the attribute if it held none)."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    object.__setattr__(obj, name, value)

    def undo() -> None:
        if had:
            object.__setattr__(obj, name, old)
        else:
            obj.__dict__.pop(name, None)

    return undo


def forward_class(model: Any) -> type[Any]:
    """The class whose ``forward`` signature names ``model``'s arguments."""
    return type(original_module(model))


__all__ = [
    "call_slot", "compiled_in_place", "current_call", "forward_class", "original_module", "swap",
]
