"""Oracles for ICG, independent condition guidance, through the compiled plan.

https://arxiv.org/abs/2407.02687 -- ``u_r + w (c - u_r)``, ``u_r`` the prediction under a
condition drawn at random from the real ones. The pool is P real conditions stacked along
the first axis; each sample draws one per sampler step from the run's seeded draws.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import guidekit
from guidekit import CADS, ICG, parse
from guidekit.errors import GuidanceValueError
from guidekit.schedules import Linear
from guidekit.schedules.steps import level_at

from ._support import BATCH, FakeModel, branch, branch_value, conditioning, np64, t64, x_at

SIGMAS = (9.0, 5.0, 2.5, 1.2, 0.4, 0.1)
POOL = torch.arange(7, dtype=torch.int64) + 7000  # P = 7 real conditions, tags 7000..7006


def _guided(expr: guidekit.Expr, seed: int = 0, **kw: object) -> tuple[guidekit.Guided, FakeModel]:
    main = FakeModel("main")
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    guided = guidekit.guide(
        plan, main, cond=conditioning("cond"), conds={"icg": {"tag": POOL}}, seed=seed, **kw
    )
    return guided, main


def _drawn(main: FakeModel) -> list[list[int]]:
    """The pool tags the model received for the u_r rows (the second block), per call."""
    return [c["tag"][BATCH:].tolist() for c in main.calls]


@pytest.mark.parametrize("w", [3.0, 1.5, -0.5])
def test_icg_matches_the_paper(w: float) -> None:
    """Every step: c, then B rows each holding ONE pool member; out = u_r + w (c - u_r)."""
    expr = ICG(w)
    assert parse(str(expr)) == expr
    assert "pooled conditionings: icg" in str(guidekit.compile(expr, prediction="eps"))
    guided, main = _guided(expr)
    for k, sigma in enumerate(SIGMAS):
        out = np64(guided(t64(x_at(k)), sigma))
        drawn = _drawn(main)[-1]
        assert set(drawn) <= set(POOL.tolist())
        u_r = np.stack([branch_value("main", t, sigma) for t in drawn])
        c = branch("main", "cond", sigma)
        np.testing.assert_allclose(out, u_r + w * (c - u_r), rtol=1e-12, atol=1e-12)
    assert [c["rows"] for c in main.calls] == [2 * BATCH] * len(SIGMAS)


def test_draws_are_per_sample_per_step_and_cover_the_pool() -> None:
    guided, main = _guided(ICG(3))
    for k in range(40):
        guided(t64(x_at(0)), 50.0 - k)
    drawn = np.array(_drawn(main))  # [steps, B]
    assert set(drawn.ravel().tolist()) == set(POOL.tolist())  # every real condition drawn
    assert len({tuple(r) for r in drawn}) > 30  # redrawn at every step
    assert any(len(set(r)) > 1 for r in drawn)  # samples draw independently


def test_draws_follow_the_run_seed_and_reset() -> None:
    a, main_a = _guided(ICG(3), seed=5)
    b, main_b = _guided(ICG(3), seed=5)
    c, main_c = _guided(ICG(3), seed=6)
    for k, sigma in enumerate(SIGMAS):
        for g in (a, b, c):
            g(t64(x_at(k)), sigma)
    assert _drawn(main_a) == _drawn(main_b)  # same seed: same draws, nothing shared
    assert _drawn(main_a) != _drawn(main_c)
    first = _drawn(main_a)
    a.reset()
    for k, sigma in enumerate(SIGMAS):
        a(t64(x_at(k)), sigma)
    assert _drawn(main_a)[len(SIGMAS):] == first  # a new run starts the draws again


def test_a_second_call_in_a_step_sees_the_same_draw() -> None:
    """Heun evaluates again at a level; DPM-2 between levels: neither redraws."""
    guided, main = _guided(ICG(3), sigmas=[9.0, 2.5, 0.4, 0.0])
    guided(t64(x_at(0)), 9.0)
    guided(t64(x_at(0)), 4.0)  # a midpoint: belongs to the step at 9
    guided(t64(x_at(0)), 9.0)  # the same level again
    guided(t64(x_at(0)), 2.5)
    d = _drawn(main)
    assert d[0] == d[1] == d[2] and d[3] != d[0]


def test_cads_anneals_the_drawn_rows() -> None:
    """Input modifiers see B gathered rows, not the pool."""
    emb = torch.randn(7, 4, dtype=torch.float64)
    main = FakeModel("main")
    plan = guidekit.compile(ICG(3) | CADS(tau1=0.0, tau2=0.01), prediction="eps", noise="ve")
    cond = conditioning("cond", emb=torch.randn(BATCH, 4, dtype=torch.float64))
    guided = guidekit.guide(plan, main, cond=cond, conds={"icg": {"tag": POOL, "emb": emb}})
    guided(t64(x_at(0)), 9.0)
    call = main.calls[0]
    assert call["emb"].shape == (2 * BATCH, 4)
    rows = call["tag"][BATCH:] - 7000
    annealed = call["emb"][BATCH:]
    assert not torch.allclose(annealed, emb[rows])  # noise was added after the gather


def test_a_bad_pool_is_refused_by_name() -> None:
    plan = guidekit.compile(ICG(3), prediction="eps")
    bad = {"tag": POOL, "other": torch.zeros(3)}
    guided = guidekit.guide(plan, FakeModel("main"), cond=conditioning("cond"), conds={"icg": bad})
    with pytest.raises(GuidanceValueError, match="'icg'.*different leading sizes"):
        guided(t64(x_at(0)), 9.0)
    with pytest.raises(GuidanceValueError, match="'icg'"):
        guidekit.guide(plan, FakeModel("main"), cond=conditioning("cond"))
    with pytest.raises(GuidanceValueError, match="different names"):
        ICG(3, pool="cond")



def test_a_scheduled_scale_equals_the_constant_of_each_step_and_drops_c_at_zero() -> None:
    """``ICG(Linear(2))`` on the run's schedule: at step k, ``u_r + w_k (c - u_r)`` with the
    same draws as a constant-scale run (the pool is drawn per step, whatever the scale); at
    ``w = 0`` (the first step) the plan runs the drawn rows only."""
    sched, sigmas = Linear(2), SIGMAS + (0.0,)
    expr = ICG(sched)
    assert parse(str(expr)) == expr
    guided, main = _guided(expr, sigmas=sigmas)
    const, cmain = _guided(ICG(3), sigmas=sigmas)
    for k, sigma in enumerate(SIGMAS):
        out = np64(guided(t64(x_at(k)), sigma))
        const(t64(x_at(k)), sigma)
        w = sched.at(level_at(sigma, sigmas))
        call = main.calls[-1]
        drawn = call["tag"][-BATCH:].tolist()
        assert drawn == cmain.calls[-1]["tag"][-BATCH:].tolist()
        u_r = np.stack([branch_value("main", t, sigma) for t in drawn])
        c = branch("main", "cond", sigma)
        np.testing.assert_allclose(out, u_r + w * (c - u_r), rtol=1e-12, atol=1e-12)
        assert call["rows"] == (BATCH if k == 0 else 2 * BATCH)
    assert sched.at(level_at(SIGMAS[0], sigmas)) == 0
