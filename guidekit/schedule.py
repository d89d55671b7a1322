"""Scales as values that depend on the noise level: the :class:`Schedule` base and its algebra.

A schedule is a frozen attrs value (hashable, printed as its constructor call, read back by
:func:`guidekit.parse`) that gives a number at each noise level: ``schedule.at(level)``
with a :class:`~guidekit.schedules.progress.Level` (the call's sigma and, where known, the
run's schedule). A term's scale field takes one in place of a number (``CFG(Cosine(7))``,
``PAG(Window(3, 1, 5))``); the plan evaluates it once per noise level.

Linear terms turn their scales into branch coefficients with ordinary arithmetic
(``1 - w`` for CFG's ``u``, ``-s`` for a direction's negative branch); on schedules that
arithmetic builds an :class:`Affine` combination, which cancels exactly (``(1 - w) + w`` is
the number 1), so a term's weight stays a whole number whatever its scales are.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypeVar

import attrs

from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.text import display_name, fmt_call, fmt_number, is_number

T = TypeVar("T", bound=type)

#: constructor name -> schedule class, read by :func:`guidekit.parse` for argument values
SCHEDULES: dict[str, type] = {}


def register_schedule(cls: T) -> T:
    """Class decorator: make a schedule shape known to ``parse`` by its ``_name``."""
    SCHEDULES[display_name(cls)] = cls
    return cls


class Schedule:
    """Base of schedule values: a number per noise level (see the module docstring)."""

    __slots__ = ()
    _name: ClassVar[str] = "Schedule"
    _positional: ClassVar[tuple[str, ...]] = ()
    #: whether the value depends on the run's progress r (not on sigma alone)
    needs_progress: ClassVar[bool] = False

    def at(self, level: Any) -> float:
        """The value at ``level`` (a :class:`~guidekit.schedules.progress.Level`)."""
        raise NotImplementedError

    def progress_free(self) -> bool:
        """Whether the value is known from sigma alone (no run schedule needed)."""
        return not self.needs_progress

    def bounds(self) -> tuple[float, float]:
        """The least and the greatest value over every noise level (a field with a range,
        such as Rescale's ``phi`` in ``[0, 1]``, checks a schedule by them)."""
        raise NotImplementedError

    def is_zero(self) -> bool:
        """Whether the value is 0 at every level (its branches never need to run)."""
        return all(getattr(self, name) == 0 for name in self._zero_when)

    #: the fields that, all 0, make the schedule 0 everywhere
    _zero_when: ClassVar[tuple[str, ...]] = ("scale",)

    def zero_on(self, lo: float, hi: float) -> bool:
        """Whether the value is 0 at every sigma in ``(lo, hi]`` (then a gated entry of it
        never runs its branches; ``False`` where that cannot be told)."""
        return self.equals_on(0.0, lo, hi)

    def equals_on(self, value: float, lo: float, hi: float) -> bool:
        """Whether the value is ``value`` at every sigma in ``(lo, hi]`` (``False`` where
        that cannot be told): ``1 - w`` is 0 there when ``w`` is 1 there."""
        return value == 0 and self.is_zero()

    def _fmt(self) -> str:
        return fmt_call(self)

    def __repr__(self) -> str:
        return self._fmt()

    __str__ = __repr__

    def __bool__(self) -> bool:
        raise GuidanceTypeError(
            f"{self!r} has no truth value: it is a value per noise level; use .at(level)"
        )

    # -- the coefficient algebra of linear terms ------------------------------------------------
    def __add__(self, other: Any) -> Any:
        return combine(self, 1.0, other, 1.0)

    __radd__ = __add__

    def __sub__(self, other: Any) -> Any:
        return combine(self, 1.0, other, -1.0)

    def __rsub__(self, other: Any) -> Any:
        return combine(self, -1.0, other, 1.0)

    def __mul__(self, other: Any) -> Any:
        if hasattr(other, "entries"):
            raise GuidanceTypeError(
                f"{self!r} * {other!r}: a schedule scales a term through the term's scale, "
                f"e.g. {display_name(type(other))}({self!r}) in place of "
                f"{display_name(type(other))}(...) * a number"
            )
        if not is_number(other):
            return NotImplemented
        return combine(self, float(other), 0.0, 0.0)

    __rmul__ = __mul__

    def __neg__(self) -> Any:
        return combine(self, -1.0, 0.0, 0.0)


def _parts(value: Any) -> tuple[float, tuple[tuple[Schedule, float], ...]]:
    if isinstance(value, Affine):
        return value.const, value.parts
    if isinstance(value, Schedule):
        return 0.0, ((value, 1.0),)
    if is_number(value):
        return float(value), ()
    raise GuidanceTypeError(f"cannot combine a schedule with {value!r}: only numbers")


def combine(a: Any, ka: float, b: Any, kb: float) -> Any:
    """``ka a + kb b`` in normal form: a float when every schedule cancels, else an Affine."""
    const_a, parts_a = _parts(a)
    const_b, parts_b = _parts(b)
    const = ka * const_a + kb * const_b
    merged: dict[Schedule, float] = {}
    for k, parts in ((ka, parts_a), (kb, parts_b)):
        for s, c in parts:
            merged[s] = merged.get(s, 0.0) + k * c
    kept = tuple((s, c) for s, c in merged.items() if c != 0.0)
    if not kept:
        return const
    if not math.isfinite(const) or not all(math.isfinite(c) for _, c in kept):
        raise GuidanceValueError(f"a scale combination overflows: {const} and {kept}")
    return Affine(const, kept)


@attrs.frozen(repr=False)
class Affine(Schedule):
    """``const + sum(k * schedule)``: a branch coefficient built from scheduled scales.

    Internal (the coefficients of the linear form); a term's field holds a named shape.
    """

    const: float
    parts: tuple[tuple[Schedule, float], ...]

    @property
    def needs_progress(self) -> bool:  # type: ignore[override]
        return any(not s.progress_free() for s, _ in self.parts)

    def progress_free(self) -> bool:
        return not self.needs_progress

    def at(self, level: Any) -> float:
        return self.const + sum(k * s.at(level) for s, k in self.parts)

    def is_zero(self) -> bool:
        return self.const == 0 and all(s.is_zero() for s, _ in self.parts)

    def zero_on(self, lo: float, hi: float) -> bool:
        if self.const == 0 and all(s.zero_on(lo, hi) for s, _ in self.parts):
            return True
        if len(self.parts) == 1:  # const + k s is 0 where s is -const / k (CFG's 1 - w)
            (s, k), = self.parts
            return s.equals_on(-self.const / k, lo, hi)
        return False

    def _fmt(self) -> str:
        text = fmt_number(self.const) if self.const else ""
        for s, k in self.parts:
            sign = "-" if k < 0 else "+"
            body = repr(s) if abs(k) == 1 else f"{fmt_number(abs(k))} * {s!r}"
            text = f"{text} {sign} {body}" if text else (body if k > 0 else f"-{body}")
        return text


def value_at(value: Any, level: Any) -> float:
    """A scale or coefficient at ``level``: a number as it is, a schedule evaluated."""
    return value.at(level) if isinstance(value, Schedule) else value  # type: ignore[no-any-return]


def scheduled_fields(obj: Any) -> dict[str, Schedule]:
    """The fields of an attrs value (a term, processor, modifier) that hold a schedule; an
    item of a tuple field (PerpNeg's ``neg_scale``) is keyed ``name[i]``."""
    if not attrs.has(type(obj)):
        return {}
    out = {}
    for f in attrs.fields(type(obj)):
        value = getattr(obj, f.name)
        key = f.alias or f.name
        if isinstance(value, Schedule):
            out[key] = value
        elif isinstance(value, tuple):
            out.update((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, Schedule))
    return out


def _value_at(value: Any, level: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(value_at(v, level) for v in value)
    return value_at(value, level)


def resolve(obj: Any, level: Any) -> Any:
    """``obj`` with every scheduled field (or tuple item) replaced by its value at ``level``
    (itself when it has none): what a nonlinear term or a post-processor computes with at
    that step."""
    if not scheduled_fields(obj):
        return obj
    changed = {}
    for f in attrs.fields(type(obj)):
        value = getattr(obj, f.name)
        if isinstance(value, Schedule) or (
            isinstance(value, tuple) and any(isinstance(v, Schedule) for v in value)
        ):
            changed[f.alias or f.name] = _value_at(value, level)
    return attrs.evolve(obj, **changed)


def check_shape(where: str, value: Any) -> None:
    """Refuse an :class:`Affine` or unregistered schedule in a field: only named shapes print
    and parse back."""
    if isinstance(value, Affine) or display_name(type(value)) not in SCHEDULES:
        raise GuidanceTypeError(
            f"{where}: {value!r} is a combination of schedules; give one named shape "
            f"({', '.join(sorted(SCHEDULES))}), e.g. Piecewise((0, 1), (14, 7)) for a "
            f"scale that moves between noise levels"
        )
