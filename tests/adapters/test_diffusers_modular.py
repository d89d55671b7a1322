"""The modular ``guider=`` component with attention-space terms: the perturbation happens.

A tiny modular SD3 denoise step (float64) with ``GuidekitGuidance``: PAG and SEG batches run
with guidekit's attention engine installed on the transformer the guider's
``prepare_models`` is handed, so the result equals ``guided(pipe, ...)`` on the classic
pipeline with the same inputs (and differs from plain CFG); terms a guider cannot honour are
refused when it is built.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, EMAG, PAG, SAG, SEG, Cond, GuidanceValueError
from guidekit.adapters.diffusers import GuidekitGuidance, guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (a fixture)

F64 = torch.float64
W = 4.0


# every test here runs on one torch thread (the fixture lives in tiny_diffusers)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3() -> tuple[Any, dict[str, Any]]:
    pipe = tiny.sd3_pipeline().to(F64)
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=["a cat", "a dog"], prompt_2=None, prompt_3=None, negative_prompt=["", ""],
            do_classifier_free_guidance=True, max_sequence_length=16,
        )
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    inputs = {
        "prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
        "negative_pooled_prompt_embeds": nppe, "latents": lat, "num_inference_steps": 3,
        "height": 16, "width": 16,
    }
    return pipe, inputs


def _modular(pipe: Any, inputs: dict[str, Any], expr: Any, batched: bool = False) -> torch.Tensor:
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    modular = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    guider = GuidekitGuidance(expr, batched=batched).attach(scheduler=pipe.scheduler)
    modular.update_components(transformer=pipe.transformer, scheduler=pipe.scheduler, guider=guider)
    modular.set_progress_bar_config(disable=True)
    out: torch.Tensor = modular(output="latents", **inputs)
    return out


@pytest.mark.parametrize("expr", [CFG(W) + PAG(3.0), Cond() + SEG(2.0)], ids=["pag", "seg"])
@pytest.mark.parametrize("batched", [False, True])
@torch.no_grad()
def test_modular_attention_terms_perturb_and_equal_the_classic_adapter(
    sd3: Any, expr: Any, batched: bool
) -> None:
    pipe, inputs = sd3
    processors = dict(pipe.transformer.attn_processors)
    # a pipeline scale the expression does not have is refused (issue 11): Cond() + SEG passes none
    scale = {"guidance_scale": W} if "CFG" in repr(expr) else {}
    with guided(pipe, expr):
        ref = pipe(output_type="latent", **scale, **inputs).images
    out = _modular(pipe, inputs, expr, batched)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-8)
    unperturbed = _modular(pipe, inputs, CFG(W) if "CFG" in repr(expr) else Cond())
    assert (out - unperturbed).abs().max() > 1e-3
    # the engine is out again: the transformer is as it was
    assert dict(pipe.transformer.attn_processors) == processors
    assert "forward" not in vars(pipe.transformer)


@pytest.mark.parametrize(
    ("expr", "match"), [(CFG(W) + SAG(1.0), "second call"), (CFG(W) + EMAG(1.0), "state")],
    ids=["sag", "emag"],
)
def test_terms_a_guider_cannot_run_are_refused_at_construction(expr: Any, match: str) -> None:
    with pytest.raises(GuidanceValueError, match=match):
        GuidekitGuidance(expr)


def _modular_sdxl(unet: Any, expr: Any, batched: bool, **inputs: Any) -> torch.Tensor:
    from diffusers import EulerDiscreteScheduler
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLCoreDenoiseStep,
    )

    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    )
    modular = StableDiffusionXLCoreDenoiseStep().init_pipeline()
    guider = GuidekitGuidance(expr, batched=batched).attach(scheduler=scheduler)
    modular.update_components(unet=unet, scheduler=scheduler, guider=guider)
    modular.set_progress_bar_config(disable=True)
    out: torch.Tensor = modular(
        output="latents", num_inference_steps=3, height=16, width=16, **inputs
    )
    return out


@pytest.fixture(scope="module")
def sdxl_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "prompt_embeds": torch.randn(2, 7, 32, generator=g, dtype=F64),
        "negative_prompt_embeds": torch.randn(2, 7, 32, generator=g, dtype=F64),
        "pooled_prompt_embeds": torch.randn(2, 16, generator=g, dtype=F64),
        "negative_pooled_prompt_embeds": torch.randn(2, 16, generator=g, dtype=F64),
        "latents": torch.randn(2, 4, 8, 8, generator=g, dtype=F64),
    }


@pytest.mark.parametrize("expr", [CFG(W), CFG(W) + PAG(3.0)], ids=["cfg", "pag"])
@torch.no_grad()
def test_modular_sdxl_batched_equals_one_batch_per_branch(
    sdxl_inputs: dict[str, torch.Tensor], expr: Any
) -> None:
    """SDXL's loop calls the UNet with its own B latent rows: batched=True tiles them."""
    unet = tiny.sdxl_unet().to(F64)
    calls: list[int] = []
    handle = unet.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["encoder_hidden_states"].shape[0]), with_kwargs=True)
    try:
        per_branch = _modular_sdxl(unet, expr, False, **sdxl_inputs)
        n = len(calls)
        batched = _modular_sdxl(unet, expr, True, **sdxl_inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(batched, per_branch, rtol=0, atol=1e-10)
    branches = 3 if "PAG" in repr(expr) else 2
    assert calls[:n] == [2] * (3 * branches) and calls[n:] == [2 * branches] * 3
    assert "forward" not in vars(unet)
    if branches == 3:
        assert (per_branch - _modular_sdxl(unet, CFG(W), False, **sdxl_inputs)).abs().max() > 1e-3


def test_batched_input_missing_for_one_conditioning_is_refused_by_name() -> None:
    guider = GuidekitGuidance(CFG(3), batched=True)
    guider.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(999))
    c = torch.randn(2, 3)
    with pytest.raises(GuidanceValueError, match="'time_ids'"):
        guider.prepare_inputs({"encoder_hidden_states": (c, c), "time_ids": (c, None)})
