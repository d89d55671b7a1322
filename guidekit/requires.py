"""What a step needs from its caller: the attention engine, or every branch given natively.

``Plan.step`` asks these before it runs anything, so a plan that would silently compute the
wrong thing (a perturbed branch equal to the unperturbed one, EMAG averages never taken, an
attention modifier never applied) raises an error that names the terms and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from guidekit.branch import Branch
from guidekit.errors import GuidanceValueError
from guidekit.program import Program

if TYPE_CHECKING:
    from guidekit.plan import Plan

_INSTALL = (
    "use `with guidekit.attention.install(model, plan) as around_call:` and pass "
    "around_call=around_call to guide() or plan.step()"
)


def check_engine(plan: Plan, prog: Program, around_call: Any, native: Any) -> None:
    """Raise unless the terms acting inside the forward have an attention engine to act in."""
    stateful = plan.stateful
    if stateful and (around_call is None or native is not None):
        names = ", ".join(repr(p) for p, _ in stateful)
        how = (
            "a guider fed with finished predictions (native=...) cannot observe the "
            "forward: sample through guidekit.guide or an adapter that calls the model"
            if native is not None else _INSTALL
        )
        raise GuidanceValueError(
            f"{plan.expr!r} keeps state inside the model's forward ({names}), which "
            f"needs the attention engine at every step, also where its branch is "
            f"inactive: {how}"
        )
    perturbed = [b.label for b in prog.branches if b.perturbation is not None]
    if native is None and around_call is None and perturbed:
        raise GuidanceValueError(
            f"{plan.expr!r} needs branches perturbed inside the forward ({', '.join(perturbed)}), "
            f"but no around_call was given, so they would equal the unperturbed ones: "
            f"{_INSTALL}"
        )
    if plan.attention and (around_call is None or native is not None):
        names = ", ".join(repr(m) for m in plan.attention)
        how = (
            "a guider fed with finished predictions (native=...) cannot change the "
            "attention of a forward it did not run"
            if native is not None else _INSTALL
        )
        raise GuidanceValueError(
            f"{plan.expr!r} changes the attention inside the model's forward ({names}), "
            f"which needs the attention engine, or the model would run unchanged: {how}"
        )


def check_native(plan: Plan, prog: Program, native: Mapping[Branch, Any], sigma: float) -> None:
    """Raise unless ``native`` holds every branch the step's program needs."""
    missing = [b.label for b in prog.branches if b not in native]
    if missing:
        raise GuidanceValueError(
            f"native= lacks the branch(es) {', '.join(missing)} that {plan.expr!r} "
            f"needs at sigma={sigma:g}; plan.program(sigma).branches lists them"
        )
