"""Base classes of guidance terms: leaf values of the expression tree.

A term is a frozen attrs value. Its fields are plain numbers, strings and tuples (never
tensors or callables), so equal terms hash equal and two equal terms are one atom of the plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from guidekit.branch import Branch
from guidekit.expr import Entry, Expr
from guidekit.fields import (  # re-exported: terms have imported the validators from here
    Examples,
    count,
    finite,
    name,
    nonnegative,
    number,
    positive_or_none,
    to_float,
    unit_interval,
)
from guidekit.text import ATOM, fmt_call, fmt_value

if TYPE_CHECKING:
    import torch

    from guidekit.context import StepContext

__all__ = [
    "Branch", "DirectionTerm", "LinearTerm", "NonlinearPrediction", "Term", "count", "finite",
    "fmt_call", "fmt_value", "name", "nonnegative", "number", "positive_or_none", "to_float",
    "unit_interval",
]


# -- term kinds ---------------------------------------------------------------------------------


class Term(Expr):
    """A leaf of the expression tree, printed as its constructor call."""

    __slots__ = ()
    level: ClassVar[int] = ATOM
    _name: ClassVar[str] = "Term"
    _kind: ClassVar[str] = "prediction"
    _positional: ClassVar[tuple[str, ...]] = ()
    _example: ClassVar[str] = "Term()"
    #: example values per field (see :data:`guidekit.fields.Examples`)
    field_examples: ClassVar[Examples] = {}

    def _fmt(self) -> str:
        return fmt_call(self)


class LinearTerm(Term):
    """A term that is a fixed linear combination of branches."""

    __slots__ = ()

    def coefficients(self) -> dict[Branch, float]:
        raise NotImplementedError

    def entries(self) -> tuple[Entry, ...]:
        return tuple(Entry(b, c) for b, c in self.coefficients().items())

    @property
    def weight(self) -> int:
        return round(sum(self.coefficients().values()))


class DirectionTerm(LinearTerm):
    """``scale * (positive - negative)``: the additive guidance convention of PAG/SEG/SLG."""

    __slots__ = ()
    _kind: ClassVar[str] = "direction"

    def negative(self) -> Branch:
        raise NotImplementedError

    def positive(self) -> Branch:
        return Branch()

    def coefficients(self) -> dict[Branch, float]:
        s: float = self.scale  # type: ignore[attr-defined]
        return {self.positive(): s, self.negative(): -s}

    @property
    def weight(self) -> int:
        return 0


class NonlinearPrediction(Term):
    """A prediction that is not linear in its branches (CFG-Zero*, TCFG).

    The plan treats it as one atom: it asks for ``atom_branches()`` and calls ``evaluate``
    with their outputs converted to ``space`` (``"native"`` is the model's own space).
    """

    __slots__ = ()
    space: ClassVar[str] = "native"
    _kind: ClassVar[str] = "nonlinear"

    @property
    def weight(self) -> int:
        return 1

    def entries(self) -> tuple[Entry, ...]:
        return (Entry(self, 1.0),)

    def atom_branches(self) -> tuple[Branch, ...]:
        raise NotImplementedError

    def evaluate(self, values: Mapping[Branch, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError
