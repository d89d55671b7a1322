"""Block perturbations through real diffusers pipelines (classic adapter and the modular
guider): SLG / PAG on the unconditional rows -- ``CFG(w) + SLG(w - 1, cond="uncond")`` runs
ONE denoiser call of 2B rows per step, ``c`` and the perturbed ``u'`` -- and TPG's token
shuffle (3B rows); each equals ``guidekit.guide`` with the engine installed by hand
(classic) and the classic adapter (modular)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import guidekit as gk
from guidekit import CFG, PAG, SLG, TPG
from guidekit.adapters.diffusers import guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
from _diffusers_helpers import (  # noqa: E402
    STEPS,
    W,
    attention_state,
    denoiser,
    forwards,
    sample,
    setup_for,
)
from test_diffusers_modular import _modular, sd3  # noqa: E402,F401  (sd3: a fixture)

_quiet_single_thread, pipes = helpers._quiet_single_thread, helpers.pipes

EXPRS = {
    "slg": SLG.on_uncond(W, layers=1),
    "pag": PAG.on_uncond(W),
}


@pytest.mark.parametrize("kind, term", [("sd3", "slg"), ("sd3", "pag"), ("dit", "slg"),
                                        ("sd", "pag")])
@torch.no_grad()
def test_classic_pipeline_runs_two_row_blocks_and_equals_a_hand_run_engine(
    kind: str, term: str, pipes: Any
) -> None:
    pipe = pipes(kind)
    setup = setup_for(kind, pipe)
    module = denoiser(pipe)
    expr = EXPRS[term]
    cfg_only = sample(pipe, **setup.kwargs)
    before = attention_state(module)
    with forwards(kind, main=module) as log, guided(pipe, expr) as run:
        out = sample(pipe, **setup.kwargs)
    assert log == [("main", 4)] * STEPS  # c and u' only: u is not computed
    ((c, u),) = {c.branches for c in run.calls}
    assert c == "c" and u.startswith("u[")
    assert attention_state(module) == before and "forward" not in vars(module)

    plan = setup.compile(expr)
    with gk.attention.install(module, plan) as around_call:
        ref = setup.loop(plan, around_call=around_call)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out - cfg_only).abs().max() > 1e-4  # the perturbed uncond changed the sample


@pytest.mark.parametrize("batched", [False, True])
@torch.no_grad()
def test_modular_guider_equals_the_classic_adapter(sd3: Any, batched: bool) -> None:  # noqa: F811
    pipe, inputs = sd3
    expr = CFG(W) + SLG(W - 1, layers=1, cond="uncond").between(0.3, 1.5)
    with guided(pipe, expr):
        ref = pipe(output_type="latent", guidance_scale=W, **inputs).images
    out = _modular(pipe, inputs, expr, batched)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-8)
    assert (out - _modular(pipe, inputs, CFG(W))).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["sd3", "sd"])
@torch.no_grad()
def test_tpg_rides_in_the_cfg_call_and_equals_a_hand_run_engine(kind: str, pipes: Any) -> None:
    pipe = pipes(kind)
    setup = setup_for(kind, pipe)
    module = denoiser(pipe)
    expr = CFG(W) + TPG(2.0, layers=0)
    cfg_only = sample(pipe, **setup.kwargs)
    with forwards(kind, main=module) as log, guided(pipe, expr, seed=3):
        out = sample(pipe, **setup.kwargs)
    assert log == [("main", 6)] * STEPS
    with guided(pipe, expr, seed=4):
        other_seed = sample(pipe, **setup.kwargs)
    plan = setup.compile(expr)
    with gk.attention.install(module, plan) as around_call:
        ref = setup.loop(plan, around_call=around_call, seed=3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out - cfg_only).abs().max() > 1e-4
    assert (out - other_seed).abs().max() > 1e-6  # the run's seed draws the permutations


@pytest.mark.parametrize("batched", [False, True])
@torch.no_grad()
def test_modular_tpg_equals_the_classic_adapter(sd3: Any, batched: bool) -> None:  # noqa: F811
    pipe, inputs = sd3
    expr = CFG(W) + TPG(2.0, layers=1)
    with guided(pipe, expr, seed=5):
        ref = pipe(output_type="latent", guidance_scale=W, **inputs).images
    guider = gk.adapters.diffusers.GuidekitGuidance(expr, batched=batched, seed=5)
    from test_diffusers_modular import _sd3_modular

    out = _sd3_modular(pipe, guider.attach(scheduler=pipe.scheduler))(output="latents", **inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-8)
    assert (out - _modular(pipe, inputs, CFG(W))).abs().max() > 1e-4
