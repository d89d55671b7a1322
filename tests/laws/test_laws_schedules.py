"""The laws of scales by noise level (guidekit.schedules), with hypothesis.

* a constant schedule (``Constant(w)``, a flat ``Piecewise``) equals the number ``w``, in
  numbers and rows;
* a 0/1 schedule equals the gate: ``D(Window(s, lo, hi)) == D(s).between(lo, hi)`` for a
  direction and ``CFG(Window(w, lo, hi, outside=1)) == CFG(w).between(lo, hi)``, in numbers
  and in the rows each step runs (a scale of 0 drops its branches, as a gate does).

The other laws (tests/laws/test_laws.py) draw schedules wherever a term's scale is drawn
(``BY_VALIDATOR`` in tests/strategies/values.py).
"""

from __future__ import annotations

from typing import Any

import attrs
from _law_checks import GATE_SIGMAS, compile_for, same_numbers, same_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import ROW_SIGMAS, SCALES, gate_bounds, predictions, strategy_for, worlds

from guidekit import CFG, Cond, fields
from guidekit.expr import Expr
from guidekit.registry import kind, term_classes
from guidekit.schedules import Constant, Piecewise, Window
from guidekit.terms.base import DirectionTerm

SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    max_examples=40)


def scale_fields(cls: type) -> list[str]:
    return [f.alias or f.name for f in attrs.fields(cls) if f.validator is fields.finite_or_schedule]


SCHEDULED = [c for c in term_classes() if scale_fields(c)]
# a direction (weight 0): PAG-like terms and Toward, whose negative side is a name
DIRECTIONS = [c for c in SCHEDULED if issubclass(c, DirectionTerm) or kind(c) == "direction"]


def as_prediction(p: Expr, t: Expr) -> Expr:
    return t if t.weight == 1 else p + t


@st.composite
def flat(draw: st.DrawFn, value: float) -> Any:
    """A schedule that is ``value`` at every noise level."""
    lo = draw(st.sampled_from((0.0, 0.3, 1.0)))
    return draw(st.sampled_from((
        Constant(value), Piecewise((lo, value)), Piecewise((lo, value), (lo + 5, value)),
        Window(value, 0, float("inf"), outside=value),
    )))


@SETTINGS
@given(data=st.data())
def test_a_constant_schedule_equals_the_constant(data: st.DataObject) -> None:
    drawn = data.draw(st.one_of([strategy_for(c) for c in SCHEDULED]), label="term")
    numeric = {n: data.draw(SCALES, label=n) for n in scale_fields(type(drawn))}
    term = attrs.evolve(drawn, **numeric)
    scheduled = attrs.evolve(term, **{n: data.draw(flat(v), label=n) for n, v in numeric.items()})
    p = data.draw(predictions(linear=True), label="prediction")
    world = data.draw(worlds(), label="world")
    a, b = as_prediction(p, term), as_prediction(p, scheduled)
    same_numbers([a, b], world, "a constant schedule equals the constant")
    same_rows([(a, compile_for(a)), (b, compile_for(b))], data.draw(st.integers(1, 3)), ROW_SIGMAS)


@SETTINGS
@given(data=st.data())
def test_a_window_schedule_equals_the_gate(data: st.DataObject) -> None:
    lo, hi = data.draw(gate_bounds(), label="bounds")
    s = data.draw(SCALES, label="scale")
    use_cfg = data.draw(st.booleans(), label="cfg")
    if use_cfg:
        p = Cond()
        scheduled: Expr = CFG(Window(s, lo, hi, outside=1))
        gated: Expr = CFG(s).between(lo, hi)
    else:
        d = data.draw(st.one_of([strategy_for(c) for c in DIRECTIONS]), label="direction")
        p = data.draw(predictions(linear=True), label="prediction")
        scheduled = p + attrs.evolve(d, scale=Window(s, lo, hi))
        gated = p + attrs.evolve(d, scale=s).between(lo, hi)
    world = data.draw(worlds(), label="world")
    same_numbers([gated, scheduled], world, "a 0/1 schedule equals the gate")
    same_rows([(gated, compile_for(gated)), (scheduled, compile_for(scheduled))],
              data.draw(st.integers(1, 3)), GATE_SIGMAS)


def test_the_laws_see_scheduled_terms() -> None:
    assert {c.__name__ for c in DIRECTIONS} >= {"PAGTerm", "AutoguidanceTerm", "TPGTerm", "TowardTerm"}
    assert {c.__name__ for c in SCHEDULED} >= {"PerpNegTerm", "FDGTerm", "BetaCFGTerm"}
    assert all(kind(c) in ("prediction", "direction", "nonlinear") for c in SCHEDULED)
