"""What a user probably meant: the expression algebra's errors for misused operands.

The operators of :mod:`guidekit.expr` refuse what is neither a prediction nor a direction,
a class where an instance belongs, a number or tensor where a term belongs, and empty or
reversed gates. The messages, which say what to write instead, live here; this module
knows no expression node (only the text conventions of :mod:`guidekit.text`), so the
expression layer imports it and never the other way round.
"""

from __future__ import annotations

import math
from typing import Any

from guidekit.branch import Branch
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.text import (
    PRODUCT,
    class_instead_of_instance,
    display_name,
    fmt_number,
    is_number,
    is_tensor,
)


class AlgebraMeta(type):
    """Metaclass of terms and post-processors: using the class where an instance belongs
    (``CFG | APG``, ``CFG(7) + PAG``) raises a clear error instead of building a
    ``types.UnionType`` or failing deep inside an operator."""

    def _misuse(cls, *_: Any) -> Any:
        raise GuidanceTypeError(class_instead_of_instance(cls))

    __or__ = __ror__ = __add__ = __radd__ = _misuse
    __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = _misuse
    __neg__ = __pos__ = _misuse

    @property
    def between(cls) -> Any:
        """``CFG.between(lo, hi)`` on the class: say to make a term first (a data descriptor
        here wins over the instance method, on the class only)."""

        def misuse(*_: Any, **__: Any) -> Any:
            gate = f", then gate it: {display_name(cls)}(...).between(lo, hi)"
            gateable = getattr(cls, "gateable", False)
            raise GuidanceTypeError(class_instead_of_instance(cls) + (gate if gateable else ""))

        return misuse


def not_an_expression(value: Any, op: str, other: Any) -> GuidanceTypeError:
    """The error for an operand of ``op`` that is no expression: say what to write."""
    if isinstance(value, type):
        return GuidanceTypeError(class_instead_of_instance(value))
    if hasattr(value, "pipe_after"):
        return GuidanceTypeError(
            f"{value!r} is a post-processor: it goes after |, e.g. CFG(7) | {value!r}, "
            f"not {op}"
        )
    if is_tensor(value):
        return GuidanceTypeError(
            f"cannot {op} a tensor and {other!r}: scales in a guidance expression are Python "
            f"numbers; use float(t) for a one-element tensor"
        )
    if is_number(value):
        return GuidanceTypeError(
            f"cannot {op} the number {value!r} and {other!r}: numbers only scale directions, "
            f"e.g. 2 * Autoguidance(1)"
        )
    return GuidanceTypeError(
        f"cannot {op} {value!r} ({type(value).__name__}) and a guidance expression"
    )


def piped_operand(value: Any, op: str) -> GuidanceTypeError:
    """The error for a piped expression used as an operand of ``op``."""
    return GuidanceTypeError(
        f"({value!r}) {op} ...: a pipe applies last. Write the sum first and pipe it, "
        f"e.g. (a + b) | P; Python already reads a + b | P that way"
    )


def two_predictions(a: Any, b: Any) -> GuidanceTypeError:
    """The error for ``a + b`` with two predictions: what was probably meant."""
    entries = b.entries()
    if not b.children() and len(entries) == 1 and isinstance(entries[0].atom, Branch):
        return GuidanceTypeError(
            f"{a!r} + {b!r} adds two predictions, which is neither a prediction nor a "
            f"direction. {b!r} is a plain model prediction. Probably meant a direction instead, "
            f"e.g. {a!r} + Autoguidance(1) or {a!r} + 0.5 * (Cond() - Uncond())"
        )
    return GuidanceTypeError(
        f"{a!r} + {b!r} adds two predictions, which is neither a prediction nor a direction. "
        f"A sum holds one prediction plus directions. Probably meant: {a!r} + ({b!r} - Cond()) "
        f"to add {b!r}'s guidance direction, or 0.5 * ({a!r} - {b!r}) + {b!r} to average them"
    )


def prediction_from_direction(a: Any, b: Any) -> GuidanceTypeError:
    """The error for ``a - b`` with a direction ``a`` and a prediction ``b``."""
    return GuidanceTypeError(
        f"{a!r} - {b!r} subtracts a prediction from a direction: the result is neither a "
        f"prediction nor a direction. Probably meant: {b!r} - {a.fmt_at(PRODUCT)} (the "
        f"prediction minus the direction), or a prediction minus a prediction"
    )


def scaled_prediction(k: float, e: Any) -> GuidanceTypeError:
    """The error for ``k * e`` with a prediction ``e`` and ``k != 1``."""
    return GuidanceTypeError(
        f"{fmt_number(k)} * {e!r} scales a prediction, which is not a prediction any more. "
        f"Probably meant a guidance scale on a direction, e.g. CFG({fmt_number(k)}) or "
        f"{fmt_number(k)} * ({e!r} - Cond())"
    )


def gate_bounds(where: str, lo: Any, hi: Any) -> tuple[float, float]:
    """``(lo, hi)`` of ``.between(lo, hi)`` as floats, or the error saying what to give."""
    for value in (lo, hi):
        if not is_number(value) or math.isnan(float(value)):
            raise GuidanceTypeError(f"{where}: the bounds must be numbers (noise levels sigma)")
    lo, hi = float(lo), float(hi)
    if lo > hi:
        raise GuidanceValueError(
            f"{where}: lo > hi, the interval is empty; the bounds are noise levels (sigma, "
            f"large = noisy) with lo < hi, probably meant .between({fmt_number(hi)}, {fmt_number(lo)})"
        )
    if lo < 0 or math.isinf(lo):
        raise GuidanceValueError(
            f"{where}: lo must be a finite noise level >= 0 (use 0 for 'down to the end')"
        )
    if lo == hi:
        raise GuidanceValueError(
            f"{where}: lo == hi, the interval (lo, hi] is empty; give lo < hi, e.g. "
            f".between({fmt_number(lo)}, {fmt_number(hi * 2 if hi > 0 else 1)})"
        )
    return lo, hi
