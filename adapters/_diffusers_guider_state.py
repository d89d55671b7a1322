"""State built inside the forward (EMAG) in the modular guider: one step's forward state.

A modular loop runs the guider's batches itself, one model call each, before the guider
combines them. EMAG's averages are observed in those calls: the guider makes the step's
:class:`~guidekit.state.ForwardState` when it prepares the batches (``Run.forward_state``)
and hands it to every batch's row layout, so the attention engine reads the step's input
state and records the conditional rows' maps there. Combining then goes through
``Run.step`` like any adapter's call, with a model that gives back what the batches
computed and an ``around_call`` that hands the plan the observations already made; the
plan commits them by its own rules (once per step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from guidekit.branch import COND, UNCOND, Branch
from guidekit.plan import RowLayout
from guidekit.renoise import Renoiser, renoised
from guidekit.run import Run
from guidekit.state import ForwardState


def combine(
    run: Run, x: torch.Tensor, sigma: float, preds: Mapping[Branch, torch.Tensor],
    observed: ForwardState | None, renoise: Renoiser | None,
) -> torch.Tensor:
    """One step's guided prediction from the batches' ``preds``; with CFG++ (``renoise``,
    see ``adapters/_diffusers_guider_renoise.py``) the one the scheduler's own step turns
    into the CFG++ step."""

    def step(keep: dict[Branch, torch.Tensor] | None) -> torch.Tensor:
        if observed is not None:
            return combine_stateful(run, x, sigma, preds, observed, keep)
        return run.step(x, sigma, {}, {}, native=preds, level=sigma, keep=keep)

    return renoised(renoise, step, x, sigma, run.plan.prediction)


def combine_stateful(
    run: Run, x: torch.Tensor, sigma: float, preds: Mapping[Branch, torch.Tensor],
    observed: ForwardState, keep: dict[Branch, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``run.step`` at ``(x, sigma)`` replaying ``preds``, with ``observed``'s observations
    (``keep``: see ``Plan.step``)."""
    current: list[RowLayout] = []

    @contextlib.contextmanager
    def around_call(layout: RowLayout) -> Iterator[None]:
        if layout.state is not None:
            layout.state.memos.update(observed.memos)
        current.append(layout)
        try:
            yield
        finally:
            current.pop()

    def replay(x_rows: torch.Tensor, sigma_rows: torch.Tensor, **_: Any) -> torch.Tensor:
        layout = current[-1]
        parts = []
        for branch, start, stop in layout.blocks:
            first = layout.sample(start)
            parts.append(preds[branch][first : first + stop - start])
        return torch.cat(parts)

    models = {model: replay for model in {b.model for b in preds}}
    # the inputs were laid out by the loop already: the replayed calls need none, but every
    # conditioning the step runs (a named one too: TPG with Toward(w, 'neg')) must be named
    conds: dict[str, dict[str, Any]] = {c: {} for c in (COND, UNCOND, *(b.cond for b in preds))}
    return run.step(x, sigma, conds, models, around_call=around_call, level=sigma, keep=keep)
