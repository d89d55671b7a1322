"""Explicit state: created per run, advanced once per sampler step, never shared."""

import pytest
import torch

import guidekit as gk
from guidekit import APG, CFG, Cond, Uncond
from guidekit.state import CallKind

B = 2


def model(x, sigma, tag):
    # the conditional and unconditional rows differ, and depend on x
    return torch.sin(x * (1 + tag.view(-1, 1))) + 0.1 * sigma.view(-1, 1)


CONDS = {"cond": {"tag": torch.zeros(B, dtype=torch.float64)},
         "uncond": {"tag": torch.ones(B, dtype=torch.float64)}}
PLAN = gk.compile(CFG(4) | APG(eta=0, momentum=-0.5), prediction="x0")


def momentum(state):
    return state.current[0].momentum


def test_state_is_a_value_and_step_returns_a_new_one():
    s0 = PLAN.init()
    x = torch.randn(B, 3, dtype=torch.float64)
    _, s1 = PLAN.step(s0, x, 2.0, CONDS, {"main": model})
    assert s0.level == -1 and momentum(s0) is None
    assert s1.level == 0 and momentum(s1) is not None
    assert list(s1.named()) == ["APG"]


def test_repeated_calls_at_a_level_do_not_advance_state():
    """Heun pattern: sigma0, sigma1 (corrector), sigma1 (next step), sigma2 ..."""
    sig = [3.0, 2.0, 1.0, 0.0]
    x = torch.randn(B, 3, dtype=torch.float64)
    heun = PLAN.init(sigmas=sig)
    kinds = []
    for s in [3.0, 2.0, 2.0, 1.0, 1.0]:
        kinds.append(heun.classify(s))
        _, heun = PLAN.step(heun, x, s, CONDS, {"main": model})
    assert kinds == [CallKind.NEW, CallKind.NEW, CallKind.REPEAT, CallKind.NEW, CallKind.REPEAT]
    assert heun.steps == 3
    euler = PLAN.init(sigmas=sig)
    for s in [3.0, 2.0, 1.0]:
        _, euler = PLAN.step(euler, x, s, CONDS, {"main": model})
    # same x at every call, so the last evaluation per level equals Euler's: same momentum
    torch.testing.assert_close(momentum(heun), momentum(euler))


def test_midpoints_read_state_and_commit_nothing():
    sig = [3.0, 1.0, 0.0]
    x = torch.randn(B, 3, dtype=torch.float64)
    state = PLAN.init(sigmas=sig)
    _, state = PLAN.step(state, x, 3.0, CONDS, {"main": model})
    assert state.classify(1.7) is CallKind.MIDPOINT
    _, after_mid = PLAN.step(state, x, 1.7, CONDS, {"main": model})
    assert after_mid is state


def test_without_schedule_every_new_level_is_a_step():
    state = PLAN.init()
    x = torch.randn(B, 3, dtype=torch.float64)
    for s in [3.0, 1.7, 1.0]:
        _, state = PLAN.step(state, x, s, CONDS, {"main": model})
    assert state.steps == 3


def test_rising_noise_level_demands_a_new_run():
    state = PLAN.init()
    x = torch.randn(B, 3, dtype=torch.float64)
    _, state = PLAN.step(state, x, 1.0, CONDS, {"main": model})
    with pytest.raises(gk.GuidanceValueError, match="new sampling run.*plan.init"):
        PLAN.step(state, x, 5.0, CONDS, {"main": model})


def test_two_runs_never_share_state():
    sig = [3.0, 2.0, 1.0]
    x = torch.randn(B, 3, dtype=torch.float64)
    a = gk.guide(PLAN, model, cond=CONDS["cond"], uncond=CONDS["uncond"], sigmas=sig)
    b = gk.guide(PLAN, model, cond=CONDS["cond"], uncond=CONDS["uncond"], sigmas=sig)
    ya, yb = [], []
    for s in sig:  # interleaved
        ya.append(a(x, s))
        yb.append(b(x, s))
    for u, v in zip(ya, yb):
        torch.testing.assert_close(u, v)
    a.reset()
    torch.testing.assert_close(a(x, 3.0), ya[0])
    assert a.steps == 1 and b.steps == 3


def test_momentum_changes_the_output_across_steps():
    """Guard that the state is actually used: without momentum the outputs differ."""
    x = torch.randn(B, 3, dtype=torch.float64)
    plain = gk.compile(CFG(4) | APG(eta=0), prediction="x0")
    s1, s2 = PLAN.init(), plain.init()
    outs = []
    for s in [3.0, 2.0]:
        y1, s1 = PLAN.step(s1, x, s, CONDS, {"main": model})
        y2, s2 = plain.step(s2, x, s, CONDS, {"main": model})
        outs.append((y1, y2))
    torch.testing.assert_close(outs[0][0], outs[0][1])  # first step: m = D
    assert not torch.allclose(outs[1][0], outs[1][1])


def test_cfg_one_expression_has_no_state():
    plan = gk.compile(Cond() + 0 * (Cond() - Uncond()))
    assert plan.init().components == ()
