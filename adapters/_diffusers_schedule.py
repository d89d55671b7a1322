"""A diffusers scheduler's conventions in guidekit's terms: prediction space, noise, sigma.

What the denoiser sees is the *model input* (after ``scheduler.scale_model_input``), so:

* DDPM-family schedulers (DDIM, DDPM, DPM-Solver, Euler, Heun, ...) feed the model
  ``sqrt(abar_t) x0 + sqrt(1 - abar_t) n``: guidekit's ``"vp"`` noise at
  ``sigma = sqrt((1 - abar_t) / abar_t)``. Euler-type schedulers keep their latents in the
  variance-exploding form ``x0 + sigma n`` but divide by ``sqrt(sigma^2 + 1)`` before the
  model, which is the same ``"vp"`` input at the same ``sigma``.
* Flow-matching schedulers feed ``(1 - sigma) x0 + sigma n`` unscaled: ``"flow"`` noise, and
  the transformer predicts the velocity ``n - x0`` (guidekit's ``"flow"`` prediction).

With these, guidekit's space conversions (APG works in x0 space) are exact, not approximate.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from guidekit import GuidanceValueError, Noise

_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def is_flow(scheduler: Any) -> bool:
    """Whether ``scheduler`` samples a rectified flow (sigma 1 = noise, velocity output)."""
    config = getattr(scheduler, "config", {}) or {}
    return (
        type(scheduler).__name__.startswith("FlowMatch")
        or config.get("prediction_type") == "flow_prediction"
        or bool(config.get("use_flow_sigmas", False))
    )


def conventions(scheduler: Any) -> tuple[str, Noise]:
    """``(prediction, noise)`` to compile a plan with for a denoiser driven by ``scheduler``."""
    if is_flow(scheduler):
        return "flow", Noise("flow")
    config = getattr(scheduler, "config", {}) or {}
    kind = config.get("prediction_type", "epsilon")
    if kind not in _PREDICTION_TYPES:
        raise GuidanceValueError(
            f"{type(scheduler).__name__} has prediction_type={kind!r}; guidekit knows "
            f"{', '.join(map(repr, _PREDICTION_TYPES))} and flow schedulers: pass "
            f"prediction=... and noise=... to name the model's conventions yourself"
        )
    abar = getattr(scheduler, "alphas_cumprod", None)
    return _PREDICTION_TYPES[kind], Noise("vp", alphas_cumprod=abar)


def _alphas_sigma(abar: torch.Tensor, t: float) -> float:
    """``sqrt((1 - abar) / abar)`` at (possibly fractional) training time ``t``."""
    table = ((1 - abar.double()) / abar.double()).sqrt()
    t = min(max(t, 0.0), len(table) - 1.0)
    lo = int(math.floor(t))
    if lo == t or lo + 1 >= len(table):
        return float(table[lo])
    # between two training times: interpolate log sigma, as Karras-type schedulers do
    frac = t - lo
    return math.exp((1 - frac) * math.log(float(table[lo])) + frac * math.log(float(table[lo + 1])))


def timestep_schedule(scheduler: Any) -> list[float] | None:
    """The noise levels of the scheduler's ``timesteps`` (a scheduler without a sigma table:
    DDIM, DDPM), for a scale by the run's progress (:mod:`guidekit.schedules`)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
        return None
    levels = [sigma_for(scheduler, float(t))[0] for t in dict.fromkeys(timesteps.tolist())]
    return sorted(set(levels), reverse=True)


def sigma_for(scheduler: Any, timestep: float) -> tuple[float, bool]:
    """guidekit's noise level for the model timestep ``timestep`` (in scheduler units).

    Returns ``(sigma, exact)``. ``exact`` is True when the value came from the scheduler's own
    ``sigmas`` table (the timestep is one of ``scheduler.timesteps``), which is then a valid
    schedule for ``plan.init``. Otherwise sigma is computed from ``alphas_cumprod`` (DDIM and
    DDPM have no sigma table) or, for flows, as ``timestep / num_train_timesteps``.
    """
    timesteps = getattr(scheduler, "timesteps", None)
    sigmas = getattr(scheduler, "sigmas", None)
    if (
        isinstance(timesteps, torch.Tensor) and isinstance(sigmas, torch.Tensor)
        and 0 < len(timesteps) <= len(sigmas)
    ):
        gaps = (timesteps.detach().double().cpu() - timestep).abs()
        i = int(gaps.argmin())
        if float(gaps[i]) <= 1e-4 * max(1.0, abs(timestep)):
            return float(sigmas[i]), True
    config = getattr(scheduler, "config", {}) or {}
    if is_flow(scheduler):
        return timestep / float(config.get("num_train_timesteps", 1000)), False
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise GuidanceValueError(
            f"cannot tell the noise level of timestep {timestep:g} for "
            f"{type(scheduler).__name__}: it has neither a sigma table nor alphas_cumprod; "
            f"pass sigma_fn=lambda t: ... to guided(...)"
        )
    return _alphas_sigma(torch.as_tensor(abar), timestep), False


def schedule_of(scheduler: Any) -> list[float] | None:
    """The scheduler's sigma table (for ``plan.init``), or None when it has none."""
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 0:
        return [float(s) for s in sigmas.detach().double().cpu().flatten()]
    return None
