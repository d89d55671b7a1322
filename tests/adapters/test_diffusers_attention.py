"""Attention-space terms through real diffusers pipelines: the engine rides in the CFG call.

``CFG(w) + PAG(s)`` runs one denoiser call of 3B rows per step (Flux's two calls per step
included) and equals ``guidekit.guide`` with the engine installed by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import guidekit as gk
from guidekit import CFG, PAG
from guidekit.adapters.diffusers import guided

# the shared set-up and the builders of tiny components live next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
from _diffusers_helpers import (  # noqa: E402
    STEPS,
    W,
    attention_state,
    call_kwargs,
    denoiser,
    forwards,
    sample,
    setup_for,
)

# the shared fixtures: pytest finds them by name in this module
_quiet_single_thread, pipes, weak_models = (
    helpers._quiet_single_thread, helpers.pipes, helpers.weak_models
)


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
