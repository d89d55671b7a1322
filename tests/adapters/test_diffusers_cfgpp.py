"""CFG++ (arXiv 2406.08070) in unmodified diffusers pipelines against hand-written CFG++ loops.

Tiny real Stable Diffusion (``EulerDiscreteScheduler``, ``DDIMScheduler``) and SD3
(``FlowMatchEulerDiscreteScheduler``) pipelines in float64. Each loop below calls the pipeline's own denoiser twice per step with
the scheduler's own sigmas and timesteps and takes the paper's step -- the denoised estimate
from ``u + lam (c - u)``, re-noised with the unconditional noise -- without guidekit; inside
``guided(pipe, CFGpp(lam))`` the pipeline's unmodified scheduler must land on the same
latents. Schedulers whose step guidekit cannot make a CFG++ step refuse it by name.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFGpp, GuidanceValueError
from guidekit.adapters.diffusers import GuidekitGuidance, guided
from guidekit.schedules import Linear
from guidekit.schedules.steps import level_at

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (a fixture)

F64, STEPS, LAM = torch.float64, 4, 0.6
PROMPTS = ["a cat", "a dog"]
EULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


def _latents(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=F64)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("lam", [LAM, Linear(0.5)], ids=["constant", "scheduled"])
@torch.no_grad()
def test_stable_diffusion_euler_matches_a_cfgpp_loop(lam: Any) -> None:
    """A scheduled lam (``Linear(0.5)``: 0 at the noisiest step to 1 at the cleanest) is the
    paper's step at each step's value, on the scheduler's own sigmas."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny.sd_pipeline(EulerDiscreteScheduler(**EULER)).to(F64)
    pe, npe = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    lat = _latents((2, 4, 8, 8))
    kwargs = {"prompt_embeds": pe, "negative_prompt_embeds": npe, "num_inference_steps": STEPS,
              "height": 16, "width": 16, "output_type": "latent"}
    with guided(pipe, CFGpp(lam)) as run:
        out = pipe(latents=lat, **kwargs).images
    assert [c.rows for c in run.calls] == [4] * STEPS  # one call [c u] per step

    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(STEPS)
    x, sigmas, gap = lat * sched.init_noise_sigma, sched.sigmas.tolist(), []
    for i, t in enumerate(sched.timesteps):
        s, sn = sigmas[i], sigmas[i + 1]
        xin = x / (s**2 + 1) ** 0.5
        eps_c = pipe.unet(xin, t, encoder_hidden_states=pe).sample
        eps_u = pipe.unet(xin, t, encoder_hidden_states=npe).sample
        w = lam.at(level_at(s, sigmas)) if isinstance(lam, Linear) else lam
        x0 = x - s * (eps_u + w * (eps_c - eps_u))
        x = x0 + sn * eps_u
        gap.append(float((sn * w * (eps_c - eps_u)).abs().max()))
    # EulerDiscreteScheduler.step computes in float32; re-noising with the guided noise
    # instead (plain CFG) moves a step by far more than the tolerance
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    assert max(gap) > 1e-3


@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_sd3_flow_match_euler_matches_a_cfgpp_loop() -> None:
    pipe = tiny.sd3_pipeline().to(F64)
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, negative_prompt=["", ""],
        do_classifier_free_guidance=True, max_sequence_length=16,
    )
    lat = _latents((2, 4, 8, 8))
    with guided(pipe, CFGpp(LAM)) as run:
        out = pipe(
            prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
            negative_pooled_prompt_embeds=nppe, latents=lat, num_inference_steps=STEPS,
            height=16, width=16, output_type="latent",
        ).images
    assert len(run.calls) == STEPS

    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(STEPS)
    x, sigmas, gap = lat, sched.sigmas.tolist(), []

    def v(x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, p: torch.Tensor) -> Any:
        return pipe.transformer(
            hidden_states=x, timestep=t.expand(2), encoder_hidden_states=e,
            pooled_projections=p, return_dict=False,
        )[0]

    for i, t in enumerate(sched.timesteps):
        s, sn = sigmas[i], sigmas[i + 1]
        v_c, v_u = v(x, t, pe, ppe), v(x, t, npe, nppe)
        x0 = x - s * (v_u + LAM * (v_c - v_u))
        noise_u = x + (1 - s) * v_u
        x = (1 - sn) * x0 + sn * noise_u
        gap.append(float((sn * LAM * (v_c - v_u)).abs().max()))
    # FlowMatchEulerDiscreteScheduler.step computes in float32; re-noising with the guided
    # velocity instead (plain CFG) moves a step by far more than the tolerance
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    assert max(gap) > 1e-3


@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_stable_diffusion_ddim_matches_the_papers_algorithm() -> None:
    """The paper's own sampler: DDIM (eta = 0) with CFG++, Algorithm 2 of arXiv 2406.08070."""
    pipe = tiny.sd_pipeline().to(F64)  # DDIMScheduler, leading spacing, set_alpha_to_one
    pe, npe = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    lat = _latents((2, 4, 8, 8))
    with guided(pipe, CFGpp(LAM)):
        out = pipe(
            prompt_embeds=pe, negative_prompt_embeds=npe, latents=lat, num_inference_steps=STEPS,
            height=16, width=16, output_type="latent",
        ).images

    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(STEPS)
    abar, ratio = sched.alphas_cumprod.double(), 1000 // STEPS
    x, gap = lat * sched.init_noise_sigma, []
    for t in sched.timesteps:
        a, prev = abar[t], int(t) - ratio
        a_prev = abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=F64)
        eps_c = pipe.unet(x, t, encoder_hidden_states=pe).sample
        eps_u = pipe.unet(x, t, encoder_hidden_states=npe).sample
        x0 = (x - (1 - a).sqrt() * (eps_u + LAM * (eps_c - eps_u))) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_u
        gap.append(float(((1 - a_prev).sqrt() * LAM * (eps_c - eps_u)).abs().max()))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
    assert max(gap) > 1e-3


@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_other_schedulers_and_the_modular_guider_refuse() -> None:
    from diffusers import DPMSolverMultistepScheduler

    pipe = tiny.sd_pipeline().to(F64)
    kwargs = {"num_inference_steps": 2, "height": 16, "width": 16, "output_type": "latent"}
    with guided(pipe, CFGpp(LAM)), pytest.raises(GuidanceValueError, match="eta=0.5"):
        pipe(PROMPTS, eta=0.5, **kwargs)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with guided(pipe, CFGpp(LAM)), pytest.raises(
        GuidanceValueError, match="FlowMatchEulerDiscreteScheduler, DDIMScheduler.*runs DPMSolverMultistepScheduler"
    ):
        pipe(PROMPTS, **kwargs)
    assert "forward" not in vars(pipe.unet)  # the pipeline is as before after the error
    # the modular guider steps it too (tests/adapters/test_diffusers_modular_cfgpp.py), under
    # the same schedulers
    guider = GuidekitGuidance(CFGpp(LAM)).attach(scheduler=pipe.scheduler)
    pipe.scheduler.set_timesteps(2)
    with pytest.raises(GuidanceValueError, match="GuidekitGuidance: CFGpp.*runs DPMSolverMultistepScheduler"):
        guider.set_state(0, 2, pipe.scheduler.timesteps[0])


@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_ddim_trailing_runs_where_its_steps_are_consecutive_and_says_so_where_not() -> None:
    # trailing spacing at N steps lands on t - 1000 // N only where N divides 1000: at 3
    # steps [999, 666, 332] it does not (the message used to suggest 'trailing' itself)
    from diffusers import DDIMScheduler

    pipe = tiny.sd_pipeline().to(F64)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    kwargs = {"height": 16, "width": 16, "output_type": "latent"}
    with guided(pipe, CFGpp(LAM)), pytest.raises(
        GuidanceValueError, match=r"trailing'\) at 3 steps: .* use timestep_spacing='leading', "
                                  r"or a step count that divides 1000"
    ):
        pipe(PROMPTS, num_inference_steps=3, **kwargs)
    with guided(pipe, CFGpp(LAM)) as run:
        out = pipe(PROMPTS, num_inference_steps=4, **kwargs).images
    assert torch.isfinite(out).all() and run.steps == 4
