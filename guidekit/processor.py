"""The right side of ``|``: post-processors, modifiers, pipelines, and the piped expression.

A **post-processor** maps the combined prediction to a new prediction (APG, Rescale). It
declares the ``space`` it works in, the branches it reads beyond those on its left
(``requires``), and optional explicit state (``init_state`` / ``apply``). An **input
modifier** changes the conditioning of every branch on its left before the model runs
(CADS); an **attention modifier** changes the attention inside the forward (PLADIS, GAG, NAG).
All are written after ``|`` and compose left to right.

``p | q`` on its own is a :class:`Pipeline`; ``(a | p) | q == a | (p | q)`` structurally.
A piped expression is final: it cannot be added to or scaled (write the sum first). The
expression layer below (:func:`guidekit.expr.pipe`) hands ``expr | x`` to ``x.pipe_after``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from guidekit.branch import Branch
from guidekit.errors import GuidanceTypeError
from guidekit.expr import Entry, Expr, _AlgebraMeta, not_a_processor, operand
from guidekit.expr import pipe as pipe
from guidekit.fields import Examples
from guidekit.misuse import gate_bounds
from guidekit.text import ATOM, PIPE, PRODUCT, SUM, fmt_call, fmt_number

if TYPE_CHECKING:
    import torch

    from guidekit.context import StepContext


class PipeStep(metaclass=_AlgebraMeta):
    """What stands right of ``|``: a processor or a pipeline of them; no arithmetic."""

    __slots__ = ()
    _what: ClassVar[str] = "a post-processor"

    def pipe_steps(self) -> tuple[Processor, ...]:
        raise NotImplementedError

    def pipe_after(self, left: Any) -> Piped:
        """``left | self``: check each processor against the prediction on its left."""
        steps = self.pipe_steps()
        if isinstance(left, Piped):
            base, before = left.expr, left.steps
        else:
            base, before = operand(left, "pipe", self), ()
        if base.weight != 1:
            raise GuidanceTypeError(
                f"{base!r} | {steps[0]!r}: post-processors act on a prediction, but {base!r} is "
                f"a direction. Add it to a prediction first, e.g. CFG(7) + "
                f"{base.fmt_at(PRODUCT)} | {steps[0]!r}"
            )
        for step in steps:
            step.check(base)
        return Piped(base, before + steps)

    def __or__(self, other: Any) -> Pipeline:
        return chain(self, other)

    def __ror__(self, other: Any) -> Any:
        return pipe(other, self)

    def __bool__(self) -> bool:
        raise GuidanceTypeError(f"{self!r} has no truth value")

    def _no_arithmetic(self, *_: Any) -> Any:
        raise GuidanceTypeError(
            f"{self!r} is {self._what}: it applies to a whole prediction with |, e.g. "
            f"CFG(7) | {self!r}; it cannot be added or scaled"
        )

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _no_arithmetic
    __truediv__ = __neg__ = __pos__ = _no_arithmetic


class Processor(PipeStep):
    """Base of everything that goes on the right of ``|``."""

    __slots__ = ()
    level: ClassVar[int] = ATOM
    space: ClassVar[str] = "native"
    _name: ClassVar[str] = "Processor"
    _kind: ClassVar[str] = "processor"
    _example: ClassVar[str] = "APG()"
    #: example values per field (see :data:`guidekit.fields.Examples`)
    field_examples: ClassVar[Examples] = {}

    # -- semantics ---------------------------------------------------------------------------
    def check(self, left: Expr) -> None:
        """Raise (at build time) if this processor cannot act on ``left``."""

    def branches(self) -> tuple[Branch, ...]:
        """Every branch this processor may read (for the plan's layout)."""
        return ()

    def requires(self, coefs: Mapping[Any, float]) -> tuple[Branch, ...]:
        """Branches needed at a step whose active coefficients are ``coefs``."""
        return ()

    def init_state(self) -> Any:
        return None

    def apply(
        self, y: torch.Tensor, ctx: StepContext, state: Any
    ) -> tuple[torch.Tensor, Any]:
        return y, state

    def at_noiseless(
        self, y: torch.Tensor, ctx: StepContext, state: Any
    ) -> tuple[torch.Tensor, Any]:
        """The processor at a level with no noise left (``b(sigma) = 0``: flow time
        ``t = 1``), for one whose ``space`` the model's prediction cannot be recovered from
        there: ``y`` and the result are in the model's own space, ``state`` carries over.

        Every branch's x0 is ``x`` itself there, so an x0-space processor is the limit of
        its map as ``b -> 0``; the default is the identity (a processor that cannot change
        an x0 which is ``x``). One whose limit is infinite raises, naming the fix."""
        return y, state

    # -- text ----------------------------------------------------------------------------------
    def pipe_steps(self) -> tuple[Processor, ...]:
        return (self,)

    def _fmt(self) -> str:
        return fmt_call(self)

    def fmt_at(self, level: int) -> str:
        return self._fmt()

    def __repr__(self) -> str:
        return self._fmt()

    __str__ = __repr__


class InputModifier(Processor):
    """A processor that changes the conditioning inputs of the branches it covers."""

    __slots__ = ()
    _kind: ClassVar[str] = "modifier"

    def modify(
        self, conds: Mapping[str, Mapping[str, Any]], ctx: StepContext
    ) -> dict[str, dict[str, Any]]:
        raise NotImplementedError


class AttentionModifier(Processor):
    """A processor that changes the attention INSIDE the forward of the branches it covers
    (PLADIS, GAG, NAG): no branch, no rows; the attention engine applies it in its layers.

    Like an input modifier it acts before any post-processor, wherever it stands in the
    pipe. ``layers`` (``None``: the architecture's cross-attention layers) is resolved by
    the engine. ``applies_to(branch)`` says which branches' rows it changes; ``negative``
    names the conditioning it reads besides the rows' own (NAG), or is ``None``.
    """

    __slots__ = ()
    _kind: ClassVar[str] = "attention"
    negative: ClassVar[str | None] = None

    def applies_to(self, branch: Branch) -> bool:
        """Whether the rows of ``branch`` are changed (in the layers of this modifier)."""
        return True

    def between(self, lo: float, hi: float) -> Any:
        """This modifier only while ``lo < sigma <= hi``; elsewhere the layers attend as the
        model does (NAG's authors apply it in the first, noisiest steps). Nested gates
        intersect. The subclass keeps the interval in its ``window`` field."""
        lo, hi = gate_bounds(f"{self!r}.between({lo!r}, {hi!r})", lo, hi)
        old = getattr(self, "window", None)
        if old is not None:
            lo, hi = max(lo, old[0]), min(hi, old[1])
            if lo >= hi:
                raise GuidanceTypeError(
                    f"{self!r}.between(...): the intervals do not overlap, so the modifier "
                    f"would never act; drop it or give overlapping intervals"
                )
        return attrs.evolve(self, window=(lo, hi))  # type: ignore[misc]

    def _fmt(self) -> str:
        window = getattr(self, "window", None)
        if window is None:
            return fmt_call(self)
        return f"{fmt_call(self)}.between({fmt_number(window[0])}, {fmt_number(window[1])})"

    def modify(
        self, conds: Mapping[str, Mapping[str, Any]], ctx: StepContext
    ) -> dict[str, dict[str, Any]]:
        """Attention modifiers leave the conditioning as it is (the forward reads it)."""
        return {name: dict(mapping) for name, mapping in conds.items()}


@attrs.frozen(repr=False)
class Pipeline(PipeStep):
    """Processors applied left to right, not yet attached to an expression."""

    steps: tuple[Any, ...]
    level: ClassVar[int] = PIPE
    _what: ClassVar[str] = "a pipeline of post-processors"

    def pipe_steps(self) -> tuple[Processor, ...]:
        return tuple(self.steps)

    def _fmt(self) -> str:
        return " | ".join(s.fmt_at(ATOM) for s in self.steps)

    def fmt_at(self, level: int) -> str:
        text = self._fmt()
        return f"({text})" if level > PIPE else text

    def __repr__(self) -> str:
        return self._fmt()


@attrs.frozen(repr=False)
class Piped(Expr):
    """``expr | steps[0] | steps[1] ...``: a prediction, post-processed."""

    expr: Expr
    steps: tuple[Any, ...]
    level: ClassVar[int] = PIPE
    final: ClassVar[bool] = True

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


def _steps_of(value: Any) -> tuple[Processor, ...]:
    if isinstance(value, PipeStep):
        return value.pipe_steps()
    raise not_a_processor(value, "p | q")


def chain(left: Any, right: Any) -> Pipeline:
    """``p | q`` for two processors or pipelines."""
    return Pipeline(_steps_of(left) + _steps_of(right))
