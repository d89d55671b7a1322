"""Oracles for CFG, Cond, Uncond and Autoguidance, computed through the compiled plan.

CFG: https://arxiv.org/abs/2207.12598 -- ``u + w (c - u)``.
Autoguidance: https://arxiv.org/abs/2406.02507 -- ``d0 + w (d1 - d0)`` with a weak model ``d0``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import guidekit
from guidekit import CFG, Autoguidance, Cond, Uncond

from ._support import BATCH, FakeModel, branch, conditioning, np64, t64, tags, x_at

SIGMAS = (9.0, 2.5, 0.4)


def cfg_oracle(c: np.ndarray, u: np.ndarray, w: float) -> np.ndarray:
    """Ho & Salimans: ``u + w (c - u)``."""
    return u + w * (c - u)


def autoguidance_oracle(d1: np.ndarray, d0: np.ndarray, w: float) -> np.ndarray:
    """Karras et al. 2024, eq. 1: ``d0 + w (d1 - d0)``."""
    return d0 + w * (d1 - d0)


def _guided(expr: guidekit.Expr, **models: FakeModel) -> tuple[guidekit.Guided, FakeModel]:
    main = FakeModel("main")
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    guided = guidekit.guide(
        plan, main, cond=conditioning("cond"), uncond=conditioning("uncond"), models=models
    )
    return guided, main


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, 7.0, -0.5])
def test_cfg_matches_formula(w: float) -> None:
    """CFG(w) equals ``u + w (c - u)`` at every step, including w = 0 (u) and w = 1 (c)."""
    guided, _ = _guided(CFG(w))
    for k, sigma in enumerate(SIGMAS):
        out = np64(guided(t64(x_at(k)), sigma))
        want = cfg_oracle(branch("main", "cond", sigma), branch("main", "uncond", sigma), w)
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("w", "rows", "branch_tags"),
    [
        (7.0, 2 * BATCH, ["cond", "uncond"]),
        (1.0, BATCH, ["cond"]),  # u has coefficient 0: not computed
        (0.0, BATCH, ["uncond"]),  # c has coefficient 0: not computed
    ],
)
def test_cfg_rows(w: float, rows: int, branch_tags: list[str]) -> None:
    """One batched call per step holding exactly the branches with nonzero coefficients."""
    guided, main = _guided(CFG(w))
    for k, sigma in enumerate(SIGMAS):
        guided(t64(x_at(k)), sigma)
    assert [c["rows"] for c in main.calls] == [rows] * len(SIGMAS)
    want = torch.cat([tags(n) for n in branch_tags]).tolist()
    assert main.row_tags() == [want] * len(SIGMAS)
    # the model sees x once per branch and sigma once per row
    for k, call in enumerate(main.calls):
        np.testing.assert_array_equal(
            call["x"].numpy(), np.concatenate([x_at(k)] * len(branch_tags))
        )
        assert call["sigma"].tolist() == [SIGMAS[k]] * rows


@pytest.mark.parametrize(("expr", "which"), [(Cond(), "cond"), (Uncond(), "uncond")])
def test_cond_and_uncond_are_plain_branches(expr: guidekit.Expr, which: str) -> None:
    """``Cond()`` is ``c`` and ``Uncond()`` is ``u``, each from a call of B rows."""
    guided, main = _guided(expr)
    for k, sigma in enumerate(SIGMAS):
        out = np64(guided(t64(x_at(k)), sigma))
        np.testing.assert_array_equal(out, branch("main", which, sigma))
    assert main.row_tags() == [tags(which).tolist()] * len(SIGMAS)


@pytest.mark.parametrize("w", [1.0, 1.5, 2.0, 3.0])
def test_autoguidance_paper_form(w: float) -> None:
    """``Cond() + Autoguidance(w - 1)`` is the paper's ``d0 + w (d1 - d0)``.

    The weak model is its own call of B rows with the SAME (conditional) conditioning; the
    main model runs only the conditional branch.
    """
    weak = FakeModel("weak")
    guided, main = _guided(Cond() + Autoguidance(w - 1), weak=weak)
    for k, sigma in enumerate(SIGMAS):
        out = np64(guided(t64(x_at(k)), sigma))
        want = autoguidance_oracle(branch("main", "cond", sigma), branch("weak", "cond", sigma), w)
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    if w == 1.0:  # scale 0: the weak model is dropped from the plan
        assert weak.calls == []
    else:
        assert weak.row_tags() == [tags("cond").tolist()] * len(SIGMAS)
        assert [c["rows"] for c in weak.calls] == [BATCH] * len(SIGMAS)
    assert main.row_tags() == [tags("cond").tolist()] * len(SIGMAS)
    # one call per model per step, main first
    assert [(r.model, r.rows, r.step) for r in guided.calls] == [
        (m, BATCH, k) for k in range(len(SIGMAS)) for m in (("main", "weak") if w != 1 else ("main",))
    ]


def test_cfg_plus_autoguidance() -> None:
    """``CFG(w) + Autoguidance(s)`` = ``u + w (c - u) + s (c - c_weak)``: 2B main rows + B weak."""
    w, s = 5.0, 1.5
    weak = FakeModel("weak")
    guided, main = _guided(CFG(w) + Autoguidance(s), weak=weak)
    for k, sigma in enumerate(SIGMAS):
        out = np64(guided(t64(x_at(k)), sigma))
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        cw = branch("weak", "cond", sigma)
        np.testing.assert_allclose(out, u + w * (c - u) + s * (c - cw), rtol=1e-12, atol=1e-12)
    assert [c["rows"] for c in main.calls] == [2 * BATCH] * len(SIGMAS)
    assert [c["rows"] for c in weak.calls] == [BATCH] * len(SIGMAS)
    assert weak.row_tags() == [tags("cond").tolist()] * len(SIGMAS)


def test_plan_step_functional_api() -> None:
    """``plan.step`` with explicit state gives the same CFG result as ``guide``."""
    w = 4.0
    plan = guidekit.compile(CFG(w))
    state = plan.init()
    conds = {"cond": conditioning("cond"), "uncond": conditioning("uncond")}
    for k, sigma in enumerate(SIGMAS):
        y, state = plan.step(state, t64(x_at(k)), sigma, conds, {"main": FakeModel()})
        want = cfg_oracle(branch("main", "cond", sigma), branch("main", "uncond", sigma), w)
        np.testing.assert_allclose(np64(y), want, rtol=1e-12, atol=1e-12)
    assert state.steps == len(SIGMAS)
