"""A step's program: the atoms active on one interval of noise levels, their forward groups and
the combine formula that ``print(plan)`` shows."""

from __future__ import annotations

import functools
from typing import Any

import attrs

from guidekit.branch import Branch
from guidekit.rows import ForwardGroup
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


def fmt_term(coef: float, label: str, first: bool) -> str:
    sign = "-" if coef < 0 else "+"
    mag = abs(coef)
    body = label if mag == 1 else f"{fmt_number(mag)}·{label}"
    if first:
        return body if sign == "+" else f"-{body}"
    return f"{sign} {body}"


def atom_label(atom: Any) -> str:
    return atom.label if isinstance(atom, Branch) else repr(atom)
