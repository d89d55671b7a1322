"""Named prompts in classic pipelines: ``guided(pipe, expr, prompts={"neg": ...})``.

Tiny real SD, SDXL, PixArt-alpha, SD3, Flux and DiT pipelines (float64). A named prompt is
encoded by the pipeline's own ``encode_prompt`` (pooled embeddings and masks included), so
``CFG(7, negative="neg")`` with ``prompts={"neg": "blurry"}`` must equal the pipeline's own
CFG with ``negative_prompt="blurry"``; an expression of three conditionings runs as one call
of three row blocks per step and equals a hand-written ``guidekit.guide`` loop given the
same embeddings; DiT takes class labels; what cannot be built is refused by name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import guidekit as gk
from guidekit import CFG, Cond, GuidanceTypeError, GuidanceValueError, Uncond
from guidekit.adapters.diffusers import guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
import tiny_diffusers as tiny  # noqa: E402
from _diffusers_helpers import (  # noqa: E402
    F64,
    PROMPTS,
    STEPS,
    call_kwargs,
    denoiser,
    forwards,
    pipe_untouched,
    sample,
    setup_for,
    snapshot,
    text_inputs,
)

_quiet_single_thread, pipes = helpers._quiet_single_thread, helpers.pipes
TEXT = ["sd", "sdxl", "pixart", "sd3", "flux"]
NEG = "blurry, dark"


@pytest.fixture(scope="module")
def get(pipes: Any) -> Any:
    cache: dict[str, Any] = {}

    def build(kind: str) -> Any:
        if kind != "sdxl":
            return pipes(kind)
        if kind not in cache:
            cache[kind] = tiny.sdxl_pipeline().to(F64)
        return cache[kind]

    return build


def _kwargs(kind: str, scale: float = 7.0) -> dict[str, Any]:
    kw = call_kwargs("sd" if kind == "sdxl" else kind, scale)
    kw.pop("negative_prompt", None)
    return kw


# -- a named negative prompt is the pipeline's own negative prompt ------------------------------


@pytest.mark.parametrize("kind", TEXT)
@torch.no_grad()
def test_a_named_negative_equals_the_pipelines_own_negative_prompt(kind: str, get: Any) -> None:
    pipe = get(kind)
    ref = sample(pipe, **_kwargs(kind), negative_prompt=[NEG, NEG])
    module = denoiser(pipe)
    before_pipe, before_module = snapshot(pipe), snapshot(module)
    with forwards("sd" if kind == "sdxl" else kind, main=module) as log, guided(
        pipe, CFG(7, negative="neg"), prompts={"neg": NEG}, max_rows="one call"
    ) as run:
        out = sample(pipe, **_kwargs(kind))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # c and neg in one call per step; the pipeline's empty negative prompt is not run
    assert [(c.rows, c.branches) for c in run.calls] == [(4, ("c", "neg"))] * STEPS
    assert log == [("main", 4)] * STEPS
    assert pipe_untouched(pipe, before_pipe) and snapshot(module) == before_module
    # no unconditional rows needed: a scale of 1 (no CFG batch) gives the same sample
    if kind != "flux":
        with guided(pipe, CFG(7, negative="neg"), prompts={"neg": NEG}) as run:
            alone = sample(pipe, **_kwargs(kind, 1.0))
        torch.testing.assert_close(alone, ref, rtol=0, atol=1e-5)
    # and the pipeline's own negative prompt is still `u`
    with guided(pipe, CFG(7)):
        again = sample(pipe, **_kwargs(kind), negative_prompt=[NEG, NEG])
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_one_named_prompt_per_prompt_and_images_per_prompt(get: Any) -> None:
    pipe = get("sd")
    for extra in ({}, {"num_images_per_prompt": 2}):
        ref = sample(pipe, **_kwargs("sd"), negative_prompt=["blurry", "dark"], **extra)
        with guided(pipe, CFG(7, negative="neg"), prompts={"neg": ["blurry", "dark"]}) as run:
            out = sample(pipe, **_kwargs("sd"), **extra)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert run.calls[0].rows == 2 * ref.shape[0]
    cls, before = type(pipe), snapshot(pipe)
    with guided(pipe, CFG(7, negative="neg"), prompts={"neg": ["a", "b", "c"]}), pytest.raises(
        GuidanceValueError, match=r"has 3 prompts for a pipeline call of 2 prompts"
    ):
        sample(pipe, **_kwargs("sd"))
    # refused inside the pipeline's encode_prompt: everything is put back all the same
    assert type(pipe) is cls and pipe_untouched(pipe, before) and "forward" not in vars(pipe.unet)


# -- three conditionings: one call of three row blocks, as a hand-written loop --------------------


def _named_embeddings(kind: str, pipe: Any, text: str) -> dict[str, torch.Tensor]:
    """The denoiser inputs of ``text`` (both samples), encoded as the pipeline does."""
    return text_inputs(kind, pipe, [text] * len(PROMPTS))


@pytest.mark.parametrize("kind", ["sd", "pixart", "sd3"])
@pytest.mark.parametrize("which", ["neg", "style"])
@torch.no_grad()
def test_three_conditionings_are_one_call_and_match_a_guide_loop(
    kind: str, which: str, get: Any
) -> None:
    pipe = get(kind)
    setup = setup_for(kind, pipe)
    setup.kwargs.pop("guidance_scale")
    if which == "neg":
        expr, text = CFG(7) - 2 * (Cond("neg") - Uncond()), NEG
    else:
        expr, text = CFG(5) + 3 * (Cond("style") - Uncond()), "an oil painting"
    with forwards(kind, main=denoiser(pipe)) as log, guided(
        pipe, expr, prompts={which: text}, max_rows="one call"
    ) as run:
        # prompt embeddings given: the named prompt is encoded to the call's token length
        length = {} if kind == "sd" else {"max_sequence_length": 16}
        out = sample(pipe, **setup.kwargs, **length, guidance_scale=7 if which == "neg" else 5)
    assert [(c.rows, c.branches) for c in run.calls] == [(6, ("c", "u", which))] * STEPS
    assert log == [("main", 6)] * STEPS
    now: dict[str, Any] = {}
    model = gk.guide(
        setup.compile(expr), setup.make(None, now), cond=setup.cond, uncond=setup.uncond,
        conds={which: _named_embeddings(kind, pipe, text)},
    )
    x = setup.latents
    for i, t in enumerate(setup.scheduler.timesteps):
        now["t"], now["i"] = t, i
        scale = getattr(setup.scheduler, "scale_model_input", None)
        pred = model(scale(x, t) if scale is not None else x, setup.sigma_of(i, t))
        x = setup.scheduler.step(pred, t, x).prev_sample
    torch.testing.assert_close(out, setup.finish(x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_flux_and_sdxl_three_conditionings_in_one_call(get: Any) -> None:
    for kind in ("flux", "sdxl"):
        pipe = get(kind)
        kw = {**_kwargs(kind, 5.0), **({"negative_prompt": ["", ""]} if kind == "flux" else {})}
        plain = sample(pipe, **kw)
        expr = CFG(5) + 3 * (Cond("style") - Uncond())
        with guided(pipe, expr, prompts={"style": "an oil painting"}, max_rows="one call") as run:
            out = sample(pipe, **kw)
        assert [(c.rows, c.branches) for c in run.calls] == [(6, ("c", "u", "style"))] * STEPS
        assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4


# -- DiT: class labels ---------------------------------------------------------------------------


@torch.no_grad()
def test_dit_takes_class_labels_by_number_or_name(get: Any) -> None:
    pipe = get("dit")
    kw = call_kwargs("dit", 7.0)
    ref = sample(pipe, **kw)
    seen: list[torch.Tensor] = []
    embedder = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder
    handle = embedder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        # the null class as the named negative is plain CFG
        with guided(pipe, CFG(7, negative="neg"), prompts={"neg": 1000}) as run:
            out = sample(pipe, **kw)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert run.calls[0].branches == ("c", "neg")
        seen.clear()
        with guided(pipe, CFG(7, negative="neg"), prompts={"neg": "dog"}):
            other = sample(pipe, **kw)
    finally:
        handle.remove()
    assert seen[0].tolist() == [0, 1, 1, 1]  # c: the call's labels, neg: 'dog' for both
    assert (other - ref).abs().max() > 1e-4
    with pytest.raises(GuidanceValueError, match=r"prompts=\{'neg'"):
        with guided(pipe, CFG(7, negative="neg"), prompts={"neg": "zebra"}):
            pass


# -- refused by name --------------------------------------------------------------------------------


@torch.no_grad()
def test_prompts_that_cannot_be_honoured_are_refused_by_name(get: Any) -> None:
    pipe = get("sd")
    cls = type(pipe)
    cases: list[tuple[Any, Any, type[Exception], str]] = [
        (CFG(7, negative="neg"), None, GuidanceValueError, r"reads the conditioning\(s\) 'neg'.*prompts="),
        (CFG(7), {"neg": "x"}, GuidanceValueError, r"names 'neg', which CFG\(7\) does not read"),
        (CFG(7, negative="neg"), {"neg": "x", "uncond": "y"}, GuidanceValueError, r"'uncond' is the pipeline's own negative prompt.*negative_prompt="),
        (CFG(7, negative="neg"), {"neg": 3}, GuidanceTypeError, r"prompts=\{'neg': \.\.\.\}\) takes a prompt"),
        (CFG(7, negative="neg"), ["neg"], GuidanceTypeError, r"maps conditioning names to prompts"),
    ]
    for expr, prompts, error, match in cases:
        with pytest.raises(error, match=match):
            with guided(pipe, expr, prompts=prompts):
                pass
        assert type(pipe) is cls and "encode_prompt" not in vars(pipe)


@torch.no_grad()
def test_a_denoiser_call_without_the_pipelines_encoding_is_refused(get: Any) -> None:
    pipe = get("sd")
    pe, npe = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    x = torch.zeros(2, 4, 8, 8, dtype=F64)
    with guided(pipe, CFG(7, negative="neg"), prompts={"neg": NEG}), pytest.raises(
        GuidanceValueError, match=r"encoded at the pipeline's encode_prompt, which this pipeline call"
    ):
        pipe.unet(torch.cat([x, x]), 10, encoder_hidden_states=torch.cat([npe, pe]))
    assert "forward" not in vars(pipe.unet)


def test_a_pipeline_with_nothing_to_encode_is_refused() -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2,
    )
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(GuidanceValueError, match=r"DDPMPipeline has neither an encode_prompt nor class labels"):
        with guided(pipe, CFG(1) + 2 * (Cond("style") - Cond()), prompts={"style": "x"}):
            pass
