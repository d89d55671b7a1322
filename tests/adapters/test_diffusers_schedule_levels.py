"""guided(pipe, ...) records, for every model call, the noise level the scheduler itself uses
at that call: real diffusers schedulers (from configs) on tiny real pipelines, float64.

The expected levels are read from each scheduler's own tables after the run, by the rule its
``scale_model_input`` and ``step`` follow (KDPM2's second-order calls sit at
``sigmas_interpol``, DPM-Solver-SDE's at the midpoint of two levels, ...); where the
scheduler scales the model input by ``1 / sqrt(sigma^2 + 1)`` the level is also measured from
the input it actually scaled.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch

from guidekit import CFG, GuidanceValueError
from guidekit.adapters._diffusers_schedule import sigma_for
from guidekit.adapters.diffusers import guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from tiny_diffusers import one_thread, sd_fixture  # noqa: E402,F401  (fixtures)

F64 = torch.float64
W = 4.0
STEPS = 3
PROMPTS = ["a cat", "a photo of a dog"]
B = len(PROMPTS)

pytestmark = pytest.mark.usefixtures("one_thread")

UNET_SCHEDULERS = [
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "DPMSolverSDEScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "PNDMScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
]
FLOW_SCHEDULERS = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
# the schedulers whose scale_model_input divides by sqrt(sigma^2 + 1) at the call's level
_VP_SCALED = {
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "DPMSolverSDEScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
}


@pytest.fixture(scope="module")
def sd3() -> Any:
    return tiny.sd3_pipeline().to(F64)


def _installed(name: str) -> type:
    cls = getattr(diffusers, name, None)
    if cls is None:
        pytest.skip(f"{name} is not in this diffusers")
    return cls


def expected_levels(scheduler: Any) -> list[float]:
    """The level of each model call, from the scheduler's tables (the oracle)."""
    name = type(scheduler).__name__
    ts = scheduler.timesteps
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:  # DDIM, PNDM: the model input is VP at the timestep's alphas_cumprod
        abar = scheduler.alphas_cumprod.double()
        return [math.sqrt((1 - abar[int(t)]) / abar[int(t)]) for t in ts]
    out = []
    for j in range(len(ts)):
        second = j % 2 == 1
        if name == "KDPM2DiscreteScheduler" and second:
            out.append(float(scheduler.sigmas_interpol[j]))
        elif name == "DPMSolverSDEScheduler" and second:
            out.append(math.sqrt(float(sigmas[j - 1]) * float(sigmas[j])))
        else:
            out.append(float(sigmas[j]))
    return out


def measured(scheduler: Any) -> tuple[list[float], Any]:
    """Wrap ``scale_model_input``: the levels it scaled with, read off its input and output."""
    seen: list[float] = []
    orig = getattr(scheduler, "scale_model_input", None)
    if orig is None:  # flow schedulers: the model takes the latents unscaled
        return seen, None

    def scale_model_input(sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        out = orig(sample, timestep)
        ratio = (sample.double().flatten()[0] / out.double().flatten()[0]).item()
        seen.append(math.sqrt(max(ratio * ratio - 1, 0.0)))
        return out

    scheduler.scale_model_input = scale_model_input
    return seen, orig


def run_levels(pipe: Any, scheduler: Any, kwargs: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(recorded, measured) levels of a CFG run of ``pipe`` with ``scheduler``."""
    old = pipe.scheduler
    pipe.scheduler = scheduler
    seen, orig = measured(scheduler)
    try:
        with guided(pipe, CFG(W)) as run:
            pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    finally:
        if orig is not None:
            scheduler.scale_model_input = orig
        pipe.scheduler = old
    return [c.sigma for c in run.calls], seen


SD_CALL = {"prompt": PROMPTS, "guidance_scale": W, "height": 16, "width": 16, "output_type": "latent"}
SD3_CALL = {**SD_CALL, "max_sequence_length": 16}


@torch.no_grad()
@pytest.mark.parametrize("name", UNET_SCHEDULERS)
def test_each_model_call_is_recorded_at_the_schedulers_own_level(sd, name):
    extra = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}  # as SD ships it
    scheduler = _installed(name).from_config(sd.scheduler.config, **extra)
    recorded, seen = run_levels(sd, scheduler, SD_CALL)
    expected = expected_levels(scheduler)
    assert len(recorded) == len(scheduler.timesteps)
    assert recorded == pytest.approx(expected, rel=1e-6)
    if name in _VP_SCALED:
        assert recorded == pytest.approx(seen, rel=1e-4)
    if name == "KDPM2AncestralDiscreteScheduler":
        # its second-order level sigmas_interpol[i - 1] is the next level up to float32
        # cancellation in its sigma_down: guidekit records the level itself
        interpol = [float(scheduler.sigmas_interpol[j - 1]) for j in range(1, len(recorded), 2)]
        assert recorded[1::2] == pytest.approx(interpol, rel=2e-3)


@torch.no_grad()
@pytest.mark.parametrize("name", FLOW_SCHEDULERS)
def test_each_flow_model_call_is_recorded_at_the_schedulers_own_level(sd3, name):
    scheduler = _installed(name).from_config(sd3.scheduler.config)
    recorded, _ = run_levels(sd3, scheduler, SD3_CALL)
    assert len(recorded) == len(scheduler.timesteps)
    assert recorded == pytest.approx(expected_levels(scheduler), rel=1e-6)


@torch.no_grad()
def test_a_window_around_kdpm2s_interpolated_level_turns_cfg_on_there(sd):
    scheduler = diffusers.KDPM2DiscreteScheduler.from_config(sd.scheduler.config)
    scheduler.set_timesteps(STEPS)
    mid, above, below = (float(scheduler.sigmas_interpol[1]), float(scheduler.sigmas[0]),
                         float(scheduler.sigmas[1]))
    lo, hi = math.sqrt(mid * below), math.sqrt(mid * above)  # only the midpoint lies inside
    old = sd.scheduler
    sd.scheduler = scheduler
    try:
        with guided(sd, CFG(W).between(lo, hi)) as run:
            sd(**SD_CALL, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    finally:
        sd.scheduler = old
    assert [c.sigma for c in run.calls][1] == pytest.approx(mid, rel=1e-6)
    assert [c.rows for c in run.calls] == [B, 2 * B, B, B, B]


def test_the_first_call_of_img2img_reads_the_begin_index(sd):
    # img2img pipelines start mid-schedule with set_begin_index, before any step
    scheduler = diffusers.KDPM2DiscreteScheduler.from_config(sd.scheduler.config)
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(2)  # t_start * order: a first-order entry
    t = float(scheduler.timesteps[2])
    assert sigma_for(scheduler, t) == (pytest.approx(float(scheduler.sigmas[2])), True)


def test_an_unknown_two_stage_scheduler_is_refused_by_name(sd):
    class TwoStageScheduler(diffusers.EulerDiscreteScheduler):
        state_in_first_order = True  # a second-order call at a level guidekit cannot read

    scheduler = TwoStageScheduler.from_config(sd.scheduler.config)
    scheduler.set_timesteps(STEPS)
    with pytest.raises(GuidanceValueError, match="TwoStageScheduler.*sigma_fn"):
        sigma_for(scheduler, float(scheduler.timesteps[0]))


EDM = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]


def _own(pipe: Any, scheduler: Any, expr: Any, **call: Any) -> torch.Tensor:
    """``pipe``'s latents with ``scheduler``: under ``guided(pipe, expr)``, or its own."""
    old = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        run = guided(pipe, expr) if expr is not None else None
        with run if run is not None else torch.no_grad():
            return pipe(**{**SD_CALL, **call}, num_inference_steps=STEPS,
                        generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.scheduler = old


@torch.no_grad()
@pytest.mark.parametrize("name", EDM)
def test_edm_schedulers_run_linear_terms_exactly(sd, name):
    # the model's output is EDM's preconditioned F: linear combinations are exact
    scheduler = _installed(name).from_config(sd.scheduler.config)
    got = _own(sd, scheduler, CFG(W))
    torch.testing.assert_close(got, _own(sd, scheduler, None), rtol=1e-6, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("name", EDM)
def test_edm_schedulers_refuse_a_term_that_needs_x0(sd, name):
    # before: read as an eps model of the VP form, APG's x0 (sigma_data ignored) was wrong
    from guidekit import APG

    scheduler = _installed(name).from_config(sd.scheduler.config)
    with pytest.raises(GuidanceValueError, match=r"EDM-preconditioned .*\(APG"):
        _own(sd, scheduler, CFG(W) | APG(eta=0))
