"""Base classes of guidance terms: leaf values of the expression tree.

A term is a frozen attrs value. Its fields are plain numbers, strings and tuples (never
tensors or callables), so equal terms hash equal and two equal terms are one atom of the plan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from guidekit.branch import Branch
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.expr import ATOM, Entry, Expr, display_name, fmt_number, is_number

if TYPE_CHECKING:
    import torch

    from guidekit.context import StepContext


def fmt_value(value: Any) -> str:
    """Text for a field value that :func:`guidekit.parse` reads back."""
    if is_number(value):
        return fmt_number(value)
    if isinstance(value, tuple):
        inner = ", ".join(fmt_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def fmt_call(obj: Any) -> str:
    """``Name(positional..., keyword=value...)`` with defaults left out."""
    cls = type(obj)
    positional: tuple[str, ...] = getattr(cls, "_positional", ())
    args = []
    for field in attrs.fields(cls):
        if not field.init or not field.repr:
            continue
        value = getattr(obj, field.name)
        if field.name in positional:
            args.append(fmt_value(value))
        elif field.default is attrs.NOTHING or value != field.default:
            args.append(f"{field.name}={fmt_value(value)}")
    return f"{display_name(cls)}({', '.join(args)})"


# -- field converters and validators that name the term ---------------------------------------


def to_float(value: Any) -> Any:
    """Convert numbers to float; leave anything else for the validator to reject by name."""
    return float(value) if is_number(value) else value


def _where(instance: Any, attribute: attrs.Attribute) -> str:
    return f"{display_name(type(instance))}({attribute.name}=...)"


def number(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, float):
        raise GuidanceTypeError(
            f"{_where(instance, attribute)}: {attribute.name} must be a Python number, "
            f"got {type(value).__name__} {value!r}"
            + ("; use float(t) for a tensor" if hasattr(value, "shape") else "")
        )
    if math.isnan(value):
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} is NaN; it must be a finite number"
        )


def finite(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    number(instance, attribute, value)
    if not math.isfinite(value):
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must be finite, got {value}"
        )


def nonnegative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    finite(instance, attribute, value)
    if value < 0:
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must be >= 0, got {fmt_number(value)}"
        )


def positive_or_none(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    finite(instance, attribute, value)
    if value <= 0:
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must be > 0 (or None to turn it "
            f"off), got {fmt_number(value)}"
        )


def unit_interval(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    finite(instance, attribute, value)
    if not 0 <= value <= 1:
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must lie in [0, 1], "
            f"got {fmt_number(value)}"
        )


def name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise GuidanceTypeError(
            f"{_where(instance, attribute)}: {attribute.name} must be a name such as 'weak', "
            f"got {value!r}"
        )


def count(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must be a whole number >= 0, "
            f"got {value!r}"
        )


# -- term kinds ---------------------------------------------------------------------------------


class Term(Expr):
    """A leaf of the expression tree, printed as its constructor call."""

    __slots__ = ()
    level: ClassVar[int] = ATOM
    _name: ClassVar[str] = "Term"
    _positional: ClassVar[tuple[str, ...]] = ()
    _example: ClassVar[str] = "Term()"

    def _fmt(self) -> str:
        return fmt_call(self)


class LinearTerm(Term):
    """A term that is a fixed linear combination of branches."""

    __slots__ = ()

    def coefficients(self) -> dict[Branch, float]:
        raise NotImplementedError

    def entries(self) -> tuple[Entry, ...]:
        return tuple(Entry(b, c) for b, c in self.coefficients().items())

    @property
    def weight(self) -> int:
        return round(sum(self.coefficients().values()))


class DirectionTerm(LinearTerm):
    """``scale * (positive - negative)``: the additive guidance convention of PAG/SEG/SLG."""

    __slots__ = ()

    def negative(self) -> Branch:
        raise NotImplementedError

    def positive(self) -> Branch:
        return Branch()

    def coefficients(self) -> dict[Branch, float]:
        s: float = self.scale  # type: ignore[attr-defined]
        return {self.positive(): s, self.negative(): -s}

    @property
    def weight(self) -> int:
        return 0


class NonlinearPrediction(Term):
    """A prediction that is not linear in its branches (CFG-Zero*, TCFG).

    The plan treats it as one atom: it asks for ``atom_branches()`` and calls ``evaluate``
    with their outputs converted to ``space`` (``"native"`` is the model's own space).
    """

    __slots__ = ()
    space: ClassVar[str] = "native"

    @property
    def weight(self) -> int:
        return 1

    def entries(self) -> tuple[Entry, ...]:
        return (Entry(self, 1.0),)

    def atom_branches(self) -> tuple[Branch, ...]:
        raise NotImplementedError

    def evaluate(self, values: Mapping[Branch, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError
