"""The issue-12 named-condition terms through the classic diffusers adapter, on a tiny real
DiT pipeline (class labels): what the pipeline itself prepares (``c`` and ``u``) suffices for
``Toward`` / ``composable`` / ``dual_cfg`` with the default names. Named prompts beyond
``c`` and ``u`` come with the adapter's ``prompts=`` (another change)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, Toward, Uncond, composable, dual_cfg
from guidekit.adapters.diffusers import guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
from _diffusers_helpers import STEPS, W, call_kwargs, sample  # noqa: E402

_quiet_single_thread, pipes = helpers._quiet_single_thread, helpers.pipes


@pytest.mark.parametrize(
    "expr",
    [
        Uncond() + Toward(W),
        composable({"cond": W}),
        # nested dual CFG whose middle and negative are both the empty prompt:
        # u + 1 * (u + w1 (c - u) - u) = CFG(w1)
        dual_cfg(W, 1.0, cond2="uncond", nested=True),
    ],
    ids=["toward", "composable", "dual"],
)
@torch.no_grad()
def test_toward_forms_equal_the_pipelines_own_cfg(expr: Any, pipes: Any) -> None:
    pipe = pipes("dit")
    ref = sample(pipe, **call_kwargs("dit"))
    with guided(pipe, expr) as run:
        out = sample(pipe, **call_kwargs("dit"))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert [(c.rows, c.branches) for c in run.calls] == [(4, ("c", "u"))] * STEPS


@torch.no_grad()
def test_a_scaled_toward_is_the_same_as_a_larger_cfg(pipes: Any) -> None:
    """``CFG(w) + Toward(s)`` is ``CFG(w + s)``: the pipeline at scale ``w + s``."""
    pipe = pipes("dit")
    ref = sample(pipe, **call_kwargs("dit", scale=W + 1.5))
    with guided(pipe, CFG(W) + Toward(1.5)):
        out = sample(pipe, **call_kwargs("dit", scale=W + 1.5))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
