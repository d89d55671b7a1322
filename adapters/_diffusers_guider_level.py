"""The noise level of one step of a modular pipeline's loop, as the guider's run sees it.

A modular loop tells its guider the step index and the model timestep (``set_state``). With
the pipeline's scheduler attached, the timestep maps to guidekit's sigma exactly. Without
one, a plan whose combine does not depend on the level (plain CFG, PAG, CFG-Zero*) still
needs its steps counted, so the guider gives each step a level of its own that falls with
the step index; a plan that reads the level (gates, APG, CADS, a space conversion) needs
the scheduler and says so.
"""

from __future__ import annotations

from typing import Any

import torch

from guidekit import GuidanceValueError
from guidekit.plan import Plan
from guidekit.terms.base import NonlinearPrediction

from ._diffusers_schedule import sigma_for


def needs_x(plan: Plan) -> bool:
    """Whether combining needs the latents (a conversion between prediction spaces)."""
    spaces = [getattr(p, "space", "native") for p in plan.post]
    spaces += [
        e.atom.space for e in plan.entries if isinstance(e.atom, NonlinearPrediction)
    ]
    return any(s not in ("native", plan.prediction) for s in spaces)


def sigma_sensitive(plan: Plan) -> bool:
    """Whether the plan's combine or inputs depend on the noise level itself."""
    return bool(plan.breakpoints or plan.post or plan.modifiers or needs_x(plan))


def step_level(
    plan: Plan, scheduler: Any, step: int, num_inference_steps: int | None, timestep: Any
) -> float:
    """guidekit's noise level for loop step ``step`` at model timestep ``timestep``."""
    t = float(torch.as_tensor(timestep).detach().flatten()[0])
    if scheduler is not None:
        return sigma_for(scheduler, t)[0]
    if sigma_sensitive(plan):
        raise GuidanceValueError(
            f"{plan.expr!r} depends on the noise level: call guider.attach(scheduler="
            f"pipe.scheduler) so timesteps map to sigma exactly"
        )
    if plan.noise.kind == "flow":
        return t / 1000.0
    # Only the level's order matters here (it counts the steps: CFG-Zero*'s zero-init);
    # one level per step index, falling as the loop advances, is that order.
    n = num_inference_steps if num_inference_steps is not None else step + 1
    return float(max(n - step, 1))
