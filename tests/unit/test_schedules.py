"""Scales by noise level: schedule values, the progress r, parsing, fields, plans and rows."""

import math

import pytest
import torch

import guidekit as gk
from guidekit import APG, CFG, PAG, Autoguidance, CFGZeroStar, Cond, parse
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.schedules import (
    Beta,
    Constant,
    Cosine,
    Level,
    Linear,
    Piecewise,
    PowerLaw,
    Window,
    schedule_progress,
)

B = 2
SIGMAS = (14.0, 7.0, 3.0, 1.0, 0.5, 0.0)  # five steps: r = 0, 1/4, 1/2, 3/4, 1


def model(x, sigma, tag):
    return x * 0.5 + tag.view(-1, 1)


def conds():
    return {"cond": {"tag": torch.zeros(B)}, "uncond": {"tag": torch.ones(B)}}


class Counter:
    def __init__(self):
        self.rows: list[int] = []

    def __call__(self, x, sigma, tag):
        self.rows.append(x.shape[0])
        return model(x, sigma, tag)


def weak(x, sigma, tag):
    return x * 0.25 + 2 * tag.view(-1, 1)


def run(expr, sigmas=SIGMAS):
    """Every step's output and rows of ``expr`` over ``sigmas``."""
    plan = gk.compile(expr)
    state = plan.init(sigmas=sigmas)
    x = torch.arange(B * 2, dtype=torch.float64).view(B, 2)
    counter = Counter()
    outs = []
    for s in sigmas[:-1]:
        y, state = plan.step(state, x, s, conds(), {"main": counter, "weak": weak})
        outs.append(y)
    return outs, counter.rows


def test_progress_is_step_fraction_on_the_schedule_and_log_sigma_between():
    assert [schedule_progress(s, SIGMAS) for s in SIGMAS[:-1]] == [0, 0.25, 0.5, 0.75, 1]
    mid = math.sqrt(14.0 * 7.0)  # halfway in log sigma between steps 0 and 1
    assert schedule_progress(mid, SIGMAS) == pytest.approx(0.125)
    assert schedule_progress(0.0, SIGMAS) == 1.0 and schedule_progress(20.0, SIGMAS) == 0.0
    # float32 rounding of a level still lands on its step
    assert schedule_progress(float(torch.tensor(3.0001, dtype=torch.float32)), SIGMAS) == pytest.approx(0.5, abs=1e-4)
    bounded = Cosine(7, sigma_max=10, sigma_min=0.1)
    assert bounded.at(Level(1.0)) == pytest.approx(7.0)  # r = 1/2 in log sigma, no schedule


def test_shape_values():
    at = [Level(s, SIGMAS) for s in SIGMAS[:-1]]
    assert [Linear(3).at(lv) for lv in at] == pytest.approx([0, 1.5, 3, 4.5, 6])
    assert [Cosine(3).at(lv) for lv in at] == pytest.approx(
        [3 * (1 - math.cos(math.pi * r)) for r in (0, 0.25, 0.5, 0.75, 1)]
    )
    assert [PowerLaw(3, 1).at(lv) for lv in at] == pytest.approx([Linear(3).at(lv) for lv in at])
    assert [PowerLaw(3, 2).at(lv) for lv in at] == pytest.approx([9 * r * r for r in (0, .25, .5, .75, 1)])
    assert [Beta(2, 2, 2).at(lv) for lv in at] == pytest.approx([12 * r * (1 - r) for r in (0, .25, .5, .75, 1)])
    assert Piecewise((1, 2), (3, 6)).at(Level(2.0)) == 4 and Piecewise((1, 2), (3, 6)).at(Level(9)) == 6
    assert Window(3, 1, 5).at(Level(5.0)) == 3 and Window(3, 1, 5).at(Level(1.0)) == 0
    assert Constant(2).at(Level(1.0)) == 2


@pytest.mark.parametrize("text", [
    "CFG(Cosine(7))", "CFG(Linear(3, sigma_max=14, sigma_min=0.5))", "CFG(PowerLaw(2, 3))",
    "CFG(Beta(4, a=3, b=1.5))", "CFG(Piecewise((0, 1), (2.5, 4), (14, 7)))", "CFG(Constant(5))",
    "CFG(7) + PAG(Window(3, 1, 5))", "CFG(Window(7, 1, 5, outside=1))",
    "CFGZeroStar(Cosine(4))", "CFG(3) | NAG(Cosine(2)).between(1, 5)",
    "CFG(3) | PLADIS(Piecewise((0, 0), (5, 2)))", "CFG(3) | GAG(2).between(0, 5)",
])
def test_printed_schedules_parse_back(text):
    e = parse(text)
    assert str(e) == text and parse(str(e)) == e and hash(parse(text)) == hash(e)


def test_fields_name_what_takes_a_schedule():
    # APG's eta is a weight of the update and takes one; its momentum is a decay and does not
    with pytest.raises(GuidanceTypeError, match=r"APG\(momentum=...\): momentum takes a number, not the schedule Cosine\(1\)"):
        APG(momentum=Cosine(1))
    with pytest.raises(GuidanceTypeError, match=r"CFG\(scale=...\).*combination of schedules"):
        CFG(1 - Cosine(1))
    with pytest.raises(GuidanceValueError, match="sigma_max and sigma_min"):
        Cosine(1, sigma_max=3)
    with pytest.raises(GuidanceValueError, match="increase strictly"):
        Piecewise((2, 1), (1, 3))
    with pytest.raises(GuidanceValueError, match="lo > hi"):
        Window(1, 5, 1)
    with pytest.raises(GuidanceTypeError, match="PAG"):
        Cosine(1) * PAG(1)


def test_progress_without_the_run_schedule_is_refused_naming_the_term():
    plan = gk.compile(CFG(Cosine(7)))
    x = torch.zeros(B, 2)
    with pytest.raises(GuidanceValueError, match=r"CFG\(Cosine\(7\)\): Cosine\(7\) needs the run's progress.*sigmas="):
        plan.step(plan.init(), x, 1.0, conds(), {"main": model})
    # a shape by sigma alone needs no schedule
    y, _ = gk.compile(CFG(Piecewise((0, 1), (2, 5)))).step(plan.init(), x, 1.0, conds(), {"main": model})
    ref, _ = gk.compile(CFG(3)).step(plan.init(), x, 1.0, conds(), {"main": model})
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("shape", [Cosine(4), Linear(4), PowerLaw(3, 0.5), Beta(2, 3, 2), Piecewise((0, 1), (14, 6))])
def test_scheduled_cfg_equals_the_constant_at_each_step(shape):
    outs, rows = run(CFG(shape))
    for s, y in zip(SIGMAS[:-1], outs):
        w = shape.at(Level(s, SIGMAS))
        ref, ref_rows = run(CFG(w), (s, 0.0))
        torch.testing.assert_close(y, ref[0])
    assert len(rows) == len(SIGMAS) - 1


def test_a_scale_of_zero_drops_its_rows_that_step():
    # Linear(3) is 0 at the first step (r = 0): PAG's perturbed rows and CFG's c drop there
    _, rows = run(CFG(Linear(2)))
    assert rows == [B, B, 2 * B, 2 * B, 2 * B]  # w = 0 (u), w = 1 (c), then both
    # Beta(., 2, 2) is 0 at both ends
    _, rows = run(Cond() + (CFG(Beta(1)) - Cond()))
    assert rows[0] == rows[-1] == B


def test_nonlinear_term_scale_is_resolved_per_step():
    outs, _ = run(CFGZeroStar(Linear(2)))
    for s, y in zip(SIGMAS[:-1], outs):
        ref, _ = run(CFGZeroStar(Linear(2).at(Level(s, SIGMAS))), (s, 0.0))
        torch.testing.assert_close(y, ref[0])


def test_window_equals_the_gate_in_numbers_and_rows():
    for expr, gated in [
        (CFG(2) + 0.5 * Autoguidance(Window(3, 1, 7)), CFG(2) + (0.5 * Autoguidance(3)).between(1, 7)),
        (CFG(Window(5, 1, 7, outside=1)), CFG(5).between(1, 7)),
    ]:
        (a, ra), (b, rb) = run(expr), run(gated)
        assert ra == rb
        for y, z in zip(a, b):
            torch.testing.assert_close(y, z)


def test_explain_and_print_show_the_schedule():
    plan = gk.compile(CFG(Linear(2)))
    text = plan.explain(SIGMAS, batch=B)
    assert "out = u" in text.splitlines()[3] and "scales by noise level: Linear(2)" in str(plan)
    assert plan.rows(14.0, B, ) == 2 * B  # structural view: r = 1/2
    assert plan.program(14.0, SIGMAS).branches == (gk.branch.Branch(cond="uncond"),)


def test_a_schedules_bounds_cover_every_level():
    """``bounds()`` is what a field with a range (Rescale's phi in [0, 1]) checks."""
    levels = [Level(s, (14.0, 7.0, 3.0, 1.0, 0.3, 0.05)) for s in (14.0, 7.0, 3.0, 1.0, 0.3, 0.05)]
    for s in (Constant(0.4), Piecewise((0, 0.2), (3, 0.9), (9, 0.1)), Window(0.8, 1, 5, outside=0.1),
              Linear(0.5), Cosine(0.5), PowerLaw(0.3, 2), Beta(0.5, 2, 3), Beta(0.2, 1, 3)):
        lo, hi = s.bounds()
        values = [s.at(lv) for lv in levels]
        assert lo <= min(values) + 1e-12 and max(values) <= hi + 1e-12, s
        assert min(values) == pytest.approx(lo, abs=0.2) and max(values) == pytest.approx(hi, abs=0.2)


def test_one_minus_a_scale_that_is_one_there_runs_no_branch():
    """CFG's ``1 - w`` is 0 where ``w`` is 1: ``u`` is not laid out for a gated CFG whose
    window leaves ``w = 1`` on the whole gate."""
    plan = gk.compile(CFG(Window(0, 20, math.inf, outside=1)).between(0, 0.05))
    assert [b.label for b in plan.branches] == ["c"]
    assert [b.label for b in gk.compile(CFG(Piecewise((0, 1), (3, 1), (9, 4))).between(0, 3)).branches] == ["c"]
