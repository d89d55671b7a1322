"""Every term of the issue through the three ways in: the custom-sampler API, the classic
pipeline adapter and the modular ``guider=``, on a tiny real SD3 pipeline (float64).

For each expression -- TPG, FDG, PAG on the unconditional rows, DynamicThreshold, Toward and
composable, PerpNeg, dual_cfg, BetaCFG, scheduled scales, all with a named conditioning
``neg`` (a negative prompt: ``prompts=`` in the classic adapter, ``attach(conds=...)`` in
the modular guider, ``conds=`` in ``guidekit.guide``) -- a hand-written loop over
``guidekit.guide`` (the attention engine installed by hand), ``guided(pipe, ...)`` and the
modular denoise step with ``GuidekitGuidance`` (one batch per branch, and batched) give the
same latents, which differ from plain CFG. A scheduled scale equals, step by step, the
constant scales of its steps (each gated to its own step), and the x0-space terms repeat on
Stable Diffusion's eps UNet under DDIM (classic adapter against the custom-sampler API).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

import guidekit as gk
from guidekit import (
    CFG,
    FDG,
    PAG,
    SLG,
    TPG,
    BetaCFG,
    DynamicThreshold,
    PerpNeg,
    Toward,
    composable,
    dual_cfg,
)
from guidekit.adapters.diffusers import GuidekitGuidance, guided
from guidekit.schedules import Cosine, Linear, Window

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
from _diffusers_helpers import STEPS, W, denoiser, setup_for  # noqa: E402
from test_diffusers_modular import _sd3_modular  # noqa: E402

_quiet_single_thread, pipes = helpers._quiet_single_thread, helpers.pipes
F64 = torch.float64
NEG = "blurry, dark"
SEED = 5

EXPRS: dict[str, Any] = {
    "tpg": CFG(W) + TPG(2.0, layers=1),
    "fdg": FDG(low=3.0, high=6.0),
    "fdg-projected": FDG(low=3.0, high=Linear(4.0), eta=0.5),
    "pag-uncond": PAG.on_uncond(W, layers=0),
    "slg-uncond-scheduled": CFG(W) + SLG(Cosine(W - 1), layers=1, cond="uncond"),
    "dynamic-threshold": CFG(W) | DynamicThreshold(0.9, max_value=1.5),
    "toward": CFG(W) - Toward(2.0, "neg"),
    "composable": composable({"cond": W, "neg": -1.5}),
    "perpneg": PerpNeg(W, negative="neg"),
    "perpneg-scheduled": PerpNeg(Cosine(W), negative="neg", neg_scale=Window(1, 0.5, 2)),
    "dual": dual_cfg(3.0, W, cond2="neg"),
    "dual-nested": dual_cfg(3.0, 2.0, cond2="neg", nested=True),
    "dual-scheduled": dual_cfg(Linear(3.0), 2.0, cond2="neg", nested=True),
    "betacfg": BetaCFG(W),
    "toward-tpg-scheduled": CFG(Linear(W)) + Toward(Cosine(1.0), "neg") + TPG(Linear(1.5), layers=0),
}


@pytest.fixture(scope="module")
def sd3(pipes: Any) -> dict[str, Any]:
    pipe = pipes("sd3")
    setup = setup_for("sd3", pipe)
    with torch.no_grad():
        neg, _, pooled, _ = pipe.encode_prompt(
            prompt=[NEG, NEG], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=16,
        )
    kw = setup.kwargs
    inputs = {
        "prompt_embeds": kw["prompt_embeds"], "negative_prompt_embeds": kw["negative_prompt_embeds"],
        "pooled_prompt_embeds": kw["pooled_prompt_embeds"],
        "negative_pooled_prompt_embeds": kw["negative_pooled_prompt_embeds"],
        "latents": setup.latents, "num_inference_steps": STEPS, "height": 16, "width": 16,
    }
    return {"pipe": pipe, "setup": setup, "inputs": inputs,
            "guider_neg": {"encoder_hidden_states": neg, "text_embeds": pooled},
            "model_neg": {"encoder_hidden_states": neg, "pooled_projections": pooled}}


def _uses_neg(expr: Any) -> bool:
    return "neg" in {b.cond for b in gk.compile(expr).branches}


def _classic(sd3: dict[str, Any], expr: Any) -> torch.Tensor:
    pipe = sd3["pipe"]
    prompts = {"neg": NEG} if _uses_neg(expr) else None
    with guided(pipe, expr, prompts=prompts, seed=SEED):
        out: torch.Tensor = pipe(
            output_type="latent", max_sequence_length=16, **sd3["inputs"]
        ).images
    return out


def _modular(sd3: dict[str, Any], expr: Any, batched: bool) -> torch.Tensor:
    pipe = sd3["pipe"]
    guider = GuidekitGuidance(expr, batched=batched, seed=SEED).attach(scheduler=pipe.scheduler)
    if _uses_neg(expr):
        guider.attach(conds={"neg": sd3["guider_neg"]})
    out: torch.Tensor = _sd3_modular(pipe, guider)(output="latents", **sd3["inputs"])
    return out


def _custom(sd3: dict[str, Any], expr: Any) -> torch.Tensor:
    """The pipeline's loop by hand over ``guidekit.guide``, on the run's schedule."""
    # a fresh set-up (its scheduler keeps its step index from the last loop), at the levels
    # of the scheduler's own sigma table, as the adapters read them: t / 1000 differs in the
    # last float32 digit, which DynamicThreshold's clamp in x0 space shows
    setup = setup_for("sd3", sd3["pipe"])
    table = [float(s) for s in setup.scheduler.sigmas]
    setup = attrs.evolve(setup, sigma_of=lambda i, t: table[i])
    module, plan = denoiser(sd3["pipe"]), setup.compile(expr)
    conds = {"neg": sd3["model_neg"]} if _uses_neg(expr) else None
    with gk.attention.install(module, plan) as around_call:
        return setup.loop(plan, around_call=around_call, seed=SEED, conds=conds, sigmas=table)


@pytest.mark.parametrize("name", list(EXPRS))
@torch.no_grad()
def test_custom_api_classic_and_modular_adapters_agree(sd3: dict[str, Any], name: str) -> None:
    expr = EXPRS[name]
    assert gk.parse(str(expr)) == expr
    classic = _classic(sd3, expr)
    torch.testing.assert_close(_custom(sd3, expr), classic, rtol=0, atol=1e-8)
    for batched in (False, True):
        torch.testing.assert_close(_modular(sd3, expr, batched), classic, rtol=0, atol=1e-8)
    assert (classic - _classic(sd3, CFG(W))).abs().max() > 1e-4  # the term mattered
    assert "forward" not in vars(sd3["pipe"].transformer)


@torch.no_grad()
def test_a_named_conditioning_reaches_every_adapter(sd3: dict[str, Any]) -> None:
    """``Cond('neg')`` alone is the pipeline run on the negative prompt's embeddings."""
    expr = CFG(W, cond="neg")
    classic = _classic(sd3, expr)
    plain = {**sd3["inputs"], "prompt_embeds": sd3["guider_neg"]["encoder_hidden_states"],
             "pooled_prompt_embeds": sd3["guider_neg"]["text_embeds"]}
    guider = GuidekitGuidance(CFG(W)).attach(scheduler=sd3["pipe"].scheduler)
    ref = _sd3_modular(sd3["pipe"], guider)(output="latents", **plain)
    torch.testing.assert_close(classic, ref, rtol=0, atol=1e-8)
    torch.testing.assert_close(_modular(sd3, expr, True), ref, rtol=0, atol=1e-8)
    torch.testing.assert_close(_custom(sd3, expr), ref, rtol=0, atol=1e-8)
    assert (ref - _classic(sd3, CFG(W))).abs().max() > 1e-4


def _per_step(make: Any, values: list[float], levels: list[float]) -> Any:
    """``make(v_i)`` gated to step ``i``'s level alone, summed: the constant-scale run."""
    cuts = [float("inf"), *((a + b) / 2 for a, b in zip(levels, levels[1:])), 0.0]  # noisiest first
    return sum((make(v).between(lo, hi) for v, hi, lo in zip(values, cuts, cuts[1:])), CFG(W))


@pytest.mark.parametrize(
    "make",
    [lambda w: TPG(w, layers=1), lambda w: SLG(w, layers=1, cond="uncond"),
     lambda w: Toward(w, "neg")],
    ids=["tpg", "slg-uncond", "toward"],
)
@torch.no_grad()
def test_a_scheduled_scale_equals_the_constant_scale_of_each_step(
    sd3: dict[str, Any], make: Any
) -> None:
    """``CFG(W) + D(Linear(2))`` runs step ``i`` as ``CFG(W) + D(4 i / (N - 1))``: the same
    latents as the sum of those constant terms each gated to its own step, in the classic
    adapter and the modular guider; the 0 scale of the first step drops D's rows there."""
    pipe = sd3["pipe"]
    expr = CFG(W) + make(Linear(2.0))
    with guided(pipe, expr, prompts={"neg": NEG} if _uses_neg(expr) else None, seed=SEED) as run:
        out = pipe(output_type="latent", max_sequence_length=16, **sd3["inputs"]).images
    levels = [c.sigma for c in run.calls]
    values = [4.0 * i / (STEPS - 1) for i in range(STEPS)]
    ref = _classic(sd3, _per_step(make, values, levels))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-8)
    torch.testing.assert_close(_modular(sd3, expr, True), ref, rtol=0, atol=1e-8)
    rows = [c.rows for c in run.calls]
    assert rows[0] < rows[1] == rows[2]  # D's branch does not run where its scale is 0


SD_EXPRS: dict[str, Any] = {
    "fdg-projected": FDG(low=3.0, high=Linear(4.0), eta=0.5),
    "dynamic-threshold": CFG(W) | DynamicThreshold(0.9, max_value=1.5),
    "perpneg-scheduled": PerpNeg(Cosine(W), negative="neg", neg_scale=(Linear(1),)),
    "betacfg": BetaCFG(W, gamma=0.5),
    "dual-tpg": dual_cfg(Cosine(3.0), W, cond2="neg") + TPG(Linear(1.0), layers=0),
}


@pytest.mark.parametrize("name", list(SD_EXPRS))
@torch.no_grad()
def test_an_eps_unet_pipeline_equals_the_custom_api(pipes: Any, name: str) -> None:
    """The same on Stable Diffusion's UNet under DDIM (an eps model, VP noise, levels from
    ``alphas_cumprod``): the x0-space terms convert through the scheduler's own table."""
    expr = SD_EXPRS[name]
    pipe = pipes("sd")
    setup = setup_for("sd", pipe)
    prompts = {"neg": NEG} if _uses_neg(expr) else None
    # the expression alone guides: no pipeline scale
    kwargs = {k: v for k, v in setup.kwargs.items() if k != "guidance_scale"}
    with guided(pipe, expr, prompts=prompts, seed=SEED):
        classic = helpers.sample(pipe, **kwargs)
    neg = pipe.encode_prompt([NEG, NEG], "cpu", 1, False)[0]
    sigmas = [setup.sigma_of(i, t) for i, t in enumerate(setup.scheduler.timesteps)] + [0.0]
    plan = setup.compile(expr)
    with gk.attention.install(denoiser(pipe), plan) as around_call:
        custom = setup.loop(plan, around_call=around_call, seed=SEED, sigmas=sigmas,
                            conds={"neg": {"encoder_hidden_states": neg}} if prompts else None)
    torch.testing.assert_close(custom, classic, rtol=0, atol=1e-8)
    assert (classic - helpers.sample(pipe, **setup.kwargs)).abs().max() > 1e-4
