"""Guidance settings in a diffusers guider's config: honoured, or refused by name.

diffusers' own guiders carry their settings in the config (``ClassifierFreeGuidance(
guidance_scale=7.5, guidance_rescale=0.7)``, ``guider.new(guidance_scale=5)``), and the
modular blocks read ``guider.guidance_scale`` (the SDXL blocks embed it for models with a
guidance embedding). ``GuidekitGuidance`` takes the same two settings with the classic
adapter's policy: ``guidance_rescale=phi`` is ``| Rescale(phi)``; a ``guidance_scale`` is
accepted only where it equals the expression's CFG scale, so the expression stays the one
place the guidance is written. Any other setting diffusers' loader would drop (a key
another guider's config holds) is refused by name instead of being ignored.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

from guidekit import GuidanceValueError, Rescale
from guidekit.branch import MAIN, UNCOND, Branch
from guidekit.expr import Expr
from guidekit.plan import Plan

from ._diffusers_arguments import cfg_term_scales


def cfg_scale(plan: Plan) -> float | None:
    """The expression's CFG scale ``w`` (``1 -`` the unconditional branch's coefficient),
    or None where it changes with the noise level (a gated CFG)."""
    if plan.scheduled:
        return None  # a scale by noise level (guidekit.schedules)
    u = Branch(MAIN, UNCOND)
    regions = plan.regions()
    if not any(u in prog.coef_map for _lo, _hi, prog in regions):
        # no linear u anywhere: a nonlinear CFG-like term's own scale (PerpNeg(7): 7)
        own = {round(w, 12) for w in cfg_term_scales(plan.expr) if isinstance(w, (int, float))}
        if own:
            return own.pop() if len(own) == 1 else None
    scales = {round(1.0 - prog.coef_map.get(u, 0.0), 12) for _lo, _hi, prog in regions}
    return scales.pop() if len(scales) == 1 else None


def with_rescale(expr: Expr, guidance_rescale: float) -> Expr:
    """``expr | Rescale(phi)`` for ``guidance_rescale=phi > 0``; ``expr`` for 0."""
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)):
        raise GuidanceValueError(
            f"GuidekitGuidance(guidance_rescale={guidance_rescale!r}): give a number in [0, 1]"
        )
    if guidance_rescale == 0:
        return expr
    return expr | Rescale(float(guidance_rescale))


def check_guidance_scale(plan: Plan, guidance_scale: float | None, text: str) -> None:
    """Refuse a ``guidance_scale`` the expression does not use, naming the fix."""
    if guidance_scale is None:
        return
    w = cfg_scale(plan)
    if w is not None and math.isclose(float(guidance_scale), w, rel_tol=1e-9, abs_tol=1e-12):
        return
    has = f"its CFG scale is {w:g}" if w is not None else "its CFG scale changes with sigma"
    raise GuidanceValueError(
        f"GuidekitGuidance({text!r}, guidance_scale={guidance_scale!r}): {has}, and the "
        f"expression is the one place the scale is written. Write the scale in the "
        f"expression (e.g. CFG({guidance_scale!r}) in place of the CFG term) and leave "
        f"guidance_scale out"
    )


def refuse_unknown(cls: type, keys: Iterable[str]) -> None:
    """Raise for config keys ``cls.__init__`` does not take (diffusers would drop them)."""
    known = set(inspect.signature(cls).parameters)
    unknown = sorted(k for k in keys if not k.startswith("_") and k not in known)
    if unknown:
        raise GuidanceValueError(
            f"{cls.__name__} does not take {', '.join(map(repr, unknown))} (a setting of "
            f"another guider?); it would be ignored. Write the guidance in the expression "
            f"(e.g. expression=\"CFG(5) + PAG(3) | Rescale(0.7)\"); the settings it takes are "
            f"{', '.join(sorted(known))}"
        )


def run_conditions(plan: Plan) -> int:
    """The conditionings (cond, uncond, named) the plan reads at any level of a run."""
    return len({b.cond for _, _, p in plan.regions() for b in p.branches})


def check_models(plan: Plan, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (``attach``'s models) if the plan reads every one; a misspelt keyword
    (``schedular=...``) would otherwise land there as a model nobody reads."""
    reads = {b.model for b in plan.branches}
    unread = [n for n in given if n not in reads]
    if unread:
        raise GuidanceValueError(
            f"GuidekitGuidance.attach({unread[0]}=...): {plan.expr!r} reads no model named "
            f"{unread[0]!r} (it reads {', '.join(map(repr, sorted(reads)))}); the keywords are "
            f"scheduler, models, around_call, conds, eta and the names of the extra models the "
            f"expression reads (Autoguidance(..., model='weak'): weak=...)"
        )
    return given


def refuse_setting(name: str, value: Any, fix: str) -> GuidanceValueError:
    """The error for assigning a guidance setting on a built guider."""
    return GuidanceValueError(
        f"guider.{name} = {value!r}: a GuidekitGuidance's guidance is fixed when it is built "
        f"(its config would go stale); make a new guider with {fix} and give it to the "
        f"pipeline (pipe.update_components(guider=...))"
    )
