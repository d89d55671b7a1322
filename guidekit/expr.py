"""The guidance expression tree: predictions, directions, sums, scalings, gates and pipes.

Every expression is *affine* in the model's predictions. Its ``weight`` is the sum of its
branch coefficients: 1 for a **prediction** (``Cond()``, ``CFG(7)``), 0 for a **direction**
(``PAG(3)`` is ``3 (c - p)``). The operators keep expressions in those two kinds:

* prediction + direction -> prediction, direction + direction -> direction
* scalar * direction -> direction, prediction - prediction -> direction
* prediction + prediction and scalar * prediction raise, saying what was probably meant.

Operators are thin: ``__add__`` forwards to :func:`add` and so on. Sums are n-ary and flatten
their *left* operand only, so the tree mirrors how Python (and :func:`guidekit.parse`) read
the text and ``parse(str(e)) == e`` holds exactly. ``repr`` prints the parsed structure with
the fewest parentheses Python's precedence allows (``*`` > ``+``/``-`` > ``|``).
What the operators say when they refuse an operand (and the metaclass that refuses a class
used as an instance) is in :mod:`guidekit.misuse`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import attrs

from guidekit.branch import Branch
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.linear import INF, Entry, atom_branches
from guidekit.misuse import (
    AlgebraMeta,
    gate_bounds,
    not_an_expression,
    piped_operand,
    prediction_from_direction,
    scaled_prediction,
    two_predictions,
)
from guidekit.text import (
    ATOM,
    PIPE,
    PRODUCT,
    SUM,
    class_instead_of_instance,
    display_name,
    fmt_number,
    is_number,
)

# the linear form and the printing helpers are re-exported: code has imported them from here
__all__ = [
    "ATOM", "INF", "PIPE", "PRODUCT", "SUM", "Entry", "Expr", "Gated", "Scaled", "Sum", "add",
    "atom_branches", "class_instead_of_instance", "display_name", "fmt_number", "gate",
    "is_number", "not_a_processor", "operand", "pipe", "scale", "scaled", "sub", "total",
]


_AlgebraMeta = AlgebraMeta  # the name processor.py and older code import


class Expr(metaclass=_AlgebraMeta):
    """Base of every guidance expression node.

    Subclasses define ``weight`` (1 prediction, 0 direction), ``entries()`` (the linear form)
    and ``_fmt()`` (text at their own ``level``).
    """

    __slots__ = ()
    level: ClassVar[int] = ATOM
    #: expressions take ``.between`` (the metaclass names it when a class is used instead)
    gateable: ClassVar[bool] = True
    #: a piped expression is final: it cannot be added to or scaled (the pipe applies last)
    final: ClassVar[bool] = False

    # -- structure -------------------------------------------------------------------------
    @property
    def weight(self) -> int:
        raise NotImplementedError

    @property
    def is_prediction(self) -> bool:
        return self.weight == 1

    @property
    def is_direction(self) -> bool:
        return self.weight == 0

    def entries(self) -> tuple[Entry, ...]:
        raise NotImplementedError

    def children(self) -> tuple[Expr, ...]:
        return ()

    def branches(self) -> tuple[Branch, ...]:
        """Distinct branches this expression reads, in order of first appearance."""
        seen: dict[Branch, None] = {}
        for entry in self.entries():
            for branch in atom_branches(entry.atom):
                seen.setdefault(branch, None)
        return tuple(seen)

    # -- text ------------------------------------------------------------------------------
    def _fmt(self) -> str:
        raise NotImplementedError

    def fmt_at(self, level: int) -> str:
        text = self._fmt()
        return f"({text})" if self.level < level else text

    def __repr__(self) -> str:
        return self._fmt()

    __str__ = __repr__

    # -- operators: thin, forwarding to named functions ------------------------------------
    def __add__(self, other: Any) -> Expr:
        return add(self, other)

    def __radd__(self, other: Any) -> Expr:
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self  # lets sum([...]) work on directions
        return add(other, self)

    def __sub__(self, other: Any) -> Expr:
        return sub(self, other)

    def __rsub__(self, other: Any) -> Expr:
        return sub(other, self)

    def __mul__(self, other: Any) -> Expr:
        return scale(other, self)

    def __rmul__(self, other: Any) -> Expr:
        return scale(other, self)

    def __truediv__(self, other: Any) -> Expr:
        if not is_number(other) or other == 0:
            raise GuidanceTypeError(
                f"{self!r} / {other!r}: divide a direction by a nonzero number only"
            )
        return scale(1.0 / float(other), self)

    def __neg__(self) -> Expr:
        return scale(-1.0, self)

    def __pos__(self) -> Expr:
        # Unary + does nothing to a term, so it is almost always a doubled operator
        # (``CFG(3) + + PAG(1)``); refusing it keeps Python and parse() agreeing.
        raise GuidanceTypeError(
            f"+{self!r}: unary + does nothing to a guidance term and usually means a doubled "
            f"operator (a + + b); remove the extra +"
        )

    def __or__(self, other: Any) -> Expr:
        return pipe(self, other)

    def __ror__(self, other: Any) -> Any:
        raise GuidanceTypeError(
            f"{other!r} | {self!r}: the right side of | must be a post-processor such as "
            f"APG(...) or Rescale(...); {self!r} is a guidance term: combine terms with +"
        )

    def __bool__(self) -> bool:
        raise GuidanceTypeError(
            f"{self!r} has no truth value: compare expressions with == or test `is None`"
        )

    def between(self, lo: float, hi: float) -> Gated:
        """Restrict this expression to noise levels ``lo < sigma <= hi``.

        A gated direction contributes zero outside the interval (and its branches are not
        computed there); a gated prediction falls back to the plain conditional ``Cond()``,
        which is the guidance-interval paper's "no guidance" (arXiv 2404.07724).
        """
        return gate(self, lo, hi)


# -- the structural nodes of + and * ------------------------------------------------------


@attrs.frozen(repr=False)
class Sum(Expr):
    """``terms[0] + terms[1] + ...``; a negative ``Scaled`` term prints as subtraction."""

    terms: tuple[Expr, ...]
    level: ClassVar[int] = SUM

    @property
    def weight(self) -> int:
        return sum(t.weight for t in self.terms)

    def entries(self) -> tuple[Entry, ...]:
        return tuple(e for t in self.terms for e in t.entries())

    def children(self) -> tuple[Expr, ...]:
        return self.terms

    def _fmt(self) -> str:
        parts = [self.terms[0].fmt_at(SUM)]
        for term in self.terms[1:]:
            if isinstance(term, Scaled) and term.factor < 0:
                k = -term.factor
                inner = term.expr.fmt_at(PRODUCT) if k == 1 else (
                    f"{fmt_number(k)} * {term.expr.fmt_at(ATOM)}"
                )
                parts.append(f"- {inner}")
            else:
                parts.append(f"+ {term.fmt_at(SUM + 1)}")
        return " ".join(parts)


@attrs.frozen(repr=False)
class Scaled(Expr):
    """``factor * expr``; never nested and never with factor 1 (see :func:`scale`)."""

    factor: float
    expr: Expr
    level: ClassVar[int] = PRODUCT

    @property
    def weight(self) -> int:
        w = self.expr.weight
        return 0 if w == 0 else round(self.factor * w)

    def entries(self) -> tuple[Entry, ...]:
        return tuple(attrs.evolve(e, coef=self.factor * e.coef) for e in self.expr.entries())

    def children(self) -> tuple[Expr, ...]:
        return (self.expr,)

    def _fmt(self) -> str:
        if self.factor == -1:
            return f"-{self.expr.fmt_at(ATOM)}"
        return f"{fmt_number(self.factor)} * {self.expr.fmt_at(ATOM)}"


# -- the structural node of .between --------------------------------------------------------


@attrs.frozen(repr=False)
class Gated(Expr):
    """``expr.between(lo, hi)``: active while ``lo < sigma <= hi`` (the guidance interval).

    https://arxiv.org/abs/2404.07724 -- guidance only on a range of noise levels, scheduled by
    sigma, never by step count.
    Outside the interval a direction is zero (its branches are not computed) and a
    prediction ``P`` is ``Cond()``: ``P.between(lo, hi) == Cond() + (P - Cond()).between(lo, hi)``.
    Nested gates intersect.
    """

    expr: Expr
    lo: float
    hi: float
    level: ClassVar[int] = ATOM

    @property
    def weight(self) -> int:
        return self.expr.weight

    def children(self) -> tuple[Expr, ...]:
        return (self.expr,)

    def entries(self) -> tuple[Entry, ...]:
        out = []
        if self.expr.weight == 1:
            out.append(Entry(Branch(), 1.0))
        for e in self.expr.entries():
            lo, hi = max(e.lo, self.lo), min(e.hi, self.hi)
            if lo < hi:
                out.append(Entry(e.atom, e.coef, lo, hi))
        if self.expr.weight == 1:
            out.append(Entry(Branch(), -1.0, self.lo, self.hi))
        return tuple(out)

    def _fmt(self) -> str:
        return f"{self.expr.fmt_at(ATOM)}.between({fmt_number(self.lo)}, {fmt_number(self.hi)})"


# -- named operations -----------------------------------------------------------------------


def operand(value: Any, op: str, other: Any) -> Expr:
    """Check one side of an arithmetic operator and say what to write instead."""
    if isinstance(value, Expr) and value.final:
        raise piped_operand(value, op)
    if isinstance(value, Expr):
        return value
    raise not_an_expression(value, op, other)


def add(a: Any, b: Any) -> Expr:
    """``a + b``: at most one of them may be a prediction."""
    a = operand(a, "add", b)
    b = operand(b, "add", a)
    if a.weight + b.weight not in (0, 1):
        raise two_predictions(a, b)
    left = a.terms if isinstance(a, Sum) else (a,)
    return Sum(left + (b,))


def sub(a: Any, b: Any) -> Expr:
    """``a - b``: prediction - prediction and direction - direction are directions."""
    a = operand(a, "subtract", b)
    b = operand(b, "subtract", a)
    if a.weight - b.weight not in (0, 1):
        raise prediction_from_direction(a, b)
    left = a.terms if isinstance(a, Sum) else (a,)
    return Sum(left + (scaled(-1.0, b),))


def scale(k: Any, e: Any) -> Expr:
    """``k * e`` for a finite number ``k`` and a direction ``e``."""
    if not is_number(k):
        if isinstance(k, Expr):
            raise GuidanceTypeError(
                f"cannot multiply {k!r} by {e!r}: only a number may scale an expression"
            )
        operand(k, "multiply", e)  # raises a specific message for classes, tensors, ...
    e = operand(e, "multiply", k)
    k = float(k)
    if not math.isfinite(k):
        raise GuidanceValueError(
            f"{fmt_number(k)} * {e.fmt_at(PRODUCT)}: the scale of {e!r} must be finite"
        )
    if e.weight != 0 and k != 1:
        raise scaled_prediction(k, e)
    return scaled(k, e)


def scaled(k: float, e: Expr) -> Expr:
    """Build ``k * e`` in normal form (no nesting, no factor 1) without kind checks."""
    if isinstance(e, Scaled):
        product = k * e.factor
        if not math.isfinite(product):  # two finite scales whose product overflows
            raise GuidanceValueError(
                f"{fmt_number(k)} * ({e!r}): the scales multiply to {fmt_number(product)}, which "
                f"is not a finite number; use a smaller scale on {e.expr!r}"
            )
        k, e = product, e.expr
    if k == 1:
        return e
    return Scaled(float(k), e)


def total(exprs: Iterable[Any]) -> Expr:
    """Sum of several expressions, left to right."""
    items = list(exprs)
    if not items:
        raise GuidanceValueError("total() of no expressions")
    result = operand(items[0], "add", None)
    for item in items[1:]:
        result = add(result, item)
    return result


def gate(expr: Any, lo: Any, hi: Any) -> Gated:
    """``expr.between(lo, hi)`` for noise levels ``0 <= lo < hi``."""
    expr = operand(expr, "gate", None)
    lo, hi = gate_bounds(f"{expr!r}.between({lo!r}, {hi!r})", lo, hi)
    return Gated(expr, lo, hi)


def pipe(left: Any, right: Any) -> Expr:
    """``left | right``: the right side, a post-processor or pipeline, builds the piped expression.

    Anything with ``pipe_after(left)`` may stand right of ``|``: the classes that do
    (:mod:`guidekit.processor`) sit above this module, which names only the method.
    """
    if not isinstance(right, type) and hasattr(right, "pipe_after"):
        return right.pipe_after(left)
    raise not_a_processor(right, f"{left!r} | ...")


def not_a_processor(value: Any, where: str) -> GuidanceTypeError:
    """The error for ``value`` standing right of ``|`` where a post-processor belongs."""
    if isinstance(value, type):
        return GuidanceTypeError(class_instead_of_instance(value))
    if isinstance(value, Expr):
        return GuidanceTypeError(
            f"... | {value!r}: the right side of | must be a post-processor such as APG(...) "
            f"or Rescale(...); {value!r} is a guidance term: combine terms with +"
        )
    return GuidanceTypeError(f"{where}: expected a post-processor such as APG(...), got {value!r}")
