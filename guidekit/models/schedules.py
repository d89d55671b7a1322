"""Noise conventions of the bundled models: how training noises data and how sampling sees it.

Two conventions, each one object used by both training and sampling so they cannot drift:

* :class:`EpsConvention` (``prediction="eps"``, guidekit ``noise="ve"``). Trained as a DDPM
  (https://arxiv.org/abs/2006.11239) with the linear schedule of 1000 steps, beta
  1e-4 .. 0.02. Sampling follows k-diffusion's view of a DDPM (Karras et al.,
  https://arxiv.org/abs/2206.00364): the sampler's state is ``x = x0 + sigma n`` with
  ``sigma = sqrt((1 - abar) / abar)``; the network sees ``x / sqrt(1 + sigma^2)``, which is
  exactly the DDPM state ``sqrt(abar) x0 + sqrt(1 - abar) n``, and the DDPM timestep that
  has this ``sigma`` (interpolated in ``log sigma`` between the 1000 discrete steps). Euler
  steps are then ``x += (sigma_next - sigma) eps``.
* :class:`FlowConvention` (``prediction="flow"``, ``noise="flow"``): rectified flow
  (https://arxiv.org/abs/2209.03003), ``x = (1 - sigma) x0 + sigma n`` for ``sigma`` in
  [0, 1], the network predicts the velocity ``n - x0`` and sees ``timestep = 1000 sigma``
  (the SD3 / diffusers convention). Euler steps are ``x += (sigma_next - sigma) v``.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from guidekit.spaces import Noise

#: DDPM training steps and linear beta range of the eps models.
DDPM_STEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def ddpm_alphas_cumprod(steps: int = DDPM_STEPS) -> torch.Tensor:
    """``abar_t`` of the linear DDPM schedule (float64, ``[steps]``)."""
    betas = torch.linspace(BETA_START, BETA_END, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al.'s schedule (https://arxiv.org/abs/2206.00364, eq. 5) with a final 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)]).float()


@attrs.frozen
class EpsConvention:
    """DDPM-trained noise prediction, sampled in k-diffusion's VE view (see module doc)."""

    prediction: ClassVar[str] = "eps"
    noise: ClassVar[str] = "ve"
    #: log sigma of every DDPM step, increasing (float64)
    log_sigmas: torch.Tensor = attrs.field(
        factory=lambda: ((1 - ddpm_alphas_cumprod()) / ddpm_alphas_cumprod()).sqrt().log(),
        eq=False,
    )

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def guidekit_noise(self) -> Noise:
        """The ``guidekit.Noise`` to compile with (carries the training schedule for CADS)."""
        return Noise(self.noise, alphas_cumprod=ddpm_alphas_cumprod())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) DDPM timestep whose noise level is ``sigma``, clamped to the table."""
        logs = self.log_sigmas
        ls = sigma.detach().to(torch.float64).clamp_min(1e-12).log()
        ls = ls.clamp(float(logs[0]), float(logs[-1]))
        hi = torch.searchsorted(logs, ls).clamp(1, len(logs) - 1)
        lo = hi - 1
        frac = (ls - logs[lo]) / (logs[hi] - logs[lo])
        return (lo + frac).to(torch.float32)

    def model_input(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(network input, timestep)`` for the sampler state ``x`` at ``sigma`` ([rows])."""
        scale = (1 + sigma.to(x.dtype) ** 2).rsqrt().view(-1, *([1] * (x.ndim - 1)))
        return x * scale, self.timestep(sigma)

    def training_batch(
        self, x0: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, sigma, target)``: a DDPM step drawn uniformly, ``x = x0 + sigma n``, target ``n``."""
        t = torch.randint(0, len(self.log_sigmas), (x0.shape[0],), generator=generator)
        sigma = self.log_sigmas[t].exp().to(x0.dtype)
        n = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return x0 + sigma.view(-1, 1, 1, 1) * n, sigma, n

    def sigmas(self, steps: int) -> torch.Tensor:
        """Karras schedule over the trained range (``rho = 7``), ``steps + 1`` values ending in 0."""
        return karras_sigmas(steps, self.sigma_min, self.sigma_max)

    def initial(self, noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
        """The sampler's start ``x`` from unit Gaussian noise."""
        return noise * sigma_max


@attrs.frozen
class FlowConvention:
    """Rectified flow with velocity ``n - x0`` (see module doc)."""

    prediction: ClassVar[str] = "flow"
    noise: ClassVar[str] = "flow"

    def guidekit_noise(self) -> Noise:
        return Noise(self.noise)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.detach().to(torch.float32) * 1000

    def model_input(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.timestep(sigma)

    def training_batch(
        self, x0: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, sigma, target)``: ``sigma`` uniform in [0, 1], target the velocity ``n - x0``."""
        sigma = torch.rand((x0.shape[0],), generator=generator, dtype=x0.dtype)
        n = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * n, sigma, n - x0

    def sigmas(self, steps: int) -> torch.Tensor:
        """Uniform steps from 1 (pure noise) to 0."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64).float()

    def initial(self, noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
        """The sampler's start ``x``: at ``sigma = 1`` the state is the noise itself."""
        if sigma_max != 1:
            raise ValueError(f"flow sampling starts at sigma = 1, got {sigma_max}")
        return noise


Convention = EpsConvention | FlowConvention

CONVENTIONS: dict[str, Convention] = {"eps": EpsConvention(), "flow": FlowConvention()}


def convention(prediction: str) -> Convention:
    """The convention of a bundled model predicting ``prediction`` ("eps" or "flow")."""
    try:
        return CONVENTIONS[prediction]
    except KeyError:
        raise ValueError(
            f"bundled models predict 'eps' or 'flow', not {prediction!r}"
        ) from None

