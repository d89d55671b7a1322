"""How a forward group's rows are split into model calls.

One call of ``K x B`` rows is usually fastest, but not always: on a 2-core CPU with a small
DiT it lost to ``K`` calls of ``B`` rows at ``B = 32``. Policies:

* :class:`FixedSplit` (``max_rows=None``: one call; ``max_rows=N``: the fewest calls of at
  most ``N`` rows each -- a row budget).
* :class:`AutoSplit` (``max_rows="auto"``): on the first calls of a run with a given row
  count it times "one call" and "one call per branch" (``trials`` times each, after one
  warm-up call of each), then keeps the faster for the rest of the run.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import attrs
import torch

from guidekit.errors import GuidanceValueError


class Splitter(Protocol):
    def chunk(self, model: str, rows: int, batch: int) -> int:
        """Rows per call for a group of ``rows`` rows (``rows // batch`` branches)."""
        ...

    def observe(self, model: str, rows: int, batch: int, chunk: int, seconds: float) -> None:
        """Report how long one forward group took with ``chunk`` rows per call."""
        ...

    @property
    def timing(self) -> bool: ...


@attrs.frozen
class FixedSplit:
    """At most ``max_rows`` rows per call (``None``: everything in one call)."""

    max_rows: int | None = None
    timing: bool = False

    def chunk(self, model: str, rows: int, batch: int) -> int:
        return rows if self.max_rows is None else min(rows, self.max_rows)

    def observe(self, model: str, rows: int, batch: int, chunk: int, seconds: float) -> None:
        return None


@attrs.define
class AutoSplit:
    """Time one call vs one call per branch on the first steps, keep the faster.

    ``chosen`` maps ``(model, rows, batch)`` to the chunk size in use; ``timings`` keeps the
    measured seconds per candidate, so a benchmark or a user can see why.
    """

    trials: int = 2
    max_rows: int | None = None
    timing: bool = True
    chosen: dict[tuple[str, int, int], int] = attrs.field(factory=dict)
    timings: dict[tuple[str, int, int], dict[int, list[float]]] = attrs.field(factory=dict)

    def candidates(self, rows: int, batch: int) -> list[int]:
        cands = [rows, batch] if rows != batch else [rows]
        if self.max_rows is not None:
            cands = sorted({min(c, self.max_rows) for c in cands}, reverse=True)
        return cands

    def chunk(self, model: str, rows: int, batch: int) -> int:
        key = (model, rows, batch)
        if key in self.chosen:
            return self.chosen[key]
        cands = self.candidates(rows, batch)
        if len(cands) == 1:
            self.chosen[key] = cands[0]
            return cands[0]
        seen = self.timings.setdefault(key, {c: [] for c in cands})
        # round-robin, one warm-up (discarded) plus `trials` timed calls per candidate
        return min(cands, key=lambda c: (len(seen[c]), cands.index(c)))

    def observe(self, model: str, rows: int, batch: int, chunk: int, seconds: float) -> None:
        key = (model, rows, batch)
        if key in self.chosen:
            return
        seen = self.timings[key]
        seen[chunk].append(seconds)
        if all(len(v) >= self.trials + 1 for v in seen.values()):
            self.chosen[key] = min(seen, key=lambda c: min(seen[c][1:]))


def make_splitter(max_rows: Any) -> Any:
    if max_rows is None or max_rows == "auto":
        return AutoSplit() if max_rows == "auto" else FixedSplit(None)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise GuidanceValueError(
            f"max_rows must be None (one call per forward group), 'auto' or a whole number "
            f">= 1, got {max_rows!r}"
        )
    return FixedSplit(max_rows)


def calls_for(rows: int, chunk: int) -> int:
    return math.ceil(rows / chunk)


def sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def now() -> float:
    return time.perf_counter()
