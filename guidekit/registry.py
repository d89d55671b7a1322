"""Every public term, post-processor and modifier by the name ``parse`` and ``repr`` use.

A term registers itself: its module decorates the class with :func:`register`, so adding a
term is adding its module (and importing it from ``guidekit/terms/__init__.py`` or
``guidekit/combinators/__init__.py``, which is what loads it). This module imports no term;
the parser, the law tests and the docs read the tables it fills.
"""

from __future__ import annotations

from typing import Any, TypeVar

from guidekit.errors import GuidanceValueError
from guidekit.text import display_name

T = TypeVar("T", bound=type)

#: constructor name -> class, e.g. ``"CFG" -> CFGTerm`` (filled as the term modules load)
TERMS: dict[str, type] = {}
PROCESSORS: dict[str, type] = {}
CONSTRUCTORS: dict[str, type] = {}

#: the kinds :func:`kind` reports; each base class names its own in ``_kind``
#: ("sampler": a term that changes the sampler's step, CFG++; see guidekit/renoise.py)
KINDS = (
    "prediction", "direction", "nonlinear", "processor", "modifier", "attention", "sampler",
)


def register(cls: T) -> T:
    """Class decorator: make ``cls`` known to ``parse`` and the registry by its ``_name``.

    Put it above ``@attrs.frozen`` so the final (slotted) class is the one registered. A
    second class under a taken name is an error; the same class again (a module reload) is
    not.
    """
    kind(cls)  # a class that is neither a term nor a processor is refused here
    name = display_name(cls)
    taken = CONSTRUCTORS.get(name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (
        cls.__module__, cls.__qualname__
    ):
        raise GuidanceValueError(
            f"two constructors named {name!r}: {taken.__module__}.{taken.__qualname__} and "
            f"{cls.__module__}.{cls.__qualname__}; give the new one another _name"
        )
    table = PROCESSORS if kind(cls) in ("processor", "modifier", "attention") else TERMS
    table[name] = cls
    CONSTRUCTORS[name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget the constructor ``name`` (for tests that define a term of their own)."""
    CONSTRUCTORS.pop(name, None)
    TERMS.pop(name, None)
    PROCESSORS.pop(name, None)


def term_classes() -> tuple[type, ...]:
    """The registered term classes, in the order their modules registered them."""
    return tuple(TERMS.values())


def processor_classes() -> tuple[type, ...]:
    """The registered post-processor and modifier classes."""
    return tuple(PROCESSORS.values())


def kind(cls: type) -> str:
    """``"prediction"``, ``"direction"``, ``"nonlinear"``, ``"processor"``, ``"modifier"``
    (conditioning) or ``"attention"`` (an attention modifier: PLADIS, GAG, NAG)."""
    found = getattr(cls, "_kind", None)
    if found not in KINDS:
        raise GuidanceValueError(
            f"{getattr(cls, '__name__', cls)!r} is not a term or post-processor class: derive "
            f"it from a base in guidekit.terms.base or guidekit.processor"
        )
    return str(found)


def __getattr__(name: str) -> Any:
    # the tuples of the hand-written registry this module replaced, read live
    if name == "TERM_CLASSES":
        return term_classes()
    if name == "PROCESSOR_CLASSES":
        return processor_classes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
