"""Row-splitting policies: FixedSplit's chunks and call counts, AutoSplit's decisions.

Behaviour only, never wall-clock speed: AutoSplit is fed made-up timings, either directly or
through a plan by a wrapper that replaces the measured seconds with a cost model.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import guidekit as gk
from guidekit import CFG, Autoguidance, AutoSplit, Cond, FixedSplit, split
from guidekit.budget import MemoryBudget
from guidekit.errors import GuidanceValueError
from guidekit.split import PerBranch, calls_for, estimate, make_splitter

SIGMAS = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]


class Net:
    """A float64 model that mixes features (a matmul), records its calls' row counts."""

    def __init__(self, seed: int = 0, offset: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(4, 4, generator=g, dtype=torch.float64) / 2
        self.offset = offset
        self.rows: list[int] = []
        self.tags: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, tag: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        self.tags.append(tag.clone())
        return torch.tanh(x @ self.w) + tag.view(-1, 1) + sigma.view(-1, 1) * 0.1 + self.offset


def conds(batch: int) -> dict[str, dict[str, torch.Tensor]]:
    tags = torch.arange(batch, dtype=torch.float64)
    return {"cond": {"tag": tags}, "uncond": {"tag": -1.0 - tags}}


def sample(plan: gk.Plan, batch: int, splitter=None, steps: int = len(SIGMAS)):
    """An Euler run; returns the final x, the main and weak models, and the call records."""
    main, weak = Net(0), Net(1, offset=3.0)
    x = torch.linspace(-2, 2, batch * 4, dtype=torch.float64).view(batch, 4)
    state = plan.init(0, SIGMAS)
    split = plan.splitter() if splitter is None else splitter
    calls: list[gk.CallRecord] = []
    sig = SIGMAS[:steps]
    for s, s_next in zip(sig, [*sig[1:], 0.0]):
        y, state = plan.step(
            state, x, s, conds(batch), {"main": main, "weak": weak}, splitter=split,
            on_call=calls.append,
        )
        x = x + (s_next - s) * y
    return x, main, weak, calls


# -- FixedSplit ---------------------------------------------------------------------------------


def test_fixed_split_chunk_is_rows_or_the_budget():
    assert FixedSplit().chunk("main", 12, 4) == 12
    assert FixedSplit(5).chunk("main", 12, 4) == 5
    assert FixedSplit(20).chunk("main", 12, 4) == 12
    assert FixedSplit(1).chunk("weak", 3, 3) == 1
    assert FixedSplit(5).timing is False
    assert FixedSplit(5).observe("main", 12, 4, 5, 1.0) is None


@pytest.mark.parametrize(
    ("rows", "chunk", "calls"), [(8, 8, 1), (8, 3, 3), (9, 3, 3), (10, 3, 4), (1, 5, 1), (7, 1, 7)]
)
def test_calls_for_is_ceil(rows, chunk, calls):
    assert calls_for(rows, chunk) == calls == math.ceil(rows / chunk)


def test_make_splitter_maps_max_rows_to_a_policy():
    for default in (None, "auto"):
        policy = make_splitter(default)
        assert isinstance(policy, AutoSplit) and policy.min_seconds == split.DEFAULT.min_seconds
    shipped = make_splitter(split.SHIPPED)  # what a user gets (the suite pins DEFAULT)
    assert shipped.min_seconds == 0.05 and isinstance(shipped.memory, MemoryBudget)
    assert shipped.memory is not split.SHIPPED.memory  # its own measurements
    assert make_splitter(None) is not make_splitter(None)  # fresh decisions per plan
    assert make_splitter("one call") == make_splitter("all") == FixedSplit(None)
    assert make_splitter("branch") == PerBranch()
    assert make_splitter(3) == FixedSplit(3)
    template = AutoSplit(min_seconds=0.0, memory=None)
    template.chosen[("main [c u]", 8, 4)] = 4
    policy = make_splitter(template)
    assert policy.min_seconds == 0.0 and policy.chosen == {} and template.chosen  # a copy


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "fast", "branches", [4]])
def test_make_splitter_rejects_bad_budgets(bad):
    with pytest.raises(GuidanceValueError, match="max_rows"):
        make_splitter(bad)
    with pytest.raises(GuidanceValueError, match="max_rows"):
        gk.compile(CFG(3), max_rows=bad)


@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("max_rows", [1, 2, 3, 5, 8, 100])
@pytest.mark.parametrize(
    ("expr", "k_main", "k_weak"),
    [(Cond(), 1, 0), (CFG(7), 2, 0), (CFG(3) + Autoguidance(1), 2, 1)],
    ids=["cond", "cfg", "cfg+ag"],
)
def test_row_budget_calls_and_rows_through_a_plan(expr, k_main, k_weak, batch, max_rows):
    plan = gk.compile(expr, max_rows=max_rows)
    steps = 3
    y, main, weak, calls = sample(plan, batch, steps=steps)
    for model, k in ((main, k_main), (weak, k_weak)):
        rows = k * batch
        n = math.ceil(rows / max_rows) if rows else 0
        per_step = [max_rows] * (n - 1) + [rows - max_rows * (n - 1)] if n else []
        assert model.rows == per_step * steps
        assert sum(model.rows) == rows * steps
    assert plan.nfe(SIGMAS[0], batch) == len(calls) // steps
    # Same rows, same order, same results as one call per group.
    y_one, main_one, _, _ = sample(gk.compile(expr), batch, steps=steps)
    assert torch.equal(torch.cat(main.tags), torch.cat(main_one.tags))
    torch.testing.assert_close(y, y_one, rtol=1e-12, atol=1e-12)


# -- AutoSplit fed made-up timings --------------------------------------------------------------


def drive(split: AutoSplit, cost: dict[int, list[float] | float], n: int, key=("main", 8, 4)):
    """Ask for ``n`` chunks, reporting ``cost[chunk]`` (a constant or a list consumed in
    order) as the seconds each group took; return the chunks asked for."""
    model, rows, batch = key
    used = {c: 0 for c in cost}
    chunks = []
    for _ in range(n):
        c = split.chunk(model, rows, batch)
        chunks.append(c)
        spec = cost[c]
        t = spec[min(used[c], len(spec) - 1)] if isinstance(spec, list) else spec
        used[c] += 1
        split.observe(model, rows, batch, c, t)
    return chunks


def test_auto_lets_no_lucky_call_win_a_close_race():
    # measured (ms, dit64, B = 16, CFG): one call usually 247-248, once 230; one call per
    # branch 231-234. By its fastest call one call would win; by its typical one it loses
    key = ("main", 32, 16)
    split = AutoSplit()
    cost = {32: [0.289, 0.247, 0.230, 0.248], 16: [0.232, 0.234, 0.231, 0.245],
            8: [0.242, 0.238, 0.240, 0.252], 4: 0.3, 2: 0.4, 1: 0.5}
    drive(split, cost, 40, key=key)
    assert split.chosen[key] == 16
    assert estimate([0.3, 0.2]) == 0.2 and estimate([0.3, 0.2, 0.25, 0.21]) == 0.21


def test_auto_picks_one_call_when_its_timings_are_faster():
    split = AutoSplit()
    chunks = drive(split, {8: 1.0, 4: 1.3}, 20)
    assert split.chosen[("main", 8, 4)] == 8
    assert chunks[:4] == [8, 8, 4, 4]  # the gate's two one-calls, then the other candidate
    assert set(chunks[4:]) == {8}


def test_auto_picks_one_call_per_branch_when_its_timings_are_faster():
    split = AutoSplit()
    chunks = drive(split, {8: 1.3, 4: 1.0, 2: 1.1}, 20)  # halving the branch loses
    assert split.chosen[("main", 8, 4)] == 4
    assert {8, 4} <= set(chunks[:4])
    assert chunks[4:6] == [2, 2] and set(chunks[6:]) == {4}


def test_auto_uses_both_candidates_during_the_trial():
    for costs in ({8: 1.0, 4: 1.2}, {8: 1.2, 4: 1.0, 2: 1.2}, {8: 1.0, 4: 1.0},
                  {8: 1.0, 4: 9.0}):
        split = AutoSplit()
        chunks = drive(split, costs, 12)
        trial = split.timings[("main", 8, 4)]
        assert len(trial[8]) >= 1 and len(trial[4]) >= 1, costs
        assert {8, 4} <= set(chunks)


def test_auto_keeps_its_choice_whatever_it_observes_later():
    split = AutoSplit()
    drive(split, {8: 1.0, 4: 1.3}, 4)
    assert split.chosen[("main", 8, 4)] == 8
    recorded = {c: list(ts) for c, ts in split.timings[("main", 8, 4)].items()}
    chunks = drive(split, {8: 50.0, 4: 0.01}, 30)  # one call suddenly much slower
    assert set(chunks) == {8}
    assert split.timings[("main", 8, 4)] == recorded  # later calls are not recorded


def test_auto_estimates_by_the_minimum_so_a_slow_first_call_does_not_mislead():
    # The first call of "one call" pays a cold start; its warm time is still the fastest.
    split = AutoSplit()
    drive(split, {8: [5.0, 1.0], 4: [1.2, 1.2]}, 6)
    assert split.chosen[("main", 8, 4)] == 8
    # ... and the same for the per-branch candidate, while its cold call is within `drop`.
    split = AutoSplit(drop=1.5)
    drive(split, {8: [1.2, 1.2], 4: [1.7, 1.0], 2: 1.5}, 8)
    assert split.chosen[("main", 8, 4)] == 4
    # A colder first call looks like a clear loser (documented trade-off); drop=inf waits
    # for a second call of every candidate.
    split = AutoSplit(drop=math.inf)
    drive(split, {8: [1.2, 1.2], 4: [5.0, 1.0], 2: 1.5}, 8)
    assert split.chosen[("main", 8, 4)] == 4


def test_auto_times_a_close_call_up_to_max_trials():
    split = AutoSplit(trials=2, max_trials=4, margin=0.05)
    chunks = drive(split, {8: 1.0, 4: 1.02}, 12)
    trial = split.timings[("main", 8, 4)]
    assert len(trial[8]) == len(trial[4]) == 4
    assert chunks[:8] == [8, 8, 4, 4, 8, 4, 8, 4]
    assert split.chosen[("main", 8, 4)] == 8


def test_auto_decides_after_trials_when_the_gap_is_clear():
    split = AutoSplit(trials=2, margin=0.05, drop=10.0)
    drive(split, {8: 1.0, 4: 1.2}, 10)
    trial = split.timings[("main", 8, 4)]
    assert len(trial[8]) == len(trial[4]) == 2


def test_auto_drops_a_clear_loser_after_one_call():
    split = AutoSplit(trials=2, drop=1.5)
    chunks = drive(split, {8: 1.0, 4: 2.0}, 6)
    assert chunks[:3] == [8, 8, 4]
    assert len(split.timings[("main", 8, 4)][4]) == 1
    assert chunks[3:] == [8, 8, 8]


def test_auto_ties_go_to_the_larger_chunk():
    split = AutoSplit()
    drive(split, {8: 1.0, 4: 1.0}, 16)
    assert split.chosen[("main", 8, 4)] == 8


def test_auto_decides_each_group_and_batch_separately():
    split = AutoSplit()
    drive(split, {8: 1.0, 4: 2.0}, 6, key=("main", 8, 4))
    drive(split, {4: 2.0, 2: 1.0, 1: 1.5}, 8, key=("main", 4, 2))
    drive(split, {4: 0.01}, 2, key=("weak", 4, 4))  # below the gate
    assert split.chosen == {("main", 8, 4): 8, ("main", 4, 2): 2, ("weak", 4, 4): 4}


def test_auto_with_one_row_a_call_has_nothing_to_try():
    split = AutoSplit()
    assert split.chunk("weak", 1, 1) == 1
    split = AutoSplit(max_rows=1)
    assert split.chunk("main", 8, 4) == 1
    assert split.chosen == {("main", 8, 4): 1} and split.timings == {}


def test_auto_ladder_halves_the_branch_and_respects_a_row_budget():
    assert AutoSplit().candidates(12, 4) == [12, 4, 2, 1]
    assert AutoSplit().candidates(24, 12) == [24, 12, 6, 3, 2, 1]
    assert AutoSplit().candidates(10, 5) == [10, 5, 3, 2, 1]  # halved rounding up
    assert AutoSplit().candidates(4, 4) == [4, 2, 1]  # one branch: halvings of it
    assert AutoSplit(max_rows=5).candidates(12, 4) == [5, 4, 2, 1]
    assert AutoSplit(max_rows=3).candidates(12, 4) == [3, 2, 1]
    assert AutoSplit().candidates(12, 4, cap=2) == [2, 1]


def test_auto_descends_while_halving_wins_and_stops_where_it_loses():
    split = AutoSplit()
    chunks = drive(split, {8: 1.0, 4: 0.8, 2: 0.6, 1: 0.7}, 14)
    assert chunks[:8] == [8, 8, 4, 4, 2, 2, 1, 1]  # each rung opened after the one above won
    assert split.chosen[("main", 8, 4)] == 2 and set(chunks[8:]) == {2}
    # a halving that loses is the last rung tried
    split = AutoSplit()
    chunks = drive(split, {8: 1.0, 4: 0.8, 2: 0.9}, 10)
    assert chunks[:6] == [8, 8, 4, 4, 2, 2] and set(chunks[6:]) == {4}
    assert 1 not in split.timings[("main", 8, 4)]
    # a rung within `margin` of the one above ends the descent too (no clear win)
    split = AutoSplit(margin=0.05)
    chunks = drive(split, {8: 1.0, 4: 0.8, 2: 0.79}, 20)
    assert 1 not in split.timings[("main", 8, 4)]
    assert split.chosen[("main", 8, 4)] == 2
    # the close race is timed to max_trials; the clearly slower one call only twice
    timings = split.timings[("main", 8, 4)]
    assert len(timings[8]) == 2 and len(timings[4]) == len(timings[2]) == split.max_trials


def test_auto_one_branch_group_above_the_gate_tries_halves_of_it():
    split = AutoSplit()
    chunks = drive(split, {4: 1.0, 2: 0.8, 1: 0.9}, 10, key=("weak", 4, 4))
    assert chunks[:6] == [4, 4, 2, 2, 1, 1]
    assert split.chosen[("weak", 4, 4)] == 2


@settings(max_examples=200, deadline=None)
@given(
    batch=st.integers(1, 64),
    branches=st.integers(1, 4),
    costs=st.lists(st.floats(0.06, 10.0), min_size=8, max_size=8),
    noise=st.lists(st.floats(1.0, 1.3), min_size=4, max_size=4),
)
def test_auto_trial_is_bounded_and_keeps_the_fastest_it_measured(batch, branches, costs,
                                                                  noise):
    rows = batch * branches
    split = AutoSplit()
    ladder = split.candidates(rows, batch)
    # every rung its own cost, each timing scaled by a noise factor
    cost = {c: [costs[i] * f for f in noise] for i, c in enumerate(ladder)}
    key = ("main", rows, batch)
    drive(split, cost, split.max_trials * len(ladder) + 1, key=key)
    assert key in split.chosen  # decided within max_trials timings of every rung
    trial = split.timings.get(key, {})
    assert sum(len(ts) for ts in trial.values()) <= split.max_trials * len(ladder)
    if trial:
        est = {c: estimate(ts) for c, ts in trial.items() if ts}
        fastest = min(est.values())
        assert est[split.chosen[key]] == fastest  # the fastest timed, never a slower one


def test_auto_ignores_timings_it_did_not_ask_for():
    split = AutoSplit()
    split.observe("main", 8, 4, 8, 1.0)  # no chunk() asked for this key yet
    split.chunk("main", 8, 4)
    split.observe("main", 8, 4, 3, 1.0)  # a chunk that is not a candidate
    assert split.timings == {("main", 8, 4): {8: [], 4: []}} and split.chosen == {}


@pytest.mark.parametrize(
    "kwargs", [{"trials": 0}, {"max_trials": 0}, {"trials": 3, "max_trials": 2},
               {"margin": -0.1}, {"drop": 0.5}, {"trials": 1.5}]
)
def test_auto_rejects_bad_settings(kwargs):
    with pytest.raises(GuidanceValueError, match="AutoSplit"):
        AutoSplit(**kwargs)


