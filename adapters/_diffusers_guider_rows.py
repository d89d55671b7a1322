"""Batched guider calls in loops that keep the latents out of the guider (modular SDXL).

With ``batched=True`` one guider batch holds the rows of several branches. Some loops pass
their latents through the guider (SD3), so they arrive with those rows; others (SDXL) call
the denoiser with the loop's own ``B`` latent rows. For those, the denoiser's call is
redirected for the batch so that its per-sample inputs are repeated to the batch's rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from guidekit import GuidanceValueError
from guidekit.compiled import call_slot, current_call, swap

SAMPLE_KEYS = ("sample", "hidden_states", "x")


def _repeat(v: Any, batch: int, k: int) -> Any:
    if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch:
        return v.repeat(k, *([1] * (v.ndim - 1)))
    return v


def tile_inputs(module: torch.nn.Module, batch: int, k: int) -> Callable[[], None]:
    """Make ``module``'s calls repeat their ``batch``-row latents and timestep ``k`` times
    (the batch's branches); return the undo."""
    inner = current_call(module)

    def call(*args: Any, **kwargs: Any) -> Any:
        if args:
            args = (_repeat(args[0], batch, k), *args[1:])
        for key in (*SAMPLE_KEYS, "timestep"):
            if key in kwargs:
                kwargs[key] = _repeat(kwargs[key], batch, k)
        if len(args) > 1:
            args = (args[0], _repeat(args[1], batch, k), *args[2:])
        return inner(*args, **kwargs)

    return swap(module, call_slot(module), call)


def concat_values(key: str, values: list[Any]) -> Any:
    """One guider input for a batch of several branches: their tensors concatenated."""
    first = values[0]
    tensors = [isinstance(v, torch.Tensor) for v in values]
    if all(tensors):
        if any(v.shape[1:] != first.shape[1:] for v in values):
            shapes = ", ".join(str(list(v.shape)) for v in values)
            raise GuidanceValueError(
                f"the guider input {key!r} has shapes {shapes} for the batch's conditionings, "
                f"so their rows cannot share one batch: give them one shape (pad the prompts "
                f"to one length), or use GuidekitGuidance(batched=False)"
            )
        return torch.cat(values) if len(values) > 1 else first
    if any(tensors):
        raise GuidanceValueError(
            f"the guider input {key!r} is a tensor for some conditionings and None for others, "
            f"so the branches' rows cannot share one batch: give the pipeline both (e.g. the "
            f"negative_* counterpart of {key!r}), or use GuidekitGuidance(batched=False)"
        )
    return first
