"""Scheduled scales of the named-condition terms and of the post-processors' weights.

Each case builds one expression from its scales: with schedules (``Toward(Cosine(3), ...)``)
and, at each step, with the numbers those schedules take there. Through
``guidekit.guide(..., sigmas=...)`` on the run's schedule the scheduled run must equal,
step by step, the constant run at that step's values -- in numbers and in the rows the model
is called with (a scale of 0 at a step drops the branches it weighs there) -- and print and
parse back. Linear terms turn their scales into Affine coefficients; PerpNeg and the
post-processors are resolved to numbers per level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import guidekit
from guidekit import APG, CFG, FDG, PerpNeg, Rescale, Toward, Uncond, composable, dual_cfg, parse
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.schedules import Cosine, Level, Linear, Piecewise, Window

from ._support import FakeModel, conditioning, np64, t64, x_at

#: the run's schedule: the steps are at r = 0, 1/2, 1 (Cosine and Linear are 0 at r = 0)
SIGMAS = (9.0, 2.5, 0.4, 0.0)
CONDS = ("style", "neg", "neg2")


def _run(expr: guidekit.Expr) -> tuple[np.ndarray, list[int]]:
    """One step at ``SIGMAS[k]`` for each k, with a fresh run of ``expr``: outputs and rows."""
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    model = FakeModel("main")
    guided = guidekit.guide(
        plan, model, cond=conditioning("cond"), uncond=conditioning("uncond"),
        conds={n: conditioning(n) for n in CONDS}, sigmas=SIGMAS,
    )
    outs, rows = [], []
    for k, s in enumerate(SIGMAS[:-1]):
        before = len(model.calls)
        outs.append(np64(guided(t64(x_at(k)), s)))
        rows.append(sum(c["rows"] for c in model.calls[before:]))
    return np.stack(outs), rows


Make = Callable[..., guidekit.Expr]

CASES: dict[str, tuple[Make, tuple[Any, ...]]] = {
    "toward": (lambda w: Uncond() + Toward(w, "style"), (Cosine(3),)),
    "toward-negative": (lambda w: CFG(5) - Toward(w, "neg", negative="neg2"), (Linear(1.5),)),
    "composable": (lambda a, b: composable({"cond": a, "style": b}), (Linear(2), Window(-1, 1, 10))),
    "perpneg": (lambda w: PerpNeg(w, negative="neg"), (Cosine(5),)),
    "perpneg-weights": (
        lambda w, a: PerpNeg(w, negative=("neg", "neg2"), neg_scale=(a, 0.5)),
        (Window(7, 1, 10), Linear(1)),
    ),
    "perpneg-all-weights-zero": (
        lambda a: PerpNeg(4, negative=("neg", "neg2"), neg_scale=a), (Piecewise((1, 1), (3, 0)),),
    ),
    "dual": (lambda a, b: dual_cfg(a, b, cond2="style"), (Cosine(3), Linear(2.5))),
    "dual-nested-inner": (lambda a: dual_cfg(a, 2, cond2="style", nested=True), (Cosine(3),)),
    "dual-nested-outer": (lambda b: dual_cfg(3, b, cond2="style", nested=True), (Linear(2),)),
    "fdg": (lambda lo, e: FDG(low=lo, high=6, eta=e), (Cosine(3), Window(0.5, 1, 10, outside=1))),
    "apg-eta": (lambda e: CFG(4) | APG(eta=e), (Linear(0.5),)),
    "rescale-phi": (lambda p: CFG(4) | Rescale(p), (Window(0.7, 1, 10),)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_scheduled_scale_equals_the_constant_at_each_steps_value(name: str) -> None:
    make, schedules = CASES[name]
    scheduled = make(*schedules)
    assert parse(str(scheduled)) == scheduled
    got, rows = _run(scheduled)
    values = []
    for k, s in enumerate(SIGMAS[:-1]):
        at = [sch.at(Level(s, SIGMAS)) for sch in schedules]
        values.append(at)
        want, want_rows = _run(make(*at))
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12)
        assert rows[k] == want_rows[k], f"step {k}: {rows[k]} rows, constant {want_rows[k]}"
    assert len({tuple(v) for v in values}) > 1  # the schedule moved over the run


def test_a_zero_scale_drops_the_branches_it_weighs_that_step() -> None:
    """Cosine is 0 at the first step: Toward's style rows and PerpNeg's c and negative rows
    are not computed there; a zero-weight negative alone drops only its own rows."""
    assert _run(Uncond() + Toward(Cosine(3), "style"))[1] == [3, 6, 6]
    assert _run(PerpNeg(Cosine(5), negative="neg"))[1] == [3, 9, 9]
    two = PerpNeg(4, negative=("neg", "neg2"), neg_scale=(Linear(1), 0.5))
    assert _run(two)[1] == [9, 12, 12]
    plan = guidekit.compile(PerpNeg(Window(7, 1, 10), negative="neg"), prediction="eps", noise="ve")
    assert plan.rows(0.4, sigmas=SIGMAS) == 1 and plan.rows(2.5, sigmas=SIGMAS) == 3


def test_what_cannot_hold_a_schedule_is_refused_by_name() -> None:
    with pytest.raises(GuidanceTypeError, match=r"dual_cfg.*nested=True.*product of two"):
        dual_cfg(Cosine(3), Linear(2), nested=True)
    with pytest.raises(GuidanceValueError, match=r"Rescale\(phi=...\).*\[0, 1\].*0 to 1.4"):
        Rescale(Linear(0.7))
    with pytest.raises(GuidanceTypeError, match=r"APG\(momentum=...\).*takes a number"):
        APG(momentum=Linear(0.5))
    with pytest.raises(GuidanceTypeError, match=r"combination of schedules"):
        PerpNeg(3, neg_scale=(1 - Cosine(1),))
