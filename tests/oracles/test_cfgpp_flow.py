"""CFG++ (arXiv 2406.08070) on a rectified flow: flow_matching's Euler ODESolver through
FlowGuided against a hand-written CFG++ loop.

The paper writes CFG++ for DDIM; on a straight flow path ``x = (1 - s) x0 + s n`` the same
step is: the denoised estimate ``x0 = x - s v_lam`` from ``v_lam = v_u + lam (v_c - v_u)``,
re-noised with the unconditional noise ``n_u = x + (1 - s) v_u`` to the next level,
``x_next = (1 - s_next) x0 + s_next n_u``. The loop below calls the tiny real velocity
network twice per step and never touches guidekit.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from guidekit import CFG, CFGpp
from guidekit.adapters.flow import FlowGuided
from guidekit.errors import GuidanceValueError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
from test_flow import Velocity  # noqa: E402

B, SHAPE, F64, LAM = 2, (2, 4, 4), torch.float64, 0.7


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(7)
    return {
        "net": Velocity(0),
        "cond": torch.randn(B, 8, generator=g, dtype=F64),
        "uncond": torch.zeros(B, 8, dtype=F64),
        "noise": torch.randn(B, *SHAPE, generator=g, dtype=F64),
        "grid": torch.linspace(0, 1, 9, dtype=F64),
    }


def oracle(data, lam):
    """CFG++ on the flow path, sigma = 1 - t, v = noise - data = -u."""
    x, net = data["noise"], data["net"]
    sigmas = [1.0 - float(t) for t in data["grid"]]
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        t = torch.tensor(1.0 - s, dtype=F64)
        v_c, v_u = -net(x=x, t=t, cond=data["cond"]), -net(x=x, t=t, cond=data["uncond"])
        x0 = x - s * (v_u + lam * (v_c - v_u))
        n_u = x + (1 - s) * v_u
        x = (1 - sn) * x0 + sn * n_u
    return x


def _sample(data, expr, **kw):
    fm = importlib.import_module("flow_matching.solver")
    guided = FlowGuided(
        expr, data["net"], cond=data["cond"], uncond=data["uncond"], time_grid=data["grid"], **kw
    )
    solver = fm.ODESolver(velocity_model=guided.model_wrapper())
    out = solver.sample(x_init=data["noise"], step_size=None, method="euler", time_grid=data["grid"])
    return out, guided


@pytest.mark.parametrize("lam", [0.0, LAM, 1.0])
def test_flow_euler_matches_the_cfgpp_loop(data, lam):
    out, guided = _sample(data, CFGpp(lam), solver="euler")
    ref = oracle(data, lam)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert len(guided.calls) == 8 and all(c.branches == ("c", "u") for c in guided.calls)
    if 0 < lam < 1:  # CFG at the same scale re-noises with the guided velocity: another path
        cfg, _ = _sample(data, CFG(lam))
        assert (cfg - ref).abs().max() > 1e-3


def test_flow_needs_the_euler_solver(data):
    with pytest.raises(GuidanceValueError, match="solver='euler'.*got solver=None"):
        FlowGuided(CFGpp(LAM), data["net"], cond=data["cond"], uncond=data["uncond"], time_grid=data["grid"])
    with pytest.raises(GuidanceValueError, match="got solver='midpoint'"):
        FlowGuided(
            CFGpp(LAM), data["net"], cond=data["cond"], uncond=data["uncond"],
            time_grid=data["grid"], solver="midpoint",
        )


@pytest.mark.parametrize(
    ("step_size", "method", "match"),
    [(None, "midpoint", "not a step of the schedule"), (1 / 16, "euler", "solver steps on 17 points")],
    ids=["midpoint", "own-grid"],
)
def test_a_solver_other_than_the_declared_euler_is_caught(data, step_size, method, match):
    """Declared euler: a midpoint solver's off-grid evaluation, and the solver's own step grid
    (step_size=, read from the solver: FlowGuided has no hidden solver setting) compared with
    the adapter's, are both refused."""
    fm = importlib.import_module("flow_matching.solver")
    guided = FlowGuided(
        CFGpp(LAM), data["net"], cond=data["cond"], uncond=data["uncond"],
        time_grid=data["grid"], solver="euler",
    )
    solver = fm.ODESolver(velocity_model=guided)
    with pytest.raises(GuidanceValueError, match=match):
        solver.sample(x_init=data["noise"], step_size=step_size, method=method, time_grid=data["grid"])
