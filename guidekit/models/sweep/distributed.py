"""Scale-out under torchrun: this process's rank, and the rows gathered on rank 0.

The ranks share nothing but their metric rows, so they meet through torchrun's key-value
store (``torch.distributed.rendezvous("env://")``) rather than a process group: no gloo or
nccl connections to tear down at exit (a gloo rank whose peer leaves mid-shutdown aborts
with "terminate called without an active exception", seen once in CI).
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

import attrs
import torch

#: Where each rank's rows are kept in the store.
_KEY = "guidekit-sweep/rows/{rank}"


@attrs.frozen
class Dist:
    """This process's place in a torchrun run (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    #: the run's ``torch.distributed.Store`` (``None`` for one process)
    store: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the run's store when launched by torchrun (``WORLD_SIZE`` > 1).

    On CUDA each rank takes ``cuda:LOCAL_RANK``. ``device`` "auto" is CUDA when available,
    else CPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, device)
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    store, rank, world = next(dist.rendezvous("env://"))
    return Dist(rank, world, device, store)


def gather(rows: list[dict[str, Any]], ctx: Dist, *, poll: float = 0.2) -> (
        list[dict[str, Any]] | None):
    """All ranks' rows on rank 0, in job order (``None`` on the other ranks).

    Rank 0 waits for every other rank's rows however long its jobs take (a rank that fails
    ends the whole run: torchrun stops its peers).
    """
    if not ctx.active:
        return sorted(rows, key=lambda r: r["index"])
    if ctx.rank != 0:
        ctx.store.set(_KEY.format(rank=ctx.rank), pickle.dumps(rows))
        return None
    parts = [rows]
    for rank in range(1, ctx.world):
        key = _KEY.format(rank=rank)
        # check() does not block, so a long job on another rank meets no store timeout
        while not ctx.store.check([key]):
            time.sleep(poll)
        parts.append(pickle.loads(ctx.store.get(key)))
    return sorted((r for part in parts for r in part), key=lambda r: r["index"])
