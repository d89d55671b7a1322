"""Pooled conditionings: a conditioning given as P candidates, one drawn per sample per step.

ICG (:mod:`guidekit.terms.icg`) reads its unconditional-like branch from a pool of real
conditions. The pool's tensors have a leading axis ``P`` (not the batch); at every sampler
step, for each of the ``B`` samples, one index in ``[0, P)`` is drawn and the gathered
``[B, ...]`` rows become the branch's conditioning, before any input modifier (CADS) sees it.

The draws are seeded like CADS's noise: a pure function of the run's seed (``plan.init`` /
``guide(seed=...)``), the step index and the pool's name. So a new run with the same seed
draws the same indices, a sampler that calls the model twice in a step (Heun's corrector,
DPM-2's midpoint) sees the same rows twice, and two runs never share a generator.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from guidekit.errors import GuidanceValueError


@functools.lru_cache(maxsize=256)
def pool_names(expr: Any) -> tuple[str, ...]:
    """The conditionings that terms of ``expr`` read as pools (``ICG(..., pool="icg")``)."""
    names: dict[str, None] = {}
    stack = [expr]
    while stack:
        node = stack.pop()
        names.update(dict.fromkeys(getattr(node, "pools", ())))
        stack.extend(reversed(node.children()))
    return tuple(names)


def pool_indices(size: int, batch: int, seed: int, level: int, pool: str) -> torch.Tensor:
    """The ``[batch]`` pool indices of step ``level`` of the run seeded ``seed`` (CPU int64)."""
    tag = zlib.crc32(f"pool/{pool}".encode())
    gen = torch.Generator().manual_seed((seed * 1_000_003 + level * 7919 + tag) % (2**63 - 1))
    return torch.randint(size, (batch,), generator=gen)


def pool_size(pool: str, mapping: Mapping[str, Any]) -> int:
    """``P``: the common leading axis of the pool's tensors; a clear error otherwise."""
    sizes = {k: v.shape[0] for k, v in mapping.items() if isinstance(v, torch.Tensor) and v.ndim}
    if not sizes:
        raise GuidanceValueError(
            f"the pooled conditioning {pool!r} holds no tensor with a leading axis: pass the "
            f"P candidate conditions stacked, e.g. conds={{{pool!r}: {{'y': torch.arange(10)}}}}"
        )
    if len(set(sizes.values())) != 1:
        raise GuidanceValueError(
            f"the pooled conditioning {pool!r} has tensors of different leading sizes "
            f"{sizes}: every tensor's first axis is the pool (P candidates), the same for all"
        )
    size = next(iter(sizes.values()))
    if size == 0:
        raise GuidanceValueError(f"the pooled conditioning {pool!r} is empty (P = 0)")
    return int(size)


def draw_pools(
    conds: Mapping[str, Mapping[str, Any]], pools: tuple[str, ...], batch: int, seed: int,
    level: int,
) -> Mapping[str, Mapping[str, Any]]:
    """``conds`` with each pool replaced by this step's ``[batch, ...]`` drawn rows."""
    if not pools:
        return conds
    out = dict(conds)
    for pool in pools:
        mapping = conds.get(pool)
        if mapping is None:
            continue  # the plan's own check names the missing conditioning
        index = pool_indices(pool_size(pool, mapping), batch, seed, level, pool)
        out[pool] = {
            k: v.index_select(0, index.to(v.device))
            if isinstance(v, torch.Tensor) and v.ndim else v
            for k, v in mapping.items()
        }
    return out
