"""CFG++ (arXiv 2406.08070) in the modular ``guider=``: the loop's own scheduler step.

Tiny real modular pipelines in float64. SD3 (``FlowMatchEulerDiscreteScheduler``): the
guider's run equals ``guided(pipe, CFGpp(lam))`` on the classic pipeline under the same
inputs (which tests/adapters/test_diffusers_cfgpp.py checks against a hand-written loop).
SDXL (``EulerDiscreteScheduler``, ``DDIMScheduler``): against hand-written CFG++ loops --
the denoised estimate from ``u + lam (c - u)``, re-noised with the unconditional noise --
that call the UNet twice per step with the loop's own conditioning and never touch
guidekit. Schedulers and settings the guider cannot make a CFG++ step are refused by name.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, PAG, CFGpp, GuidanceValueError
from guidekit.adapters.diffusers import GuidekitGuidance, guided
from guidekit.schedules import Linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from _modular_sd3 import sd3_modular, sd3_setup  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (a fixture)

F64, STEPS, LAM = torch.float64, 3, 0.6
EULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3() -> tuple[Any, dict[str, Any]]:
    return sd3_setup()


def _sd3(pipe: Any, guider: Any, inputs: dict[str, Any]) -> torch.Tensor:
    out: torch.Tensor = sd3_modular(pipe, guider)(output="latents", **inputs)
    return out


@pytest.mark.parametrize("batched", [False, True])
@torch.no_grad()
def test_sd3_flow_match_euler_equals_the_classic_adapter(sd3: Any, batched: bool) -> None:
    pipe, inputs = sd3
    with guided(pipe, CFGpp(LAM)):
        ref = pipe(output_type="latent", **inputs).images
    guider = GuidekitGuidance(CFGpp(LAM), batched=batched).attach(scheduler=pipe.scheduler)
    out = _sd3(pipe, guider, inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-8)
    assert guider.run.steps == STEPS
    # directions add to the denoised estimate, the re-noising stays u (as the classic adapter)
    with guided(pipe, CFGpp(LAM) + PAG(2.0)):
        ref_pag = pipe(output_type="latent", **inputs).images
    pag = GuidekitGuidance(CFGpp(LAM) + PAG(2.0), batched=batched).attach(scheduler=pipe.scheduler)
    torch.testing.assert_close(_sd3(pipe, pag, inputs), ref_pag, rtol=0, atol=1e-8)
    # not plain CFG at the same scale: the re-noising matters (far beyond the tolerance)
    cfg = GuidekitGuidance(CFG(LAM)).attach(scheduler=pipe.scheduler)
    assert (out - _sd3(pipe, cfg, inputs)).abs().max() > 1e-5


@torch.no_grad()
def test_a_scheduled_lam_equals_the_classic_adapter(sd3: Any) -> None:
    """``CFGpp(Linear(0.5))`` reads lam at each step's level on the scheduler's sigmas in both
    adapters; not the constant lam's result."""
    pipe, inputs = sd3
    expr = CFGpp(Linear(0.5))
    with guided(pipe, expr):
        ref = pipe(output_type="latent", **inputs).images
    guider = GuidekitGuidance(expr).attach(scheduler=pipe.scheduler)
    out = _sd3(pipe, guider, inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-8)
    const = GuidekitGuidance(CFGpp(0.5)).attach(scheduler=pipe.scheduler)
    assert (out - _sd3(pipe, const, inputs)).abs().max() > 1e-6


# -- SDXL: the loop's UNet with its own added conditioning, against hand-written loops ---------


@pytest.fixture(scope="module")
def sdxl() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "unet": tiny.sdxl_unet().to(F64),
        "inputs": {
            "prompt_embeds": torch.randn(2, 7, 32, generator=g, dtype=F64),
            "negative_prompt_embeds": torch.randn(2, 7, 32, generator=g, dtype=F64),
            "pooled_prompt_embeds": torch.randn(2, 16, generator=g, dtype=F64),
            "negative_pooled_prompt_embeds": torch.randn(2, 16, generator=g, dtype=F64),
            "latents": torch.randn(2, 4, 8, 8, generator=g, dtype=F64),
        },
    }


def _sdxl(sdxl: dict[str, Any], scheduler: Any, guider: Any, **extra: Any) -> torch.Tensor:
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLCoreDenoiseStep,
    )

    modular = StableDiffusionXLCoreDenoiseStep().init_pipeline()
    modular.update_components(unet=sdxl["unet"], scheduler=scheduler, guider=guider)
    modular.set_progress_bar_config(disable=True)
    out: torch.Tensor = modular(
        output="latents", num_inference_steps=STEPS, height=16, width=16, **sdxl["inputs"], **extra
    )
    return out


def _recorded_calls(sdxl: dict[str, Any], scheduler: Any) -> list[dict[str, Any]]:
    """The UNet's keyword arguments in the loop's first step (cond, then uncond batch)."""
    seen: list[dict[str, Any]] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append({k: v for k, v in kwargs.items() if k not in ("sample", "timestep", "return_dict")})

    handle = sdxl["unet"].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _sdxl(sdxl, scheduler, GuidekitGuidance(CFG(2.0)).attach(scheduler=scheduler))
    finally:
        handle.remove()
    return seen[:2]


def _eps(sdxl: dict[str, Any], x: torch.Tensor, t: Any, kw: dict[str, Any]) -> torch.Tensor:
    out: torch.Tensor = sdxl["unet"](x, t, **kw, return_dict=False)[0]
    return out


def _euler_loop(sdxl: dict[str, Any], scheduler: Any, lam: float, renoise_u: bool) -> torch.Tensor:
    """Euler steps in k-diffusion's VE form; ``renoise_u``: CFG++, else plain CFG(lam)."""
    kw_c, kw_u = _recorded_calls(sdxl, scheduler)
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas.tolist()
    x = sdxl["inputs"]["latents"] * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        s, sn = sigmas[i], sigmas[i + 1]
        xin = x / (s**2 + 1) ** 0.5
        eps_c, eps_u = _eps(sdxl, xin, t, kw_c), _eps(sdxl, xin, t, kw_u)
        guided_eps = eps_u + lam * (eps_c - eps_u)
        x0 = x - s * guided_eps
        x = x0 + sn * (eps_u if renoise_u else guided_eps)
    return x


@pytest.mark.parametrize("batched", [False, True])
@torch.no_grad()
def test_sdxl_euler_matches_a_cfgpp_loop(sdxl: dict[str, Any], batched: bool) -> None:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(**EULER)
    # the loop's plumbing (latents, added conditioning) first: plain CFG equals its loop
    cfg = _sdxl(sdxl, scheduler, GuidekitGuidance(CFG(3.0)).attach(scheduler=scheduler))
    torch.testing.assert_close(cfg, _euler_loop(sdxl, scheduler, 3.0, False), rtol=0, atol=1e-5)
    guider = GuidekitGuidance(CFGpp(LAM), batched=batched).attach(scheduler=scheduler)
    out = _sdxl(sdxl, scheduler, guider)
    ref = _euler_loop(sdxl, scheduler, LAM, True)
    # EulerDiscreteScheduler.step computes in float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (ref - _euler_loop(sdxl, scheduler, LAM, False)).abs().max() > 1e-3


@torch.no_grad()
def test_sdxl_ddim_eta_0_matches_the_papers_algorithm(sdxl: dict[str, Any]) -> None:
    """DDIM (eta = 0) with CFG++, Algorithm 2 of arXiv 2406.08070; eta must be stated."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**EULER, clip_sample=False, set_alpha_to_one=True)
    with pytest.raises(GuidanceValueError, match=r"DDIMScheduler.*attach\(scheduler=pipe.scheduler, eta=0\)"):
        _sdxl(sdxl, scheduler, GuidekitGuidance(CFGpp(LAM)).attach(scheduler=scheduler))
    with pytest.raises(GuidanceValueError, match="eta=0.5"):
        _sdxl(sdxl, scheduler, GuidekitGuidance(CFGpp(LAM)).attach(scheduler=scheduler, eta=0.5))
    guider = GuidekitGuidance(CFGpp(LAM)).attach(scheduler=scheduler, eta=0)
    out = _sdxl(sdxl, scheduler, guider)

    kw_c, kw_u = _recorded_calls(sdxl, scheduler)
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(STEPS)
    abar, ratio = sched.alphas_cumprod.double(), 1000 // STEPS
    x, gap = sdxl["inputs"]["latents"] * sched.init_noise_sigma, []
    for t in sched.timesteps:
        a, prev = abar[t], int(t) - ratio
        a_prev = abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=F64)
        eps_c, eps_u = _eps(sdxl, x, t, kw_c), _eps(sdxl, x, t, kw_u)
        x0 = (x - (1 - a).sqrt() * (eps_u + LAM * (eps_c - eps_u))) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_u
        gap.append(float(((1 - a_prev).sqrt() * LAM * (eps_c - eps_u)).abs().max()))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
    assert max(gap) > 1e-3


@torch.no_grad()
def test_what_the_guider_cannot_step_is_refused_by_name(sdxl: dict[str, Any]) -> None:
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    dpm = DPMSolverMultistepScheduler(**EULER)
    with pytest.raises(GuidanceValueError, match=r"GuidekitGuidance: CFGpp\(0.6\) re-noises.*runs DPMSolverMultistepScheduler.*update_components"):
        _sdxl(sdxl, dpm, GuidekitGuidance(CFGpp(LAM)).attach(scheduler=dpm))
    euler = EulerDiscreteScheduler(**EULER)
    with pytest.raises(GuidanceValueError, match=r"guider.attach\(scheduler=pipe.scheduler\)"):
        _sdxl(sdxl, euler, GuidekitGuidance(CFGpp(LAM)))  # no scheduler attached
    with pytest.raises(GuidanceValueError, match=r"start=0.2.*\.between\(lo, hi\)"):
        GuidekitGuidance(CFGpp(LAM), start=0.2)
    assert "forward" not in vars(sdxl["unet"])
