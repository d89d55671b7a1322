"""KDiffusionGuided as a run: retreats without a schedule, ``extra_args`` conditionings,
errors that name the fix, and attention terms through the adapter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import guidekit as gk
from guidekit import APG, CFG, PAG, Autoguidance, GuidanceValueError
from guidekit.adapters.kdiffusion import KDiffusionGuided
from guidekit.attention import install

# the shared set-up lives next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kdiffusion_helpers as helpers  # noqa: E402
from _kdiffusion_helpers import Attention, AttentionDenoiser, B  # noqa: E402

# the shared fixtures: pytest finds them by name in this module
K, setup = helpers.K, helpers.setup


def _den(x, sigma, cond):
    # a fixed, nonlinear x0 denoiser
    return torch.tanh(x + cond.view(-1, 1)) / (1 + sigma.view(-1, 1))


@torch.no_grad()
def test_without_schedule_a_retreat_undoes_the_steps_below():
    # What dpm_adaptive does on a rejection: back to a level it already evaluated.
    cond, uncond = torch.tensor([0.5, -1.0]), torch.zeros(2)
    expr = CFG(3) | APG(eta=0, momentum=-0.5)
    x = torch.linspace(-1, 1, 6).view(2, 3)
    guided = KDiffusionGuided(expr, _den, cond=cond, uncond=uncond)
    first = guided(x, torch.full((2,), 5.0))
    guided(x, torch.full((2,), 4.0))
    guided(x, torch.full((2,), 3.0))
    assert guided.steps == 3
    again = guided(x, torch.full((2,), 5.0))  # retreat to the first level: fresh state
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert guided.steps == 1
    y45 = guided(x + 1, torch.full((2,), 4.5))
    fresh = KDiffusionGuided(expr, _den, cond=cond, uncond=uncond)
    fresh(x, torch.full((2,), 5.0))
    torch.testing.assert_close(y45, fresh(x + 1, torch.full((2,), 4.5)), rtol=0, atol=0)
    assert guided.steps == 2
    # a retreat between levels undoes only the steps below it
    guided(x, torch.full((2,), 2.0))
    y3 = guided(x, torch.full((2,), 3.0))
    torch.testing.assert_close(y3, fresh(x, torch.full((2,), 3.0)), rtol=0, atol=0)
    assert guided.steps == 3
    with pytest.raises(GuidanceValueError, match="new sampling run"):
        guided(x, torch.full((2,), 6.0))  # above the run's first level: reset() first
    guided.reset()
    guided(x, torch.full((2,), 6.0))
    assert guided.steps == 1 and len(guided.calls) == 1


@torch.no_grad()
def test_extra_args_replace_construction_conditionings():
    x = torch.linspace(-1, 1, 6).view(2, 3)
    a, b, u = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.1]), torch.zeros(2)
    built = KDiffusionGuided(CFG(3), _den, cond=a, uncond=u)
    other = KDiffusionGuided(CFG(3), _den, cond=b, uncond=u)
    sigma = torch.full((2,), 1.5)
    torch.testing.assert_close(built(x, sigma, cond=b), other(x, sigma))
    assert not torch.allclose(built(x, sigma, cond=b), built(x, sigma))
    # dicts name the model's keywords; bare tensors go to cond_key
    torch.testing.assert_close(built(x, sigma, cond={"cond": b}, uncond={"cond": u}),
                               other(x, sigma))


def test_errors_name_the_fix():
    u = torch.zeros(2)
    with pytest.raises(GuidanceValueError, match="models=.*weak"):
        KDiffusionGuided(CFG(3) + Autoguidance(1), _den, uncond=u)
    guided = KDiffusionGuided(CFG(3), _den, uncond=u)
    x, sigma = torch.zeros(2, 3), torch.ones(2)
    with pytest.raises(GuidanceValueError, match="needs the conditioning"):
        guided(x, sigma)
    with pytest.raises(GuidanceValueError, match="cond_scale.*not a conditioning"):
        guided(x, sigma, cond=u, cond_scale=7)
    with pytest.raises(GuidanceValueError, match="prediction='eps'"):
        KDiffusionGuided(CFG(3), _den, timestep=lambda s: s)
    with pytest.raises(GuidanceValueError, match="prediction='flow'.*noise='flow'"):
        KDiffusionGuided(gk.compile(CFG(3), prediction="flow", noise="flow"), _den)
    with pytest.raises(GuidanceValueError, match="'x0'"):
        KDiffusionGuided(CFG(3), _den, prediction="sample")
    # guidance text and compiled plans are accepted
    assert KDiffusionGuided("CFG(3) | APG(eta=0)", _den).plan.expr == (CFG(3) | APG(eta=0))
    plan = gk.compile(CFG(2), prediction="x0")
    assert KDiffusionGuided(plan, _den).plan is plan


@torch.no_grad()
def test_attention_terms_run_through_the_adapter(K, setup):
    net, sigmas = AttentionDenoiser(), setup["sigmas"]
    conds = {"cond": setup["cond"], "uncond": setup["uncond"]}
    x = setup["x"] * sigmas[0]
    plan = gk.compile(CFG(3) + PAG(2, layers=-1), prediction="x0")
    with pytest.raises(GuidanceValueError, match="around_call"):
        KDiffusionGuided(plan, net, sigmas=sigmas, **conds)(x, sigmas[:1].expand(B))
    with install(net, plan, attention_class=Attention) as around_call:
        den = KDiffusionGuided(plan, net, sigmas=sigmas, around_call=around_call, **conds)
        out = K.sampling.sample_heun(den, x, sigmas, disable=True)
        ref = gk.guide(plan, net, cond={"cond": conds["cond"]}, uncond={"cond": conds["uncond"]},
                       sigmas=sigmas, around_call=around_call)
        expected = K.sampling.sample_heun(lambda x, s: ref(x, s), x, sigmas, disable=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert [(c.rows, c.branches[:2], len(c.branches)) for c in den.calls] == [
        (3 * B, ("c", "u"), 3)
    ] * 9
    cfg = KDiffusionGuided(CFG(3), net, sigmas=sigmas, **conds)
    plain = K.sampling.sample_heun(cfg, x, sigmas, disable=True)
    assert (out - plain).abs().max() > 1e-3  # the perturbed branch really differed from c
