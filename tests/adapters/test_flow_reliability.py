"""FlowGuided refuses a schedule the solver does not step on (issue 11): an 11-point
time_grid with ODESolver(step_size=0.05) made 20 calls and advanced state on 10 of them."""

from __future__ import annotations

import pytest
import torch

from guidekit import APG, CFG, GuidanceValueError
from guidekit.adapters.flow import FlowGuided

pytestmark = pytest.mark.outcome("error")
B = 2
F64 = torch.float64


def velocity(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype)
    return -x + cond.view(-1, 1) * (t.reshape(-1, 1) if t.ndim else t)


def guided(points: int, **kwargs) -> FlowGuided:
    grid = torch.linspace(0, 1, points, dtype=F64)
    return FlowGuided(CFG(3) | APG(eta=0, momentum=-0.5), velocity, time_grid=grid,
                      cond=torch.ones(B, dtype=F64), uncond=torch.zeros(B, dtype=F64), **kwargs)


def solve(g: FlowGuided, points: int, method: str, step_size: float | None) -> torch.Tensor:
    from flow_matching.solver import ODESolver

    grid = torch.linspace(0, 1, points, dtype=F64)
    return ODESolver(velocity_model=g.model_wrapper()).sample(  # type: ignore[no-any-return]
        x_init=torch.zeros(B, 3, dtype=F64), time_grid=grid, method=method, step_size=step_size)


@pytest.mark.parametrize(("method", "step_size", "steps"),
                         [("euler", 0.05, 20), ("midpoint", 0.05, 20), ("euler", 0.2, 5)])
def test_a_solver_stepping_off_the_grid_is_refused(method, step_size, steps):
    g = guided(11)
    with pytest.raises(GuidanceValueError) as info:
        solve(g, 11, method, step_size)
    text = str(info.value)
    assert f"solver steps on {steps + 1} points ({steps} steps)" in text
    assert "schedule of 11 points (10 steps)" in text
    assert f"time_grid=torch.linspace(0, 1, {steps + 1})" in text and "step_size" in text
    assert g.calls == [] and g.steps == 0  # refused before the first model call


@pytest.mark.outcome("correct")
def test_the_suggested_grid_runs_one_state_step_per_solver_step():
    g = guided(21)
    solve(g, 11, "euler", 0.05)
    assert len(g.calls) == 20 and g.steps == 20


@pytest.mark.outcome("correct")
@pytest.mark.parametrize(("method", "calls", "steps"), [("euler", 10, 10), ("midpoint", 20, 10)])
def test_a_solver_on_the_grid_runs(method, calls, steps):
    g = guided(11)
    solve(g, 11, method, None)
    assert len(g.calls) == calls and g.steps == steps
    g.reset()
    solve(g, 11, method, None)  # checked again, and passes, in the next run
    assert g.steps == steps


def test_torchdiffeq_in_sigma_time_is_checked_too():
    from torchdiffeq import odeint

    sig = torch.linspace(1, 0, 11, dtype=F64)
    g = FlowGuided(CFG(3), velocity, sigmas=sig.tolist(), model_time="t",
                   cond=torch.ones(B, dtype=F64), uncond=torch.zeros(B, dtype=F64))
    with pytest.raises(GuidanceValueError, match=r"solver steps on 21 points .*sigmas=torch"):
        odeint(g.odeint_func("sigma"), torch.zeros(B, 3, dtype=F64), sig, method="euler",
               options={"step_size": 0.05})
    g.reset()
    odeint(g.odeint_func("sigma"), torch.zeros(B, 3, dtype=F64), sig, method="euler")
    assert g.steps == 10


@pytest.mark.parametrize(("grid", "match"), [
    (torch.linspace(0, 1, 5).flip(0), r"time_grid\[0\] = 1 > time_grid\[1\] = 0.75: .* must "
                                      r"increase"),
    (torch.linspace(0, 2, 5), r"time_grid\[3\] = 1.5 lies outside \[0, 1\]"),
    (torch.tensor([0.0, float("nan"), 1.0]), r"time_grid\[1\] = nan lies outside"),
])
def test_a_time_grid_that_is_no_sampling_grid_is_named(grid, match):
    # before the fix: accepted, then "the noise level rose ..., call reset()" at the first
    # call, or "sigmas[3] = -0.5" for a point the user passed as time_grid = 1.5
    with pytest.raises(GuidanceValueError, match=match):
        FlowGuided(CFG(3), velocity, time_grid=grid, cond=torch.ones(B), uncond=torch.zeros(B))


def test_a_rising_sigma_schedule_is_named():
    with pytest.raises(GuidanceValueError, match=r"sigmas\[0\] = 0 < sigmas\[1\] = 0.25: a "
                                                 r"schedule runs from high noise to low"):
        FlowGuided(CFG(3), velocity, sigmas=torch.linspace(0, 1, 5), cond=torch.ones(B),
                   uncond=torch.zeros(B))
