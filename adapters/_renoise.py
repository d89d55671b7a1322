"""CFG++ in the adapters: the diffusers schedulers it runs under, and the shared stepper.

The stepper itself (:class:`~guidekit.renoise.Renoiser`, how an unmodified sampler is made to
take CFG++ steps) lives in :mod:`guidekit.renoise`; it is re-exported here for the adapters.
"""

from __future__ import annotations

from typing import Any

from guidekit.errors import GuidanceValueError
from guidekit.plan import Plan
from guidekit.renoise import (
    SAMPLERS,
    SUPPORTED,
    Renoiser,
    refused,
    renoised,
    renoiser,
    sampler_term,
)

#: diffusers schedulers whose step is an Euler step guidekit can make a CFG++ step
SCHEDULERS = ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")


def scheduler_renoiser(plan: Plan, scheduler: Any, where: str) -> Renoiser | None:
    """A :class:`Renoiser` for a classic pipeline run driven by ``scheduler`` (after its
    ``set_timesteps``), or ``None`` without CFGpp; refuses another scheduler by name."""
    term = sampler_term(plan.expr)
    if term is None:
        return None
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", {}) or {}
    if name not in SCHEDULERS or config.get("stochastic_sampling", False):
        extra = " with stochastic_sampling=True" if name in SCHEDULERS else ""
        raise GuidanceValueError(
            f"{where}: {term!r} re-noises inside the scheduler's step, which guidekit expresses "
            f"for {' and '.join(SCHEDULERS)} (deterministic); the pipeline runs {name}{extra}. "
            f"Swap the scheduler (pipe.scheduler = EulerDiscreteScheduler.from_config("
            f"pipe.scheduler.config), FlowMatchEulerDiscreteScheduler for flow pipelines) or "
            f"use CFG. Supported: {SUPPORTED}"
        )
    return renoiser(plan, "euler", getattr(scheduler, "sigmas", None), where)


def refuse(plan: Plan, where: str) -> None:
    """For a caller that cannot step CFG++ at all: refuse a plan holding it, by name."""
    if sampler_term(plan.expr) is not None:
        raise refused(plan.expr, f"{where}: ")


__all__ = [
    "SAMPLERS", "SCHEDULERS", "Renoiser", "refuse", "renoised", "renoiser", "scheduler_renoiser",
]
