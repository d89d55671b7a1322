"""CFG++ in the adapters: the diffusers schedulers it runs under, and the shared stepper.

The stepper itself (:class:`~guidekit.renoise.Renoiser`, how an unmodified sampler is made to
take CFG++ steps) lives in :mod:`guidekit.renoise`; it is re-exported here for the adapters.
"""

from __future__ import annotations

from typing import Any

import torch

from guidekit.errors import GuidanceValueError
from guidekit.plan import Plan
from guidekit.renoise import (
    SAMPLERS,
    SUPPORTED,
    Renoiser,
    renoised,
    renoiser,
    sampler_term,
)

#: diffusers schedulers whose step is an Euler step guidekit can make a CFG++ step (DDIM at
#: eta = 0 is the paper's own sampler: an Euler step in x / sqrt(abar))
SCHEDULERS = ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "DDIMScheduler")


def _ddim_levels(scheduler: Any, where: str, term: Any) -> list[float]:
    """The noise levels DDIM steps between: each timestep's, then the last step's target
    (``final_alpha_cumprod``); refuses what makes its step not an Euler step."""
    config = scheduler.config
    if config.get("clip_sample", False) or config.get("thresholding", False):
        raise GuidanceValueError(
            f"{where}: {term!r} under DDIMScheduler with clip_sample / thresholding: DDIM then "
            f"clips its x0 but keeps the model's noise, which is not an Euler step guidekit "
            f"can make a CFG++ step. Set clip_sample=False, thresholding=False (or use "
            f"expr | DynamicThreshold(...), which acts on guidekit's x0)"
        )
    steps = [int(t) for t in scheduler.timesteps]
    ratio = config.num_train_timesteps // scheduler.num_inference_steps
    if any(a - b != ratio for a, b in zip(steps, steps[1:])):
        spacing = config.get("timestep_spacing")
        n, total = scheduler.num_inference_steps, config.num_train_timesteps
        # leading spacing always steps by total // n; trailing only where n divides total
        fix = (f"use timestep_spacing='leading', or a step count that divides {total}"
               if spacing == "trailing" else "use timestep_spacing='leading'"
               + (f" (or 'trailing' with a step count that divides {total})"))
        raise GuidanceValueError(
            f"{where}: {term!r} under DDIMScheduler(timestep_spacing={spacing!r}) at {n} "
            f"steps: DDIM steps from t to t - {ratio}, which are not its consecutive "
            f"timesteps here ({steps[:3]}...); {fix}"
        )
    abar = scheduler.alphas_cumprod.double()
    last = steps[-1] - ratio
    final = abar[last] if last >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod).double()
    return [float(((1 - a) / a).sqrt()) for a in [*(abar[t] for t in steps), final]]


def scheduler_renoiser(
    plan: Plan, scheduler: Any, where: str, eta: float = 0.0
) -> Renoiser | None:
    """A :class:`Renoiser` for a classic pipeline run driven by ``scheduler`` (after its
    ``set_timesteps``; ``eta`` the pipeline call's), or ``None`` without CFGpp; refuses
    another scheduler by name."""
    term = sampler_term(plan.expr)
    if term is None:
        return None
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", {}) or {}
    if eta:
        raise GuidanceValueError(
            f"{where}: {term!r} with DDIM's eta={eta:g}: DDIM's eta adds noise "
            f"that guidekit's CFG++ step does not model; sample with eta=0"
        )
    if name not in SCHEDULERS or config.get("stochastic_sampling", False):
        extra = " with stochastic_sampling=True" if name in SCHEDULERS else ""
        raise GuidanceValueError(
            f"{where}: {term!r} re-noises inside the scheduler's step, which guidekit expresses "
            f"for {', '.join(SCHEDULERS)} (deterministic); the pipeline runs {name}{extra}. "
            f"Swap the scheduler (EulerDiscreteScheduler.from_config(scheduler.config), "
            f"FlowMatchEulerDiscreteScheduler for flow models: pipe.scheduler = ... or, modular, "
            f"update_components(scheduler=...)) or use CFG. Supported: {SUPPORTED}"
        )
    if name == "DDIMScheduler":
        return renoiser(plan, "euler", _ddim_levels(scheduler, where, term), where)
    return renoiser(plan, "euler", getattr(scheduler, "sigmas", None), where)


__all__ = [
    "SAMPLERS", "SCHEDULERS", "Renoiser", "renoised", "renoiser", "scheduler_renoiser",
]
