"""Frequency-decoupled guidance (FDG), https://arxiv.org/abs/2506.19713.

Split ``c`` and ``u`` (x0 predictions, the paper's denoiser outputs) into the bands of a
Laplacian pyramid; in band ``l`` with ``d_l = c_l - u_l`` and scale ``w_l``, return
``c_l + (w_l - 1) (eta d_l_par + d_l_perp)`` (``d_l_par`` the part of ``d_l`` along ``c_l``,
per sample), and rebuild the prediction from the bands. The residual (coarsest) band takes
``low``; every finer band takes ``high``. ``eta = 1`` is no projection: FDG is then linear
in ``c - u`` and equal in every prediction space, and ``low == high == w`` is ``CFG(w)``.

The pyramid is Burt and Adelson's: a separable 5-tap binomial blur with reflected borders,
``down`` keeps every second pixel of the blurred band, ``up`` puts a band's pixels back on
the even positions of the finer grid and blurs with four times the kernel. The finer grid's
size is kept, so odd sizes rebuild exactly (no power-of-two padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch
import torch.nn.functional as F

from guidekit.branch import Branch, cond, uncond
from guidekit.errors import GuidanceValueError
from guidekit.fields import Examples, Range, finite_or_schedule, to_float
from guidekit.registry import register
from guidekit.terms.base import NonlinearPrediction

if TYPE_CHECKING:
    from guidekit.context import StepContext

_KERNEL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _levels(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise GuidanceValueError(
            f"FDG(levels=...): levels must be a whole number >= 2 (one residual band and at "
            f"least one finer band), got {value!r}"
        )


def _blur(img: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Separable binomial blur of ``[N, H, W]`` with reflected borders."""
    k = torch.tensor(_KERNEL, dtype=img.dtype, device=img.device) * (gain**0.5 / 16.0)
    x = F.pad(img.unsqueeze(1), (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5))
    return F.conv2d(x, k.view(1, 1, 5, 1)).squeeze(1)


def _up(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    grid = img.new_zeros(img.shape[0], *size)
    grid[:, ::2, ::2] = img
    return _blur(grid, 4.0)


def pyramid(img: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The Laplacian bands of ``[N, H, W]``, finest first; the last is the residual."""
    bands = []
    for level in range(levels - 1):
        if min(img.shape[-2:]) < 3:
            raise GuidanceValueError(
                f"FDG(levels={levels}): band {level} is {tuple(img.shape[-2:])}, too small to "
                f"blur (it needs 3 x 3); use fewer levels"
            )
        low = _blur(img)[:, ::2, ::2]
        bands.append(img - _up(low, (img.shape[-2], img.shape[-1])))
        img = low
    return [*bands, img]


def rebuild(bands: list[torch.Tensor]) -> torch.Tensor:
    img = bands[-1]
    for band in reversed(bands[:-1]):
        img = band + _up(img, (band.shape[-2], band.shape[-1]))
    return img


@register
@attrs.frozen(repr=False)
class FDGTerm(NonlinearPrediction):
    """``FDG(low, high)``: CFG with scale ``low`` on the coarsest band, ``high`` on the rest.

    Latents ``[B, C, H, W]`` (or ``[B, C, T, H, W]``: each frame alone). With ``eta = 1``
    the result is the same in every prediction space, so it is computed in the model's own;
    with ``eta != 1`` the projection runs in x0 space, except for an eps / v / flow model at
    a level without noise (every branch's x0 is ``x`` there, and x0 cannot be turned back),
    where it is left out, as x0-space post-processors are. The paper's SDXL setting is ``FDG(low=5, high=10)``
    (diffusers' ``guidance_scales=[10, 5]``).
    """

    low: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    high: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    levels: int = attrs.field(default=2, validator=_levels)
    eta: float = attrs.field(default=1.0, converter=to_float, validator=finite_or_schedule)
    _name: ClassVar[str] = "FDG"
    _example: ClassVar[str] = "FDG(low=5, high=10)"
    field_examples: ClassVar[Examples] = {"levels": (2,), "eta": (1.0, Range(0, 1))}

    def atom_branches(self) -> tuple[Branch, ...]:
        return (cond(), uncond())

    def evaluate(self, values: Mapping[Branch, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        c, u = values[cond()], values[uncond()]
        if c.ndim < 4:
            raise GuidanceValueError(
                f"{self!r}: FDG splits a latent grid [B, C, H, W] into frequency bands, got a "
                f"prediction of shape {list(c.shape)} (packed tokens, e.g. Flux, have no grid)"
            )
        # (the coefficients only where a projection needs them: a noise of no x0 form refuses)
        project = self.eta != 1.0 and (
            ctx.prediction == "x0" or ctx.noise.coefficients(ctx.sigma)[1] != 0.0
        )
        # With no noise left every x0 is x and cannot be turned back: each band's x0 is
        # P_l + q Y_l with q -> 0, so the limit projects the prediction-space difference
        # onto the bands of P = x0 (the same for every branch) instead of c's.
        limit = self.eta != 1.0 and not project
        if project:
            c, u = ctx.convert(c, "native", "x0"), ctx.convert(u, "native", "x0")
        flat = (-1, c.shape[-2], c.shape[-1])
        bands_c = pyramid(c.reshape(flat), self.levels)
        bands_u = pyramid(u.reshape(flat), self.levels)
        bands_p: list[torch.Tensor | None] = [None] * self.levels
        if limit:
            bands_p = list(pyramid(ctx.convert(u, "native", "x0").reshape(flat), self.levels))
        scales = [self.high] * (self.levels - 1) + [self.low]
        batch = c.shape[0]
        out = [
            bc + (w - 1.0) * (
                self._shift(bc.reshape(batch, -1), bu.reshape(batch, -1),
                            None if bp is None else bp.reshape(batch, -1)).reshape(bc.shape)
                if project or limit else bc - bu
            )
            for bc, bu, bp, w in zip(bands_c, bands_u, bands_p, scales)
        ]
        y = rebuild(out).reshape(c.shape)
        return ctx.convert(y, "x0", "native") if project else y

    def _shift(
        self, c: torch.Tensor, u: torch.Tensor, along_of: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``eta d_par + d_perp`` per sample (rows of ``[B, D]``), in float64; ``d_par``
        along ``along_of`` where given (the noiseless limit), else along ``c``."""
        d = c - u
        c64, d64 = (c if along_of is None else along_of).double(), d.double()
        norm2 = c64.square().sum(1, keepdim=True)
        # a band of c that is exactly zero has no direction: its parallel part is zero
        along = (d64 * c64).sum(1, keepdim=True) / norm2.clamp_min(1e-300)
        par = torch.where(norm2 > 0, along, 0.0) * c64
        return (d64 + (self.eta - 1.0) * par).to(d.dtype)


FDG = FDGTerm
