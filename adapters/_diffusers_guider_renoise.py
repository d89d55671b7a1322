"""CFG++ (https://arxiv.org/abs/2406.08070) in the modular ``guider=``: the scheduler's step.

A modular loop steps its scheduler on whatever prediction the guider returns. As in
``guided(pipe, ...)`` (``adapters/_renoise.py``), the guider returns the prediction that makes
that unmodified step the CFG++ step -- for an Euler step from ``sigma`` to ``sigma_next``,
``eps' = (sigma eps_g - sigma_next eps_u) / (sigma - sigma_next)`` -- which needs the
scheduler itself (its levels, attached with ``guider.attach(scheduler=...)``). That
combination has weights summing to one, so it is the same in every prediction space and
needs no latents. What the guider cannot see is refused by name: a scheduler whose step is
no Euler step, DDIM's ``eta`` unless stated (``attach(eta=0)``), and diffusers' step window
(``start`` / ``stop``), which would skip the re-noising on some steps.
"""

from __future__ import annotations

from typing import Any

from guidekit.errors import GuidanceValueError
from guidekit.plan import Plan
from guidekit.renoise import Renoiser, sampler_term

from ._renoise import scheduler_renoiser

WHERE = "GuidekitGuidance"


def check_window(plan: Plan, start: float, stop: float) -> None:
    """Refuse diffusers' step window for a CFG++ plan (gate it by noise level instead)."""
    term = sampler_term(plan.expr)
    if term is not None and (start > 0.0 or stop < 1.0):
        raise GuidanceValueError(
            f"{WHERE}(start={start:g}, stop={stop:g}): {term!r} re-noises inside every step "
            f"it runs, and outside diffusers' step window the guider returns the conditional "
            f"prediction alone; gate by noise level instead, {term!r}.between(lo, hi), where "
            f"the step falls back to the scheduler's own on c"
        )


def guider_renoiser(plan: Plan, scheduler: Any, eta: float | None) -> Renoiser | None:
    """The CFG++ stepper for one pipeline call (after the scheduler's ``set_timesteps``), or
    ``None`` without CFGpp; refuses what the guider cannot make a CFG++ step, by name."""
    term = sampler_term(plan.expr)
    if term is None:
        return None
    if scheduler is None:
        raise GuidanceValueError(
            f"{WHERE}: {term!r} re-noises inside the scheduler's step, so the guider needs the "
            f"scheduler's levels: call guider.attach(scheduler=pipe.scheduler)"
        )
    if type(scheduler).__name__ == "DDIMScheduler" and eta is None:
        raise GuidanceValueError(
            f"{WHERE}: {term!r} under DDIMScheduler: its step takes the loop's eta, which the "
            f"guider cannot see, and only eta=0 is a CFG++ step. Sample with eta=0 and say "
            f"so: guider.attach(scheduler=pipe.scheduler, eta=0)"
        )
    return scheduler_renoiser(plan, scheduler, WHERE, eta=eta or 0.0)


__all__ = ["check_window", "guider_renoiser"]
