"""How a forward group's rows are split into model calls.

One call of ``K x B`` rows is usually fastest, but not always: once ``K x B`` rows saturate
the device, ``K`` calls of ``B`` rows cost about the same or less (on a 2-core CPU with a
2M-parameter DiT the two are within about 7 % at ``B = 32``, and which one wins changes
from run to run; see docs/benchmarks.md).
Policies:

* :class:`FixedSplit` (``max_rows=None``: one call; ``max_rows=N``: the fewest calls of at
  most ``N`` rows each -- a row budget).
* :class:`AutoSplit` (``max_rows="auto"``): on the first calls of a run with a given row
  count it times "one call" and "one call per branch", alternating, and keeps the faster for
  the rest of the run. Splitting never changes which rows are computed, only how many go into
  each call, so the outputs are the same up to float rounding.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import attrs
import torch

from guidekit.errors import GuidanceValueError


class Splitter(Protocol):
    """What ``Plan.step`` asks of a split policy (one instance per sampling run)."""

    def chunk(self, model: str, rows: int, batch: int) -> int:
        """Rows per call for a group of ``rows`` rows (``rows // batch`` branches)."""
        ...

    def observe(self, model: str, rows: int, batch: int, chunk: int, seconds: float) -> None:
        """Report how long one forward group took with ``chunk`` rows per call."""
        ...

    @property
    def timing(self) -> bool:
        """Whether ``Plan.step`` should time each group and call :meth:`observe`."""
        ...


@attrs.frozen
class FixedSplit:
    """At most ``max_rows`` rows per call (``None``: everything in one call)."""

    max_rows: int | None = None
    timing: bool = False

    def chunk(self, model: str, rows: int, batch: int) -> int:
        """``rows``, or the row budget if that is smaller."""
        return rows if self.max_rows is None else min(rows, self.max_rows)

    def observe(self, model: str, rows: int, batch: int, chunk: int, seconds: float) -> None:
        """Nothing to learn: a fixed policy ignores timings."""
        return None


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GuidanceValueError(
            f"AutoSplit({attribute.name}=...) must be a whole number >= 1, got {value!r}"
        )


def _at_least(low: float) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
            raise GuidanceValueError(
                f"AutoSplit({attribute.name}=...) must be a number >= {low:g}, got {value!r}"
            )

    return check


@attrs.define
class AutoSplit:
    """Time one call vs one call per branch on the first steps of a run, keep the faster.

    Trial phase, per ``(model, rows, batch)``: the candidates (``rows`` rows per call, and
    ``batch`` rows per call) take turns, largest chunk first, and each forward group's time
    is recorded. A candidate's estimate is the **minimum** of its times: timing noise on a
    shared machine only ever adds time, and the first call at a new shape (lazy
    initialisation, kernel selection) is slow, so the minimum discards both without a
    separate, wasted warm-up call. The decision:

    * once every candidate has ``trials`` times: keep the fastest if it beats the next by
      more than ``margin`` (relative); otherwise, while the two are that close, keep timing,
      up to ``max_trials`` times each, then keep the fastest (a close call costs little);
    * early: once the fastest has ``trials`` times, keep it if every other candidate's times
      are all more than ``drop`` times slower, without trying those again (at small batches
      one call per branch is often 1.5-2.5x slower, and each trial of it costs a step).

    With the defaults a clear case takes 3 or 4 steps and an even one at most 8. The choice
    is then kept for the rest of the run (``Guided.reset`` starts a new splitter).

    ``chosen`` maps ``(model, rows, batch)`` to the chunk size in use; ``timings`` keeps the
    measured seconds per candidate, so a benchmark or a user can see why.
    """

    trials: int = attrs.field(default=2, validator=_positive_int)
    max_trials: int = attrs.field(default=4, validator=_positive_int)
    margin: float = attrs.field(default=0.05, validator=_at_least(0.0))
    drop: float = attrs.field(default=1.5, validator=_at_least(1.0))
    max_rows: int | None = None
    timing: bool = True
    chosen: dict[tuple[str, int, int], int] = attrs.field(factory=dict)
    timings: dict[tuple[str, int, int], dict[int, list[float]]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.max_trials < self.trials:
            raise GuidanceValueError(
                f"AutoSplit(max_trials={self.max_trials}) must be >= trials={self.trials}"
            )

    def candidates(self, rows: int, batch: int) -> list[int]:
        """Chunk sizes to try, largest first: one call, and one call per branch."""
        cands = [rows, batch] if rows != batch else [rows]
        if self.max_rows is not None:
            cands = sorted({min(c, self.max_rows) for c in cands}, reverse=True)
        return cands

    def chunk(self, model: str, rows: int, batch: int) -> int:
        """The chosen chunk, or during the trial the candidate with the fewest timings."""
        key = (model, rows, batch)
        if key in self.chosen:
            return self.chosen[key]
        cands = self.candidates(rows, batch)
        if len(cands) == 1:
            self.chosen[key] = cands[0]
            return cands[0]
        seen = self.timings.setdefault(key, {c: [] for c in cands})
        # Round-robin: the candidates alternate, so drift of the machine hits both alike.
        return min(cands, key=lambda c: (len(seen[c]), cands.index(c)))

    def observe(self, model: str, rows: int, batch: int, chunk: int, seconds: float) -> None:
        """Record one timed forward group; decide once the data allow it."""
        key = (model, rows, batch)
        if key in self.chosen:
            return
        seen = self.timings.get(key)
        if seen is None or chunk not in seen:
            return  # not a trial call of this splitter (e.g. a group it never proposed)
        seen[chunk].append(float(seconds))
        best = self._decide(seen)
        if best is not None:
            self.chosen[key] = best

    def _decide(self, seen: dict[int, list[float]]) -> int | None:
        """The chunk to keep, or ``None`` while the timings so far cannot tell."""
        if any(not ts for ts in seen.values()):
            return None
        est = {c: min(ts) for c, ts in seen.items()}
        # Fastest first; on a tie the larger chunk (fewer calls) wins.
        best, *rest = sorted(est, key=lambda c: (est[c], -c))
        runner_up = min(est[c] for c in rest)
        if len(seen[best]) >= self.trials and runner_up > self.drop * est[best]:
            return best  # a clear loser: no more of its (expensive) trials
        counts = [len(ts) for ts in seen.values()]
        if min(counts) < self.trials:
            return None
        if runner_up > (1.0 + self.margin) * est[best] or min(counts) >= self.max_trials:
            return best
        return None


def make_splitter(max_rows: Any) -> Any:
    """The split policy for ``compile(..., max_rows=...)``: validates the value."""
    if max_rows is None or max_rows == "auto":
        return AutoSplit() if max_rows == "auto" else FixedSplit(None)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise GuidanceValueError(
            f"max_rows must be None (one call per forward group), 'auto' or a whole number "
            f">= 1, got {max_rows!r}"
        )
    return FixedSplit(max_rows)


def calls_for(rows: int, chunk: int) -> int:
    """Model calls needed for ``rows`` rows at ``chunk`` rows per call."""
    return math.ceil(rows / chunk)


def sync(t: torch.Tensor) -> None:
    """Wait for ``t``'s device so that a timing covers the work, not just its launch."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def now() -> float:
    """A monotonic clock in seconds (the one the auto split times with)."""
    return time.perf_counter()
