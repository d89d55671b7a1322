"""A step's program: the atoms active on one interval of noise levels, their forward groups and
the combine formula that ``print(plan)`` shows."""

from __future__ import annotations

import functools
from typing import Any

import attrs
import torch

from guidekit.branch import Branch
from guidekit.expr import atom_branches
from guidekit.linear import linear_at
from guidekit.rows import ForwardGroup
from guidekit.schedule import resolve, value_at
from guidekit.schedules.steps import level_at
from guidekit.text import fmt_number


@attrs.frozen(eq=False)
class Program:
    """What runs for noise levels in one interval: active atoms and forward groups."""

    coefs: tuple[tuple[Any, float], ...]
    groups: tuple[ForwardGroup, ...]
    formula: str

    # read at every step of the program's interval: made once (the fields are frozen)
    @functools.cached_property
    def coef_map(self) -> dict[Any, float]:
        """The coefficients by atom (shared: read it, never change it)."""
        return dict(self.coefs)

    @functools.cached_property
    def branches(self) -> tuple[Branch, ...]:
        return tuple(b for g in self.groups for b in g.branches)

    @functools.cached_property
    def row_weights(self) -> tuple[float, ...] | None:
        """The combine as one weight per row block of the only forward group, in its row
        order, where the combine is exactly that: every atom a branch of the one group and
        every branch of the group an atom (``None`` otherwise: more groups, a nonlinear
        term, or rows the combine skips, as fixed shapes' inactive branches)."""
        if len(self.groups) != 1:
            return None
        branches = self.groups[0].branches
        coefs = self.coef_map
        if len(coefs) != len(branches) or any(b not in coefs for b in branches):
            return None
        return tuple(coefs[b] for b in branches)

    def weights(self, like: torch.Tensor) -> torch.Tensor:
        """:attr:`row_weights` as a ``[1, k]`` tensor of ``like``'s dtype and device (made once
        per dtype and device)."""
        key = (like.dtype, like.device)
        cached = self._weights.get(key)
        if cached is None:
            assert self.row_weights is not None
            cached = self._weights[key] = torch.tensor(
                [self.row_weights], dtype=like.dtype, device=like.device
            )
        return cached

    @functools.cached_property
    def _weights(self) -> dict[tuple[torch.dtype, torch.device], torch.Tensor]:
        return {}


def fmt_term(coef: float, label: str, first: bool) -> str:
    sign = "-" if coef < 0 else "+"
    mag = abs(coef)
    body = label if mag == 1 else f"{fmt_number(mag)}·{label}"
    if first:
        return body if sign == "+" else f"-{body}"
    return f"{sign} {body}"


def atom_label(atom: Any) -> str:
    return atom.label if isinstance(atom, Branch) else repr(atom)


def build_program(plan: Any, sigma: float, sigmas: tuple[float, ...] | None = None) -> Program:
    """The program of ``plan`` at noise level ``sigma`` (scheduled scales read on the run's
    schedule ``sigmas``): the active atoms' coefficients, the branches they need in their
    forward groups, and the combine formula. ``Plan.program`` caches it."""
    # scheduled scales take their value at this level; with no run (print(plan)) a
    # progress shape reads r = 1/2 (guidekit/schedules/steps.py)
    where = level_at(sigma, sigmas, sigmas is None) if plan.scheduled else None
    coefs: dict[Any, float] = {}
    for e in plan.entries:
        if e.active(sigma):
            atom, coef = e.atom, e.coef
            if where is not None:
                coef = value_at(coef, where)
                atom = atom if isinstance(atom, Branch) else resolve(atom, where)
            # a nonlinear term a zero scale makes linear here (PerpNeg(0) is u) reads
            # only the branches of that form
            form = None if isinstance(atom, Branch) else linear_at(atom)
            for a, k in ({atom: 1.0} if form is None else form).items():
                coefs[a] = coefs.get(a, 0.0) + coef * k
    # cancelled terms leave round-off residues (3.3 - 1.1 - 2.2); they need no rows
    coefs = {a: c for a, c in coefs.items() if abs(c) > 1e-12}
    needed: dict[Branch, None] = {}
    for atom in coefs:
        needed.update(dict.fromkeys(atom_branches(atom)))
    for proc in plan.post:
        needed.update(dict.fromkeys(proc.requires(coefs)))
    # a dependent branch's input is made from its source branch (SAG: u), which must run
    # in the first call even where its own coefficient cancels
    for b in list(needed):
        if getattr(b.perturbation, "dependent", False):
            needed.setdefault(Branch(model=b.model, cond=b.perturbation.source), None)
    groups = []
    for g in plan.groups:
        active = tuple(b for b in g.branches if b in needed)
        if active:
            groups.append(attrs.evolve(g, branches=active))
    parts = [fmt_term(c, atom_label(a), i == 0) for i, (a, c) in enumerate(coefs.items())]
    formula = "out = " + " ".join(parts)
    if plan.post or plan.modifiers:
        formula += " | " + " | ".join(repr(p) for p in plan.post + plan.modifiers)
    return Program(tuple(coefs.items()), tuple(groups), formula)
