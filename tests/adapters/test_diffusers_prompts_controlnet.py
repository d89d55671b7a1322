"""Named prompts in ControlNet pipelines: each named row block gets its own residuals.

Tiny ``StableDiffusionControlNetPipeline`` and ``StableDiffusionXLControlNetPipeline``
(every ControlNet parameter perturbed so that its residuals matter), float64. With
``prompts={"neg": ...}`` the named rows ride in the pipeline's one ControlNet call per step,
so ``CFG(7, negative="neg")`` equals the pipeline's own CFG with that negative prompt;
``guess_mode`` has no rule for named rows and is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, PAG, Cond, GuidanceValueError, Uncond
from guidekit.adapters.diffusers import guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (a fixture)

F64 = torch.float64
NEG = "blurry, dark"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request: pytest.FixtureRequest) -> Any:
    build = tiny.sd_controlnet_pipeline if request.param == "sd" else tiny.sdxl_controlnet_pipeline
    return build().to(F64)


def run(pipe: Any, **kwargs: Any) -> torch.Tensor:
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    return pipe(
        prompt=["a cat", "a photo of a dog"], image=image, height=16, width=16,
        num_inference_steps=3, guidance_scale=7, output_type="latent",
        generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


@torch.no_grad()
def test_a_named_negative_gets_its_own_residuals_in_the_one_controlnet_call(pipe: Any) -> None:
    ref = run(pipe, negative_prompt=[NEG, NEG])
    rows: list[int] = []
    handle = pipe.controlnet.conv_in.register_forward_pre_hook(
        lambda m, a: rows.append(int(a[0].shape[0]))
    )
    try:
        with guided(pipe, CFG(7, negative="neg"), prompts={"neg": NEG}, max_rows="one call") as g:
            out = run(pipe)
    finally:
        handle.remove()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # one ControlNet call per step: the pipeline's [u, c] and the named block
    assert rows == [6, 6, 6]
    assert [(c.rows, c.branches) for c in g.calls] == [(4, ("c", "neg"))] * 3
    assert "forward" not in vars(pipe.controlnet) and "forward" not in vars(pipe.unet)
    # the residuals matter: the named block without them would be another sample
    assert (run(pipe, negative_prompt=[NEG, NEG], controlnet_conditioning_scale=0.0) - ref).abs().max() > 1e-3


@torch.no_grad()
def test_three_conditionings_and_pag_with_a_controlnet(pipe: Any) -> None:
    expr = CFG(7) - 2 * (Cond("neg") - Uncond()) + PAG(2)
    with guided(pipe, expr, prompts={"neg": NEG}, max_rows="one call") as g:
        out = run(pipe)
    assert [c.branches for c in g.calls] == [("c", "u", "neg", "c[IdentityAttention()]")] * 3
    assert torch.isfinite(out).all() and (out - run(pipe)).abs().max() > 1e-4


@torch.no_grad()
def test_guess_mode_with_named_prompts_is_refused(pipe: Any) -> None:
    with guided(pipe, CFG(7, negative="neg"), prompts={"neg": NEG}), pytest.raises(
        GuidanceValueError, match=r"guess_mode=True.*call the pipeline with guess_mode=False"
    ):
        run(pipe, guess_mode=True)
    assert "forward" not in vars(pipe.controlnet)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@torch.no_grad()
def test_sd3_and_flux_controlnets_run_the_named_rows_in_their_one_call(kind: str) -> None:
    """SD3 samples the VAE latents of the control image per row of its CFG batch, so its
    unconditional rows see other control latents than the conditional ones (a named block
    takes the conditional rows'); Flux runs its ControlNet on the conditional rows only."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    build = tiny.sd3_controlnet_pipeline if kind == "sd3" else tiny.flux_controlnet_pipeline
    pipe = build().to(F64)
    scale = "guidance_scale" if kind == "sd3" else "true_cfg_scale"

    def call() -> torch.Tensor:
        torch.manual_seed(3)  # the pipeline samples the VAE encoding of the control image
        return pipe(
            prompt=["a cat", "a dog"], negative_prompt=["", ""], control_image=image,
            height=16, width=16, num_inference_steps=3, output_type="latent",
            max_sequence_length=16, generator=torch.Generator().manual_seed(0), **{scale: 7.0},
        ).images

    plain = call()
    rows: list[int] = []
    entry = pipe.controlnet.pos_embed if kind == "sd3" else pipe.controlnet.x_embedder
    handle = entry.register_forward_pre_hook(lambda m, a: rows.append(int(a[0].shape[0])))
    try:
        with guided(
            pipe, CFG(7) - 2 * (Cond("neg") - Uncond()), prompts={"neg": NEG}, max_rows="one call"
        ) as g:
            out = call()
    finally:
        handle.remove()
    assert [c.branches for c in g.calls] == [("c", "u", "neg")] * 3
    assert rows == ([6] * 3 if kind == "sd3" else [4] * 3)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4
    assert "forward" not in vars(pipe.controlnet)
