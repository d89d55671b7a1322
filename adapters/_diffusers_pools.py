"""ICG's pools through the diffusers adapters: ``prompts={"icg": [...]}``, ``attach(conds=...)``.

ICG (:mod:`guidekit.terms.icg`, https://arxiv.org/abs/2407.02687) reads its
unconditional-like branch from a POOL of ``P`` real conditions, one drawn per sample per step
by the core (:mod:`guidekit.pools`: seeded by the run's seed, the step and the pool's name).
The adapters only build the pool, ``P`` rows per input, and leave the drawing to the plan:

* text pipelines: the pool's prompts are encoded in ONE ``encode_prompt`` call of ``P``
  prompts (the call's own arguments, one image per prompt), so they share its token length;
* class-label pipelines (DiT): the pool is class labels; with none given, every real label
  (``0 .. num_classes - 1``, never the null class), as the bundled models do and as the paper
  draws: a random condition from the training distribution, the sampled label included;
* an input the prompt does not decide (SDXL's time ids, an input alike for cond and uncond)
  has one row per sample, not per candidate: it is the same for every row, so the pool holds
  it ``P`` times; rows that differ are refused, naming the input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.plan import Plan
from guidekit.pools import pool_names


def plan_pools(plan: Plan) -> tuple[str, ...]:
    """The conditionings ``plan`` reads as pools (``ICG(w, pool="icg")``)."""
    return pool_names(plan.left)


def example(name: str, labels: bool) -> str:
    """How to pass the pool ``name``, for messages."""
    if labels:
        return f"prompts={{{name!r}: [0, 1, 2, ...]}} (class labels)"
    return f"prompts={{{name!r}: ['a cat', 'a dog', 'a tree', ...]}}"


def default_pools(plan: Plan, classes: int | None) -> dict[str, list[int]]:
    """Class-label pipelines: every pool defaults to all ``classes`` real labels."""
    if classes is None:
        return {}
    return {name: list(range(classes)) for name in plan_pools(plan)}


def check_pool_value(name: str, value: Any, labels: bool) -> None:
    """A pool is a non-empty list: ``P`` prompts, or ``P`` class labels."""
    if not isinstance(value, (list, tuple)) or not value:
        raise GuidanceTypeError(
            f"guided(prompts={{{name!r}: ...}}) is ICG's pool: a non-empty list of the real "
            f"conditions to draw from, e.g. {example(name, labels)}, got {value!r:.60}"
        )


def check_pool_labels(name: str, ids: list[int], classes: int | None) -> None:
    """A pool of class labels holds real classes only: ICG never draws the null class."""
    if classes is None:
        return
    bad = [i for i in ids if not 0 <= i < classes]
    if bad:
        raise GuidanceValueError(
            f"guided(prompts={{{name!r}: [...]}}) is ICG's pool, which holds real class labels "
            f"0..{classes - 1}, got {bad[:5]}: ICG draws a real condition, never the null class "
            f"(for the null class as the negative, use CFG)"
        )


def pooled_rows(name: str, path: str, value: torch.Tensor, size: int) -> torch.Tensor:
    """An input with one row per sample that the pool's prompt does not decide, as ``size``
    candidate rows: the same row for every sample, held ``size`` times."""
    if value.ndim and not bool((value == value[:1]).all()):
        raise GuidanceValueError(
            f"the denoiser's input {path!r} differs between the samples of the batch, and ICG's "
            f"pool {name!r} has one row per candidate, not per sample: guidekit cannot tell "
            f"which candidate takes which row; give every sample the same {path!r}"
        )
    if not value.ndim:
        return value
    return value[:1].expand(size, *value.shape[1:]).contiguous()


def pool_sizes(pools: Mapping[str, Any]) -> dict[str, int]:
    """``P`` of each pool given as a list."""
    return {name: len(value) for name, value in pools.items()}
