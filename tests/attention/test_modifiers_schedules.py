"""Attention modifiers by noise level on a tiny real PixArt: ``.between(lo, hi)`` leaves the
layers' own attention outside the interval, and a scheduled scale equals the constant scale
at every step (one guided run over a schedule, in the one batched call)."""

from __future__ import annotations

import pytest
import torch

import guidekit
from guidekit import CFG, GAG, NAG, PLADIS, Linear, Piecewise, parse
from guidekit.attention import install
from guidekit.schedules import Level

from ._modifiers_reference import close, guided, inputs, model_and_fn

SIGMAS = (3.0, 1.5, 0.8, 0.3, 0.0)
MODIFIERS = {"NAG": lambda s: NAG(s), "PLADIS": lambda s: PLADIS(s), "GAG": lambda s: GAG(s, eta=None)}


def run(model, fn, expr, x, cond, uncond):
    """One guided run over SIGMAS: each step's output and the rows of each call."""
    plan = guidekit.compile(expr)
    outs = []
    with install(model, plan) as around_call:
        g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around_call,
                           sigmas=SIGMAS)
        for s in SIGMAS[:-1]:
            outs.append(g(x, s))
    return outs, [r.rows for r in g.calls]


@pytest.mark.parametrize("name", list(MODIFIERS))
def test_gated_modifier_is_the_model_outside_and_the_modifier_inside(name):
    model, fn = model_and_fn("pixart")
    x, cond, uncond = inputs()
    make = MODIFIERS[name]
    expr = CFG(3) | make(2.5).between(1, 2)
    assert parse(str(expr)) == expr
    with torch.no_grad():
        outs, rows = run(model, fn, expr, x, cond, uncond)
        for s, y in zip(SIGMAS, outs):
            inside = 1 < s <= 2
            ref, _ = guided(model, fn, CFG(3) | make(2.5) if inside else CFG(3), x, s, cond, uncond)
            close(y, ref, 1e-12)
            if inside:
                plain, _ = guided(model, fn, CFG(3), x, s, cond, uncond)
                assert float((y - plain).abs().max()) > 1e-4, "the modifier acted inside"
    assert rows == [2 * inputs()[0].shape[0]] * 4  # no extra rows, ever


@pytest.mark.parametrize("name", list(MODIFIERS))
@pytest.mark.parametrize("shape", [Linear(2), Piecewise((0.5, 3), (2, 1))])
def test_scheduled_modifier_scale_equals_the_constant_each_step(name, shape):
    model, fn = model_and_fn("pixart")
    x, cond, uncond = inputs()
    make = MODIFIERS[name]
    with torch.no_grad():
        outs, _ = run(model, fn, CFG(3) | make(shape), x, cond, uncond)
        for s, y in zip(SIGMAS, outs):
            scale = shape.at(Level(s, SIGMAS))
            ref, _ = guided(model, fn, CFG(3) | make(scale), x, s, cond, uncond)
            close(y, ref, 1e-12)


def test_a_neutral_scheduled_scale_is_the_plain_model():
    # PLADIS(0) and NAG(1) change nothing; scheduled there, the layers run as the model's own
    model, fn = model_and_fn("pixart")
    x, cond, uncond = inputs()
    with torch.no_grad():
        outs, _ = run(model, fn, CFG(3) | PLADIS(Linear(2)), x, cond, uncond)  # 0 at step 0
        plain, _ = guided(model, fn, CFG(3), x, SIGMAS[0], cond, uncond)
    assert torch.equal(outs[0], plain)
