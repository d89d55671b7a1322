"""Named conditionings through the flow adapter with flow_matching's own ODE solver: ICG's
pool and Perp-Neg's negative, against ``guidekit.guide`` in a hand-written Euler loop."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import guidekit as gk
from guidekit import ICG, PerpNeg
from guidekit.adapters.flow import FlowGuided

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_flow import F64, SHAPE, B, Velocity  # noqa: E402


@pytest.fixture(scope="module")
def fm() -> Any:
    return importlib.import_module("flow_matching.solver")


@torch.no_grad()
@pytest.mark.parametrize("expr", [ICG(3), PerpNeg(4, neg_scale=1.5)], ids=["icg", "perpneg"])
def test_ode_solver_euler_equals_a_guide_loop(fm: Any, expr: Any) -> None:
    g = torch.Generator().manual_seed(7)
    main = Velocity(0)
    cond = torch.randn(B, 8, generator=g, dtype=F64)
    named = {"uncond": torch.zeros(B, 8, dtype=F64), "neg": torch.randn(B, 8, generator=g, dtype=F64),
             "icg": torch.randn(5, 8, generator=g, dtype=F64)}  # a pool of 5 real conditions
    noise = torch.randn(B, *SHAPE, generator=g, dtype=F64)
    grid = torch.linspace(0, 1, 7, dtype=F64)
    guided = FlowGuided(expr, main, conds=named, time_grid=grid, seed=3)
    solver = fm.ODESolver(velocity_model=guided.model_wrapper())
    out = solver.sample(x_init=noise, step_size=None, method="euler", time_grid=grid, cond=cond)
    rows = 2 * B if isinstance(expr, ICG) else 3 * B
    assert [c.rows for c in guided.calls] == [rows] * 6

    plan = gk.compile(expr, prediction="flow", noise="flow")
    sigmas = (1 - grid).tolist()
    ref = gk.guide(
        plan, lambda x, s, cond: -main(x=x, t=1 - s, cond=cond), cond={"cond": cond},
        conds={k: {"cond": v} for k, v in named.items()}, sigmas=sigmas, seed=3,
    )
    x = noise.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * ref(x, s)
    torch.testing.assert_close(out, x, rtol=1e-9, atol=1e-9)
