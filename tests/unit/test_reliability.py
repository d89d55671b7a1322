"""Issue 11 "nothing silent": bad input gets a clear error naming the term and the fix, or
correct behaviour. Each case is one parametrized row."""

from __future__ import annotations

import math

import pytest

from guidekit import APG, CFG, Autoguidance, GuidanceTypeError, GuidanceValueError, parse

inf = math.inf

CLEAR_ERRORS = [
    # (build, error type, fragments the message must hold)
    (lambda: 1e308 * (10 * Autoguidance(1)), GuidanceValueError,
     ["not a finite number", "Autoguidance(1)", "smaller scale"]),
    (lambda: -1e308 * (-10 * Autoguidance(1)), GuidanceValueError, ["not a finite number"]),
    (lambda: 1e200 * (1e200 * (CFG(7) - CFG(3))), GuidanceValueError, ["not a finite number"]),
    (lambda: parse("1e308 * (10 * Autoguidance(1))"), GuidanceValueError, ["not a finite number"]),
    (lambda: CFG(7).between(inf, inf), GuidanceValueError, ["lo must be a finite noise level"]),
    (lambda: CFG(7).between(inf, 5), GuidanceValueError, ["lo > hi"]),
    (lambda: CFG.between(1, 2), GuidanceTypeError, ["CFG is a term class", "CFG(7)",
                                                    "CFG(...).between(lo, hi)"]),
    (lambda: Autoguidance.between(0, 1), GuidanceTypeError, ["Autoguidance is a term class"]),
    (lambda: APG.between(0, 1), GuidanceTypeError, ["APG is a term class"]),
    (lambda: -Autoguidance, GuidanceTypeError, ["Autoguidance is a term class", "Autoguidance("]),
    (lambda: +CFG, GuidanceTypeError, ["CFG is a term class"]),
    (lambda: CFG(3) + + Autoguidance(1), GuidanceTypeError, ["unary +", "remove the extra +"]),
    (lambda: parse("CFG(3) + + Autoguidance(1)"), GuidanceTypeError, ["remove the extra +"]),
]


@pytest.mark.outcome("error")
@pytest.mark.parametrize(("build", "kind", "fragments"), CLEAR_ERRORS)
def test_clear_error(build, kind, fragments):
    with pytest.raises(kind) as info:
        build()
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "e.g. .between(inf" not in str(info.value)  # never suggests what was refused


@pytest.mark.outcome("correct")
def test_finite_products_still_build():
    assert str(1e154 * (1e154 * Autoguidance(1))) == f"{1e308!r} * Autoguidance(1)"
    assert CFG(7).between(0, inf).lo == 0


# -- gates select the same steps whatever the sigma dtype ---------------------------------------


def _gated_steps(expr, sigmas) -> list[int]:
    import guidekit

    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    rows = [plan.rows(s) for s in sigmas.tolist()[:-1]]
    return [i for i, r in enumerate(rows) if r > min(rows)]


def _schedule():
    import numpy as np
    import torch

    # float64 levels that float32 cannot hold exactly, so rounding moves some of them up
    return torch.tensor([*np.geomspace(14.6, 0.03, 28), 0.0], dtype=torch.float64)


@pytest.mark.outcome("correct")
def test_emag_preset_same_steps_with_float32_sigmas():
    from guidekit import EMAG

    sig = _schedule()
    expr = EMAG.sd3(sig)
    assert _gated_steps(expr, sig) == list(range(5, 23))
    assert _gated_steps(expr, sig.float()) == list(range(5, 23))  # was 6..22


@pytest.mark.outcome("correct")
def test_between_same_steps_with_float32_sigmas():
    sig = _schedule()
    expr = CFG(4) + Autoguidance(1).between(float(sig[20]), float(sig[5]))
    assert _gated_steps(expr, sig) == list(range(5, 20))
    assert _gated_steps(expr, sig.float()) == list(range(5, 20))  # was 6..19


@pytest.mark.outcome("correct")
def test_snap_only_moves_sigmas_within_float32_rounding():
    from guidekit.combinators.interval import snap

    assert snap(1.0 + 1e-8, (0.5, 1.0)) == 1.0
    assert snap(1.0 + 1e-4, (0.5, 1.0)) == 1.0 + 1e-4
    assert snap(0.3, ()) == 0.3


# -- non-finite noise levels are refused where they enter ----------------------------------------


def _guided(**kwargs):
    import torch

    import guidekit

    def model(x, sigma, y):
        return x * 0 + y.view(-1, 1)

    plan = guidekit.compile(CFG(3))
    return guidekit.guide(plan, model, cond={"y": torch.ones(1)}, uncond={"y": torch.zeros(1)},
                          **kwargs)


@pytest.mark.outcome("error")
@pytest.mark.parametrize(
    ("sigmas", "fragment"),
    [([1.0, math.nan, 0.0], "sigmas[1] = nan"), ([inf, 1.0, 0.0], "sigmas[0] = inf"),
     ([1.0, -0.5, 0.0], "sigmas[1] = -0.5"), ("tensor", "sigmas[2] = nan")],
)
def test_schedule_with_non_finite_levels_is_refused(sigmas, fragment):
    import torch

    if sigmas == "tensor":
        sigmas = torch.tensor([2.0, 1.0, math.nan, 0.0])
    with pytest.raises(GuidanceValueError, match=r"finite numbers >= 0|must be >= 0") as info:
        _guided(sigmas=sigmas)
    assert fragment in str(info.value)
    g = _guided(sigmas=[1.0, 0.5, 0.0])
    with pytest.raises(GuidanceValueError, match=fragment.replace("[", r"\[")):
        g.reset(sigmas=sigmas)


@pytest.mark.outcome("error")
@pytest.mark.parametrize("sigmas", [[0.0, 0.5, 1.0], [2.0, 1.0, 1.5, 0.0]])
def test_a_schedule_that_rises_is_refused_by_name(sigmas):
    # before: accepted, then "the noise level rose ... call reset()" at the sampler's call
    i = next(i for i in range(len(sigmas) - 1) if sigmas[i + 1] > sigmas[i])
    fragment = rf"sigmas\[{i}\] = {sigmas[i]:g} < sigmas\[{i + 1}\] = {sigmas[i + 1]:g}"
    with pytest.raises(GuidanceValueError, match=fragment + ".*high noise to low"):
        _guided(sigmas=sigmas)
    g = _guided(sigmas=[1.0, 0.5, 0.0])
    with pytest.raises(GuidanceValueError, match=fragment):
        g.reset(sigmas=sigmas)


@pytest.mark.outcome("error")
@pytest.mark.parametrize("sigma", [inf, -inf, math.nan])
def test_call_at_a_non_finite_sigma_is_refused(sigma):
    import torch

    g = _guided()
    with pytest.raises(GuidanceValueError, match="sigma"):
        g(torch.ones(1, 2), sigma)
    with pytest.raises(GuidanceValueError, match="sigma"):
        g(torch.ones(1, 2), torch.tensor(sigma))
    assert torch.equal(g(torch.ones(1, 2), 1.0), torch.full((1, 2), 3.0))  # still usable
