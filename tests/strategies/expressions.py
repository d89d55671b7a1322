"""Recursive expression strategies built from the value strategies.

:func:`directions`, :func:`predictions`, :func:`piped` reuse drawn subtrees (``d + d``,
``p + (d - d)``) so that deduplication is exercised.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypothesis import strategies as st

from guidekit import (
    CFGRescale,
    GuidanceTypeError,
    Piped,
)
from guidekit.branch import MAIN, UNCOND, Branch
from guidekit.expr import Expr

from .values import SCALES, gate_bounds, processors, terms

# -- recursive expressions ------------------------------------------------------------------------


def prediction_atoms(linear: bool = False) -> st.SearchStrategy[Expr]:
    """Registered prediction terms; ``linear`` leaves out nonlinear ones (CFG-Zero*, TCFG)."""
    return terms("prediction") if linear else terms("prediction", "nonlinear")


def _gate(pair: tuple[Expr, tuple[float, float]]) -> Expr:
    expr, (lo, hi) = pair
    return expr.between(lo, hi)


def directions(linear: bool = False, max_leaves: int = 5) -> st.SearchStrategy[Expr]:
    """Directions (weight 0): registered direction terms and prediction differences,
    combined by ``+``, ``-``, scaling, negation and gates, with duplicated subtrees."""
    atoms = prediction_atoms(linear)
    leaves = st.one_of(
        terms("direction"),
        st.tuples(atoms, atoms).map(lambda ab: ab[0] - ab[1]),
    )

    def extend(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
        pairs = st.tuples(children, children)
        return st.one_of(
            pairs.map(lambda ab: ab[0] + ab[1]),
            pairs.map(lambda ab: ab[0] - ab[1]),
            st.tuples(SCALES, children).map(lambda kd: kd[0] * kd[1]),
            children.map(lambda d: -d),
            st.tuples(children, gate_bounds()).map(_gate),
            # the same subtree twice: equal branches must stay one row block
            children.map(lambda d: d + d),
            pairs.map(lambda ab: ab[0] + (ab[1] - ab[1])),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


def predictions(linear: bool = False, max_leaves: int = 4) -> st.SearchStrategy[Expr]:
    """Predictions (weight 1): a prediction term plus directions, ``p - q + r``, gated
    predictions and duplicated subtrees (``p + d + d``, ``p + (d - d)``)."""
    dirs = directions(linear, max_leaves=3)

    def extend(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
        with_dir = st.tuples(children, dirs)
        return st.one_of(
            with_dir.map(lambda pd: pd[0] + pd[1]),
            with_dir.map(lambda pd: pd[1] + pd[0]),
            with_dir.map(lambda pd: pd[0] + pd[1] + pd[1]),
            with_dir.map(lambda pd: pd[0] + (pd[1] - pd[1])),
            st.tuples(children, children, children).map(lambda t: t[0] - t[1] + t[2]),
            st.tuples(children, gate_bounds()).map(_gate),
        )

    return st.recursive(prediction_atoms(linear), extend, max_leaves=max_leaves)


def has_uncond(expr: Expr) -> bool:
    """Whether ``expr``'s linear form names the main model's unconditional branch."""
    return Branch(MAIN, UNCOND) in [e.atom for e in expr.entries()]


def apg_lefts() -> st.SearchStrategy[Expr]:
    """Linear predictions with an unconditional branch: what ``| APG(...)`` accepts."""
    return predictions(linear=True).filter(has_uncond)


def attach(left: Expr, procs: Iterable[Any]) -> Expr:
    """``left | p1 | p2 ...``, leaving out processors that reject ``left`` (APG on a
    nonlinear or unconditional-free prediction)."""
    expr = left
    for proc in procs:
        try:
            expr = expr | proc
        except GuidanceTypeError:
            continue
    return expr


@st.composite
def piped(draw: st.DrawFn, min_steps: int = 0, max_steps: int = 3) -> Expr:
    """``prediction | processors`` (possibly with no processor left when ``min_steps=0``)."""
    if min_steps:
        left = draw(apg_lefts())
    else:
        left = draw(st.one_of(predictions(), apg_lefts()))
    procs = draw(st.lists(processors(), min_size=min_steps, max_size=max_steps))
    expr = attach(left, procs)
    if min_steps and not isinstance(expr, Piped):
        # apg_lefts() accepts every processor, so this only guards future processors
        expr = left | CFGRescale(0.5)
    return expr


def expressions() -> st.SearchStrategy[Expr]:
    """Anything a user may write on the left of ``compile``: predictions, piped or not
    (weighted towards pipes, whose processors are the least likely to be drawn)."""
    return st.one_of(predictions(), piped(), piped(min_steps=1))


def classes_in(expr: Any) -> set[type]:
    """Every term and processor class used in ``expr``."""
    found: set[type] = set()
    stack = [expr]
    while stack:
        node = stack.pop()
        found.add(type(node))
        if isinstance(node, Piped):
            found.update(type(s) for s in node.steps)
        if isinstance(node, Expr):
            stack.extend(node.children())
    return found
