"""Conditioning channels concatenated after the latents in the denoiser's input.

Inpainting (latents + mask + masked-image latents, 9 -> 4 channels), InstructPix2Pix-like
(8 -> 4) and the x4 upscaler (7 -> 4) pipelines concatenate conditioning to the latents on
the channel axis before calling the denoiser. guidekit's ``x`` is the latents the scheduler
steps (the first ``out_channels`` channels); the rest follows the rows: every model call
gets the sample's extra channels back, tiled per branch like its ``x`` rows.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from guidekit.errors import GuidanceValueError

from ._diffusers_call import DenoiserCall, tile


@attrs.define(eq=False)
class ChannelCall(DenoiserCall):
    """A denoiser call whose ``x`` is the latents; ``extra`` the channels after them (all rows)."""

    extra: torch.Tensor


def latent_channels(denoiser: Any) -> tuple[int, int] | None:
    """``(in_channels, out_channels)`` of a denoiser whose input has more channels than its
    prediction, from its config (``None``: the input is the latents alone)."""
    config = getattr(denoiser, "config", None)
    c_in = getattr(config, "in_channels", None)
    c_out = getattr(config, "out_channels", None)
    if isinstance(c_in, int) and isinstance(c_out, int) and 0 < c_out < c_in:
        return c_in, c_out
    return None


def strip_channels(channels: tuple[int, int] | None, call: DenoiserCall) -> DenoiserCall:
    """``call`` with ``x`` the latents and the conditioning channels set aside (unchanged
    when the denoiser has none, or its input is not ``[rows, in_channels, ...]``)."""
    x = call.x
    # Only the image layout [rows, C, H, W]: a video or packed-sequence input puts its
    # channels elsewhere, and a frame or token count could equal in_channels by chance.
    if channels is None or x.ndim != 4 or x.shape[1] != channels[0]:
        return call
    c = channels[1]
    return ChannelCall(call.x_name, x[:, :c], call.arguments, call.timestep, x[:, c:])


def check_shared(call: DenoiserCall, lo: slice, hi: slice, other: DenoiserCall | None = None) -> None:
    """Refuse conditioning channels that differ between the pipeline's conditional and
    unconditional rows (``lo`` of ``call``, ``hi`` of ``other``, by default ``call``)."""
    other = call if other is None else other
    if not isinstance(call, ChannelCall) or not isinstance(other, ChannelCall):
        return
    if torch.equal(call.extra[lo], other.extra[hi]):
        return
    n = int(call.extra.shape[1])
    raise GuidanceValueError(
        f"the pipeline's conditional and unconditional rows carry different conditioning "
        f"channels (the {n} channels its denoiser's input has after the latents: a mask, an "
        f"image's latents); guided(...) gives every branch the same channels, so it cannot "
        f"share them across its branches: call this pipeline outside the with block for its "
        f"own guidance"
    )


def with_channels(call: DenoiserCall, x_rows: torch.Tensor, batch: int) -> torch.Tensor:
    """The denoiser's input for guidekit's ``x_rows`` (``k * batch`` rows, ``k`` branches):
    the latents with the sample's conditioning channels, tiled in the order of the rows."""
    if not isinstance(call, ChannelCall):
        return x_rows
    extra = call.extra[:batch]
    return torch.cat([x_rows, tile(extra, x_rows.shape[0] // batch)], dim=1)
