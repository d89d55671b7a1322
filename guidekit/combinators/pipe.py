"""``expr | p | q``: pipe a prediction through post-processors, left to right.

``p | q`` on its own is a :class:`Pipeline`; ``(a | p) | q == a | (p | q)`` structurally.
A piped expression is final: it cannot be added to or scaled (write the sum first).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from guidekit.errors import GuidanceTypeError
from guidekit.expr import ATOM, PIPE, SUM, Entry, Expr, class_instead_of_instance, operand


@attrs.frozen(repr=False)
class Pipeline:
    """Processors applied left to right, not yet attached to an expression."""

    steps: tuple[Any, ...]
    level: ClassVar[int] = PIPE

    def _fmt(self) -> str:
        return " | ".join(s.fmt_at(ATOM) for s in self.steps)

    def fmt_at(self, level: int) -> str:
        text = self._fmt()
        return f"({text})" if level > PIPE else text

    def __repr__(self) -> str:
        return self._fmt()

    def __or__(self, other: Any) -> Pipeline:
        return chain(self, other)

    def __ror__(self, other: Any) -> Any:
        return pipe(other, self)

    def __bool__(self) -> bool:
        raise GuidanceTypeError(f"{self!r} has no truth value")

    def _no_arithmetic(self, *_: Any) -> Any:
        raise GuidanceTypeError(
            f"{self!r} is a pipeline of post-processors: it applies to a whole prediction "
            f"with |, e.g. CFG(7) | {self!r}; it cannot be added or scaled"
        )

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _no_arithmetic
    __truediv__ = __neg__ = __pos__ = _no_arithmetic


@attrs.frozen(repr=False)
class Piped(Expr):
    """``expr | steps[0] | steps[1] ...``: a prediction, post-processed."""

    expr: Expr
    steps: tuple[Any, ...]
    level: ClassVar[int] = PIPE

    @property
    def weight(self) -> int:
        return 1

    def entries(self) -> tuple[Entry, ...]:
        return self.expr.entries()

    def children(self) -> tuple[Expr, ...]:
        return (self.expr,)

    def branches(self) -> tuple[Any, ...]:
        seen = dict.fromkeys(self.expr.branches())
        for step in self.steps:
            seen.update(dict.fromkeys(step.branches()))
        return tuple(seen)

    def _fmt(self) -> str:
        return " | ".join([self.expr.fmt_at(SUM)] + [s.fmt_at(ATOM) for s in self.steps])

    def between(self, lo: float, hi: float) -> Any:
        raise GuidanceTypeError(
            f"({self!r}).between(...): gate the expression inside the pipe instead, e.g. "
            f"CFG(7).between(lo, hi) | APG(...)"
        )


def _steps_of(value: Any, where: str) -> tuple[Any, ...]:
    from guidekit.combinators.base import Processor

    if isinstance(value, Pipeline):
        return value.steps
    if isinstance(value, Processor):
        return (value,)
    if isinstance(value, type):
        raise GuidanceTypeError(class_instead_of_instance(value))
    if isinstance(value, Expr):
        raise GuidanceTypeError(
            f"... | {value!r}: the right side of | must be a post-processor such as APG(...) "
            f"or Rescale(...); {value!r} is a guidance term: combine terms with +"
        )
    raise GuidanceTypeError(
        f"{where}: expected a post-processor such as APG(...), got {value!r}"
    )


def chain(left: Any, right: Any) -> Pipeline:
    """``p | q`` for two processors or pipelines."""
    return Pipeline(_steps_of(left, "p | q") + _steps_of(right, "p | q"))


def pipe(left: Any, right: Any) -> Piped:
    """``expr | processor``: check each processor against the prediction on its left."""
    steps = _steps_of(right, f"{left!r} | ...")
    if isinstance(left, Piped):
        base, before = left.expr, left.steps
    else:
        left = operand(left, "pipe", right)
        base, before = left, ()
    if base.weight != 1:
        raise GuidanceTypeError(
            f"{base!r} | {steps[0]!r}: post-processors act on a prediction, but {base!r} is a "
            f"direction. Add it to a prediction first, e.g. CFG(7) + {base!r} | {steps[0]!r}"
        )
    for step in steps:
        step.check(base)
    return Piped(base, before + steps)
