"""guided(...) on a denoiser whose input concatenates conditioning channels to the latents.

The tiny StableDiffusionInpaintPipeline's UNet takes 9 channels (latents, mask, masked-image
latents) and predicts 4; guidekit guides the 4 latent channels and gives every branch's rows
the sample's mask and masked image back (the x4 upscaler: 7 -> 4, the low-resolution image).
Real diffusers objects from configs, float64.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, PAG, GuidanceValueError
from guidekit.adapters.diffusers import guided

# the shared set-up and the builders of tiny components live next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
import tiny_diffusers as tiny  # noqa: E402
from _diffusers_helpers import F64, PROMPTS, STEPS, forwards, pipe_untouched, snapshot  # noqa: E402

_quiet_single_thread = helpers._quiet_single_thread


def _inpaint_unet(seed: int = 0) -> Any:
    """The tiny SD UNet with the inpainting input: 4 latent + 1 mask + 4 masked-image channels."""
    return tiny.unet(seed, in_channels=9)


@pytest.fixture(scope="module")
def pipe() -> Any:
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        steps_offset=1, clip_sample=False,
    )
    p = StableDiffusionInpaintPipeline(
        vae=tiny._vae(), text_encoder=tiny.clip_encoder(), tokenizer=tiny.clip_tokenizer(),
        unet=_inpaint_unet(), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    p.set_progress_bar_config(disable=True)
    return p.to(F64)


def _kwargs(**extra: Any) -> dict[str, Any]:
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=F64)
    mask = torch.zeros(2, 1, 16, 16, dtype=F64)
    mask[:, :, 4:12, 4:12] = 1
    return {"prompt": PROMPTS, "image": image, "mask_image": mask, "height": 16, "width": 16,
            "output_type": "latent", "num_inference_steps": STEPS, **extra}


def _sample(pipe: Any, **extra: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.as_tensor(pipe(generator=gen, **_kwargs(**extra)).images)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_cfg_reproduces_the_inpaint_pipeline(pipe: Any, strength: float) -> None:
    ref = _sample(pipe, guidance_scale=5.0, strength=strength)
    with forwards("sd", main=pipe.unet) as log, guided(pipe, CFG(5)) as run:
        out = _sample(pipe, guidance_scale=5.0, strength=strength)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    steps = int(STEPS * strength)  # the pipeline skips the first steps where strength < 1
    assert log == [("main", 4)] * steps
    assert [c.rows for c in run.calls] == [4] * steps


def test_cfg_and_pag_batch_one_call_per_step(pipe: Any) -> None:
    with forwards("sd", main=pipe.unet) as log, guided(pipe, CFG(5) + PAG(2)) as run:
        out = _sample(pipe, guidance_scale=5.0)
    assert log == [("main", 6)] * STEPS
    assert [c.rows for c in run.calls] == [6] * STEPS
    assert out.shape == (2, 4, 8, 8)
    assert bool(torch.isfinite(out).all())


def test_the_pipeline_is_unchanged_after_the_block(pipe: Any) -> None:
    before_attrs = snapshot(pipe)
    before = _sample(pipe, guidance_scale=5.0)
    with guided(pipe, CFG(5) + PAG(2)):
        _sample(pipe, guidance_scale=5.0)
    assert torch.equal(_sample(pipe, guidance_scale=5.0), before)
    assert pipe_untouched(pipe, before_attrs)


def test_refuses_conditioning_channels_that_differ_between_cfg_rows(pipe: Any) -> None:
    unet = pipe.unet
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    extra = torch.randn(4, 5, 8, 8, dtype=F64)  # the unconditional rows' differ
    text = torch.randn(4, 77, 32, dtype=F64)
    with guided(pipe, CFG(5)), pytest.raises(GuidanceValueError, match="conditioning channels"):
        unet(torch.cat([torch.cat([x, x]), extra], dim=1), 500, encoder_hidden_states=text)


def test_cfg_reproduces_the_x4_upscaler() -> None:
    """7 -> 4 channels (latents + the low-resolution image), its noise level as class labels."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    unet = tiny.unet(0, in_channels=7, num_class_embeds=100)
    pipe = StableDiffusionUpscalePipeline(
        vae=tiny._vae(scaling_factor=0.08333), text_encoder=tiny.clip_encoder(),
        tokenizer=tiny.clip_tokenizer(), unet=unet, low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"), max_noise_level=99,
    ).to(F64)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    kwargs = {"prompt": PROMPTS, "image": image, "noise_level": 20, "guidance_scale": 5.0,
              "num_inference_steps": STEPS, "output_type": "latent"}
    ref = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    with guided(pipe, CFG(5)) as run:
        out = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert [c.rows for c in run.calls] == [4] * STEPS
