"""A branch: one model prediction that a guidance expression needs.

A branch names *which model*, *which conditioning* and *which perturbation*; it holds no
tensors. Equal branches are one row block in the batched forward, however many terms use them.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import attrs

MAIN = "main"
COND = "cond"
UNCOND = "uncond"


#: every branch made so far, by value: equal branches are ONE object (see Branch)
_LOCK = threading.Lock()
_INTERNED: weakref.WeakValueDictionary[tuple[str, str, Any], Branch] = weakref.WeakValueDictionary()


# Branches key the dicts read at every step (row layouts, routes, each branch's output rows,
# the combine): interned, so that equality is identity and the hash is the object's own (no
# Python-level __hash__ or __eq__ per lookup); value semantics are kept by construction
@attrs.frozen(eq=False)
class Branch:
    """A model prediction: ``model`` and ``cond`` are names bound when the plan runs.

    ``perturbation`` is a frozen, hashable description of a change made inside the forward
    (an attention perturbation, for example); ``None`` is the model as it is. Equal fields
    give the same object (copies and pickles included), so ``==`` and ``hash`` are those of
    the value.
    """

    model: str = MAIN
    cond: str = COND
    perturbation: Any = None

    def __new__(cls, model: str = MAIN, cond: str = COND, perturbation: Any = None) -> Branch:
        key = (model, cond, perturbation)
        found = _INTERNED.get(key)
        if found is None:
            with _LOCK:  # two threads making the same branch get one object
                found = _INTERNED.get(key)
                if found is None:
                    found = _INTERNED[key] = super().__new__(cls)
        return found

    def __reduce__(self) -> tuple[Any, tuple[str, str, Any]]:
        # copy, deepcopy and pickle rebuild through __new__: the interned object again
        return (Branch, (self.model, self.cond, self.perturbation))

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
