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
    if callable(getattr(scheduler, "precondition_outputs", None)):
        # EDM's schedulers (EDMEuler, EDMDPMSolverMultistep, CosineDPMSolverMultistep) read
        # the model's output as Karras et al.'s preconditioned F, with their own sigma_data:
        # neither eps nor v, so nothing may be converted (Noise("edm") refuses it by name)
        return _PREDICTION_TYPES[kind], Noise("edm")
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


# Second-order schedulers whose model calls alternate between the step's level (first order)
# and a level of their own (second order): how each names the second call's level, read from
# diffusers' scale_model_input and step (``i`` is the scheduler's step_index at the call).
_SECOND_ORDER = {
    "KDPM2DiscreteScheduler": "interpol",  # sigmas_interpol[i], between two steps' levels
    "DPMSolverSDEScheduler": "midpoint",  # mid_point_sigma = sqrt(sigmas[i - 1] * sigmas[i])
    "HeunDiscreteScheduler": "sigmas",  # sigmas[i]: the next step's level (the table repeats it)
    "FlowMatchHeunDiscreteScheduler": "sigmas",
    # sigmas_interpol[i - 1] = sqrt(sigma * sigma_down) with sigma_down = sigma_next^2 / sigma:
    # exactly the next level, sigmas[i]. The table's own value is off by float32 cancellation
    # in sigma_down (up to 1e-3 at a few steps), which would look like a level below the next.
    "KDPM2AncestralDiscreteScheduler": "sigmas",
}


def _second_order_rule(scheduler: Any) -> str | None:
    """The rule of ``_SECOND_ORDER`` for ``scheduler`` (by its class or a diffusers base)."""
    for cls in type(scheduler).__mro__:
        if cls.__name__ in _SECOND_ORDER:
            return _SECOND_ORDER[cls.__name__]
    if hasattr(scheduler, "sigmas_interpol") or hasattr(type(scheduler), "state_in_first_order"):
        # a two-stage scheduler guidekit has not read: its second call's level is its own
        raise GuidanceValueError(
            f"{type(scheduler).__name__} calls the model at levels of its own between its "
            f"steps, which guidekit cannot read from it: pass sigma_fn=lambda t: ... to "
            f"guided(...) (the noise level of model timestep t), or use a scheduler guidekit "
            f"knows ({', '.join(sorted(_SECOND_ORDER))}, Euler, DPM-Solver, UniPC, DDIM, ...)"
        )
    return None


def _level_at(scheduler: Any, sigmas: torch.Tensor, i: int, first_order: bool) -> float | None:
    """The level the scheduler scales the model input with at step index ``i``."""
    if not 0 <= i < len(sigmas):
        return None
    rule = _second_order_rule(scheduler)
    if first_order or rule in (None, "sigmas"):
        return float(sigmas[i])
    if rule == "midpoint":
        mid = getattr(scheduler, "mid_point_sigma", None)
        if mid is not None:
            return float(mid)
        return math.sqrt(float(sigmas[i - 1]) * float(sigmas[i])) if i > 0 else None
    table = getattr(scheduler, "sigmas_interpol", None)
    if not isinstance(table, torch.Tensor) or not i < len(table):
        return None
    return float(table[i])


def _matches(timesteps: torch.Tensor, timestep: float) -> list[int]:
    """The indices of ``timesteps`` equal to ``timestep`` (up to a pipeline's rescaling)."""
    gaps = (timesteps.detach().double().cpu().flatten() - timestep).abs()
    return [int(k) for k in (gaps <= 1e-4 * max(1.0, abs(timestep))).nonzero().flatten()]


def _table_level(scheduler: Any, timestep: float) -> float | None:
    """The level of the model call at ``timestep`` from the scheduler's state at the call.

    Between ``scale_model_input`` and ``step`` a diffusers scheduler's ``step_index`` (and,
    for the two-stage ones, ``state_in_first_order``) say which level it scales the model
    input with and converts the output at. Looking the timestep up instead would give the
    wrong level where the timesteps interleave levels of another table (KDPM2) or repeat.
    """
    timesteps = getattr(scheduler, "timesteps", None)
    sigmas = getattr(scheduler, "sigmas", None)
    if not (isinstance(timesteps, torch.Tensor) and isinstance(sigmas, torch.Tensor)):
        return None
    if not 0 < len(timesteps) <= len(sigmas):
        return None
    matches = _matches(timesteps, timestep)
    if not matches:
        return None
    index = getattr(scheduler, "step_index", None)
    first = bool(getattr(scheduler, "state_in_first_order", True))
    if index is None:
        # before the scheduler's first step: the index its _init_step_index will take
        begin = getattr(scheduler, "begin_index", None)
        index = begin if begin is not None else matches[1 if len(matches) > 1 else 0]
        first = True
    elif int(index) not in matches:
        # a model call the scheduler's state does not describe (a custom loop): the first
        # step with this timestep, first order on the even entries of an interleaved table
        index = matches[0]
        first = _second_order_rule(scheduler) is None or index % 2 == 0
    return _level_at(scheduler, sigmas, int(index), first)


def timestep_schedule(scheduler: Any) -> list[float] | None:
    """The noise levels of the scheduler's ``timesteps`` (a scheduler without a sigma table:
    DDIM, DDPM), for a scale by the run's progress (:mod:`guidekit.schedules`)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
        return None
    levels = [sigma_for(scheduler, float(t))[0] for t in dict.fromkeys(timesteps.tolist())]
    return sorted(set(levels), reverse=True)


def sigma_for(scheduler: Any, timestep: float) -> tuple[float, bool]:
    """guidekit's noise level for a model call at ``timestep`` (in scheduler units).

    Returns ``(sigma, exact)``. ``exact`` is True when the value came from the scheduler's own
    tables at its current step (see :func:`_table_level`), whose ``sigmas`` are then a valid
    schedule for ``plan.init``. Otherwise sigma is computed from ``alphas_cumprod`` (DDIM and
    DDPM have no sigma table) or, for flows, as ``timestep / num_train_timesteps``.
    """
    level = _table_level(scheduler, timestep)
    if level is not None:
        return level, True
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
