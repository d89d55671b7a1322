"""ControlNet pipelines under ``guided(...)``: the residuals follow the plan's rows.

Tiny ``StableDiffusionControlNetPipeline`` and ``StableDiffusionXLControlNetPipeline``
(ControlNets from the tiny UNets, every parameter perturbed so that its residuals matter),
SD3 and Flux ControlNet pipelines, float64. Plain ``CFG(w)`` must equal the pipeline's own
CFG, with and without ``guess_mode`` (ControlNet on the conditional rows only, zeros for the
others); ``CFG(w) + PAG(s)`` must hand each row block the residuals of its conditioning (and
SDXL's ``added_cond_kwargs`` of its conditioning).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, PAG, GuidanceValueError
from guidekit.adapters.diffusers import guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (a fixture)

from guidekit.adapters._diffusers_rows import Leaf, fill, take_apart  # noqa: E402

F64 = torch.float64
W = 4.0


# every test here runs on one torch thread (the fixture lives in tiny_diffusers)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> Any:
    return tiny.sd_controlnet_pipeline().to(F64)


@pytest.fixture(scope="module")
def sdxl() -> Any:
    return tiny.sdxl_controlnet_pipeline().to(F64)


def run(pipe: Any, **kwargs: Any) -> torch.Tensor:
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    return pipe(
        prompt=["a cat", "a photo of a dog"], image=image, height=16, width=16,
        num_inference_steps=3, guidance_scale=W, output_type="latent",
        generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


@pytest.mark.parametrize("kind", ["pipe", "sdxl"], ids=["sd", "sdxl"])
@pytest.mark.parametrize("guess_mode", [False, True])
@torch.no_grad()
def test_plain_cfg_equals_the_controlnet_pipelines_own(
    request: pytest.FixtureRequest, kind: str, guess_mode: bool
) -> None:
    pipe = request.getfixturevalue(kind)
    ref = run(pipe, guess_mode=guess_mode)
    with guided(pipe, CFG(W)) as g:
        out = run(pipe, guess_mode=guess_mode)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert [c.rows for c in g.calls] == [4, 4, 4]
    # the residuals matter: without them the sample is another one
    assert (run(pipe, guess_mode=guess_mode, controlnet_conditioning_scale=0.0) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["pipe", "sdxl"], ids=["sd", "sdxl"])
@pytest.mark.parametrize("guess_mode", [False, True])
@torch.no_grad()
def test_pag_rows_get_the_residuals_of_their_conditioning(
    request: pytest.FixtureRequest, kind: str, guess_mode: bool
) -> None:
    """What the UNet adds after its mid block, per row, is the ControlNet's mid residual of
    that row's conditioning: rows [c, u, c perturbed] get [res_c, res_u, res_c]. SDXL's
    text-time embedding input follows the rows too."""
    pipe = request.getfixturevalue(kind)
    unet = pipe.unet
    seen: dict[str, list[torch.Tensor]] = {"res": [], "mid": [], "up_in": [], "add": []}
    handles = [
        pipe.controlnet.register_forward_hook(lambda m, a, out: seen["res"].append(out[1])),
        unet.mid_block.register_forward_hook(lambda m, a, out: seen["mid"].append(out)),
        unet.up_blocks[0].register_forward_pre_hook(
            lambda m, a, kw: seen["up_in"].append(kw.get("hidden_states", a[0] if a else None)),
            with_kwargs=True,
        ),
    ]
    if getattr(unet, "add_embedding", None) is not None:
        handles.append(unet.add_embedding.register_forward_pre_hook(
            lambda m, a: seen["add"].append(a[0])
        ))
    try:
        cfg_only = run(pipe, guess_mode=guess_mode)
        add_u, add_c = seen["add"][0].chunk(2) if seen["add"] else (None, None)
        for v in seen.values():
            v.clear()
        with guided(pipe, CFG(W) + PAG(3.0)) as g:
            out = run(pipe, guess_mode=guess_mode)
    finally:
        for h in handles:
            h.remove()
    assert [c.rows for c in g.calls] == [6, 6, 6]
    assert g.calls[0].branches == ("c", "u", "c[IdentityAttention()]")
    assert torch.isfinite(out).all() and (out - cfg_only).abs().max() > 1e-4
    for res, mid, up_in in zip(seen["res"], seen["mid"], seen["up_in"], strict=True):
        if guess_mode:  # the ControlNet ran on the conditional rows only
            res_u, res_c = torch.zeros_like(res), res
        else:
            res_u, res_c = res.chunk(2)
        torch.testing.assert_close(up_in - mid, torch.cat([res_c, res_u, res_c]), rtol=0, atol=1e-12)
    if add_c is not None:  # SDXL: pooled text and time ids of each row's conditioning
        assert not torch.equal(add_c, add_u)
        for add in seen["add"]:
            torch.testing.assert_close(add, torch.cat([add_c, add_u, add_c]), rtol=0, atol=0)
    assert (kind == "sdxl") == (add_c is not None)


@torch.no_grad()
def test_a_residual_with_other_rows_is_refused_by_name(pipe: Any) -> None:
    unet = pipe.unet
    x = torch.randn(2, 4, 8, 8, dtype=F64).repeat(2, 1, 1, 1)  # the CFG batch [x, x]
    text = torch.randn(4, 77, 32, dtype=F64)
    with guided(pipe, CFG(W)) as g:
        g._batch = 2  # the pipeline's sample batch, as prepare_latents would record it
        with pytest.raises(GuidanceValueError, match="mid_block_additional_residual"):
            unet(x, torch.tensor(500), encoder_hidden_states=text,
                 mid_block_additional_residual=torch.randn(3, 8, 4, 4, dtype=F64))
        with pytest.raises(GuidanceValueError, match="added_cond_kwargs.extra"):
            unet(x, torch.tensor(500), encoder_hidden_states=text,
                 added_cond_kwargs={"extra": torch.randn(2, 5, dtype=F64)})


@dataclasses.dataclass
class _Embeds:
    values: torch.Tensor


@torch.no_grad()
def test_per_row_tensors_in_an_opaque_object_are_refused_by_name(pipe: Any) -> None:
    x = torch.randn(2, 4, 8, 8, dtype=F64).repeat(2, 1, 1, 1)
    text = torch.randn(4, 77, 32, dtype=F64)
    with guided(pipe, CFG(W)), pytest.raises(GuidanceValueError, match="cross_attention_kwargs.extra"):
        pipe.unet(x, torch.tensor(500), encoder_hidden_states=text,
                  cross_attention_kwargs={"extra": _Embeds(torch.zeros(4, 3, dtype=F64))})


def test_take_apart_and_fill_round_trip_through_nested_containers() -> None:
    n = 4
    args = {
        "sample": torch.zeros(n, 1),
        "timestep": torch.arange(n),
        "txt_ids": torch.zeros(n, 3),
        "added_cond_kwargs": {"text_embeds": torch.randn(n, 2), "image_embeds": [torch.randn(n, 5)]},
        "down_block_additional_residuals": (torch.randn(n, 2), torch.randn(n, 3)),
        "cross_attention_kwargs": {"scale": 0.5, "mask": torch.ones(n, 7), "table": torch.ones(1, 7)},
    }
    parts = take_apart(args, "sample", n, n // 2)
    assert set(parts.shared) == {"timestep"}
    assert set(parts.rows) == {
        "added_cond_kwargs.text_embeds", "added_cond_kwargs.image_embeds.0",
        "down_block_additional_residuals.0", "down_block_additional_residuals.1",
        "cross_attention_kwargs.mask",
    }
    assert parts.template["txt_ids"] is args["txt_ids"]  # never per-row
    assert isinstance(parts.template["down_block_additional_residuals"][0], Leaf)
    halves = {k: v[:2] for k, v in {**parts.rows, **parts.shared}.items()}
    back = fill(parts.template, halves)
    assert isinstance(back["down_block_additional_residuals"], tuple)
    embeds = args["added_cond_kwargs"]["image_embeds"][0]
    assert torch.equal(back["added_cond_kwargs"]["image_embeds"][0], embeds[:2])
    assert back["cross_attention_kwargs"]["scale"] == 0.5
    assert back["cross_attention_kwargs"]["table"] is args["cross_attention_kwargs"]["table"]


@torch.no_grad()
def test_sd3_controlnet_cfg_equals_the_pipelines_own_and_pag_runs_in_one_call() -> None:
    pipe = tiny.sd3_controlnet_pipeline().to(F64)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)

    def sd3(**kwargs: Any) -> torch.Tensor:
        torch.manual_seed(3)  # the pipeline samples the VAE encoding of the control image
        return pipe(
            prompt=["a cat", "a dog"], control_image=image, height=16, width=16,
            num_inference_steps=3, guidance_scale=W, output_type="latent",
            max_sequence_length=16, generator=torch.Generator().manual_seed(0), **kwargs,
        ).images

    ref = sd3()
    assert (sd3(controlnet_conditioning_scale=0.0) - ref).abs().max() > 1e-3
    with guided(pipe, CFG(W)):
        out = sd3()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    with guided(pipe, CFG(W) + PAG(3.0)) as g:
        pag = sd3()
    assert [c.rows for c in g.calls] == [6, 6, 6]
    assert torch.isfinite(pag).all() and (pag - ref).abs().max() > 1e-4


@torch.no_grad()
def test_flux_controlnet_cfg_equals_the_pipelines_own_and_block_samples_follow_the_rows() -> None:
    """Flux ControlNet: the pipeline runs the ControlNet once per step on the conditional
    prompt and hands its block samples to both transformer calls; under ``CFG + PAG`` every
    row block of guidekit's one call gets them."""
    pipe = tiny.flux_controlnet_pipeline().to(F64)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)

    def flux(**kwargs: Any) -> torch.Tensor:
        torch.manual_seed(3)  # the pipeline samples the VAE encoding of the control image
        return pipe(
            prompt=["a cat", "a dog"], negative_prompt=["", ""], control_image=image,
            height=16, width=16, num_inference_steps=3, true_cfg_scale=W, output_type="latent",
            max_sequence_length=16, generator=torch.Generator().manual_seed(0), **kwargs,
        ).images

    ref = flux()
    assert (flux(controlnet_conditioning_scale=0.0) - ref).abs().max() > 1e-3
    with guided(pipe, CFG(W)) as g:
        out = flux()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert [c.rows for c in g.calls] == [4, 4, 4]

    transformer = pipe.transformer
    seen: dict[str, list[torch.Tensor]] = {"samples": [], "double_out": [], "single_in": []}
    handles = [
        pipe.controlnet.register_forward_hook(lambda m, a, out: seen["samples"].append(out[0][0])),
        transformer.transformer_blocks[0].register_forward_hook(
            lambda m, a, out: seen["double_out"].append(out[1])
        ),
        transformer.single_transformer_blocks[0].register_forward_pre_hook(
            lambda m, a, kw: seen["single_in"].append(kw["hidden_states"]), with_kwargs=True
        ),
    ]
    try:
        with guided(pipe, CFG(W) + PAG(3.0)) as g:
            pag = flux()
    finally:
        for h in handles:
            h.remove()
    assert [c.rows for c in g.calls] == [6, 6, 6]
    assert torch.isfinite(pag).all() and (pag - ref).abs().max() > 1e-4
    assert len(seen["samples"]) == len(seen["single_in"]) == 3
    for sample, double_out, single_in in zip(*seen.values(), strict=True):
        assert sample.shape[0] == 2 and double_out.shape[0] == 6
        torch.testing.assert_close(single_in - double_out, sample.repeat(3, 1, 1), rtol=0, atol=1e-12)
