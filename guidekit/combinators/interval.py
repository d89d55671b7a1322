"""Guidance interval: restrict a term to a range of noise levels.

https://arxiv.org/abs/2404.07724 -- guidance applied only for ``sigma`` in ``(lo, hi]``,
plain ``c`` elsewhere; scheduled by noise level, never by step count.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import attrs

from guidekit.branch import Branch
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.expr import ATOM, Entry, Expr, fmt_number, is_number, operand

#: A sigma this close (relatively) to a gate bound is that bound: float32 rounding of a float64
#: schedule moves a sigma by at most 2**-24 relatively, far less than two steps apart.
RTOL = 1e-6


def snap(sigma: float, bounds: Sequence[float], rtol: float = RTOL) -> float:
    """``sigma``, or the bound of the sorted ``bounds`` within ``rtol`` of it.

    Gates compare ``lo < sigma <= hi`` on the bound itself, so the same steps are selected
    whether the sampler hands sigmas over in float64 or rounded to float32.
    """
    i = bisect.bisect_left(bounds, sigma)
    for b in bounds[max(i - 1, 0) : i + 1]:
        if abs(sigma - b) <= rtol * abs(b):
            return float(b)
    return sigma


@attrs.frozen(repr=False)
class Gated(Expr):
    """``expr.between(lo, hi)``: active while ``lo < sigma <= hi``.

    Outside the interval a direction is zero (its branches are not computed) and a
    prediction ``P`` is ``Cond()``: ``P.between(lo, hi) == Cond() + (P - Cond()).between(lo, hi)``.
    Nested gates intersect.
    """

    expr: Expr
    lo: float
    hi: float
    level: ClassVar[int] = ATOM

    @property
    def weight(self) -> int:
        return self.expr.weight

    def children(self) -> tuple[Expr, ...]:
        return (self.expr,)

    def entries(self) -> tuple[Entry, ...]:
        out = []
        if self.expr.weight == 1:
            out.append(Entry(Branch(), 1.0))
        for e in self.expr.entries():
            lo, hi = max(e.lo, self.lo), min(e.hi, self.hi)
            if lo < hi:
                out.append(Entry(e.atom, e.coef, lo, hi))
        if self.expr.weight == 1:
            out.append(Entry(Branch(), -1.0, self.lo, self.hi))
        return tuple(out)

    def _fmt(self) -> str:
        return f"{self.expr.fmt_at(ATOM)}.between({fmt_number(self.lo)}, {fmt_number(self.hi)})"


def gate(expr: Any, lo: Any, hi: Any) -> Gated:
    expr = operand(expr, "gate", None)
    where = f"{expr!r}.between({lo!r}, {hi!r})"
    for value in (lo, hi):
        if not is_number(value) or math.isnan(float(value)):
            raise GuidanceTypeError(f"{where}: the bounds must be numbers (noise levels sigma)")
    lo, hi = float(lo), float(hi)
    if lo > hi:
        raise GuidanceValueError(
            f"{where}: lo > hi, the interval is empty; the bounds are noise levels (sigma, "
            f"large = noisy) with lo < hi, probably meant .between({fmt_number(hi)}, {fmt_number(lo)})"
        )
    if lo < 0 or math.isinf(lo):
        raise GuidanceValueError(
            f"{where}: lo must be a finite noise level >= 0 (use 0 for 'down to the end')"
        )
    if lo == hi:
        raise GuidanceValueError(
            f"{where}: lo == hi, the interval (lo, hi] is empty; give lo < hi, e.g. "
            f".between({fmt_number(lo)}, {fmt_number(hi * 2 if hi > 0 else 1)})"
        )
    if lo < 0 or math.isinf(lo):
        raise GuidanceValueError(
            f"{where}: lo must be a finite noise level >= 0 (use 0 for 'down to the end')"
        )
    return Gated(expr, lo, hi)
