"""guidekit.adapters.diffusers with tiny real diffusers pipelines (random weights, float64).

The pipelines are DiT, PixArt-alpha, SD3, Flux and Stable Diffusion, built offline in
``tiny_diffusers.py``. They run unmodified: ``guided(pipe, expr)`` wraps the denoiser's forward
for the duration of a ``with`` block. The tests check that:

* plain ``CFG(w)`` reproduces each pipeline's own output;
* a hand-written sampling loop around ``guidekit.guide`` gives the same result for
  Autoguidance + APG, which checks the row split, the timestep -> sigma mapping (APG works in
  x0 space, so a wrong sigma changes the result) and the learned-sigma channels;
* the real forwards are one call per forward group per step;
* the module is left as it was, even after errors;
* the modular ``guider=`` component matches the classic pipelines.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

import guidekit as gk
from guidekit import APG, CADS, CFG, PAG, Autoguidance, Cond, GuidanceValueError
from guidekit.adapters.diffusers import GuidekitGuidance, guided, layout_for

# the builders of tiny components live next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402

F64 = torch.float64
STEPS = 3
W = 4.0
# Different token lengths on purpose: the pipelines pad every prompt (and the empty negative
# prompt) to the tokenizer's max length, so cond and uncond rows share one batch.
PROMPTS = ["a cat", "a photo of a big dog on the grass"]
KINDS = ["dit", "pixart", "sd3", "flux", "sd"]


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_thread() -> Iterator[None]:
    """One thread (tiny models run slower with more on a shared machine) and quiet logs."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    threads, dv, tv = torch.get_num_threads(), dlog.get_verbosity(), tlog.get_verbosity()
    torch.set_num_threads(1)
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    dlog.set_verbosity(dv)
    tlog.set_verbosity(tv)


_BUILD: dict[str, Callable[[], Any]] = {
    "dit": tiny.dit_pipeline, "pixart": tiny.pixart_pipeline, "sd3": tiny.sd3_pipeline,
    "flux": tiny.flux_pipeline, "sd": tiny.sd_pipeline,
}
_WEAK: dict[str, Callable[..., Any]] = {
    "dit": tiny.dit_transformer, "pixart": tiny.pixart_transformer,
    "sd3": tiny.sd3_transformer, "flux": tiny.flux_transformer, "sd": tiny.unet,
}
# The first submodule each denoiser runs on its input: a pre-hook there counts real forwards.
_ENTRY = {"dit": "pos_embed", "pixart": "pos_embed", "sd3": "pos_embed", "flux": "x_embedder",
          "sd": "conv_in"}


@pytest.fixture(scope="module")
def pipes() -> Callable[[str], Any]:
    """Each tiny pipeline (float64), built once per module on first use."""
    cache: dict[str, Any] = {}

    def get(kind: str) -> Any:
        if kind not in cache:
            cache[kind] = _BUILD[kind]().to(F64)
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def weak_models() -> Callable[[str], Any]:
    """A second tiny denoiser per kind (another seed): Autoguidance's weak model."""
    cache: dict[str, Any] = {}

    def get(kind: str) -> Any:
        if kind not in cache:
            cache[kind] = _WEAK[kind](seed=7).to(F64)
        return cache[kind]

    return get


def call_kwargs(kind: str, scale: float = W) -> dict[str, Any]:
    common = {"height": 16, "width": 16, "output_type": "latent"}
    if kind == "dit":
        return {"class_labels": [0, 1], "guidance_scale": scale, "output_type": "pt"}
    if kind == "pixart":
        return {**common, "prompt": PROMPTS, "guidance_scale": scale, "max_sequence_length": 16,
                "use_resolution_binning": False, "clean_caption": False}
    if kind == "sd3":
        return {**common, "prompt": PROMPTS, "guidance_scale": scale, "max_sequence_length": 16}
    if kind == "flux":
        negative = ["", ""] if scale > 1 else None
        return {**common, "prompt": PROMPTS, "negative_prompt": negative,
                "true_cfg_scale": scale, "max_sequence_length": 16}
    return {**common, "prompt": PROMPTS, "guidance_scale": scale}


def sample(pipe: Any, **kwargs: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.as_tensor(pipe(generator=gen, num_inference_steps=STEPS, **kwargs).images)


def denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


@contextlib.contextmanager
def forwards(kind: str, **modules: torch.nn.Module) -> Iterator[list[tuple[str, int]]]:
    """Log ``(name, rows)`` for every real forward of the named denoisers."""
    log: list[tuple[str, int]] = []
    handles = [
        getattr(m, _ENTRY[kind]).register_forward_pre_hook(
            lambda _m, args, name=name: log.append((name, int(args[0].shape[0])))
        )
        for name, m in modules.items()
    ]
    try:
        yield log
    finally:
        for h in handles:
            h.remove()


def snapshot(obj: Any) -> dict[str, int]:
    """The object's instance attributes by identity: equal snapshots mean nothing was left."""
    return {k: id(v) for k, v in vars(obj).items()}


def pipe_untouched(pipe: Any, before: dict[str, int]) -> bool:
    """No attribute added to or left on the pipeline (a run re-sets some of its own values)."""
    patched = {"prepare_latents", "encode_prompt"}
    return set(vars(pipe)) == set(before) and not patched & set(vars(pipe))


# -- the pipelines' own CFG, reproduced -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_plain_cfg_equals_the_pipelines_own_output(kind: str, pipes: Any) -> None:
    pipe = pipes(kind)
    ref = sample(pipe, **call_kwargs(kind))
    module = denoiser(pipe)
    before_module, before_pipe = snapshot(module), snapshot(pipe)
    with forwards(kind, main=module) as log, guided(pipe, CFG(W)) as run:
        out = sample(pipe, **call_kwargs(kind))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # one batched call of 2B rows per step, also for Flux, which itself calls twice per step
    assert log == [("main", 4)] * STEPS
    assert [(c.model, c.rows, c.branches) for c in run.calls] == [("main", 4, ("c", "u"))] * STEPS
    assert run.runs == 1 and run.steps == STEPS
    assert snapshot(module) == before_module and "forward" not in vars(module)
    assert pipe_untouched(pipe, before_pipe)


@pytest.mark.parametrize("kind", ["dit", "sd3", "flux"])
@torch.no_grad()
def test_an_explicit_pipeline_scale_must_be_the_expressions(kind: str, pipes: Any) -> None:
    """The expression alone guides; a scale the call passes must agree with it (issue 11:
    ``guidance_scale=7`` under ``CFG(2.5)`` silently ran 2.5)."""
    pipe = pipes(kind)
    ref = sample(pipe, **call_kwargs(kind, scale=2.5))
    name = "true_cfg_scale" if kind == "flux" else "guidance_scale"
    left_out = call_kwargs(kind, scale=2.5)
    if kind != "flux":  # the pipeline's default scale (> 1) prepares the unconditional rows
        del left_out[name]
    for kwargs in (call_kwargs(kind, scale=2.5), left_out):
        with guided(pipe, CFG(2.5)):
            out = sample(pipe, **kwargs)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    module, cls = denoiser(pipe), type(pipe)
    before = snapshot(module)
    with guided(pipe, CFG(2.5)), pytest.raises(
        GuidanceValueError, match=rf"{name}=7 is not the CFG scale of CFG\(2.5\).*write CFG\(7\)"
    ):
        sample(pipe, **call_kwargs(kind, scale=7.0))
    assert snapshot(module) == before and type(pipe) is cls  # the call hook is gone


# -- a composite expression: one call per forward group per step --------------------------------


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_autoguidance_and_apg_run_one_call_per_forward_group(
    kind: str, pipes: Any, weak_models: Any
) -> None:
    pipe, weak = pipes(kind), weak_models(kind)
    expr = CFG(W) + Autoguidance(1.5) | APG(eta=0, momentum=-0.5)
    plain = sample(pipe, **call_kwargs(kind))
    with forwards(kind, main=denoiser(pipe), weak=weak) as log, guided(
        pipe, expr, models={"weak": weak}
    ) as run:
        out = sample(pipe, **call_kwargs(kind))
    assert log == [("main", 4), ("weak", 2)] * STEPS
    assert [(c.model, c.rows, c.step) for c in run.calls] == [
        (m, r, s) for s in range(STEPS) for m, r in (("main", 4), ("weak", 2))
    ]
    assert torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-4  # the extra terms changed the sample


# -- against hand-written sampling loops (independent sigma, split and channel handling) ----------


def _guide_loop(
    plan: gk.Plan, scheduler: Any, x: torch.Tensor, make_model: Callable[[Any], Any],
    cond: dict[str, Any], uncond: dict[str, Any], weak: Any, sigma_of: Callable[[int, Any], float],
    around_call: Any = None, seed: int = 0,
) -> torch.Tensor:
    """A diffusers-style loop: scale the input, guide with ``guidekit.guide``, step.

    ``now`` (shared with the models) holds the current timestep ``t`` and step index ``i``.
    """
    now: dict[str, Any] = {}
    guided_model = gk.guide(
        plan, make_model(None, now), cond=cond, uncond=uncond,
        models={"weak": make_model(weak, now)}, around_call=around_call, seed=seed,
    )
    for i, t in enumerate(scheduler.timesteps):
        now["t"], now["i"] = t, i
        scale = getattr(scheduler, "scale_model_input", None)  # flow schedulers have none
        inp = scale(x, t) if scale is not None else x
        pred = guided_model(inp, sigma_of(i, t))
        x = scheduler.step(pred, t, x).prev_sample
    return x


@torch.no_grad()
def test_sd3_matches_a_hand_written_flow_loop(pipes: Any, weak_models: Any) -> None:
    pipe, weak = pipes("sd3"), weak_models("sd3")
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, negative_prompt=["", ""],
        do_classifier_free_guidance=True, max_sequence_length=16,
    )
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    # the gate leaves the weak model out of the last step (sigma ~0.003): sigma must be right
    expr = CFG(W) + Autoguidance(1.5).between(0.5, 1) | APG(eta=0, momentum=-0.5)
    with guided(pipe, expr, models={"weak": weak}) as run:
        out = pipe(
            prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
            negative_pooled_prompt_embeds=nppe, latents=lat, guidance_scale=W,
            num_inference_steps=STEPS, height=16, width=16, output_type="latent",
        ).images
    assert [c.model for c in run.calls] == ["main", "weak", "main", "weak", "main"]

    scheduler = copy.deepcopy(pipe.scheduler)  # from_config would drop defaulted settings
    scheduler.set_timesteps(STEPS)

    def make(module: Any, now: dict[str, Any]) -> Any:
        net = module if module is not None else pipe.transformer

        def model(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
            t = now["t"].expand(x.shape[0])
            return net(hidden_states=x, timestep=t, return_dict=False, **cond)[0]

        return model

    ref = _guide_loop(
        gk.compile(expr, prediction="flow", noise="flow"), scheduler, lat, make,
        {"encoder_hidden_states": pe, "pooled_projections": ppe},
        {"encoder_hidden_states": npe, "pooled_projections": nppe}, weak,
        lambda i, t: float(t) / 1000.0,  # SD3's timesteps are 1000 sigma
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "EulerDiscreteScheduler"])
@torch.no_grad()
def test_stable_diffusion_matches_a_hand_written_vp_loop(
    scheduler_name: str, weak_models: Any
) -> None:
    import diffusers

    cls = getattr(diffusers, scheduler_name)
    pipe = tiny.sd_pipeline(
        cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    ).to(F64)
    weak = weak_models("sd")
    pe, npe = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    expr = CFG(W) + Autoguidance(1.5).between(1, 100) | APG(eta=0.2, momentum=-0.5)
    with guided(pipe, expr, models={"weak": weak}):
        out = pipe(
            prompt_embeds=pe, negative_prompt_embeds=npe, latents=lat, guidance_scale=W,
            num_inference_steps=STEPS, height=16, width=16, output_type="latent",
        ).images

    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    abar = scheduler.alphas_cumprod.double()

    def make(module: Any, now: dict[str, Any]) -> Any:
        net = module if module is not None else pipe.unet

        def model(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
            return net(x, now["t"], **cond).sample

        return model

    def sigma_of(i: int, t: Any) -> float:
        if scheduler_name == "EulerDiscreteScheduler":
            return float(scheduler.sigmas[i])  # the model input is x / sqrt(sigma^2 + 1)
        a = abar[int(t)]
        return float(((1 - a) / a).sqrt())

    ref = _guide_loop(
        gk.compile(expr, prediction="eps", noise="vp"), scheduler,
        lat * scheduler.init_noise_sigma, make, {"encoder_hidden_states": pe},
        {"encoder_hidden_states": npe}, weak, sigma_of,
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_dit_learned_sigma_and_cond_first_rows_match_a_hand_written_loop(
    pipes: Any, weak_models: Any
) -> None:
    from diffusers.utils.torch_utils import randn_tensor

    pipe, weak = pipes("dit"), weak_models("dit")
    expr = CFG(W) + Autoguidance(1.0) | APG(eta=0, momentum=-0.5)
    with guided(pipe, expr, models={"weak": weak}):
        out = sample(pipe, **call_kwargs("dit"))

    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    abar = scheduler.alphas_cumprod.double()
    c = pipe.transformer.config.in_channels

    def make(module: Any, now: dict[str, Any]) -> Any:
        net = module if module is not None else pipe.transformer

        def model(x: torch.Tensor, sigma: torch.Tensor, class_labels: Any) -> torch.Tensor:
            t = now["t"].expand(x.shape[0])
            return net(x, timestep=t, class_labels=class_labels).sample[:, :c]  # eps channels

        return model

    lat = randn_tensor((2, c, 8, 8), generator=torch.Generator().manual_seed(0), dtype=F64)
    labels = torch.tensor([0, 1])
    x = _guide_loop(
        gk.compile(expr, prediction="eps", noise="vp"), scheduler, lat, make,
        {"class_labels": labels}, {"class_labels": torch.full_like(labels, 1000)}, weak,
        lambda i, t: float(((1 - abar[int(t)]) / abar[int(t)]).sqrt()),
    )
    ref = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


# -- the module is left exactly as it was ------------------------------------------------------


@torch.no_grad()
def test_the_denoiser_is_restored_after_errors_and_interrupts(pipes: Any) -> None:
    pipe = pipes("sd3")
    module = denoiser(pipe)
    sample(pipe, **call_kwargs("sd3"))  # the pipeline's own attributes exist from here on
    before_module, before_pipe = snapshot(module), snapshot(pipe)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), guided(pipe, CFG(2)):
        assert "forward" in vars(module)
        raise Boom
    assert snapshot(module) == before_module and pipe_untouched(pipe, before_pipe)

    with pytest.raises(KeyboardInterrupt), guided(pipe, CFG(2)):
        raise KeyboardInterrupt
    assert snapshot(module) == before_module and pipe_untouched(pipe, before_pipe)

    # raised inside the wrapped forward, in the middle of the pipeline's loop
    with pytest.raises(GuidanceValueError, match="guidance_scale > 1"), guided(pipe, CFG(2)):
        sample(pipe, **call_kwargs("sd3", scale=1.0))
    assert snapshot(module) == before_module and pipe_untouched(pipe, before_pipe)

    with guided(pipe, CFG(2)), pytest.raises(GuidanceValueError, match="already"):
        with guided(pipe, CFG(3)):
            pass
    assert snapshot(module) == before_module


@torch.no_grad()
def test_an_existing_instance_forward_is_used_and_put_back(pipes: Any) -> None:
    pipe = pipes("sd3")
    module = denoiser(pipe)
    seen: list[int] = []
    original = type(module).forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:  # e.g. an offloading hook
        seen.append(1)
        return original(module, *args, **kwargs)

    module.forward = counting_forward
    try:
        ref = sample(pipe, **call_kwargs("sd3"))
        seen.clear()
        with guided(pipe, CFG(W)):
            out = sample(pipe, **call_kwargs("sd3"))
        assert len(seen) == STEPS  # guidekit's calls went through the existing forward
        assert vars(module)["forward"] is counting_forward
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    finally:
        del module.forward


# -- guidance scale 1: the pipeline sends conditional rows only ---------------------------------


@pytest.mark.parametrize("kind", ["dit", "sd3", "flux"])
@torch.no_grad()
def test_scale_one_runs_expressions_without_uncond_and_explains_the_rest(
    kind: str, pipes: Any, weak_models: Any
) -> None:
    pipe, weak = pipes(kind), weak_models(kind)
    with forwards(kind, main=denoiser(pipe), weak=weak) as log, guided(
        pipe, Cond() + Autoguidance(1.0), models={"weak": weak}
    ):
        out = sample(pipe, **call_kwargs(kind, scale=1.0))
    assert log == [("main", 2), ("weak", 2)] * STEPS
    assert torch.isfinite(out).all()
    scale = "true_cfg_scale" if kind == "flux" else "guidance_scale"
    with pytest.raises(GuidanceValueError, match=rf"{scale}=1 makes the pipeline skip the "
                       rf"unconditional rows.*call it with {scale}=3"), guided(pipe, CFG(3)):
        sample(pipe, **call_kwargs(kind, scale=1.0))


@torch.no_grad()
def test_cads_anneals_the_token_embeddings_seeded_per_run(pipes: Any) -> None:
    """CADS sees the split conditionings by the denoiser's argument names."""
    pipe = pipes("sd3")
    plain = sample(pipe, **call_kwargs("sd3"))
    expr = CFG(W) | CADS(tau1=0.2, tau2=0.9, noise_scale=0.5, keys=("encoder_hidden_states",))
    outs = []
    for seed in (0, 0, 1):
        with guided(pipe, expr, seed=seed):
            outs.append(sample(pipe, **call_kwargs("sd3")))
    assert torch.equal(outs[0], outs[1])  # the same seed anneals the same way
    assert (outs[0] - outs[2]).abs().max() > 1e-6
    assert (outs[0] - plain).abs().max() > 1e-6


def test_conventions_come_from_the_scheduler(pipes: Any) -> None:
    with guided(pipes("sd3"), CFG(2)) as run:
        assert (run.plan.prediction, run.plan.noise.kind) == ("flow", "flow")
    with guided(pipes("dit"), CFG(2)) as run:
        assert (run.plan.prediction, run.plan.noise.kind) == ("eps", "vp")
    assert layout_for(pipes("dit")).order == "cond_first"
    assert layout_for(pipes("flux")).order == "sequential"
    with pytest.raises(GuidanceValueError, match="compiled for"):
        with guided(pipes("sd3"), gk.compile(CFG(2), prediction="eps", noise="ve")):
            pass
    with pytest.raises(GuidanceValueError, match="weak"):
        with guided(pipes("sd3"), CFG(2) + Autoguidance(1)):
            pass


# -- modular pipelines: the guider= component ---------------------------------------------------


def test_guider_contract_batches_combine_and_window() -> None:
    c, u = torch.randn(2, 3), torch.randn(2, 3)
    guider = GuidekitGuidance("CFG(3)")
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    assert guider.num_conditions == 2
    batches = guider.prepare_inputs({"encoder_hidden_states": (c, u)})
    assert [b.__guidance_identifier__ for b in batches] == ["pred_cond", "pred_uncond"]
    assert batches[0].encoder_hidden_states is c and batches[1].encoder_hidden_states is u
    flags = []
    for b in batches:
        guider.prepare_models(torch.nn.Identity())
        flags.append(guider.is_conditional)
        b.noise_pred = b.encoder_hidden_states * 2
        guider.cleanup_models(torch.nn.Identity())
    assert flags == [True, False]
    out = guider(batches)
    torch.testing.assert_close(out.pred, 2 * u + 3 * (2 * c - 2 * u))
    assert torch.equal(out.pred_cond, batches[0].noise_pred)

    guider.disable()
    assert guider.num_conditions == 1
    (only,) = guider.prepare_inputs({"encoder_hidden_states": (c, u)})
    only.noise_pred = c
    assert guider([only]).pred is c

    windowed = GuidekitGuidance("CFG(3)", start=0.5)
    windowed.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(500))
    assert windowed.num_conditions == 1  # diffusers' step-fraction window, kept for users
    windowed.set_state(step=2, num_inference_steps=4, timestep=torch.tensor(250))
    assert windowed.num_conditions == 2


def test_guider_config_round_trips_and_needs_a_scheduler_for_sigma(tmp_path: Path) -> None:
    expr = CFG(3) + Autoguidance(1.5).between(0.5, 1) | APG(eta=0, momentum=-0.5)
    guider = GuidekitGuidance(expr, batched=True)
    assert guider.config["expression"] == repr(expr)
    guider.save_pretrained(tmp_path)
    again = GuidekitGuidance.from_pretrained(tmp_path)
    assert again.plan.expr == expr and again.config["batched"] is True
    assert guider.new(seed=3).plan.expr == expr
    with pytest.raises(GuidanceValueError, match="attach"):
        guider.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(999))


def _modular_sd3(pipe: Any, guider: Any) -> Any:
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    modular = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    modular.update_components(transformer=pipe.transformer, scheduler=pipe.scheduler, guider=guider)
    modular.set_progress_bar_config(disable=True)
    return modular


@torch.no_grad()
def test_modular_sd3_with_the_guider_matches_the_classic_pipelines(
    pipes: Any, weak_models: Any
) -> None:
    pipe, weak = pipes("sd3"), weak_models("sd3")
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, negative_prompt=["", ""],
        do_classifier_free_guidance=True, max_sequence_length=16,
    )
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    inputs = {
        "prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
        "negative_pooled_prompt_embeds": nppe, "latents": lat,
        "num_inference_steps": STEPS, "height": 16, "width": 16,
    }

    def classic(expr: Any = None) -> torch.Tensor:
        ctx = guided(pipe, expr, models={"weak": weak}) if expr is not None else contextlib.nullcontext()
        with ctx:
            return pipe(guidance_scale=W, output_type="latent", **inputs).images

    guider = GuidekitGuidance(CFG(W)).attach(scheduler=pipe.scheduler)
    out = _modular_sd3(pipe, guider)(output="latents", **inputs)
    torch.testing.assert_close(out, classic(), rtol=0, atol=1e-5)

    expr = CFG(W) + Autoguidance(1.5) | APG(eta=0, momentum=-0.5)
    ref = classic(expr)
    for batched, expected in [
        (False, [("main", 2), ("main", 2), ("weak", 2)]),  # the loop's one batch per branch
        (True, [("main", 4), ("weak", 2)]),  # one batch per forward group
    ]:
        guider = GuidekitGuidance(expr, batched=batched).attach(scheduler=pipe.scheduler, weak=weak)
        with forwards("sd3", main=pipe.transformer, weak=weak) as log:
            out = _modular_sd3(pipe, guider)(output="latents", **inputs)
        assert log == expected * STEPS
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert "forward" not in vars(pipe.transformer)


# -- reference set-ups: each pipeline on fixed inputs, and the same sampling by hand --------------


@attrs.frozen
class Setup:
    """One pipeline call on fixed inputs and the pieces of a hand-written loop that repeats it.

    ``kwargs``: the pipeline call (``sample(pipe, **kwargs)``); ``cond`` / ``uncond``: the
    denoiser's conditionings; ``make(net, now)``: the denoiser as a guidekit model;
    ``sigma_of(i, t)``: the noise level of step ``i``; ``finish``: what the pipeline does to
    the final latents; ``scheduler``: a fresh copy with the run's timesteps.
    """

    kwargs: dict[str, Any]
    latents: torch.Tensor
    cond: dict[str, Any]
    uncond: dict[str, Any]
    make: Callable[[Any, dict[str, Any]], Any]
    sigma_of: Callable[[int, Any], float]
    scheduler: Any
    prediction: str
    noise: Any
    finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def compile(self, expr: Any) -> gk.Plan:
        return gk.compile(expr, prediction=self.prediction, noise=self.noise)

    def loop(
        self, plan: gk.Plan, around_call: Any = None, weak: Any = None, seed: int = 0
    ) -> torch.Tensor:
        x = _guide_loop(
            plan, self.scheduler, self.latents, self.make, self.cond, self.uncond, weak,
            self.sigma_of, around_call=around_call, seed=seed,
        )
        return self.finish(x)


def setup_for(kind: str, pipe: Any) -> Setup:
    """The embeddings path of ``kind``'s pipeline (DiT: its class labels), latents fixed."""
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = copy.deepcopy(pipe.scheduler)  # from_config would drop defaulted settings
    scheduler.set_timesteps(STEPS)
    abar = scheduler.alphas_cumprod.double() if hasattr(scheduler, "alphas_cumprod") else None
    # the scheduler's own table, as guided(...) reads it (CADS's time comes from it)
    vp = gk.Noise("vp", alphas_cumprod=scheduler.alphas_cumprod) if abar is not None else None
    net = denoiser(pipe)
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    common = {"latents": lat, "height": 16, "width": 16, "output_type": "latent",
              "guidance_scale": W}

    def ddpm_sigma(i: int, t: Any) -> float:
        return float(((1 - abar[int(t)]) / abar[int(t)]).sqrt())

    if kind == "dit":  # the pipeline draws its latents from the generator: the same draw
        lat = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=F64)
        labels = torch.tensor([0, 1])

        def make_dit(module: Any, now: dict[str, Any]) -> Any:
            m = module if module is not None else net

            def model(x: torch.Tensor, sigma: torch.Tensor, class_labels: Any) -> torch.Tensor:
                return m(x, timestep=now["t"].expand(x.shape[0]), class_labels=class_labels).sample[:, :4]

            return model

        def decode(x: torch.Tensor) -> torch.Tensor:
            return (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

        return Setup(call_kwargs("dit"), lat, {"class_labels": labels},
                     {"class_labels": torch.full_like(labels, 1000)}, make_dit, ddpm_sigma,
                     scheduler, "eps", vp, decode)
    if kind == "pixart":
        pe, pm, npe, nm = pipe.encode_prompt(
            PROMPTS, True, negative_prompt="", device="cpu", max_sequence_length=16
        )

        def make_pixart(module: Any, now: dict[str, Any]) -> Any:
            m = module if module is not None else net

            def model(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
                return m(x, timestep=now["t"].expand(x.shape[0]), return_dict=False,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                         **cond)[0][:, :4]  # eps channels (learned sigma)

            return model

        kwargs = {**common, "prompt_embeds": pe, "prompt_attention_mask": pm,
                  "negative_prompt": None, "negative_prompt_embeds": npe,
                  "negative_prompt_attention_mask": nm, "use_resolution_binning": False}
        return Setup(kwargs, lat, {"encoder_hidden_states": pe, "encoder_attention_mask": pm},
                     {"encoder_hidden_states": npe, "encoder_attention_mask": nm},
                     make_pixart, lambda i, t: float(scheduler.sigmas[i]), scheduler, "eps", vp)
    if kind == "sd":
        pe, npe = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)

        def make_sd(module: Any, now: dict[str, Any]) -> Any:
            m = module if module is not None else net

            def model(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
                return m(x, now["t"], **cond).sample

            return model

        kwargs = {**common, "prompt_embeds": pe, "negative_prompt_embeds": npe}
        return Setup(kwargs, lat * scheduler.init_noise_sigma, {"encoder_hidden_states": pe},
                     {"encoder_hidden_states": npe}, make_sd, ddpm_sigma, scheduler, "eps", vp)
    assert kind == "sd3"
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, negative_prompt=["", ""],
        do_classifier_free_guidance=True, max_sequence_length=16,
    )

    def make_sd3(module: Any, now: dict[str, Any]) -> Any:
        m = module if module is not None else net

        def model(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
            return m(hidden_states=x, timestep=now["t"].expand(x.shape[0]), return_dict=False,
                     **cond)[0]

        return model

    kwargs = {**common, "prompt_embeds": pe, "negative_prompt_embeds": npe,
              "pooled_prompt_embeds": ppe, "negative_pooled_prompt_embeds": nppe}
    return Setup(kwargs, lat, {"encoder_hidden_states": pe, "pooled_projections": ppe},
                 {"encoder_hidden_states": npe, "pooled_projections": nppe}, make_sd3,
                 lambda i, t: float(t) / 1000.0, scheduler, "flow", "flow")


def attention_state(module: torch.nn.Module) -> dict[str, Any]:
    """Every attention processor, instance ``forward`` and hook of ``module``, by identity:
    equal snapshots mean the attention engine left nothing behind."""
    out: dict[str, Any] = {}
    for path, m in module.named_modules():
        if hasattr(m, "processor"):
            out[f"{path}.processor"] = id(m.processor)
        if "forward" in vars(m):
            out[f"{path}.forward"] = id(vars(m)["forward"])
        hooks = (m._forward_hooks, m._forward_pre_hooks)
        if any(hooks):
            out[f"{path}.hooks"] = tuple(tuple(h) for h in hooks)
    return out


# -- attention-space terms: the engine is installed for the block -------------------------------


@pytest.mark.parametrize("kind", ["dit", "pixart", "sd", "sd3"])
@torch.no_grad()
def test_pag_rides_in_the_cfg_call_and_equals_a_hand_run_engine(kind: str, pipes: Any) -> None:
    """``CFG(w) + PAG(s)``: one denoiser call of 3B rows per step, as guidekit.guide with the
    attention engine installed by hand computes it; every processor is put back."""
    pipe = pipes(kind)
    setup = setup_for(kind, pipe)
    module = denoiser(pipe)
    expr = CFG(W) + PAG(2.0)
    cfg_only = sample(pipe, **setup.kwargs)
    before = attention_state(module)
    with forwards(kind, main=module) as log, guided(pipe, expr) as run:
        assert attention_state(module) != before  # the engine is in for the block
        out = sample(pipe, **setup.kwargs)
    assert log == [("main", 6)] * STEPS
    assert {c.branches for c in run.calls} == {("c", "u", "c[IdentityAttention()]")}
    assert list(run.engines) == ["main"]
    assert attention_state(module) == before and "forward" not in vars(module)

    plan = setup.compile(expr)
    with gk.attention.install(module, plan) as around_call:
        ref = setup.loop(plan, around_call=around_call)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out - cfg_only).abs().max() > 1e-4  # the perturbed branch changed the sample


@torch.no_grad()
def test_pag_through_flux_joint_attention_runs_in_one_call(pipes: Any) -> None:
    """Flux's two calls per step become one call of 3B rows, the engine in its joint attention."""
    pipe = pipes("flux")
    module = denoiser(pipe)
    cfg_only = sample(pipe, **call_kwargs("flux"))
    before = attention_state(module)
    with forwards("flux", main=module) as log, guided(pipe, CFG(W) + PAG(2.0)) as run:
        out = sample(pipe, **call_kwargs("flux"))
    assert log == [("main", 6)] * STEPS
    assert {c.branches for c in run.calls} == {("c", "u", "c[IdentityAttention()]")}
    assert attention_state(module) == before and "forward" not in vars(module)
    assert torch.isfinite(out).all() and (out - cfg_only).abs().max() > 1e-4


@torch.no_grad()
def test_attention_errors_leave_everything_as_it_was(pipes: Any) -> None:
    pipe = pipes("pixart")
    module = denoiser(pipe)
    sample(pipe, **call_kwargs("pixart"))  # the pipeline's own attributes exist from here on
    before, before_pipe = attention_state(module), snapshot(pipe)
    # a layer the engine refuses: raised on entering the block, before anything changed
    with pytest.raises(GuidanceValueError, match="cross-attention"):
        with guided(pipe, CFG(W) + PAG(2, layers="transformer_blocks.0.attn2")):
            pass
    assert attention_state(module) == before and pipe_untouched(pipe, before_pipe)

    class Boom(Exception):
        pass

    def explode(*_: Any) -> Any:
        raise Boom

    # an error in the middle of the pipeline's loop, with the engine in
    with pytest.raises(Boom), guided(pipe, CFG(W) + PAG(2) | CADS()) as run:
        sample(pipe, **call_kwargs("pixart"), callback=explode)
    assert len(run.calls) == 1
    assert attention_state(module) == before and pipe_untouched(pipe, before_pipe)
    assert "forward" not in vars(module)


# -- CADS: the noise reaches the embeddings the model reads -----------------------------------


def _cads_expected(
    cads: Any, plan: gk.Plan, clean: dict[str, torch.Tensor], key: str, step: int, sigma: float,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Each conditioning's tensor annealed by CADS's own formula for step ``step``."""
    from guidekit.context import StepContext

    ctx = StepContext(x=torch.zeros(1), sigma=sigma, level=step, seed=seed, prediction="eps",
                      noise=plan.noise, coefs={}, native={})
    gamma = cads.gamma(plan.noise.t(sigma))
    if gamma >= 1:
        return dict(clean)
    return {c: cads.anneal(v, gamma, cads.noise_for(ctx, c, key, v)) for c, v in clean.items()}


@torch.no_grad()
def test_cads_anneals_the_dit_class_embedding(pipes: Any, weak_models: Any) -> None:
    """DiT's labels are integers: CADS reaches their embedding in every block, per branch,
    for the weak model too; the model output equals a loop whose embedders the test patches."""
    pipe, weak = pipes("dit"), weak_models("dit")
    setup = setup_for("dit", pipe)
    cads = CADS(tau1=0.2, tau2=0.9, noise_scale=0.5)
    expr = CFG(W) + Autoguidance(1.0) | cads
    embedders = [m for net in (pipe.transformer, weak) for m in net.modules()
                 if type(m).__name__ == "LabelEmbedding"]
    assert len(embedders) == 4  # one per block, two blocks per model
    plain = sample(pipe, **setup.kwargs)
    seen: list[tuple[int, Any, torch.Tensor]] = []
    outs = []
    for seed in (0, 0, 1):
        with guided(pipe, expr, models={"weak": weak}, seed=seed) as run:
            # registered after guidekit's hook, this one sees the annealed embedding
            handles = [m.register_forward_hook(
                lambda m, a, out: seen.append((len(run.calls), m, out.clone())))
                for m in embedders]
            outs.append(sample(pipe, **setup.kwargs))
            for h in handles:
                h.remove()
        assert all(not m._forward_hooks for m in embedders)  # guidekit's hooks are gone
    assert "class_embedding" in repr(run.plan.expr)
    assert torch.equal(outs[0], outs[1]) and (outs[0] - outs[2]).abs().max() > 1e-6
    assert (outs[0] - plain).abs().max() > 1e-4

    # an independent computation of what each embedder must have returned in the first run
    plan = setup.compile(expr)
    sigmas = [setup.sigma_of(i, t) for i, t in enumerate(setup.scheduler.timesteps)]
    labels = torch.tensor([0, 1, 1000, 1000])
    annealed_steps = 0
    # DiT calls its first block's embedder twice per forward (the output layer reads it too)
    assert len(seen) == 3 * STEPS * 2 * 3
    for calls_before, table, emb in seen[: len(seen) // 3]:
        step, rows = calls_before // 2, emb.shape[0]
        clean = table(labels[:rows])  # rows: [c, u] of the main model, [c] of the weak one
        parts = {"cond": clean[:2], "uncond": clean[2:]} if rows == 4 else {"cond": clean}
        want = _cads_expected(cads, plan, parts, "class_embedding", step, sigmas[step])
        expected = torch.cat(list(want.values()))
        torch.testing.assert_close(emb, expected, rtol=0, atol=1e-12)
        annealed_steps += int(not torch.equal(emb, clean))
    assert annealed_steps == 2 * 2 * 3  # gamma < 1 at the first two steps (t = 0.67, 0.33)

    # the same sampling by hand (no CADS in the plan), the label embedders patched by the
    # test with those values: equal samples mean the annealed embeddings are all it changed
    box: dict[str, Any] = {}

    def make(module: Any, now: dict[str, Any]) -> Any:
        box["now"] = now
        return setup.make(module, now)

    def patch(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        step, rows = box["now"]["i"], out.shape[0]
        clean = {"cond": out[:2], "uncond": out[2:]} if rows == 4 else {"cond": out}
        want = _cads_expected(cads, plan, clean, "class_embedding", step, sigmas[step])
        return torch.cat(list(want.values()))

    handles = [m.register_forward_hook(patch) for m in embedders]
    try:
        ref = attrs.evolve(setup, make=make).loop(
            setup.compile(CFG(W) + Autoguidance(1.0)), weak=weak
        )
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(outs[0], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@torch.no_grad()
def test_cads_anneals_token_embeddings_and_leaves_pooled_alone(kind: str, pipes: Any) -> None:
    """``CADS()`` in a text pipeline: ``encoder_hidden_states`` annealed per branch, exactly as
    CADS's formula says; ``pooled_projections`` reach the model untouched."""
    pipe = pipes(kind)
    module = denoiser(pipe)
    cads = CADS(tau1=0.2, tau2=0.9, noise_scale=0.5)

    def recorded(expr: Any) -> tuple[torch.Tensor, list[Any], Any]:
        log: list[Any] = []

        def text(m: Any, args: Any, kwargs: Any) -> None:
            log.append(("tokens", args[0].clone()))

        def pooled(m: Any, args: Any, kwargs: Any) -> None:
            log.append(("pooled", (args[1] if len(args) > 1 else kwargs["pooled_projection"]).clone()))

        handles = [
            module.context_embedder.register_forward_pre_hook(text, with_kwargs=True),
            module.time_text_embed.register_forward_pre_hook(pooled, with_kwargs=True),
        ]
        try:
            with guided(pipe, expr) as run:
                out = sample(pipe, **call_kwargs(kind))
        finally:
            for h in handles:
                h.remove()
        return out, log, run

    plain, clean_log, _ = recorded(CFG(W))
    out, log, run = recorded(CFG(W) | cads)
    assert "keys=('encoder_hidden_states',)" in repr(run.plan.expr)
    assert (out - plain).abs().max() > 1e-4
    assert [k for k, _ in log] == [k for k, _ in clean_log] and len(log) == 2 * STEPS
    plan = run.plan
    annealed = 0
    for (kind_, got), (_, clean), call in zip(log, clean_log, [c for c in run.calls for _ in (0, 1)]):
        if kind_ == "pooled":
            assert torch.equal(got, clean)  # the pooled embeddings are never annealed
            continue
        want = _cads_expected(cads, plan, {"cond": clean[:2], "uncond": clean[2:]},
                              "encoder_hidden_states", call.step, call.sigma)
        torch.testing.assert_close(got, torch.cat([want["cond"], want["uncond"]]),
                                   rtol=0, atol=1e-12)
        annealed += int(not torch.equal(got, clean))
    # the flow time is sigma: noise goes in where sigma > tau1 (SD3: 2 steps, Flux: 3)
    assert annealed == sum(c.sigma > cads.tau1 for c in run.calls) >= 2


@torch.no_grad()
def test_cads_in_sd3_equals_a_hand_written_loop_with_explicit_keys(pipes: Any) -> None:
    pipe = pipes("sd3")
    setup = setup_for("sd3", pipe)
    cads = dict(tau1=0.2, tau2=0.9, noise_scale=0.5, psi=0.5)
    with guided(pipe, CFG(W) | CADS(**cads), seed=3):
        out = sample(pipe, **setup.kwargs)
    plan = setup.compile(CFG(W) | CADS(**cads, keys=("encoder_hidden_states",)))
    torch.testing.assert_close(out, setup.loop(plan, seed=3), rtol=0, atol=1e-5)


@torch.no_grad()
def test_label_embedding_hooks_are_removed_after_an_error_mid_run(pipes: Any) -> None:
    pipe = pipes("dit")
    net = pipe.transformer
    embedders = [m for m in net.modules() if type(m).__name__ == "LabelEmbedding"]
    before = attention_state(net)

    class Boom(Exception):
        pass

    calls: list[int] = []

    def second_forward_fails(*_: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Boom

    handle = net.pos_embed.register_forward_pre_hook(second_forward_fails)
    try:
        with pytest.raises(Boom), guided(pipe, CFG(W) + PAG(2) | CADS()):
            assert all(m._forward_hooks for m in embedders)  # hooked for the block
            sample(pipe, **call_kwargs("dit"))
    finally:
        handle.remove()
    assert len(calls) == 2
    assert all(not m._forward_hooks for m in embedders)
    assert attention_state(net) == before and "forward" not in vars(net)


def test_cads_errors_name_the_problem(pipes: Any) -> None:
    pipe = pipes("dit")
    weak = tiny.dit_transformer(seed=7).to(F64)
    with pytest.raises(GuidanceValueError, match="LabelEmbedding"):
        with guided(pipe, CFG(W) + Autoguidance(1) | CADS(),
                    models={"weak": lambda *a, **k: weak(*a, **k)}):
            pass
    assert all(not m._forward_hooks for m in pipe.transformer.modules())
    with pytest.raises(GuidanceValueError, match="LabelEmbedding"):
        with guided(pipes("sd3"), CFG(W) | CADS(keys=("class_embedding",))):
            pass


def test_guider_cads_anneals_token_embeddings_only() -> None:
    """The modular guider applies the same default: pooled inputs stay as given."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(STEPS)
    guider = GuidekitGuidance(CFG(3) | CADS(tau1=0.2, tau2=0.9, noise_scale=0.5))
    guider.attach(scheduler=scheduler)
    guider.set_state(step=0, num_inference_steps=STEPS, timestep=scheduler.timesteps[0])
    c, u = torch.randn(2, 5, 8, dtype=F64), torch.randn(2, 5, 8, dtype=F64)
    pc, pu = torch.randn(2, 8, dtype=F64), torch.randn(2, 8, dtype=F64)
    batches = guider.prepare_inputs(
        {"encoder_hidden_states": (c, u), "pooled_projections": (pc, pu)}
    )
    assert batches[0].pooled_projections is pc and batches[1].pooled_projections is pu
    assert (batches[0].encoder_hidden_states - c).abs().max() > 1e-3
    assert (batches[1].encoder_hidden_states - u).abs().max() > 1e-3


# -- the documentation's examples run ----------------------------------------------------------


def test_docs_diffusers_section_runs() -> None:
    """Every ``python`` block of the "## diffusers" section of docs/adapters.md, in order."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "adapters.md").read_text()
    section = text[text.index("## diffusers\n") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"^```python[^\n]*\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    assert len(blocks) == 3
    namespace: dict[str, Any] = {}
    for code in blocks:
        exec(compile(code, "docs/adapters.md#diffusers", "exec"), namespace)
    assert [(c.model, c.rows) for c in namespace["run"].calls] == [("main", 4), ("weak", 2)] * 3
    assert [(c.model, c.rows) for c in namespace["pag_run"].calls] == [("main", 6)] * 3
    assert not namespace["pag_run"].engines["main"]._installed
