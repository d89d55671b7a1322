"""guidekit.adapters.diffusers with tiny real diffusers pipelines (random weights, float64).

The pipelines are DiT, PixArt-alpha, SD3, Flux and Stable Diffusion, built offline in
``tiny_diffusers.py``. They run unmodified: ``guided(pipe, expr)`` wraps the denoiser's forward
for the duration of a ``with`` block. The tests check that:

* plain ``CFG(w)`` reproduces each pipeline's own output;
* a hand-written sampling loop around ``guidekit.guide`` gives the same result for
  Autoguidance + APG, which checks the row split, the timestep -> sigma mapping (APG works in
  x0 space, so a wrong sigma changes the result) and the learned-sigma channels;
* the real forwards are one call per forward group per step.

The module left as it was: test_diffusers_lifecycle.py; attention terms:
test_diffusers_attention.py; CADS: test_diffusers_cads.py; the modular ``guider=`` component:
test_diffusers_guider.py.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import guidekit as gk
from guidekit import APG, CFG, Autoguidance, Cond, GuidanceValueError
from guidekit.adapters.diffusers import guided, layout_for

# the shared set-up and the builders of tiny components live next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
import tiny_diffusers as tiny  # noqa: E402
from _diffusers_helpers import (  # noqa: E402
    F64,
    KINDS,
    PROMPTS,
    STEPS,
    W,
    _guide_loop,
    call_kwargs,
    denoiser,
    forwards,
    pipe_untouched,
    sample,
    snapshot,
)

# the shared fixtures: pytest finds them by name in this module
_quiet_single_thread, pipes, weak_models = (
    helpers._quiet_single_thread, helpers.pipes, helpers.weak_models
)


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


@torch.no_grad()
def test_flux_with_one_negative_prompt_for_several_prompts(pipes: Any) -> None:
    # diffusers encodes the one negative prompt as ONE row and the transformer broadcasts
    # it; guidekit's rows are per sample (before: refused as a token-length difference)
    pipe = pipes("flux")
    kwargs = {**call_kwargs("flux"), "negative_prompt": "a blur"}
    ref = sample(pipe, **kwargs)
    with guided(pipe, CFG(W)) as run:
        out = sample(pipe, **kwargs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert [c.rows for c in run.calls] == [4] * STEPS


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
