"""Oracle for the guidance interval, https://arxiv.org/abs/2404.07724.

Guidance is applied only for noise levels ``lo < sigma <= hi`` and the plain conditional
``c`` is used elsewhere; the schedule is by noise level, not by step count. Outside its
interval a gated term's branches are not computed at all.
"""

from __future__ import annotations

import numpy as np
import pytest

import guidekit
from guidekit import CFG, Autoguidance, Cond

from ._support import BATCH, FakeModel, branch, conditioning, np64, t64, x_at

W, S = 5.0, 1.5
LO, HI = 0.5, 3.0
# above, at hi (inside), inside, at lo (outside), below
SIGMAS = (8.0, HI, 1.2, LO, 0.1)


def inside(sigma: float, lo: float = LO, hi: float = HI) -> bool:
    return lo < sigma <= hi


def _run(expr: guidekit.Expr, sigmas: tuple[float, ...] = SIGMAS
         ) -> tuple[list[np.ndarray], guidekit.Guided, FakeModel, FakeModel]:
    main, weak = FakeModel("main"), FakeModel("weak")
    plan = guidekit.compile(expr)
    guided = guidekit.guide(plan, main, cond=conditioning("cond"), uncond=conditioning("uncond"),
                            models={"weak": weak})
    outs = [np64(guided(t64(x_at(k)), s)) for k, s in enumerate(sigmas)]
    return outs, guided, main, weak


def test_gated_cfg_is_cfg_inside_and_cond_outside() -> None:
    """``CFG(w).between(lo, hi)``: CFG for ``lo < sigma <= hi``, ``c`` elsewhere; the
    boundary ``sigma == hi`` is inside and ``sigma == lo`` outside."""
    outs, guided, main, _ = _run(CFG(W).between(LO, HI))
    for out, sigma in zip(outs, SIGMAS):
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        want = u + W * (c - u) if inside(sigma) else c
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12, err_msg=f"sigma {sigma}")
    # outside, the unconditional branch is not computed: B rows instead of 2B
    assert [c["rows"] for c in main.calls] == [BATCH if not inside(s) else 2 * BATCH
                                              for s in SIGMAS]
    assert [r.branches for r in guided.calls] == [("c", "u") if inside(s) else ("c",)
                                                 for s in SIGMAS]


def test_gated_direction_contributes_zero_outside() -> None:
    """``CFG(w) + Autoguidance(s).between(lo, hi)``: plain CFG outside, and the weak model is
    not called there."""
    outs, _, main, weak = _run(CFG(W) + Autoguidance(S).between(LO, HI))
    for out, sigma in zip(outs, SIGMAS):
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        want = u + W * (c - u)
        if inside(sigma):
            want = want + S * (c - branch("weak", "cond", sigma))
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12, err_msg=f"sigma {sigma}")
    assert [c["sigma"][0].item() for c in weak.calls] == [s for s in SIGMAS if inside(s)]
    assert [c["rows"] for c in main.calls] == [2 * BATCH] * len(SIGMAS)


def test_nested_gates_intersect() -> None:
    """``P.between(a, b).between(c, d)`` is active on ``(max(a, c), min(b, d)]``."""
    sigmas = (9.0, 4.0, 3.0, 2.0, 1.0, 0.7, 0.5, 0.2)
    lo, hi = 0.7, 3.0  # the intersection of (0.5, 3] and (0.7, 4]
    outs, _, _, weak = _run(Cond() + Autoguidance(S).between(0.5, 3.0).between(0.7, 4.0), sigmas)
    for out, sigma in zip(outs, sigmas):
        c = branch("main", "cond", sigma)
        want = c + S * (c - branch("weak", "cond", sigma)) if inside(sigma, lo, hi) else c
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12, err_msg=f"sigma {sigma}")
    # the weak model runs at sigma = hi (inside) but not at lo = 0.7 (outside)
    assert [c["sigma"][0].item() for c in weak.calls] == [3.0, 2.0, 1.0]

    outs, _, main, _ = _run(CFG(W).between(0.5, 3.0).between(0.7, 4.0), sigmas)
    for out, sigma in zip(outs, sigmas):
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        want = u + W * (c - u) if inside(sigma, lo, hi) else c
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12, err_msg=f"sigma {sigma}")


@pytest.mark.parametrize("hi", [float("inf"), 2.0])
def test_open_and_closed_upper_bounds(hi: float) -> None:
    """``between(lo, inf)`` gates only from below; ``plan.rows`` agrees with the calls made."""
    expr = CFG(W).between(LO, hi)
    outs, _, main, _ = _run(expr)
    plan = guidekit.compile(expr)
    for out, sigma, call in zip(outs, SIGMAS, main.calls):
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        want = u + W * (c - u) if inside(sigma, LO, hi) else c
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
        assert plan.rows(sigma, BATCH) == call["rows"]
