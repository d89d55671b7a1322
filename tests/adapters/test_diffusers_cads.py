"""CADS through real diffusers pipelines: the noise reaches the embeddings the model reads.

DiT's class embedding (main and weak model), the token embeddings of SD3 and Flux (pooled
projections untouched), seeded per run, checked against CADS's own formula and hand-written
loops; the modular guider anneals the same keys.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

import guidekit as gk
from guidekit import CADS, CFG, Autoguidance, GuidanceValueError
from guidekit.adapters.diffusers import GuidekitGuidance, guided

# the shared set-up and the builders of tiny components live next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
import tiny_diffusers as tiny  # noqa: E402
from _diffusers_helpers import (  # noqa: E402
    F64,
    STEPS,
    W,
    call_kwargs,
    denoiser,
    sample,
    setup_for,
)

# the shared fixtures: pytest finds them by name in this module
_quiet_single_thread, pipes, weak_models = (
    helpers._quiet_single_thread, helpers.pipes, helpers.weak_models
)


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
