"""The default split policy through a plan, with an injected clock and memory readers.

Never wall-clock speed: the models advance a fake clock by a cost model of their own, the
memory budget reads made-up free and peak memory, and every test checks that the samples are
the same whatever split was chosen (the same rows, the same maths), counting calls and rows.
"""

from __future__ import annotations

import pytest
import torch
from test_split import SIGMAS, Net, conds

import guidekit as gk
from guidekit import CFG, Autoguidance, AutoSplit
from guidekit.budget import MemoryBudget, free_memory, memory_usage


class Clock:
    """A fake clock that the models below advance."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TimedNet(Net):
    """A :class:`Net` whose call costs ``per_call + per_row2 * rows**2`` fake seconds."""

    def __init__(self, clock: Clock, per_call: float, per_row2: float, **kw) -> None:
        super().__init__(**kw)
        self.clock, self.per_call, self.per_row2 = clock, per_call, per_row2

    def __call__(self, x, sigma, tag):
        self.clock.t += self.per_call + self.per_row2 * x.shape[0] ** 2
        return super().__call__(x, sigma, tag)


def run(plan, batch, main, weak=None, splitter=None):
    """An Euler run over SIGMAS; returns the final x and the call records."""
    weak = weak or Net(1, offset=3.0)
    x = torch.linspace(-2, 2, batch * 4, dtype=torch.float64).view(batch, 4)
    state = plan.init(0, SIGMAS)
    split = plan.splitter() if splitter is None else splitter
    calls: list[gk.CallRecord] = []
    for s, s_next in zip(SIGMAS, [*SIGMAS[1:], 0.0]):
        y, state = plan.step(state, x, s, conds(batch), {"main": main, "weak": weak},
                             splitter=split, on_call=calls.append)
        x = x + (s_next - s) * y
    return x, calls


def reference(expr, batch):
    return run(gk.compile(expr, max_rows="one call"), batch, Net(0))[0]


def test_below_the_gate_one_call_is_kept_without_a_trial():
    clock, batch = Clock(), 4
    main = TimedNet(clock, per_call=0.001, per_row2=0.0)  # 1 ms a call: below 50 ms
    plan = gk.compile(CFG(7), max_rows=AutoSplit(clock=clock))
    y, calls = run(plan, batch, main)
    assert main.rows == [2 * batch] * len(SIGMAS)  # never split
    assert [c.split for c in calls[:3]] == ["one call (trial)", "one call (trial)", "one call"]
    assert plan.policy.chosen == {("main [c u]", 2 * batch, batch): 2 * batch}
    torch.testing.assert_close(y, reference(CFG(7), batch), rtol=0, atol=0)


def test_above_the_gate_the_faster_split_is_measured_and_kept():
    clock, batch = Clock(), 4
    # 0.1 s a call plus 0.01 s x rows**2: one call of 8 rows costs 0.74 s, two calls of 4
    # rows 0.52 s, four calls of 2 rows 0.56 s (the halving loses: the descent stops).
    main = TimedNet(clock, per_call=0.1, per_row2=0.01)
    plan = gk.compile(CFG(7), max_rows=AutoSplit(clock=clock))
    y, calls = run(plan, batch, main)
    # gate: one call twice; trial: per branch twice (a clear win), 2-row calls twice (a
    # loss); then per branch.
    assert main.rows == [8, 8] + [4, 4] * 2 + [2] * 8 + [4, 4] * (len(SIGMAS) - 6)
    assert sum(c.rows for c in calls) == 2 * batch * len(SIGMAS)
    assert calls[-1].split == "per branch" and calls[2].split == "per branch (trial)"
    assert calls[6].split == "2-row calls (trial)"
    assert plan.policy.chosen == {("main [c u]", 8, 4): 4}
    text = str(plan)
    assert ("split main [c u] at 2x4 rows: per branch (one call 740 ms, per branch 520 ms, "
            "2-row calls 560 ms)") in text
    assert plan.nfe(1.0, batch) == 2  # the decision, once taken
    torch.testing.assert_close(y, reference(CFG(7), batch), rtol=1e-12, atol=1e-12)


def test_where_calls_grow_superlinearly_the_trial_descends_to_one_row_calls():
    clock, batch = Clock(), 4
    main = TimedNet(clock, per_call=0.0, per_row2=0.01)  # k calls of 8/k rows: 0.64 s / k
    plan = gk.compile(CFG(7), max_rows=AutoSplit(clock=clock))
    y, calls = run(plan, batch, main)
    assert plan.policy.chosen == {("main [c u]", 8, 4): 1}
    assert calls[-1].split == "1-row calls" and calls[-1].rows == 1
    assert ("split main [c u] at 2x4 rows: 1-row calls (one call 640 ms, per branch 320 ms, "
            "2-row calls 160 ms, 1-row calls 80 ms)") in str(plan)
    trial = plan.policy.timings[("main [c u]", 8, 4)]
    # one call is dropped once per branch ran 2x faster; each rung timed twice at most
    assert {c: len(ts) for c, ts in trial.items()} == {8: 2, 4: 2, 2: 2, 1: 2}
    torch.testing.assert_close(y, reference(CFG(7), batch), rtol=1e-12, atol=1e-12)


def test_a_plan_keeps_its_decisions_for_later_runs():
    clock, batch = Clock(), 3
    plan = gk.compile(CFG(3) + Autoguidance(1), max_rows=AutoSplit(clock=clock))
    run(plan, batch, TimedNet(clock, per_call=0.1, per_row2=0.01))
    main = TimedNet(clock, per_call=0.1, per_row2=0.01)  # per branch wins, 2-row calls lose
    y, calls = run(plan, batch, main)  # a second run: no trial
    assert main.rows == [batch, batch] * len(SIGMAS)
    assert all("trial" not in c.split for c in calls)
    # weak has one branch: nothing to choose, one call each step
    assert [c.rows for c in calls if c.model == "weak"] == [batch] * len(SIGMAS)
    assert plan.policy.chosen[("weak [c@weak]", batch, batch)] == batch
    torch.testing.assert_close(y, reference(CFG(3) + Autoguidance(1), batch), rtol=1e-12,
                               atol=1e-12)


def test_each_active_branch_set_is_decided_separately():
    policy = AutoSplit(clock=Clock())
    for group, rows in (("main [c u]", 8), ("main [c u u[PAG(2)]]", 12)):
        for _ in range(6):  # gate, per branch (faster), half a branch (slower)
            chunk = policy.chunk(group, rows, 4)
            policy.observe(group, rows, 4, chunk, 0.5 if chunk == 4 else 1.0)
    assert policy.chosen == {("main [c u]", 8, 4): 4, ("main [c u u[PAG(2)]]", 12, 4): 4}


@pytest.mark.parametrize(
    ("max_rows", "per_step"),
    [("one call", [8]), ("all", [8]), ("branch", [4, 4]), (3, [3, 3, 2])],
)
def test_overrides_fix_the_split(max_rows, per_step):
    clock, batch = Clock(), 4
    main = TimedNet(clock, per_call=0.0, per_row2=0.01)  # auto would split
    plan = gk.compile(CFG(7), max_rows=max_rows)
    y, calls = run(plan, batch, main)
    assert main.rows == per_step * len(SIGMAS)
    assert all("trial" not in c.split for c in calls)
    torch.testing.assert_close(y, reference(CFG(7), batch), rtol=1e-12, atol=1e-12)


def test_print_plan_names_the_policy():
    assert ("split: auto (one call, or per branch or smaller calls where measured faster, "
            "memory-capped)") in str(gk.compile(CFG(7)))
    assert "one call per forward group" in str(gk.compile(CFG(7), max_rows="one call"))
    assert "one call per branch" in str(gk.compile(CFG(7), max_rows="branch"))


# -- the memory budget -------------------------------------------------------------------------


class Memory:
    """Made-up device memory: free bytes, and (in use, peak) that each call raises."""

    def __init__(self, free: int, per_row: int) -> None:
        self.free_bytes, self.per_row = free, per_row
        self.in_use, self.peak = 1000, 1000

    def free(self, device):
        return self.free_bytes

    def usage(self, device):
        return self.in_use, self.peak

    def wrap(self, net):
        def model(x, sigma, tag):
            self.peak = max(self.peak, self.in_use + self.per_row * x.shape[0])
            return net(x, sigma, tag)

        return model


def test_memory_budget_caps_rows_from_free_memory_and_measured_cost():
    batch, mem = 4, Memory(free=6 * 100 * 3 // 2, per_row=100)  # room for 6 rows at x1.5
    budget = MemoryBudget(free=mem.free, usage=mem.usage)
    plan = gk.compile(CFG(7), max_rows=AutoSplit(memory=budget, min_seconds=1e9))
    net = Net(0)
    y, calls = run(plan, batch, mem.wrap(net), splitter=None)
    key = ("main [c u]", 8, 4)
    assert plan.policy.memory.per_row[key] == 100.0  # (1000 + 800 - 1000) / 8 rows
    assert net.rows == [8] + [6, 2] * (len(SIGMAS) - 1)  # first call measures, then capped
    assert max(c.rows for c in calls[1:]) == 6 and calls[-1].split == "6-row calls"
    torch.testing.assert_close(y, reference(CFG(7), batch), rtol=1e-12, atol=1e-12)


def test_memory_budget_gives_up_after_peaks_that_never_rise():
    mem = Memory(free=10, per_row=100)
    mem.peak = 10**9  # an earlier, bigger peak hides every call's own
    budget = MemoryBudget(free=mem.free, usage=mem.usage, attempts=3)
    plan = gk.compile(CFG(7), max_rows=AutoSplit(memory=budget, min_seconds=1e9))
    net = Net(0)
    run(plan, 4, mem.wrap(net))
    assert plan.policy.memory.per_row == {("main [c u]", 8, 4): 0.0}
    assert plan.policy.memory.tries == {("main [c u]", 8, 4): 3}
    assert net.rows == [8] * len(SIGMAS)  # unknown cost: no cap


def test_memory_budget_rejects_a_factor_below_one():
    with pytest.raises(gk.GuidanceValueError, match="MemoryBudget\\(factor"):
        MemoryBudget(factor=0.5)


def test_cpu_memory_readers_read_this_machine():
    cpu = torch.device("cpu")
    free = free_memory(cpu)
    assert free is None or free > 0
    use = memory_usage(cpu)
    assert use is None or 0 < use[0] <= use[1]
