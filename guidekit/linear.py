"""The linear form of an expression: ``sum(coef * atom)`` with each entry active on a sigma range.

Every guidance expression is affine in the model's predictions; :meth:`Expr.entries` lists
that combination and the plan evaluates it per step from the branches' outputs.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from guidekit.branch import Branch

INF = math.inf


@attrs.frozen
class Entry:
    """One term of an expression's linear form: ``coef * atom`` while ``lo < sigma <= hi``.

    ``atom`` is a :class:`~guidekit.branch.Branch` or a nonlinear prediction term (such as
    ``CFGZeroStar``) that the plan evaluates from its own branches.
    """

    atom: Any
    coef: float
    lo: float = -INF
    hi: float = INF

    def active(self, sigma: float) -> bool:
        return self.lo < sigma <= self.hi


def atom_branches(atom: Any) -> tuple[Branch, ...]:
    """The branches an atom reads: itself, or a nonlinear term's ``atom_branches()``."""
    if isinstance(atom, Branch):
        return (atom,)
    return tuple(atom.atom_branches())


def linear_at(atom: Any) -> dict[Any, float] | None:
    """A nonlinear atom as the linear form its scales make it at this level (PerpNeg at
    scale 0 is ``u``), or ``None``: it runs as it is."""
    form = getattr(atom, "linear_at", None)
    return None if form is None else form()  # type: ignore[no-any-return]


def reads(atom: Any) -> tuple[Branch, ...]:
    """The branches an atom may read at some level: those of the form a zero scale fixed
    for the whole run makes it (``PerpNeg(0, neg_scale=Cosine(1))`` is ``u``), else its own."""
    form = linear_at(atom)
    if form is None:
        return atom_branches(atom)
    return tuple(dict.fromkeys(b for a in form for b in atom_branches(a)))
