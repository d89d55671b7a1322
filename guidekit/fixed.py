"""Fixed shapes: every step runs every branch of the plan, active or not.

By default a step runs only the branches its active terms need, so a gated term changes the
row count of the call where it switches (``CFG(5) + PAG(2).between(1, 10)``: 2B rows above
10 and at or below 1, 3B inside), and ``torch.compile`` (or a captured CUDA graph) sees a
new shape and a new row layout there. ``compile(expr, fixed_shapes=True)`` keeps every
forward group at all of its branches at every noise level: the rows of an inactive branch
are still computed (with the same inputs and perturbation as where it is active) and the
combine skips them, since the step's coefficients hold only the active atoms. The output
equals the default's; the cost is the inactive rows' compute, the gain one shape (one
compile, one graph) per run. Branches that no noise level ever needs (``0 * d``, cancelled
terms) stay dropped, as by default.
"""

from __future__ import annotations

from typing import Any

import attrs

from guidekit.errors import GuidanceTypeError
from guidekit.program import Program
from guidekit.rows import ForwardGroup


def check_fixed_shapes(value: Any) -> bool:
    """``compile``'s ``fixed_shapes=`` argument (a bool)."""
    if not isinstance(value, bool):
        raise GuidanceTypeError(f"compile(fixed_shapes={value!r}): pass True or False")
    return value


def fixed_program(program: Program, groups: tuple[ForwardGroup, ...]) -> Program:
    """``program`` running every branch of the plan's ``groups``; its combine unchanged."""
    return attrs.evolve(program, groups=groups)


__all__ = ["check_fixed_shapes", "fixed_program"]
