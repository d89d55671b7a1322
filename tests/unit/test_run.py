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


def karras(n):
    """An n-step schedule from 10 to 0.1 (then 0), as k-diffusion's Karras schedule."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = 0.1 ** (1 / 7), 10.0 ** (1 / 7)
    return [float(s) for s in (hi + ramp * (lo - hi)) ** 7] + [0.0]


def sample(run, sigmas):
    return [step(run, s) for s in sigmas[:-1]]


@torch.no_grad()
def test_reset_without_the_new_sigmas_after_a_schedule_change_is_refused():
    """A run set up for 5 steps and reset() without the 8-step schedule it then samples:
    refused at the first call that cannot belong to the 5-step run (it used to advance
    only where the two schedules met). A schedule that refines the old one (9 steps of
    the same ramp hold all 5 levels) looks exactly like a sampler with midpoints and is
    caught too (test below)."""
    five, nine = karras(5), karras(8)
    run = Run(PLAN, sigmas=five)
    sample(run, five)
    run.reset()
    with pytest.raises(GuidanceValueError, match=r"reset\(sigmas=\.\.\.\)"):
        sample(run, nine)
    run.reset(sigmas=nine)  # with the new schedule: a correct 9-step run
    got = sample(run, nine)
    assert run.steps == 8
    fresh = Run(PLAN, sigmas=nine)
    for a, b in zip(got, sample(fresh, nine)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_reset_without_sigmas_then_a_refined_schedule_is_refused():
    """The issue's case: 5 steps, reset() without sigmas, then 9 steps of the same ramp. The
    9-step schedule holds every 5-step level, so its other levels read as midpoints of the
    kept schedule; the previous run never called them, so the run refuses them instead of
    advancing the momentum only at every other step."""
    five, nine = karras(5), karras(9)
    assert all(any(abs(a - b) < 1e-6 * a + 1e-9 for b in nine) for a in five)
    run = Run(PLAN, sigmas=five)
    sample(run, five)
    run.reset()
    with pytest.raises(GuidanceValueError, match=r"reset\(sigmas=new_sigmas\)"):
        sample(run, nine)
    run.reset(sigmas=nine)
    got = sample(run, nine)
    assert run.steps == 9
    for a, b in zip(got, sample(Run(PLAN, sigmas=nine), nine)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_reset_without_sigmas_repeats_a_run_with_midpoints():
    """A sampler with midpoints (DPM-2-like: a geometric midpoint in every interval) run
    again after reset() without sigmas: the same midpoints as before are accepted, and the
    second run equals the first."""
    sigmas = karras(5)
    levels = [v for a, b in zip(sigmas[:-2], sigmas[1:-1]) for v in (a, (a * b) ** 0.5)]
    run = Run(PLAN, sigmas=sigmas)
    first = [step(run, v) for v in levels]
    run.reset()
    again = [step(run, v) for v in levels]
    assert run.steps == len(levels) // 2
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_a_new_run_below_the_last_level_without_reset_is_refused():
    """A run stopped part-way, then a new one on the same schedule that starts lower (an
    image-to-image run) without reset(): it would reuse the old APG momentum."""
    sigmas = karras(9)
    run = Run(PLAN, sigmas=sigmas)
    sample(run, sigmas[:4])  # stopped after 3 steps
    with pytest.raises(GuidanceValueError, match="passing the schedule's level"):
        step(run, sigmas[5])
    run.reset()
    fresh = Run(PLAN, sigmas=sigmas)
    torch.testing.assert_close(step(run, sigmas[5]), step(fresh, sigmas[5]), rtol=0, atol=0)


@torch.no_grad()
def test_midpoints_within_a_step_are_still_midpoints():
    sigmas = karras(5)
    run = Run(PLAN, sigmas=sigmas)
    step(run, sigmas[0])
    for mid in (0.75 * sigmas[0] + 0.25 * sigmas[1], 0.5 * (sigmas[0] + sigmas[1])):
        step(run, mid)  # bosh3-like: two midpoints in one interval
    step(run, sigmas[1] * (1 + 1e-7))  # an ancestral midpoint that lands on the next level
    assert run.steps == 2
    step(run, sigmas[1] * 1.3)  # Euler's churn lifts the level a little above the step
    assert run.steps == 2
