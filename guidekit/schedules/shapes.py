"""Schedules by sigma alone: a constant, piecewise linear between noise levels, and a window.

``Window(w, lo, hi)`` is the interval gate as a schedule: ``w`` on ``lo < sigma <= hi`` and
``outside`` (default 0) elsewhere, so ``PAG(Window(3, lo, hi)) == PAG(3).between(lo, hi)``
step by step, rows included, and ``CFG(Window(w, lo, hi, outside=1))`` is
``CFG(w).between(lo, hi)`` (plain ``c`` outside).
"""

from __future__ import annotations

import bisect
from typing import Any, ClassVar

import attrs

from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.fields import finite, to_float
from guidekit.misuse import gate_bounds
from guidekit.schedule import Schedule, register_schedule
from guidekit.schedules.progress import Level
from guidekit.text import fmt_number, is_number


@register_schedule
@attrs.frozen(repr=False)
class Constant(Schedule):
    """``Constant(w)``: ``w`` at every noise level (equal in effect to the number ``w``)."""

    value: float = attrs.field(converter=to_float, validator=finite)
    _name: ClassVar[str] = "Constant"
    _zero_when: ClassVar[tuple[str, ...]] = ("value",)
    _positional: ClassVar[tuple[str, ...]] = ("value",)

    def at(self, level: Any) -> float:
        return self.value

    def bounds(self) -> tuple[float, float]:
        return self.value, self.value

    def equals_on(self, value: float, lo: float, hi: float) -> bool:
        return self.value == value


def _points(value: Any) -> tuple[tuple[float, float], ...]:
    if not isinstance(value, tuple) or not value:
        raise GuidanceTypeError(
            f"Piecewise(...): give (sigma, value) points, e.g. Piecewise((0, 1), (14, 7)); "
            f"got {value!r}"
        )
    out = []
    for p in value:
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(is_number(v) for v in p)):
            raise GuidanceTypeError(
                f"Piecewise(...): each point is a (sigma, value) pair of numbers, got {p!r}"
            )
        out.append((float(p[0]), float(p[1])))
    return tuple(out)


@register_schedule
@attrs.frozen(repr=False, init=False)
class Piecewise(Schedule):
    """``Piecewise((s0, v0), (s1, v1), ...)``: linear in sigma between the points, constant
    beyond the first and last; noise levels ``s0 < s1 < ...`` (``0 <= s``, finite)."""

    points: tuple[tuple[float, float], ...] = attrs.field(converter=_points)
    _name: ClassVar[str] = "Piecewise"

    def is_zero(self) -> bool:
        return all(v == 0 for _, v in self.points)

    def equals_on(self, value: float, lo: float, hi: float) -> bool:
        # continuous and linear between points: ``value`` on (lo, hi] iff it is that at both
        # ends and at every point between
        inside = [Level(s) for s, _ in self.points if lo < s < hi]
        ends = [Level(max(lo, 0.0)), Level(hi if hi != float("inf") else self.points[-1][0])]
        return all(self.at(lv) == value for lv in (*ends, *inside))

    def bounds(self) -> tuple[float, float]:
        values = [v for _, v in self.points]  # linear between points: extremes at points
        return min(values), max(values)

    def __init__(self, *points: Any) -> None:
        self.__attrs_init__(points)  # type: ignore[attr-defined]

    def __attrs_post_init__(self) -> None:
        sigmas = [s for s, _ in self.points]
        for s, v in self.points:
            if not (0 <= s < float("inf")) or v != v or abs(v) == float("inf"):
                raise GuidanceValueError(
                    f"{self!r}: each point is (sigma, value) with a finite noise level >= 0 "
                    f"and a finite value, got ({fmt_number(s)}, {fmt_number(v)})"
                )
        if any(b <= a for a, b in zip(sigmas, sigmas[1:])):
            raise GuidanceValueError(
                f"{self!r}: the points' noise levels must increase strictly, e.g. "
                f"Piecewise((0, 1), (2, 4), (14, 7))"
            )

    def at(self, level: Any) -> float:
        sigma = level.sigma
        pts = self.points
        sigmas = [s for s, _ in pts]
        j = bisect.bisect_left(sigmas, sigma)
        if j == 0:
            return pts[0][1]
        if j == len(pts):
            return pts[-1][1]
        (s0, v0), (s1, v1) = pts[j - 1], pts[j]
        return v0 + (v1 - v0) * (sigma - s0) / (s1 - s0)

    def _fmt(self) -> str:
        pts = ", ".join(f"({fmt_number(s)}, {fmt_number(v)})" for s, v in self.points)
        return f"Piecewise({pts})"


@register_schedule
@attrs.frozen(repr=False)
class Window(Schedule):
    """``Window(w, lo, hi, outside=0)``: ``w`` while ``lo < sigma <= hi``, ``outside`` elsewhere
    (the interval gate of arXiv 2404.07724 as a 0/1 schedule times ``w``)."""

    value: float = attrs.field(converter=to_float, validator=finite)
    lo: float = attrs.field(converter=to_float)
    hi: float = attrs.field(converter=to_float)
    outside: float = attrs.field(default=0.0, converter=to_float, validator=finite)
    _name: ClassVar[str] = "Window"
    _zero_when: ClassVar[tuple[str, ...]] = ("value", "outside")
    _positional: ClassVar[tuple[str, ...]] = ("value", "lo", "hi")

    def __attrs_post_init__(self) -> None:
        gate_bounds(
            f"Window({fmt_number(self.value)}, {self.lo!r}, {self.hi!r})", self.lo, self.hi
        )

    def at(self, level: Any) -> float:
        return self.value if self.lo < level.sigma <= self.hi else self.outside

    def bounds(self) -> tuple[float, float]:
        return min(self.value, self.outside), max(self.value, self.outside)

    def equals_on(self, value: float, lo: float, hi: float) -> bool:
        meets = max(lo, self.lo) < min(hi, self.hi)
        within = self.lo <= lo and hi <= self.hi
        return (self.value == value or not meets) and (self.outside == value or within)
