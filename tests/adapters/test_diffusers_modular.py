"""The modular ``guider=`` component: attention terms, run state and guidance settings.

A tiny modular SD3 denoise step (float64) with ``GuidekitGuidance``: PAG and SEG batches run
with guidekit's attention engine installed on the transformer the guider's
``prepare_models`` is handed, so the result equals ``guided(pipe, ...)`` on the classic
pipeline with the same inputs (and differs from plain CFG); terms a guider cannot honour are
refused when it is built. Each pipeline call starts a fresh run (``guidekit.run.Run``), and
diffusers' guidance settings (``guidance_scale``, ``guidance_rescale``) are honoured or
refused by name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import (
    APG,
    CFG,
    EMAG,
    EMAGQ,
    PAG,
    SAG,
    SEG,
    CFGZeroStar,
    Cond,
    GuidanceValueError,
    Rescale,
)
from guidekit.adapters.diffusers import GuidekitGuidance, guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from _modular_sd3 import sd3_modular, sd3_setup  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (a fixture)

F64 = torch.float64
W = 4.0


# every test here runs on one torch thread (the fixture lives in tiny_diffusers)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3() -> tuple[Any, dict[str, Any]]:
    return sd3_setup()


_sd3_modular = sd3_modular


def _modular(pipe: Any, inputs: dict[str, Any], expr: Any, batched: bool = False) -> torch.Tensor:
    guider = GuidekitGuidance(expr, batched=batched).attach(scheduler=pipe.scheduler)
    out: torch.Tensor = _sd3_modular(pipe, guider)(output="latents", **inputs)
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


def test_a_term_a_guider_cannot_run_is_refused_at_construction() -> None:
    with pytest.raises(GuidanceValueError, match="second call"):
        GuidekitGuidance(CFG(W) + SAG(1.0))


@pytest.mark.parametrize(
    "term",
    [
        EMAG(3.0, layers=(0, 1), beta=0.5),
        EMAGQ(3.0, layers=(0, 1), beta=0.5),
        EMAG(3.0, layers=(0, 1), beta=0.5).between(0.0, 0.7),  # averaged while gated off
    ],
    ids=["emag", "emagq", "gated-emag"],
)
@pytest.mark.parametrize("batched", [False, True])
@torch.no_grad()
def test_stateful_emag_equals_the_classic_adapter(sd3: Any, term: Any, batched: bool) -> None:
    """EMAG's averages are observed in the loop's own calls of the batches (the step's forward
    state rides on each batch's row layout) and committed once per step by the run."""
    pipe, inputs = sd3
    expr = CFG(W) + term
    with guided(pipe, expr):
        ref = pipe(guidance_scale=W, output_type="latent", **inputs).images
    guider = GuidekitGuidance(expr, batched=batched).attach(scheduler=pipe.scheduler)
    out = _sd3_modular(pipe, guider)(output="latents", **inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert (out - _modular(pipe, inputs, CFG(W))).abs().max() > 1e-4
    (state,) = guider.run.state.named().values()
    assert state.steps == inputs["num_inference_steps"]  # once per step, not per batch
    assert "forward" not in vars(pipe.transformer)


# -- run state: one guidekit.run.Run per pipeline call --------------------------------------------

APG_EXPR = CFG(W) | APG(eta=0.0, momentum=-0.5)


@torch.no_grad()
def test_each_modular_call_starts_a_fresh_run(sd3: Any) -> None:
    """Two identical calls give identical latents; a 3-step call after a 5-step one equals a
    fresh guider's 3-step call (APG's momentum is not carried over)."""
    pipe, inputs = sd3
    guider = GuidekitGuidance(APG_EXPR).attach(scheduler=pipe.scheduler)
    modular = _sd3_modular(pipe, guider)
    first = modular(output="latents", **inputs)
    again = modular(output="latents", **inputs)
    assert torch.equal(first, again)
    assert guider.run.steps == inputs["num_inference_steps"]

    modular(output="latents", **{**inputs, "num_inference_steps": 5})
    assert guider.run.steps == 5
    after = modular(output="latents", **inputs)
    assert guider.run.steps == inputs["num_inference_steps"]
    torch.testing.assert_close(after, first, rtol=0, atol=0)
    fresh = GuidekitGuidance(APG_EXPR).attach(scheduler=pipe.scheduler)
    torch.testing.assert_close(_sd3_modular(pipe, fresh)(output="latents", **inputs), first)
    # the momentum matters, so a stale run would show
    assert (first - _modular(pipe, inputs, CFG(W) | APG(eta=0.0))).abs().max() > 1e-4


def _contract_step(guider: Any, step: int, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One step of a modular loop by hand: the model returns its conditioning."""
    guider.set_state(step=step, num_inference_steps=3, timestep=torch.tensor(999 - 300 * step))
    batches = guider.prepare_inputs({"encoder_hidden_states": (c, u)})
    for b in batches:
        guider.prepare_models(torch.nn.Identity())
        b.noise_pred = b.encoder_hidden_states
        guider.cleanup_models(torch.nn.Identity())
    out: torch.Tensor = guider(batches).pred
    return out


def test_steps_are_counted_without_a_scheduler() -> None:
    """CFG-Zero*'s zero-init needs the step count; without a scheduler every step used to
    read as the same level, so the output stayed zero at every step."""
    guider = GuidekitGuidance(CFGZeroStar(3.0, zero_init_steps=1))
    c, u = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    assert torch.equal(_contract_step(guider, 0, c, u), torch.zeros_like(c))
    assert _contract_step(guider, 1, c, u).abs().max() > 1e-3
    assert guider.run.steps == 2
    assert torch.equal(_contract_step(guider, 0, c, u), torch.zeros_like(c))  # a new call
    assert guider.run.steps == 1


# -- diffusers' guidance settings: honoured or refused by name -----------------------------------


@torch.no_grad()
def test_guidance_rescale_is_rescale_and_equals_diffusers_own_guider(sd3: Any) -> None:
    from diffusers.guiders import ClassifierFreeGuidance

    pipe, inputs = sd3
    peer = ClassifierFreeGuidance(guidance_scale=W, guidance_rescale=0.7)
    ref = _sd3_modular(pipe, peer)(output="latents", **inputs)
    guider = GuidekitGuidance(CFG(W), guidance_scale=W, guidance_rescale=0.7)
    assert guider.plan.expr == CFG(W) | Rescale(0.7)
    out = _sd3_modular(pipe, guider.attach(scheduler=pipe.scheduler))(output="latents", **inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert (out - _modular(pipe, inputs, CFG(W))).abs().max() > 1e-4  # the rescale mattered
    again = guider.new(guidance_rescale=0.0)
    assert again.plan.expr == CFG(W) and again.config["expression"] == repr(CFG(W))


def test_guidance_scale_the_expression_does_not_use_is_refused(tmp_path: Path) -> None:
    expr = CFG(W) + PAG(3.0)
    guider = GuidekitGuidance(expr, guidance_scale=W)
    assert guider.guidance_scale == W  # what the SDXL blocks read for a guidance embedding
    with pytest.raises(GuidanceValueError, match=r"guidance_scale=2.*CFG scale is 4.*CFG\(2\)"):
        GuidekitGuidance(expr, guidance_scale=2)
    with pytest.raises(GuidanceValueError, match="guidance_scale=2"):
        guider.new(guidance_scale=2)
    with pytest.raises(GuidanceValueError, match="changes with sigma"):
        GuidekitGuidance(CFG(W).between(1, 2), guidance_scale=W)
    with pytest.raises(GuidanceValueError, match="no one CFG scale"):
        _ = GuidekitGuidance(CFG(W).between(1, 2)).guidance_scale
    guider.save_pretrained(tmp_path)
    assert GuidekitGuidance.from_pretrained(tmp_path).config["guidance_scale"] == W


def test_guidance_settings_assigned_or_unknown_are_refused_by_name() -> None:
    guider = GuidekitGuidance(CFG(W))
    with pytest.raises(GuidanceValueError, match=r"guider.guidance_scale = 2.*expression="):
        guider.guidance_scale = 2.0
    with pytest.raises(GuidanceValueError, match=r"guidance_rescale=0.7"):
        guider.guidance_rescale = 0.7
    guider.guidance_scale = W  # what it already is: nothing to refuse
    assert guider.plan.expr == CFG(W)
    # another guider's setting, which diffusers' from_config would drop with a log line
    with pytest.raises(GuidanceValueError, match="'use_original_formulation'"):
        guider.new(use_original_formulation=True)
    with pytest.raises(GuidanceValueError, match="'perturbed_guidance_scale'"):
        GuidekitGuidance.from_config({"expression": "CFG(3)", "perturbed_guidance_scale": 2.8})


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


@pytest.mark.parametrize("expr", [CFG(5), CFG(5).between(0, 5), CFG(5).between(5, 100)],
                         ids=repr)
@pytest.mark.parametrize("batched", [False, True])
@torch.no_grad()
def test_the_full_sdxl_modular_pipeline_equals_the_classic_adapter(expr: Any, batched: bool) -> None:
    # SDXL's text-encoder blocks prepare the negative embeddings only where the guider's
    # num_conditions > 1 BEFORE the loop: batched it read 1 (one forward group), and a
    # gated CFG read 1 at its first level, so the loop got no negative embeddings
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (  # noqa: E501
        StableDiffusionXLAutoBlocks,
    )

    pipe = tiny.sdxl_pipeline().to(torch.float64)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
    call = {"prompt": ["a cat", "a dog"], "height": 16, "width": 16, "num_inference_steps": 3}
    with guided(pipe, expr):
        classic = pipe(**call, output_type="latent", latents=latents.clone()).images
    modular = StableDiffusionXLAutoBlocks().init_pipeline()
    modular.update_components(**{k: v for k, v in pipe.components.items() if v is not None})
    modular.set_progress_bar_config(disable=True)
    guider = GuidekitGuidance(expr, batched=batched).attach(scheduler=modular.scheduler)
    modular.update_components(guider=guider)
    for _ in range(2):  # a second call starts from the first one's last step
        assert guider.num_conditions == 2
        out = modular(**call, output="latents", latents=latents.clone())
        torch.testing.assert_close(out, classic, rtol=1e-10, atol=1e-10)
