"""guidekit.run.Run: the one owner of a run's state, reset, call log and step recognition."""

import pytest
import torch
from test_runner import Tiny  # the custom-sampler tests' model (tests/unit is on the path)

import guidekit as gk
from guidekit import APG, CFG, GuidanceValueError
from guidekit.branch import COND, MAIN, UNCOND
from guidekit.run import Run
from guidekit.runner import Guided

PLAN = gk.compile(CFG(3) | APG(eta=0, momentum=-0.5), prediction="eps", noise="ve")
LABELS = torch.arange(3)
CONDS = {COND: {"y": LABELS}, UNCOND: {"y": torch.full((3,), 10)}}
X = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


MODELS = {MAIN: Tiny(0)}


def step(run, sigma):
    return run.step(X, sigma, CONDS, MODELS)


@torch.no_grad()
def test_raise_is_the_default_and_a_rise_names_the_fix():
    run = Run(PLAN)
    step(run, 5.0)
    step(run, 2.0)
    assert run.steps == 2 and len(run.calls) == 2 and run.runs == 1
    with pytest.raises(GuidanceValueError, match="reset"):
        step(run, 4.0)
    run.reset()
    assert run.steps == 0 and run.calls == [] and run.runs == 2
    step(run, 4.0)
    assert run.steps == 1


@torch.no_grad()
def test_restart_starts_a_new_run_on_a_rise_and_keeps_the_call_log():
    run = Run(PLAN, on_rise="restart")
    first = [step(run, s) for s in (5.0, 2.0, 1.0)]
    again = [step(run, s) for s in (5.0, 2.0, 1.0)]
    assert run.runs == 2 and run.steps == 3 and len(run.calls) == 6
    for a, b in zip(first, again):  # fresh APG momentum: the second run repeats the first
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_retreat_undoes_the_steps_below_the_level_returned_to():
    run = Run(PLAN, on_rise="retreat")
    step(run, 5.0)
    state = run.state
    step(run, 2.0)
    step(run, 1.0)
    y = step(run, 2.0)  # an adaptive solver rejected the step from 2.0 and tries again
    assert run.state.level == 1 and run.state.before is state.current
    ref = Run(PLAN)
    step(ref, 5.0)
    torch.testing.assert_close(y, step(ref, 2.0), rtol=0, atol=0)
    assert run.steps == 2
    with pytest.raises(GuidanceValueError, match="rose"):
        step(run, 9.0)  # above the run's first level: a new run


@torch.no_grad()
def test_start_with_a_schedule_and_a_bad_policy_is_refused():
    run = Run(PLAN)
    run.start(sigmas=[5.0, 2.0, 0.0])
    step(run, 5.0)
    step(run, 3.0)  # off the schedule: a midpoint, not a step
    assert run.steps == 1
    with pytest.raises(GuidanceValueError, match="on_rise"):
        Run(PLAN, on_rise="again")  # type: ignore[arg-type]


def test_guided_is_a_run():
    g = Guided(PLAN, Tiny(0), cond=CONDS[COND], uncond=CONDS[UNCOND])
    assert isinstance(g, Run) and g.on_rise == "raise"
