"""How a classic diffusers pipeline lays out its CFG batch, and which module is its denoiser."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from guidekit.errors import GuidanceTypeError, GuidanceValueError

DIT_NULL_CLASS = 1000  # the label DiTPipeline hard-codes for its unconditional rows
ORDERS = ("uncond_first", "cond_first", "sequential")


def _order(_: Any, attribute: Any, value: Any) -> None:
    if value not in ORDERS:
        raise GuidanceValueError(
            f"layout={value!r}: use one of {', '.join(map(repr, ORDERS))} or a "
            f"Layout(order, timestep_scale=..., null_class=...); leave it out to read the "
            f"layout from the pipeline's class"
        )


@attrs.frozen
class Layout:
    """How a pipeline batches its CFG rows for the denoiser.

    ``order``: ``"uncond_first"`` (one call, rows ``[uncond, cond]``: SD, SDXL, SD3, PixArt),
    ``"cond_first"`` (one call, ``[cond, null]``: DiT) or ``"sequential"`` (two calls per step
    with ``B`` rows each, conditional first: Flux's ``true_cfg_scale``).
    ``timestep_scale`` multiplies the timestep the denoiser receives into scheduler units
    (Flux passes ``t / 1000``).
    """

    order: str = attrs.field(validator=_order)
    timestep_scale: float = attrs.field(default=1.0)
    null_class: int | None = None

    @timestep_scale.validator
    def _positive(self, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise GuidanceValueError(
                f"Layout(timestep_scale={value!r}): a positive number (the factor from the "
                f"denoiser's timestep to scheduler units; Flux: 1000)"
            )


def as_layout(layout: Any, pipe: Any) -> Layout:
    """``guided``'s ``layout=`` argument as a :class:`Layout` (``None``: the pipeline's)."""
    if layout is None:
        return layout_for(pipe)
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, str):
        return Layout(layout)
    raise GuidanceTypeError(
        f"layout must be None, a Layout or one of {', '.join(map(repr, ORDERS))}, got "
        f"{type(layout).__name__}"
    )


def layout_for(pipe: Any) -> Layout:
    """The :class:`Layout` of a classic diffusers pipeline, by its class."""
    names = [c.__name__ for c in type(pipe).__mro__]
    if "DiTPipeline" in names:
        return Layout("cond_first", null_class=DIT_NULL_CLASS)
    own = names[0]
    if "FluxPipeline" in names or (own.startswith("Flux") and not own.startswith("Flux2")):
        scale = float(pipe.scheduler.config.get("num_train_timesteps", 1000))
        return Layout("sequential", timestep_scale=scale)
    return Layout("uncond_first")


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's ``transformer`` or ``unet``."""
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise GuidanceValueError(
        f"{type(pipe).__name__} has no transformer or unet component: pass denoiser=..."
    )
