"""A guidance argument whose default is on is refused by name, passed or left out.

``StableDiffusionPAGPipeline`` defaults ``pag_scale=3``, ``StableDiffusionSAGPipeline``
``sag_scale=0.75``, InstructPix2Pix ``image_guidance_scale=1.5``: equal to the default is not
off, so inside ``guided(pipe, expr)`` such a call is refused before it runs, naming the
argument and the fix (pass it as 0, write the term in the expression). Off, the pipeline runs
the expression. A modifier whose switch is off (SD3's ``skip_layer_guidance_scale=2.8`` with
``skip_guidance_layers=None``) is off. Tiny real pipelines, float64.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, PAG, Cond, GuidanceValueError
from guidekit.adapters.diffusers import guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (a fixture)

F64 = torch.float64
PROMPTS = ["a cat", "a dog"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(pipe: Any, **kwargs: Any) -> torch.Tensor:
    return pipe(
        prompt=PROMPTS, height=16, width=16, num_inference_steps=3, output_type="latent",
        generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


def components() -> dict[str, Any]:
    return tiny.sd_pipeline().to(F64).components


@torch.no_grad()
def test_pag_pipelines_default_pag_scale_is_refused_by_name() -> None:
    from diffusers import StableDiffusionPAGPipeline

    pipe = tiny._quiet(StableDiffusionPAGPipeline(**components(), pag_applied_layers=["mid"]))
    fix = r"pass pag_scale=0 \(guidekit's PAG\(s\) replaces it: write PAG\(scale\) .*PAG\(3\.0\)\)"
    for kwargs, said in (({}, r"leaves pag_scale at its default 3\.0"), ({"pag_scale": 3.0}, r"'s pag_scale=3\.0")):
        with guided(pipe, CFG(5) + PAG(3)) as g, pytest.raises(GuidanceValueError, match=said + ".*" + fix):
            run(pipe, guidance_scale=5.0, **kwargs)
        assert g.calls == []  # refused before the pipeline ran
    with guided(pipe, CFG(5) + PAG(3)) as g:
        out = run(pipe, guidance_scale=5.0, pag_scale=0)
    assert [c.rows for c in g.calls] == [6] * 3 and torch.isfinite(out).all()
    # pag_adaptive_scale only gates the pipeline's PAG: off while pag_scale is off
    with guided(pipe, CFG(5)) as g:
        run(pipe, guidance_scale=5.0, pag_scale=0, pag_adaptive_scale=0.5)
    assert [c.rows for c in g.calls] == [4] * 3
    plain = tiny.sd_pipeline().to(F64)
    with guided(pipe, CFG(5)):  # its own CFG, as StableDiffusionPipeline's
        mine = run(pipe, guidance_scale=5.0, pag_scale=0)
    plain.unet, plain.text_encoder, plain.vae = pipe.unet, pipe.text_encoder, pipe.vae
    torch.testing.assert_close(mine, run(plain, guidance_scale=5.0), rtol=0, atol=1e-9)


@torch.no_grad()
def test_sag_pipelines_default_sag_scale_is_refused_by_name() -> None:
    from diffusers import StableDiffusionSAGPipeline

    pipe = tiny._quiet(StableDiffusionSAGPipeline(**components()))
    for expr, kwargs in ((CFG(5), {"guidance_scale": 5.0}), (Cond(), {})):
        with guided(pipe, expr) as g, pytest.raises(
            GuidanceValueError,
            match=r"leaves sag_scale at its default 0\.75.*pass sag_scale=0 \(guidekit's SAG\(s\) replaces it",
        ):
            run(pipe, **kwargs)
        assert g.calls == []
    with guided(pipe, CFG(5)), pytest.raises(GuidanceValueError, match=r"sag_scale=0\.75 asks .*SAG\(0\.75\)"):
        run(pipe, guidance_scale=5.0, sag_scale=0.75)
    own = run(pipe, guidance_scale=1.0, sag_scale=0.0)  # the pipeline's conditional-only sampling
    with guided(pipe, Cond()) as g:
        out = run(pipe, sag_scale=0.0)
    assert [c.rows for c in g.calls] == [2] * 3
    torch.testing.assert_close(out, own, rtol=0, atol=0)


@torch.no_grad()
def test_instruct_pix2pix_default_image_guidance_scale_is_refused_by_name() -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    parts = components()
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=2,
    ).to(F64)
    pipe = tiny._quiet(StableDiffusionInstructPix2PixPipeline(**parts))
    image = torch.rand(2, 3, 16, 16, dtype=F64, generator=torch.Generator().manual_seed(5))
    kwargs = {"prompt": PROMPTS, "image": image, "num_inference_steps": 2, "output_type": "latent"}
    with guided(pipe, CFG(5)), pytest.raises(
        GuidanceValueError, match=r"leaves image_guidance_scale at its default 1\.5.*three-way"
    ):
        pipe(guidance_scale=5.0, **kwargs)


def test_a_modifier_is_off_while_its_switch_is_off() -> None:
    import inspect

    from diffusers import StableDiffusion3Pipeline

    from guidekit.adapters._diffusers_arguments import refuse_unowned

    params = dict(list(inspect.signature(StableDiffusion3Pipeline.__call__).parameters.items())[1:])
    assert params["skip_layer_guidance_scale"].default == 2.8  # on, but only with layers
    refuse_unowned({}, params)
    refuse_unowned({"skip_layer_guidance_start": 0.1, "skip_guidance_layers": []}, params)
    with pytest.raises(GuidanceValueError, match=r"skip_guidance_layers=\[0\] .*write SLG"):
        refuse_unowned({"skip_guidance_layers": [0]}, params)
