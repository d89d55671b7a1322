"""Scale-out under torchrun: this process's rank, and the rows gathered on rank 0."""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch


@attrs.frozen
class Dist:
    """This process's place in a torch.distributed run (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    gloo on CPU, nccl on GPU (each rank on ``cuda:LOCAL_RANK``). ``device`` "auto" is
    CUDA when available, else CPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, device)
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def gather(rows: list[dict[str, Any]], ctx: Dist) -> list[dict[str, Any]] | None:
    """All ranks' rows on rank 0, in job order (``None`` on the other ranks)."""
    if not ctx.active:
        return sorted(rows, key=lambda r: r["index"])
    import torch.distributed as dist

    parts: list[Any] | None = [None] * ctx.world if ctx.rank == 0 else None
    dist.gather_object(rows, parts, dst=0)
    if parts is None:
        return None
    return sorted((r for part in parts for r in part), key=lambda r: r["index"])
