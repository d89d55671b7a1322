"""Compiled models in every adapter: ``torch.compile(m)`` and ``m.compile()``.

Each adapter runs a real tiny diffusers model compiled with the ``eager`` backend (Dynamo
traces, nothing is code-generated, so it takes seconds on CPU) and must give the eager run's
output. For plans without the attention engine the Dynamo counters are asserted too: the
guided model call compiles as one graph without a break, and a second run of the same
expression compiles nothing new.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import guidekit as gk
import guidekit.models
from guidekit import APG, CFG, PAG, Autoguidance
from guidekit.adapters.diffusers import GuidekitGuidance, guided
from guidekit.adapters.flow import FlowGuided
from guidekit.adapters.kdiffusion import KDiffusionGuided
from guidekit.attention import install
from guidekit.compiled import original_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402

STYLES = ["torch.compile(m)", "m.compile()"]


@contextlib.contextmanager
def compiled(model: torch.nn.Module, style: str) -> Iterator[Any]:
    """``model`` compiled in ``style`` (eager backend, fresh Dynamo caches); undone on exit."""
    torch._dynamo.reset()
    counters.clear()
    try:
        if style == "m.compile()":
            model.compile(backend="eager")
            yield model
        else:
            yield torch.compile(model, backend="eager")
    finally:
        model._compiled_call_impl = None
        torch._dynamo.reset()


def dynamo() -> tuple[int, int]:
    """(frames compiled, graph breaks) since the last :func:`compiled` reset."""
    return counters["frames"]["ok"], sum(counters["graph_break"].values())


def assert_one_graph_no_recompile(run: Callable[[], Any]) -> None:
    run()
    assert dynamo() == (1, 0), dict(counters["graph_break"])
    run()  # the same expression again: nothing new to compile
    assert dynamo() == (1, 0)


def _dit_latents(pipe: Any) -> torch.Tensor:
    out = pipe(class_labels=[0, 1], num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    return torch.as_tensor(out.images)


# -- the classic pipeline adapter ---------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("expr", [CFG(4), CFG(4) | APG(eta=0, momentum=-0.5)], ids=repr)
@torch.no_grad()
def test_classic_pipeline_with_a_compiled_denoiser_equals_eager(style: str, expr: Any) -> None:
    pipe = tiny.dit_pipeline()
    module = pipe.transformer
    with guided(pipe, expr):
        ref = _dit_latents(pipe)
    with compiled(module, style) as m:
        pipe.transformer = m
        before = dict(vars(m))

        def run() -> torch.Tensor:
            with guided(pipe, expr) as g:
                out = _dit_latents(pipe)
            assert [c.rows for c in g.calls] == [4] * 3  # still one batched call per step
            return out

        torch.testing.assert_close(run(), ref, rtol=0, atol=1e-5)
        assert dynamo()[1] == 0
        assert_one_graph_no_recompile(run)
        assert dict(vars(m)) == before  # the compiled call is put back
    assert "forward" not in vars(module)


@pytest.mark.parametrize("style", STYLES)
@torch.no_grad()
def test_classic_pipeline_with_a_compiled_denoiser_runs_pag(style: str) -> None:
    pipe = tiny.dit_pipeline()
    module = pipe.transformer
    with guided(pipe, CFG(4)):
        cfg = _dit_latents(pipe)
    with guided(pipe, CFG(4) + PAG(3)):
        ref = _dit_latents(pipe)
    assert (ref - cfg).abs().max() > 1e-3  # PAG really changes the samples
    with compiled(module, style) as m:
        pipe.transformer = m
        with guided(pipe, CFG(4) + PAG(3)):
            out = _dit_latents(pipe)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_a_compiled_denoiser_keeps_one_call_instead_of_a_timed_split(style: str) -> None:
    """A timing trial of a second split would recompile the denoiser: guided() keeps one
    call for a compiled one (the auto default otherwise; an explicit max_rows is kept)."""
    pipe = tiny.dit_pipeline()
    with guided(pipe, CFG(4)) as g:
        assert g.plan.max_rows is None
    module = pipe.transformer
    with compiled(module, style) as m:
        pipe.transformer = m
        with guided(pipe, CFG(4)) as g:
            assert g.plan.max_rows == "one call"
        with guided(pipe, CFG(4), max_rows=2) as g:
            assert g.plan.max_rows == 2
    pipe.transformer = module


@pytest.mark.parametrize("style", STYLES)
def test_install_finds_the_layers_of_the_original_module(style: str) -> None:
    dit = tiny.dit_transformer()
    plan = gk.compile(CFG(2) + PAG(2), prediction="eps")
    expected = install(dit, plan).layers
    with compiled(dit, style) as m:
        assert original_module(m) is dit
        assert install(m, plan).layers == expected


# -- the modular pipelines' guider --------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@torch.no_grad()
def test_modular_guider_with_a_compiled_transformer_equals_eager(style: str) -> None:
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    pipe = tiny.sd3_pipeline()
    weak = tiny.sd3_transformer(seed=1)
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=["a cat", "a dog"], prompt_2=None, prompt_3=None, negative_prompt=["", ""],
        do_classifier_free_guidance=True, max_sequence_length=16,
    )
    inputs = {
        "prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
        "negative_pooled_prompt_embeds": nppe, "num_inference_steps": 3, "height": 16,
        "width": 16, "latents": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)),
    }
    expr = CFG(4) + Autoguidance(1.5) | APG(eta=0, momentum=-0.5)

    def run(transformer: Any, batched: bool) -> torch.Tensor:
        guider = GuidekitGuidance(expr, batched=batched).attach(scheduler=pipe.scheduler, weak=weak)
        modular = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
        modular.update_components(transformer=transformer, scheduler=pipe.scheduler, guider=guider)
        modular.set_progress_bar_config(disable=True)
        return modular(output="latents", **inputs)

    module = pipe.transformer
    for batched in (False, True):
        ref = run(module, batched)
        with compiled(module, style) as m:
            torch.testing.assert_close(run(m, batched), ref, rtol=0, atol=1e-5)
        assert "forward" not in vars(module)


# -- k-diffusion, flow_matching, guide() --------------------------------------------------------


def _unet_eps(unet: Any) -> Callable[..., torch.Tensor]:
    return lambda x, t, cond: unet(x, t, encoder_hidden_states=cond).sample


@pytest.mark.parametrize("style", STYLES)
@torch.no_grad()
def test_kdiffusion_heun_with_a_compiled_unet_equals_eager(style: str) -> None:
    from k_diffusion import sampling

    unet = tiny.unet()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    sigmas = sampling.get_sigmas_karras(4, 0.03, 14.6, rho=7).float()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 8, 8, generator=g) * sigmas[0]
    text, null = torch.randn(2, 6, 32, generator=g), torch.zeros(2, 6, 32)

    def run(net: Any, expr: Any, around_call: Any = None) -> torch.Tensor:
        den = KDiffusionGuided(expr, _unet_eps(net), prediction="eps", cond=text, uncond=null,
                               sigmas=sigmas, alphas_cumprod=ac, around_call=around_call)
        return sampling.sample_heun(den, x0, sigmas, disable=True)

    expr = CFG(3) | APG(eta=0, momentum=-0.5)
    ref = run(unet, expr)
    plan = gk.compile(CFG(3) + PAG(2), prediction="eps", noise=gk.Noise("ve", alphas_cumprod=ac))
    with install(unet, plan) as around:
        ref_pag = run(unet, plan, around)
    with compiled(unet, style) as m:
        torch.testing.assert_close(run(m, expr), ref, rtol=0, atol=1e-5)
        assert_one_graph_no_recompile(lambda: run(m, expr))
        with install(m, plan) as around:
            torch.testing.assert_close(run(m, plan, around), ref_pag, rtol=0, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
@torch.no_grad()
def test_flow_matching_solver_with_a_compiled_sd3_transformer_equals_eager(style: str) -> None:
    from flow_matching.solver import ODESolver

    sd3 = tiny.sd3_transformer()
    g = torch.Generator().manual_seed(4)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 64, generator=g),
            "pooled_projections": torch.randn(2, 64, generator=g)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    noise = torch.randn(2, 4, 8, 8, generator=g)
    grid = torch.linspace(0, 1, 4)

    def run(net: Any) -> torch.Tensor:
        def v(x: torch.Tensor, sigma: torch.Tensor, **c: Any) -> torch.Tensor:
            return net(hidden_states=x, timestep=1000 * sigma, **c).sample

        guided_v = FlowGuided(CFG(3) | APG(eta=0), v, model_time="sigma", cond=cond,
                              uncond=uncond, time_grid=grid)
        return ODESolver(guided_v).sample(x_init=noise, step_size=None, method="midpoint",
                                          time_grid=grid)

    ref = run(sd3)
    with compiled(sd3, style) as m:
        torch.testing.assert_close(run(m), ref, rtol=0, atol=1e-5)
        assert_one_graph_no_recompile(lambda: run(m))


@pytest.mark.parametrize("style", STYLES)
@torch.no_grad()
def test_guide_and_the_bundled_models_with_a_compiled_transformer_equal_eager(style: str) -> None:
    bundled, weak = guidekit.models.load("eps"), guidekit.models.load("eps-weak")
    exprs = [CFG(3), CFG(3) | APG(), CFG(3) + Autoguidance(1), CFG(3) + PAG(2)]
    refs = [guidekit.models.sample(bundled, e, [1, 2], steps=3, weak=weak).images for e in exprs]
    module = bundled.transformer
    with compiled(module, style) as m:
        bundled.transformer = m
        try:
            for expr, ref in zip(exprs[:3], refs[:3]):
                out = guidekit.models.sample(bundled, expr, [1, 2], steps=3, weak=weak).images
                torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
            assert dynamo() == (1, 0)  # three expressions, one graph: the rows' shape is the same
            out = guidekit.models.sample(bundled, exprs[3], [1, 2], steps=3, weak=weak).images
            torch.testing.assert_close(out, refs[3], rtol=0, atol=1e-5)
        finally:
            bundled.transformer = module
