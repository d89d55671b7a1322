"""Post-processors (right of ``|``) and input modifiers: the non-additive part of the algebra.

A **post-processor** maps the combined prediction to a new prediction (APG, Rescale). It
declares the ``space`` it works in, the branches it reads beyond those on its left
(``requires``), and optional explicit state (``init_state`` / ``apply``).

An **input modifier** changes the conditioning of every branch on its left before the model
runs (CADS). Both are written after ``|`` and compose left to right.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from guidekit.branch import Branch
from guidekit.errors import GuidanceTypeError
from guidekit.expr import ATOM, Expr, _AlgebraMeta
from guidekit.terms.base import fmt_call

if TYPE_CHECKING:
    import torch

    from guidekit.combinators.pipe import Pipeline
    from guidekit.context import StepContext


class Processor(metaclass=_AlgebraMeta):
    """Base of everything that goes on the right of ``|``."""

    __slots__ = ()
    level: ClassVar[int] = ATOM
    space: ClassVar[str] = "native"
    _name: ClassVar[str] = "Processor"
    _example: ClassVar[str] = "APG()"

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

    # -- text and operators --------------------------------------------------------------------
    def _fmt(self) -> str:
        return fmt_call(self)

    def fmt_at(self, level: int) -> str:
        return self._fmt()

    def __repr__(self) -> str:
        return self._fmt()

    __str__ = __repr__

    def __or__(self, other: Any) -> Pipeline:
        from guidekit.combinators.pipe import chain

        return chain(self, other)

    def __ror__(self, other: Any) -> Any:
        from guidekit.combinators.pipe import pipe

        return pipe(other, self)

    def _no_arithmetic(self, *_: Any) -> Any:
        raise GuidanceTypeError(
            f"{self!r} is a post-processor: it applies to a whole prediction with |, e.g. "
            f"CFG(7) | {self!r}; it cannot be added or scaled"
        )

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _no_arithmetic
    __truediv__ = __neg__ = __pos__ = _no_arithmetic

    def __bool__(self) -> bool:
        raise GuidanceTypeError(f"{self!r} has no truth value")


class InputModifier(Processor):
    """A processor that changes the conditioning inputs of the branches it covers."""

    __slots__ = ()

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
    negative: ClassVar[str | None] = None

    def applies_to(self, branch: Branch) -> bool:
        """Whether the rows of ``branch`` are changed (in the layers of this modifier)."""
        return True

    def modify(
        self, conds: Mapping[str, Mapping[str, Any]], ctx: StepContext
    ) -> dict[str, dict[str, Any]]:
        """Attention modifiers leave the conditioning as it is (the forward reads it)."""
        return {name: dict(mapping) for name, mapping in conds.items()}
