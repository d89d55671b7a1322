"""Row-aware hook machinery shared by the attention engine and the attention modifiers.

Both :mod:`guidekit.attention.engine` (perturbed branches) and
:mod:`guidekit.attention.modifiers` (PLADIS / GAG / NAG) hook a layer the same two ways: a
diffusers processor is replaced by a wrapper that holds the original, and a plain module's
``scaled_dot_product_attention`` calls are routed through a ``TorchFunctionMode``. What they
do with the rows differs; the plumbing below does not.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from guidekit.errors import GuidanceValueError

Ranges = tuple[tuple[int, int], ...]


def take(t: torch.Tensor, ranges: Ranges) -> torch.Tensor:
    """Rows ``ranges`` of ``t`` along axis 0 (a view when it is one range)."""
    if len(ranges) == 1:
        a, b = ranges[0]
        return t if (a, b) == (0, t.shape[0]) else t[a:b]
    return torch.cat([t[a:b] for a, b in ranges])


def rows_of(value: Any, rows: int) -> bool:
    """Whether ``value`` is a tensor with one entry per row of the model call."""
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows


def row_slice(value: Any, rows: int, a: int, b: int) -> Any:
    """``value[a:b]`` for a tensor of the call's rows; anything else (None, a shared mask)
    unchanged."""
    return value[a:b] if rows_of(value, rows) else value


def slice_kwargs(
    kwargs: dict[str, Any], rows: int, ranges: Ranges, names: tuple[str, ...]
) -> dict[str, Any]:
    """``kwargs`` with the row tensors among ``names`` cut down to ``ranges``."""
    return {
        k: take(v, ranges) if k in names and rows_of(v, rows) else v for k, v in kwargs.items()
    }


def check_rows(path: str, got: int, rows: int, what: str) -> None:
    """Raise unless a hooked layer sees the model call's rows (``what``: what would be lost)."""
    if got != rows:
        raise GuidanceValueError(
            f"layer {path!r} received {got} rows in a model call of {rows}: the model "
            f"changes the batch before this layer, so guidekit cannot tell {what}"
        )


def _signature_of(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _unwrapped(original: Any) -> Any:
    """What a copied or pickled guidekit wrapper becomes: the object it wraps."""
    return original


_ADVERTISING: dict[tuple[type, tuple[tuple[str, Any], ...]], type] = {}


def _advertising(cls: type, sig: inspect.Signature) -> type:
    """``cls`` with a ``__call__`` whose signature is ``sig`` (cached per class and names)."""
    key = (cls, tuple((p.name, p.kind) for p in sig.parameters.values()))
    sub = _ADVERTISING.get(key)
    if sub is None:
        base = cls.__call__  # type: ignore[operator]
        # a copy of the function (same code, its own attributes), not a wrapper that calls
        # it: one Python frame less in every hooked layer's call
        call: Any
        if isinstance(base, types.FunctionType):
            call = types.FunctionType(base.__code__, base.__globals__, base.__name__,
                                      base.__defaults__, base.__closure__)
            call.__kwdefaults__ = base.__kwdefaults__
        else:
            def call(self: Any, *args: Any, **kwargs: Any) -> Any:
                return base(self, *args, **kwargs)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        call.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[self_param, *sig.parameters.values()])
        sub = type(cls.__name__, (cls,), {"__call__": call, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _ADVERTISING[key] = sub
    return sub


class ProcessorWrapper:
    """Base of a processor that takes the place of a diffusers attention processor.

    Subclasses define ``__call__(attn, hidden_states, *args, **kwargs)``; the constructor
    keeps the original processor and makes the instance advertise the original's signature.
    A subclass that is also an ``nn.Module`` (for an original that is one) keeps the
    original as a child, so its parameters still move with ``.to()``.

    ``copy.deepcopy`` and pickling (``torch.save(model)``) of a model during a run see the
    ORIGINAL processor: the copy is the user's model, not one hooked forever by an engine
    that will never restore it.
    """

    path: str
    original: Any

    def __init__(self, path: str, original: Any) -> None:
        if isinstance(self, torch.nn.Module):
            torch.nn.Module.__init__(self)  # first: the original may become a child
        self.path = path
        self.original = original
        # diffusers reads inspect.signature(processor.__call__) to decide which
        # cross_attention_kwargs to pass on: advertise the original's, so the same arrive.
        # A class-level __call__ (one subclass per signature), not an instance attribute:
        # torch.compile traces a class's __call__ but breaks the graph on an instance's.
        sig = _signature_of(original.__call__)
        if sig is not None:
            self.__class__ = _advertising(type(self), sig)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_unwrapped, (self.original,))


class ReplacedForward:
    """A hooked module's instance ``forward``: calls ``fn``; ``owner`` is the engine part
    that installed it. Copies and pickles of the module get ``original`` (the ``forward``
    found at install, bound to the copy) instead, as :class:`ProcessorWrapper` does."""

    def __init__(self, fn: Callable[..., Any], original: Any, owner: Any) -> None:
        self.fn = fn
        self.original = original
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_unwrapped, (self.original,))


#: one ReplacedForward object per hooked module, reused by every install: torch.compile
#: guards on the instance ``forward``, and a new object (or a freed one) would recompile
#: the model at every run
_SLOTS: weakref.WeakKeyDictionary[torch.nn.Module, ReplacedForward] = weakref.WeakKeyDictionary()


def _forward_slot(module: torch.nn.Module) -> ReplacedForward:
    slot = _SLOTS.get(module)
    if slot is None:
        slot = _SLOTS[module] = ReplacedForward(None, None, None)  # type: ignore[arg-type]
    return slot


def _taken(path: str, current: Any) -> None:
    if isinstance(current, (ProcessorWrapper, ReplacedForward)):
        raise GuidanceValueError(
            f"layer {path!r} is already hooked by another guidekit attention engine (entered "
            f"and not exited yet): one engine per layer at a time; exit the other `with` "
            f"block first, or compile one plan with both expressions"
        )


class _SdpaOwner(Protocol):
    _frames: list[Any]

    def _sdpa(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any: ...


class SdpaMode(TorchFunctionMode):
    """Routes ``scaled_dot_product_attention`` calls made inside a hooked plain module to
    ``owner._sdpa`` while ``owner._frames`` is not empty."""

    def __init__(self, owner: _SdpaOwner) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.owner._frames:
            return self.owner._sdpa(func, args, kwargs)
        return func(*args, **kwargs)


@attrs.define(eq=False)
class LayerHook:
    """One hooked layer and what restores it: its diffusers processor replaced by a
    wrapper (``kind="processor"``), or its ``forward`` replaced (``kind="forward"``: the
    ``scaled_dot_product_attention`` calls inside are intercepted, or SLG's block skip).

    What is replaced is read when the hook is INSTALLED (the engine's ``__enter__``), not
    when the engine is built, so exit puts back what the model held on entry.
    """

    path: str
    module: torch.nn.Module
    kind: str
    #: Flux joint attention: perturb the image queries only (text first)
    flux: bool = False
    original: Any = None
    had_forward: bool = False
    installed: bool = False

    @classmethod
    def processor(cls, path: str, module: torch.nn.Module) -> LayerHook:
        """A processor hook of a diffusers ``Attention``."""
        return cls(path, module, "processor")

    @classmethod
    def forward(cls, path: str, module: torch.nn.Module, *, flux: bool = False) -> LayerHook:
        """A forward hook of a plain module."""
        return cls(path, module, "forward", flux=flux)

    def install(self, make: Callable[[Any], Any], owner: Any = None) -> None:
        """Put in ``make(current)``: the processor, or the new ``forward`` (then wrapped in a
        :class:`ReplacedForward` of ``owner``). Refuses a layer another engine holds."""
        if self.kind == "processor":
            current = getattr(self.module, "get_processor")()  # noqa: B009 (typed as a Tensor)
            _taken(self.path, current)
            wrapper = make(current)
            self.original = current
            self.module.set_processor(wrapper)  # type: ignore[operator]
        else:
            current = self.module.forward
            _taken(self.path, current)
            wrapper = _forward_slot(self.module)
            wrapper.fn, wrapper.original, wrapper.owner = make(current), current, owner
            self.had_forward = "forward" in self.module.__dict__
            self.original = self.module.__dict__.get("forward")
            self.module.forward = wrapper  # type: ignore[method-assign]
        self.installed = True

    def restore(self) -> None:
        """Put back exactly what was found (an instance ``forward`` only if there was one)."""
        if not self.installed:
            return
        self.installed = False
        if self.kind == "processor":
            self.module.set_processor(self.original)  # type: ignore[operator]
        else:
            wrapper = self.module.__dict__.get("forward")
            if isinstance(wrapper, ReplacedForward):  # keep no engine alive through the slot
                wrapper.fn = wrapper.original = wrapper.owner = None  # type: ignore[assignment]
            if self.had_forward:
                self.module.forward = self.original  # type: ignore[method-assign]
            else:
                self.module.__dict__.pop("forward", None)


def restore_all(hooks: Iterable[LayerHook]) -> list[BaseException]:
    """Restore every installed hook, last first; the errors, after trying them all."""
    errors: list[BaseException] = []
    for hook in reversed(list(hooks)):
        if not hook.installed:
            continue
        try:
            hook.restore()
        except Exception as err:  # restore every other hook before reporting
            errors.append(err)
    return errors


class _Counted(Protocol):
    calls: int


def intercepting_forward(
    owner: _SdpaOwner, hook: LayerHook, open_frame: Callable[[], _Counted | None], lost: str
) -> Callable[[Any], Callable[..., Any]]:
    """A maker (for :meth:`LayerHook.install`) of a ``forward`` for ``hook.module`` that,
    while ``open_frame()`` gives a frame, runs the original with the module's SDPA calls
    routed to ``owner._sdpa`` (the frame counts them).

    A hooked layer that makes no SDPA call raises (``lost`` says what would be lost).
    """
    path = hook.path

    def make(original: Any) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            frame = open_frame()
            if frame is None:
                return original(*args, **kwargs)
            outermost = not owner._frames
            owner._frames.append(frame)
            try:
                if outermost:
                    with SdpaMode(owner):
                        out = original(*args, **kwargs)
                else:
                    out = original(*args, **kwargs)
            finally:
                owner._frames.pop()
            if frame.calls == 0:
                raise GuidanceValueError(
                    f"layer {path!r} made no torch.nn.functional.scaled_dot_product_attention "
                    f"call, so {lost}; hook the module that calls it (see guidekit.attention.engine)"
                )
            return out

        return forward

    return make


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class SdpaCall:
    """One intercepted ``scaled_dot_product_attention`` call, bound to its argument names and
    checked to carry the model call's ``rows`` as the first axis of ``query``/``key``/``value``.

    ``row_mask`` says the mask has the rows as its first axis (it is split with them); a
    broadcast mask is shared. :meth:`plain` runs the call on some row ranges unchanged.
    """

    def __init__(self, func: Any, args: Any, kwargs: dict[str, Any], path: str, rows: int) -> None:
        self.func = func
        self.bound = dict(zip(SDPA_ARGS, args))
        self.bound.update(kwargs)
        self.query, self.key, self.value = (self.bound[n] for n in ("query", "key", "value"))
        for name, t in (("query", self.query), ("key", self.key), ("value", self.value)):
            if t.shape[0] != rows:
                raise GuidanceValueError(
                    f"layer {path!r}: scaled_dot_product_attention got {name} with "
                    f"{t.shape[0]} rows in a model call of {rows}; the plain-module protocol "
                    f"needs the call's rows as the first axis (see guidekit.attention.engine)"
                )
        self.mask: Any = self.bound.get("attn_mask")
        self.row_mask = isinstance(self.mask, torch.Tensor) and (
            self.mask.ndim == self.query.ndim and self.mask.shape[0] == rows
        )

    def plain(self, ranges: Ranges) -> torch.Tensor:
        """The call's own attention of the rows in ``ranges``, in one call."""
        sub = dict(self.bound)
        sub["query"], sub["key"], sub["value"] = (
            take(t, ranges) for t in (self.query, self.key, self.value)
        )
        if self.row_mask:
            sub["attn_mask"] = take(self.mask, ranges)
        return self.func(**sub)  # type: ignore[no-any-return]
