"""How a forward group's rows are split into model calls.

One call of ``K x B`` rows is usually fastest, but not always: once ``K x B`` rows saturate
the device, ``K`` calls of ``B`` rows can cost less (issue 14 measured one call up to 19 %
slower on one CPU thread with a width-256 DiT of 64 tokens at B = 16; see
docs/benchmarks.md). Policies
(``compile(..., max_rows=...)``):

* the default, ``max_rows=None`` or ``"auto"``: :class:`AutoSplit` measures "one call"
  against "one call per branch" (and, while smaller wins, halves of a branch) on a forward
  group's first steps and keeps the fastest, under
  a :class:`~guidekit.budget.MemoryBudget`; the choice is kept by the plan (per forward group,
  active-branch set and batch), so later runs of the same plan pay no trial;
* ``"one call"`` (or ``"all"``): :class:`FixedSplit` ``(None)``, one call per forward group;
* ``"branch"``: :class:`PerBranch`, one call per branch (``B`` rows);
* an int ``N``: :class:`FixedSplit` ``(N)``, the fewest calls of at most ``N`` rows;
* an :class:`AutoSplit` value: its settings, for every run of the plan.

Splitting never changes which rows are computed, only how many go into each call, so the
outputs are the same up to float rounding.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import attrs
import torch

from guidekit.budget import MemoryBudget
from guidekit.errors import GuidanceValueError

#: A forward group's key for a split decision: ``(group, rows, batch)``, where ``group`` names
#: the model and its active branches (``"main [c u]"``).
Key = tuple[str, int, int]


class Splitter(Protocol):
    """What ``Plan.step`` asks of a split policy (one instance per sampling run).

    Optional extras a policy may define, which ``Plan.step`` uses when present:
    ``deciding(group, rows, batch) -> bool`` (time this group? defaults to ``timing``),
    ``clock() -> float`` (the clock to time with; defaults to :func:`now`) and
    ``memory`` (a :class:`~guidekit.budget.MemoryBudget` that measures the group's calls).
    """

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


@attrs.frozen
class PerBranch:
    """One call per branch: ``B`` rows per call (``max_rows="branch"``)."""

    timing: bool = False

    def chunk(self, model: str, rows: int, batch: int) -> int:
        """The sampler's batch ``B``: one branch's block of rows."""
        return min(rows, batch)

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


def now() -> float:
    """A monotonic clock in seconds (the one the auto split times with)."""
    return time.perf_counter()


@attrs.define
class AutoSplit:
    """Time one call, one call per branch and smaller calls on a group's first steps, keep
    the fastest.

    The candidates form a **ladder** of rows per call, largest first: ``rows`` (one call),
    ``batch`` (one call per branch), then ``batch`` halved (rounded up) down to 1 row, each
    capped by ``max_rows`` and the memory cap. Per key ``(group, rows, batch)`` (``group``:
    the model and its active branches):

    * **gate**: the first ``trials`` calls run as one call; if the fastest of them took
      less than ``min_seconds``, one call is kept without trying anything else. Below that a
      call is dominated by per-call overhead, where one call per branch lost by 1.4-2.2x in
      every measurement (docs/benchmarks.md), and a cheap model never pays a trial;
    * **trial**: otherwise the open candidates (at first one call and one call per branch)
      take turns, and a candidate's estimate is the **lower median** of its times
      (:func:`estimate`: its fastest of two, since noise of a shared machine only adds time
      and the first call at a new shape pays lazy initialisation; its second fastest of
      three or four, so a lucky call does not decide a close race). A candidate more than
      ``drop`` times slower than the fastest is a clear loser: it is not timed again;
    * **descent**: once every contender has ``trials`` times, if the smallest open
      candidate is the fastest by more than ``margin``, the next rung (half its rows) is
      opened and timed. On one CPU thread a compute-bound DiT ran fastest at 4-16 rows per
      call, well below one branch of a large batch (docs/benchmarks.md);
    * **decision**: otherwise keep the fastest if it beats the next by more than
      ``margin``; while closer, keep timing the contenders up to ``max_trials`` each, then
      keep the fastest (a close call costs little). On a tie the larger chunk wins.

    Trial cost, per key and plan: the ladder has at most ``2 + ceil(log2 batch)`` rungs, a
    rung is opened only when the one above it won, and each is timed at most ``max_trials``
    times (``trials`` when clearly slower, once when more than ``drop`` times slower); each
    timed step costs the difference to the fastest; nothing below the gate.
    ``memory`` caps every candidate by the free memory (see :mod:`guidekit.budget`).
    ``chosen`` maps keys to the chunk in use and ``timings`` keeps the seconds measured per
    candidate: a plan hands the same two dicts to every splitter it makes, so its decisions
    carry over to its later runs (``print(plan)`` lists them). ``clock`` is what groups are
    timed with (a test injects its own).
    """

    trials: int = attrs.field(default=2, validator=_positive_int)
    max_trials: int = attrs.field(default=8, validator=_positive_int)
    margin: float = attrs.field(default=0.05, validator=_at_least(0.0))
    drop: float = attrs.field(default=1.5, validator=_at_least(1.0))
    min_seconds: float = attrs.field(default=0.05, validator=_at_least(0.0))
    max_rows: int | None = None
    memory: MemoryBudget | None = None
    clock: Callable[[], float] = now
    timing: bool = True
    chosen: dict[Key, int] = attrs.field(factory=dict)
    timings: dict[Key, dict[int, list[float]]] = attrs.field(factory=dict)
    device: dict[Key, torch.device] = attrs.field(factory=dict, repr=False)
    last: dict[Key, int] = attrs.field(factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.max_trials < self.trials:
            raise GuidanceValueError(
                f"AutoSplit(max_trials={self.max_trials}) must be >= trials={self.trials}"
            )

    def candidates(self, rows: int, batch: int, cap: int | None = None) -> list[int]:
        """The ladder of chunk sizes a trial may reach, largest first: one call, one call
        per branch, then the branch halved (rounded up) down to one row, all capped."""
        ladder, chunk = [rows, batch], batch
        while chunk > 1:
            chunk = (chunk + 1) // 2
            ladder.append(chunk)
        for limit in (self.max_rows, cap):
            if limit is not None:
                ladder = [min(c, limit) for c in ladder]
        return sorted(set(ladder), reverse=True)

    def _cap(self, key: Key) -> int | None:
        device = self.device.get(key)
        if self.memory is None or device is None:
            return None
        return self.memory.cap(key, device)

    def chunk(self, model: str, rows: int, batch: int) -> int:
        """The chosen chunk, or during the trial the candidate whose turn it is."""
        key = (model, rows, batch)
        cap = self._cap(key)
        if key in self.chosen:
            chunk = self.chosen[key] if cap is None else min(self.chosen[key], cap)
        else:
            chunk = self._trial(key, rows, batch, cap)
        self.last[key] = chunk
        return chunk

    def _trial(self, key: Key, rows: int, batch: int, cap: int | None) -> int:
        ladder = self.candidates(rows, batch, cap)
        if len(ladder) == 1:
            self.chosen[key] = ladder[0]
            return ladder[0]
        seen = self.timings.setdefault(key, {})
        for c in [c for c in seen if c not in ladder]:
            del seen[c]  # the memory cap moved: timings of a chunk no longer tried
        # Open: the top two rungs, and every rung down to the smallest one opened so far.
        low = min([*seen, ladder[1]])
        for c in ladder:
            if c >= low:
                seen.setdefault(c, [])
        if len(seen[ladder[0]]) < self.trials:
            return ladder[0]  # the gate's calls: one call first
        # Round-robin: the contenders alternate, so drift of the machine hits all alike.
        return min(self._racing(seen), key=lambda c: (len(seen[c]), -c))

    def _racing(self, seen: dict[int, list[float]]) -> list[int]:
        """The candidates still timed: every contender until it has ``trials`` timings,
        then only those within ``margin`` of the fastest (a clearly slower one is done)."""
        live = contenders(seen, self.drop)
        if any(len(seen[c]) < self.trials for c in live):
            return live
        fastest = min(estimate(seen[c]) for c in live)
        return [c for c in live if estimate(seen[c]) <= (1.0 + self.margin) * fastest]

    def measure(
        self, model: str, rows: int, batch: int, device: torch.device
    ) -> AbstractContextManager[None] | None:
        """Called before a group's calls (before :meth:`chunk`): notes the device for the
        memory cap, and returns the memory budget's per-row measurement to enter around
        the calls while it has none (``None`` once it has: nothing to enter)."""
        key = (model, rows, batch)
        self.device[key] = device
        if self.memory is None or not self.memory.measuring(key):
            return None
        return self.memory.measure(key, device, lambda: self.last.get(key, rows))

    def deciding(self, model: str, rows: int, batch: int) -> bool:
        """Whether this group is still on trial (only then is it timed)."""
        return (model, rows, batch) not in self.chosen

    def observe(self, model: str, rows: int, batch: int, chunk: int, seconds: float) -> None:
        """Record one timed forward group; descend or decide once the data allow it."""
        key = (model, rows, batch)
        if key in self.chosen:
            return
        seen = self.timings.get(key)
        if seen is None or chunk not in seen:
            return  # not a trial call of this splitter (e.g. a group it never proposed)
        seen[chunk].append(float(seconds))
        best = self._decide(seen, self.candidates(rows, batch, self._cap(key)))
        if best is not None:
            # the largest candidate is "one call" (under the memory cap of the moment)
            self.chosen[key] = rows if best == max(seen) else best

    def _decide(self, seen: dict[int, list[float]], ladder: list[int]) -> int | None:
        """The chunk to keep, or ``None`` while the timings so far cannot tell (a rung
        opened for the descent counts as not timed yet)."""
        one = max(seen)
        if len(seen[one]) >= self.trials and min(seen[one]) < self.min_seconds:
            return one  # below the gate: one call, nothing else tried
        live = contenders(seen, self.drop)
        if any(len(seen[c]) < self.trials for c in live):
            return None
        est = {c: estimate(ts) for c, ts in seen.items() if ts}
        # Fastest first; on a tie the larger chunk (fewer calls) wins.
        best = min(live, key=lambda c: (est[c], -c))
        runner_up = min((t for c, t in est.items() if c != best), default=math.inf)
        clear = runner_up > (1.0 + self.margin) * est[best]
        lower = [c for c in ladder if c < best]
        if clear and best == min(seen) and lower:
            seen[lower[0]] = []  # the smallest rung won: try half its rows
            return None
        if clear or all(len(seen[c]) >= self.max_trials for c in self._racing(seen)):
            return best
        return None


def estimate(times: list[float]) -> float:
    """A candidate's time per step from its trial timings: their lower median -- its fastest
    when timed twice (noise only adds time; the first call at a shape pays lazy
    initialisation), the second fastest when timed three or four times, so that one
    lucky call does not win a close race (one call at dit64, B = 16 timed 289, 247, 230
    and 248 ms against one call per branch's 232, 234, 231 and 245: its fastest won, its
    typical call lost; docs/benchmarks.md)."""
    return statistics.median_low(times)


def contenders(seen: dict[int, list[float]], drop: float) -> list[int]:
    """The candidates still in the running: untimed, or within ``drop`` times the fastest
    estimate (:func:`estimate`), largest first."""
    est = {c: estimate(ts) for c, ts in seen.items() if ts}
    fastest = min(est.values(), default=math.inf)
    return sorted((c for c in seen if c not in est or est[c] <= drop * fastest), reverse=True)


#: The policy ``max_rows=None`` / ``"auto"`` copies (its settings, fresh decision tables).
#: Assign another :class:`AutoSplit` to change the default of every later ``compile``;
#: guidekit's own test suite pins ``min_seconds=inf`` here, because its tests count calls
#: (tests/unit/test_split_policy.py tests the shipped default with an injected clock).
DEFAULT = AutoSplit(memory=MemoryBudget())
SHIPPED = DEFAULT  # what guidekit ships as DEFAULT

#: ``max_rows`` words and the fixed policy each names
_WORDS = {"one call": FixedSplit(None), "all": FixedSplit(None), "branch": PerBranch()}


def make_splitter(max_rows: Any) -> Any:
    """The split policy for ``compile(..., max_rows=...)``: validates the value.

    An :class:`AutoSplit` comes with empty decision tables (a copy of a given one's
    settings); a plan keeps it and hands :func:`per_run` copies that share its tables.
    """
    if isinstance(max_rows, AutoSplit):
        memory = None if max_rows.memory is None else attrs.evolve(
            max_rows.memory, per_row={}, tries={}, caps={}
        )
        return attrs.evolve(max_rows, chosen={}, timings={}, device={}, last={}, memory=memory)
    if max_rows is None or max_rows == "auto":
        return make_splitter(DEFAULT)
    if isinstance(max_rows, str) and max_rows in _WORDS:
        return _WORDS[max_rows]
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise GuidanceValueError(
            f"max_rows must be None or 'auto' (measure and keep the faster split), 'one call' "
            f"(or 'all'), 'branch', an AutoSplit(...) or a whole number >= 1 (a row budget), "
            f"got {max_rows!r}"
        )
    return FixedSplit(max_rows)


def per_run(policy: Any) -> Any:
    """The splitter for one run of a plan whose policy is ``policy``: fixed policies are
    values; an :class:`AutoSplit` is a shallow copy that shares the plan's decisions."""
    return attrs.evolve(policy) if isinstance(policy, AutoSplit) else policy


def planned_chunk(policy: Any, group: str, rows: int, batch: int) -> int:
    """The chunk ``policy`` uses for a group, without running anything: a fixed policy's,
    or an :class:`AutoSplit`'s decision so far (one call, capped, where it has none)."""
    if isinstance(policy, AutoSplit):
        chunk = policy.chosen.get((group, rows, batch), rows)
        return chunk if policy.max_rows is None else min(chunk, policy.max_rows)
    return int(policy.chunk(group, rows, batch))


def split_label(rows: int, batch: int, chunk: int) -> str:
    """How a group of ``rows`` rows was split, in words (for call records and ``print``)."""
    if chunk >= rows:
        return "one call"
    if chunk == batch:
        return "per branch"
    return f"{chunk}-row calls"


def calls_for(rows: int, chunk: int) -> int:
    """Model calls needed for ``rows`` rows at ``chunk`` rows per call."""
    return math.ceil(rows / chunk)


def sync(t: torch.Tensor) -> None:
    """Wait for ``t``'s device so that a timing covers the work, not just its launch."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
