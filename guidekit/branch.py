"""A branch: one model prediction that a guidance expression needs.

A branch names *which model*, *which conditioning* and *which perturbation*; it holds no
tensors. Equal branches are one row block in the batched forward, however many terms use them.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs

MAIN = "main"
COND = "cond"
UNCOND = "uncond"


# the hash and the label are read at every step (row layouts, routes, call records): kept
@attrs.frozen(cache_hash=True)
class Branch:
    """A model prediction: ``model`` and ``cond`` are names bound when the plan runs.

    ``perturbation`` is a frozen, hashable description of a change made inside the forward
    (an attention perturbation, for example); ``None`` is the model as it is.
    """

    model: str = MAIN
    cond: str = COND
    perturbation: Any = None

    @functools.cached_property
    def label(self) -> str:
        """Short name used by ``Plan.explain``: ``c``, ``u``, ``c@weak``, ``c[PAG(...)]``."""
        base = {COND: "c", UNCOND: "u"}.get(self.cond, self.cond)
        if self.model != MAIN:
            base += f"@{self.model}"
        if self.perturbation is not None:
            base += f"[{self.perturbation!r}]"
        return base

    def __repr__(self) -> str:
        return self.label


def cond(model: str = MAIN) -> Branch:
    """The conditional prediction of ``model``."""
    return Branch(model=model, cond=COND)


def uncond(model: str = MAIN) -> Branch:
    """The unconditional prediction of ``model``."""
    return Branch(model=model, cond=UNCOND)
