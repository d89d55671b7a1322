"""A denoiser shared by another pipeline is guided only for the guided pipeline's own calls.

``StableDiffusionImg2ImgPipeline.from_pipe(pipe)`` (or a pipeline built from
``pipe.components``) calls the same UNet. Inside ``guided(pipe, expr)`` such a call is
refused by name: guided, it would ignore its own ``guidance_scale``; unguided, the block's
expression. A loop of the user's own calling ``pipe.unet`` stays guided (documented), and
after the block the other pipeline runs exactly as before. Tiny real SD pipelines, float64.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, PAG, GuidanceValueError
from guidekit.adapters.diffusers import guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from tiny_diffusers import one_thread, run_sd, sd_fixture  # noqa: E402,F401  (fixtures)

F64 = torch.float64
PROMPTS = ["a cat", "a dog"]

pytestmark = pytest.mark.usefixtures("one_thread")


def img2img(pipe: Any, **kwargs: Any) -> torch.Tensor:
    image = torch.rand(2, 3, 16, 16, dtype=F64, generator=torch.Generator().manual_seed(5))
    return pipe(
        prompt=PROMPTS, image=image, strength=0.6, num_inference_steps=5, output_type="latent",
        generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


@torch.no_grad()
def test_a_pipeline_from_pipe_is_refused_inside_the_block_and_unchanged_after(sd: Any) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    i2i = tiny._quiet(StableDiffusionImg2ImgPipeline.from_pipe(sd, torch_dtype=F64))
    assert i2i.unet is sd.unet
    before = img2img(i2i, guidance_scale=3.0)
    with guided(sd, CFG(5)) as g:
        run_sd(sd)
        for kwargs in ({"guidance_scale": 3.0}, {"guidance_scale": 5.0}, {}):
            with pytest.raises(
                GuidanceValueError,
                match=r"StableDiffusionImg2ImgPipeline called the UNet2DConditionModel that "
                r"guided\(StableDiffusionPipeline, CFG\(5\)\) guides .*outside the with block",
            ):
                img2img(i2i, **kwargs)
        again = run_sd(sd)  # the guided pipeline still runs, from a fresh run
    assert g.runs == 2 and [c.rows for c in g.calls] == [4] * 6
    assert "forward" not in vars(sd.unet)
    torch.testing.assert_close(img2img(i2i, guidance_scale=3.0), before, rtol=0, atol=0)
    with guided(sd, CFG(5)):
        torch.testing.assert_close(run_sd(sd), again, rtol=0, atol=0)


@torch.no_grad()
def test_a_pipeline_of_the_same_components_and_class_is_refused() -> None:
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline

    # its own pipeline: the refused PAG pipeline leaves its processors on the UNet, as
    # diffusers does on any error inside its call
    sd = tiny.sd_pipeline().to(F64)
    twin = tiny._quiet(StableDiffusionPipeline(**sd.components))
    with guided(sd, CFG(5)), pytest.raises(
        GuidanceValueError, match=r"another StableDiffusionPipeline called the UNet2DConditionModel"
    ):
        run_sd(twin, guidance_scale=3.0)
    # the other pipeline's own guidance arguments never reach guidekit's argument checks
    pag = tiny._quiet(StableDiffusionPAGPipeline(**sd.components))
    with guided(sd, CFG(5) + PAG(2)), pytest.raises(
        GuidanceValueError, match=r"StableDiffusionPAGPipeline called the UNet2DConditionModel"
    ):
        run_sd(pag, guidance_scale=5.0, pag_scale=1.0)
    assert "forward" not in vars(sd.unet)


@torch.no_grad()
def test_the_guided_pipeline_and_a_loop_of_ones_own_stay_guided(sd: Any) -> None:
    with guided(sd, CFG(5)):
        ref = run_sd(sd)
    x = torch.randn(2, 4, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 77, 32, dtype=F64)
    with guided(sd, CFG(5)) as g:
        out = sd.unet(x.repeat(2, 1, 1, 1), 500, encoder_hidden_states=text.repeat(2, 1, 1)).sample
        torch.testing.assert_close(run_sd(sd), ref, rtol=0, atol=0)
    plain = sd.unet(x.repeat(2, 1, 1, 1), 500, encoder_hidden_states=text.repeat(2, 1, 1)).sample
    # the direct call was guided: both halves hold the guided prediction u + 5 (c - u)
    torch.testing.assert_close(out[:2], out[2:], rtol=0, atol=0)
    u, c = plain[:2], plain[2:]
    torch.testing.assert_close(out[:2], u + 5 * (c - u), rtol=1e-9, atol=1e-9)
    assert [c.rows for c in g.calls] == [4] * 4
