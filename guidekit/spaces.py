"""Prediction spaces (eps, x0, v, flow velocity) and noise conventions, with conversions.

A noise convention writes the sampler's state as ``x = a(sigma) x0 + b(sigma) n``:

* ``"ve"``   (k-diffusion, EDM):           ``a = 1``,                ``b = sigma``
* ``"vp"``   (DDPM, ``sigma = sqrt((1 - abar) / abar)``): ``a = 1 / sqrt(1 + sigma^2)``, ``b = sigma a``
* ``"flow"`` (rectified flow, diffusers):  ``a = 1 - sigma``,        ``b = sigma``

Predictions, given ``x`` and ``sigma``:

* ``"eps"``:  the noise ``n``;                 ``x0 = (x - b eps) / a``
* ``"x0"``:   the clean sample
* ``"v"``:    ``v = (a n - b x0) / r``, ``r = sqrt(a^2 + b^2)`` (diffusers' v for VP; k-diffusion's
  ``VDenoiser`` with ``sigma_data = 1`` for VE);  ``x0 = (a x - b r v) / r^2``
* ``"flow"``: the velocity ``n - x0`` of diffusers' flow-matching schedulers;
  ``x0 = (x - b u) / (a + b)``

Conversions are affine in the prediction for fixed ``x`` and ``sigma``, so a combination whose
coefficients sum to one gives the same result in every space; only nonlinear post-processors
(APG, ...) care which space they run in.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from guidekit.errors import GuidanceValueError

PREDICTIONS = ("eps", "x0", "v", "flow")
NOISE_KINDS = ("ve", "vp", "flow", "edm")


def check_prediction(space: Any, what: str = "prediction") -> str:
    if space not in PREDICTIONS:
        raise GuidanceValueError(
            f"unknown {what} space {space!r}: use one of {', '.join(map(repr, PREDICTIONS))} "
            f"('flow' is the velocity n - x0 of flow-matching models)"
        )
    return str(space)


def _ddpm_linear_sigmas(steps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()


@attrs.frozen
class Noise:
    """How the sampler's ``x`` relates to ``x0`` and noise at level ``sigma``.

    ``alphas_cumprod`` (optional, not hashed) is the model's training schedule; it maps
    ``sigma`` to the discrete DDPM time that CADS's ``t`` is defined on. Without it, VE/VP
    use the DDPM linear schedule (1000 steps, beta 1e-4 .. 0.02) of the CADS and DiT code.
    """

    kind: str = "ve"
    alphas_cumprod: Any = attrs.field(default=None, eq=False, hash=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise GuidanceValueError(
                f"unknown noise convention {self.kind!r}: use one of "
                f"{', '.join(map(repr, NOISE_KINDS))}"
            )

    def coefficients(self, sigma: float) -> tuple[float, float]:
        """``(a, b)`` with ``x = a x0 + b n``.

        ``"edm"`` (a model behind diffusers' EDM schedulers: its output is Karras et al.'s
        preconditioned ``F``, ``x0 = c_skip x + c_out F`` with the scheduler's ``sigma_data``)
        has no such form in guidekit's spaces: terms that combine predictions linearly
        (CFG, PAG, ...) and gates are exact, and whatever needs x0 or noise is refused here.
        """
        if self.kind == "ve":
            return 1.0, sigma
        if self.kind == "vp":
            a = 1.0 / math.sqrt(1.0 + sigma * sigma)
            return a, sigma * a
        if self.kind == "edm":
            raise GuidanceValueError(
                "this model is EDM-preconditioned (diffusers' EDM schedulers: x0 = c_skip x + "
                "c_out F with the scheduler's sigma_data), which guidekit cannot turn into x0 "
                "or noise, and a term of this expression works there (APG, DynamicThreshold, "
                "FDG with eta != 1, CFG++, SAG). Use terms that combine the model's predictions "
                "linearly (CFG, PAG, SEG, EMAG, Autoguidance, ...) with this scheduler, or a "
                "scheduler of the standard eps / v conventions"
            )
        return 1.0 - sigma, sigma

    def check_sigma(self, sigma: float) -> None:
        if math.isnan(sigma):
            raise GuidanceValueError("noise level sigma is NaN; it must be a number >= 0")
        if sigma < 0:
            raise GuidanceValueError(f"noise level sigma={sigma} must be >= 0")
        if self.kind == "flow" and sigma > 1 + 1e-6:
            raise GuidanceValueError(
                f"flow noise levels lie in [0, 1], got sigma={sigma}; for Meta's flow_matching "
                f"time t (0 = noise) pass sigma = 1 - t"
            )

    def t(self, sigma: float) -> float:
        """CADS time in [0, 1]: 1 is pure noise, 0 is data."""
        if self.kind == "flow":
            return min(max(sigma, 0.0), 1.0)
        if self.alphas_cumprod is not None:
            abar = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).flatten()
            table = ((1 - abar) / abar).sqrt()
        else:
            table = _ddpm_linear_sigmas()
        logs = table.log()
        steps = len(table)
        ls = math.log(max(sigma, 1e-12))
        if ls <= logs[0]:
            return 0.0
        if ls >= logs[-1]:
            return 1.0
        hi = int(torch.searchsorted(logs, torch.tensor([ls], dtype=torch.float64))[0])
        lo = hi - 1
        frac = (ls - float(logs[lo])) / (float(logs[hi]) - float(logs[lo]))
        return (lo + frac) / (steps - 1)


def as_noise(noise: Any) -> Noise:
    if isinstance(noise, Noise):
        return noise
    if isinstance(noise, str):
        return Noise(noise)
    raise GuidanceValueError(
        f"noise must be 've', 'vp', 'flow' or a guidekit.Noise, got {noise!r}"
    )


def to_x0(pred: torch.Tensor, space: str, x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    # each conversion as x + c pred (one operator: add with alpha) and one scale, skipped
    # where it is 1 (VE's a, flow's a + b): on a few rows each operator is a kernel launch
    # that costs more than its arithmetic
    if space == "x0":
        return pred
    if space == "eps":
        if a == 0:
            raise GuidanceValueError("cannot turn an eps prediction into x0 at pure noise (a = 0)")
        return _scaled(torch.add(x, pred, alpha=-b), a)
    if space == "v":
        r2 = a * a + b * b
        if a == 0:
            return pred * (-b * math.sqrt(r2) / r2)
        return torch.add(x, pred, alpha=-b * math.sqrt(r2) / a).mul_(a / r2)
    return _scaled(torch.add(x, pred, alpha=-b), a + b)


def _scaled(t: torch.Tensor, d: float) -> torch.Tensor:
    """``t / d`` in place on a fresh ``t`` (nothing to do for ``d = 1``)."""
    return t if d == 1.0 else t.div_(d)


def from_x0(x0: torch.Tensor, space: str, x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    if space == "x0":
        return x0
    if b == 0:
        raise GuidanceValueError(
            f"cannot express an x0 prediction in {space!r} space at sigma = 0 (no noise left)"
        )
    n = _scaled(torch.add(x, x0, alpha=-a), b)
    if space == "eps":
        return n
    if space == "v":
        return torch.add(n.mul_(a), x0, alpha=-b).div_(math.sqrt(a * a + b * b))
    return n.sub_(x0)


def convert(
    pred: torch.Tensor, src: str, dst: str, x: torch.Tensor, sigma: float, noise: Noise,
    ab: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Express ``pred`` (a ``src``-space prediction at ``x``, ``sigma``) in ``dst`` space
    (``ab``: ``noise.coefficients(sigma)``, where the caller already has them)."""
    if src == dst:
        return pred
    a, b = noise.coefficients(sigma) if ab is None else ab
    return from_x0(to_x0(pred, src, x, a, b), dst, x, a, b)
