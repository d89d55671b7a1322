"""Scales by noise level through the adapters: k-diffusion (Euler and DPM-2, whose midpoints
lie between the schedule's levels), flow_matching's ODE solver, the classic diffusers adapter
on tiny real pipelines and the modular ``GuidekitGuidance`` guider.

Each scheduled run is compared with the same sampler driven step by step by a constant
``CFG(w_i)``, ``w_i`` the shape's value at the step's progress ``r = i / (N - 1)``: the
adapters hand guidekit the run's schedule, so ``r`` is the step fraction.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import guidekit as gk
from guidekit import CFG, Cosine, Linear, Piecewise
from guidekit.adapters.diffusers import GuidekitGuidance, guided
from guidekit.adapters.flow import FlowGuided
from guidekit.adapters.kdiffusion import KDiffusionGuided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
import _kdiffusion_helpers as khelpers  # noqa: E402
import test_diffusers_modular as modular_tests  # noqa: E402
import test_flow as flow_tests  # noqa: E402
from _diffusers_helpers import STEPS, W, call_kwargs, forwards, sample  # noqa: E402

# the shared fixtures: pytest finds them by name in this module
K, setup = khelpers.K, khelpers.setup
fm, data, sd3 = flow_tests.fm, flow_tests.data, modular_tests.sd3
_sd3_modular = modular_tests._sd3_modular
_quiet_single_thread, pipes = helpers._quiet_single_thread, helpers.pipes
B = khelpers.B


class PerStep:
    """A guided denoiser that runs the plan ``CFG(w(r))`` at each call, ``r`` the call's
    progress: ``i / (N - 1)`` at the schedule's level ``i``, placed between the indices
    linearly in log sigma for a level between two (DPM-2's midpoints)."""

    def __init__(self, make, levels, w):
        self.make, self.levels, self.w = make, levels, w

    def progress(self, s):
        lv, n = self.levels, len(self.levels)
        i = max(j for j, v in enumerate(lv) if v >= s * (1 - 1e-9))
        if i == n - 1 or abs(s - lv[i]) <= 1e-9 * lv[i]:
            return i / (n - 1)
        return (i + math.log(lv[i] / s) / math.log(lv[i] / lv[i + 1])) / (n - 1)

    def __call__(self, x, sigma, **kw):
        return self.make(self.w(self.progress(float(sigma.flatten()[0]))))(x, sigma, **kw)


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["euler", "dpm_2"])
def test_kdiffusion_scheduled_cfg_equals_cfg_per_step(K, setup, sampler):
    sigmas = setup["sigmas"]
    levels = sigmas[:-1].tolist()
    shape = Cosine(W)
    run = getattr(K.sampling, f"sample_{sampler}")
    g = KDiffusionGuided(CFG(shape), setup["den"], uncond=setup["uncond"], sigmas=sigmas)
    out = run(g, setup["x"] * sigmas[0], sigmas, extra_args={"cond": setup["cond"]}, disable=True)

    def constant(w):
        return KDiffusionGuided(CFG(w), setup["den"], uncond=setup["uncond"])

    ref = run(PerStep(constant, levels, lambda r: W * (1 - math.cos(math.pi * r))), setup["x"] * sigmas[0], sigmas,
              extra_args={"cond": setup["cond"]}, disable=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert g.calls[0].rows == B  # Cosine is 0 at the first step: only u runs


@torch.no_grad()
def test_flow_ode_solver_scheduled_cfg_equals_cfg_per_step(fm, data):
    grid = data["grid"]
    sigmas = (1 - grid).tolist()
    n = len(sigmas) - 1
    scales = [2 * W * i / (n - 1) for i in range(n)]
    g = FlowGuided(CFG(Linear(W)), data["main"], uncond=data["uncond"], time_grid=grid)
    out = fm.ODESolver(velocity_model=g).sample(
        x_init=data["noise"], step_size=None, method="euler", time_grid=grid, cond=data["cond"])
    x = data["noise"].clone()
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        step = FlowGuided(CFG(scales[i]), data["main"], uncond=data["uncond"])
        x = x + (t_next - t) * step(x=x, t=t, cond=data["cond"])
    torch.testing.assert_close(out, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["sd3", "sd"])
@torch.no_grad()
def test_classic_diffusers_scheduled_cfg_equals_the_piecewise_of_its_values(kind, pipes):
    """``CFG(Linear(W))`` over the pipeline's own schedule is ``2 W i / (N - 1)`` at step ``i``:
    the same run as a Piecewise schedule through those (sigma, w) points; a 0 scale at the
    first step drops the conditional rows there."""
    pipe = pipes(kind)
    with forwards(kind, main=helpers.denoiser(pipe)) as log, guided(pipe, CFG(Linear(W))) as run:
        out = sample(pipe, **call_kwargs(kind))
    levels = [c.sigma for c in run.calls]
    assert len(levels) == STEPS and log == [("main", 2), ("main", 4), ("main", 4)]
    points = sorted((s, 2 * W * i / (STEPS - 1)) for i, s in enumerate(levels))
    with guided(pipe, CFG(Piecewise(*points))):
        ref = sample(pipe, **call_kwargs(kind))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert (out - sample(pipe, **call_kwargs(kind))).abs().max() > 1e-4  # not plain CFG(W)


@torch.no_grad()
def test_modular_guider_scheduled_cfg_equals_the_classic_adapter(sd3: Any):
    pipe, inputs = sd3
    expr = CFG(Cosine(W)) + gk.PAG(Linear(2))
    for batched in (False, True):
        guider = GuidekitGuidance(expr, batched=batched).attach(scheduler=pipe.scheduler)
        out = _sd3_modular(pipe, guider)(output="latents", **inputs)
        with guided(pipe, expr):
            ref = pipe(guidance_scale=W, output_type="latent", **inputs).images
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        assert guider.run.state.schedule is not None
