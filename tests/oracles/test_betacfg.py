"""Oracle for beta-CFG, https://arxiv.org/abs/2502.10574, and the scale schedules of
arXiv 2404.13040, through the custom-sampler API (``guidekit.guide``).

``u + w Beta(a, b).pdf(r) (c - u) / ||c - u||^gamma`` per sample, with the sampling progress
``r = step / (N - 1)`` of the official code: guidekit defines ``r`` by noise level, which on
the run's schedule is exactly that fraction. The Beta density is written here from
``math.lgamma`` (scipy is not a dependency).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import guidekit
from guidekit import CFG, BetaCFG, Cosine, Linear, PowerLaw

from ._support import FakeModel, branch, conditioning, np64, t64, x_at

VE_SIGMAS = (14.0, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0)
FLOW_SIGMAS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.05, 0.0)


def beta_density(r: float, a: float, b: float) -> float:
    """``r^(a-1) (1-r)^(b-1) / B(a, b)``, ``B(a, b) = G(a) G(b) / G(a + b)``."""
    beta_fn = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return r ** (a - 1) * (1 - r) ** (b - 1) / beta_fn


def betacfg_oracle(c: np.ndarray, u: np.ndarray, w: float, a: float, b: float, gamma: float,
                   r: float) -> np.ndarray:
    d = c - u
    norm = np.sqrt((d.reshape(len(d), -1) ** 2).sum(1)).reshape(-1, *([1] * (d.ndim - 1)))
    return u + w * beta_density(r, a, b) * d / norm ** gamma


def run(expr, sigmas, prediction="eps", noise="ve"):
    plan = guidekit.compile(expr, prediction=prediction, noise=noise)
    guided = guidekit.guide(plan, FakeModel("main"), cond=conditioning("cond"),
                            uncond=conditioning("uncond"), sigmas=sigmas)
    steps = [s for s in sigmas if s > 0]
    return [(k / (len(steps) - 1), s, np64(guided(t64(x_at(k)), s))) for k, s in enumerate(steps)]


@pytest.mark.parametrize(("a", "b", "gamma"), [(2.0, 2.0, 0.0), (3.0, 1.5, 1.0), (1.0, 2.0, 0.5)])
@pytest.mark.parametrize(("prediction", "noise", "sigmas"),
                         [("eps", "ve", VE_SIGMAS), ("flow", "flow", FLOW_SIGMAS)])
def test_betacfg_formula_per_step(a, b, gamma, prediction, noise, sigmas):
    w = 5.0
    for r, sigma, out in run(BetaCFG(w, a, b, gamma=gamma), sigmas, prediction, noise):
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        np.testing.assert_allclose(out, betacfg_oracle(c, u, w, a, b, gamma, r), rtol=1e-9,
                                   atol=1e-9, err_msg=f"r = {r}")


def test_betacfg_with_bounds_needs_no_schedule_and_maps_r_by_log_sigma():
    plan = guidekit.compile(BetaCFG(4, sigma_max=10, sigma_min=0.1))
    guided = guidekit.guide(plan, FakeModel("main"), cond=conditioning("cond"),
                            uncond=conditioning("uncond"))
    out = np64(guided(t64(x_at(0)), 1.0))  # log-halfway: r = 1/2
    c, u = branch("main", "cond", 1.0), branch("main", "uncond", 1.0)
    np.testing.assert_allclose(out, betacfg_oracle(c, u, 4, 2, 2, 0, 0.5), rtol=1e-9)


def test_betacfg_without_a_schedule_is_refused_naming_it():
    plan = guidekit.compile(BetaCFG(4))
    guided = guidekit.guide(plan, FakeModel("main"), cond=conditioning("cond"),
                            uncond=conditioning("uncond"))
    with pytest.raises(guidekit.GuidanceValueError, match=r"BetaCFG\(4\): .*sigmas="):
        guided(t64(x_at(0)), 1.0)


@pytest.mark.parametrize(("shape", "formula"), [
    (Linear(3), lambda r: 2 * 3 * r),  # the paper's 2 w (1 - t/T), t/T = 1 - r
    (Cosine(3), lambda r: 3 * (1 + math.cos(math.pi * (1 - r)))),  # w (1 + cos(pi t/T))
    (PowerLaw(3, 2), lambda r: 3 * 3 * r ** 2),
])
def test_scheduled_cfg_follows_the_paper_shapes(shape, formula):
    for r, sigma, out in run(CFG(shape), VE_SIGMAS):
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        np.testing.assert_allclose(out, u + formula(r) * (c - u), rtol=1e-9, atol=1e-9)
