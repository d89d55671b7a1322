"""Oracles for prediction spaces (eps, x0, v, flow velocity) under VE, VP and flow noise.

The oracle writes the sampler state as ``x = a x0 + b n`` (VE: ``a = 1, b = sigma``; VP:
``a = 1 / sqrt(1 + sigma^2), b = sigma a``; flow: ``a = 1 - sigma, b = sigma``) and every
prediction as a fixed combination ``p = alpha x0 + beta n``:

* ``x0``:   ``(1, 0)``
* ``eps``:  ``(0, 1)``
* ``flow``: ``(-1, 1)`` (diffusers' flow-matching velocity ``n - x0``)
* ``v``:    ``(-b / r, a / r)``, ``r = sqrt(a^2 + b^2)`` (diffusers' v for VP, where r = 1;
  k-diffusion's ``VDenoiser`` for VE, derived below)

A conversion solves the 2 x 2 system ``[[a, b], [alpha_src, beta_src]] (x0, n) = (x, p)``
and re-combines with ``(alpha_dst, beta_dst)``: independent of how guidekit arranges it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import guidekit
from guidekit import CFG, Autoguidance, Cond

from ._support import FakeModel, branch, conditioning, noise_coefficients, np64, t64, x_at

SPACES = ("eps", "x0", "v", "flow")
NOISE_SIGMAS = {"ve": (6.0, 0.3), "vp": (6.0, 0.3), "flow": (0.8, 0.25)}


def combination(space: str, a: float, b: float) -> tuple[float, float]:
    """``(alpha, beta)`` with ``prediction = alpha x0 + beta n``."""
    r = math.hypot(a, b)
    return {"x0": (1.0, 0.0), "eps": (0.0, 1.0), "flow": (-1.0, 1.0), "v": (-b / r, a / r)}[space]


def convert_oracle(p: np.ndarray, src: str, dst: str, x: np.ndarray, sigma: float,
                   noise: str) -> np.ndarray:
    a, b = noise_coefficients(noise, sigma)
    alpha, beta = combination(src, a, b)
    det = a * beta - b * alpha
    x0 = (beta * x - b * p) / det
    n = (a * p - alpha * x) / det
    alpha2, beta2 = combination(dst, a, b)
    return alpha2 * x0 + beta2 * n


def _cond_output(prediction: str, noise: str, output: str, x: np.ndarray, sigma: float
                 ) -> np.ndarray:
    plan = guidekit.compile(Cond(), prediction=prediction, noise=noise)
    guided = guidekit.guide(plan, FakeModel(), cond=conditioning("cond"), output=output)
    return np64(guided(t64(x), sigma))


@pytest.mark.parametrize("noise", ["ve", "vp", "flow"])
@pytest.mark.parametrize(("src", "dst"), list(itertools.product(SPACES, SPACES)))
def test_plan_output_conversion(noise: str, src: str, dst: str) -> None:
    """``guide(..., output=dst)`` on a ``src`` model equals the oracle conversion."""
    for k, sigma in enumerate(NOISE_SIGMAS[noise]):
        x = x_at(k, scale=2.0)
        out = _cond_output(src, noise, dst, x, sigma)
        want = convert_oracle(branch("main", "cond", sigma), src, dst, x, sigma, noise)
        np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("noise", ["ve", "vp", "flow"])
def test_convert_round_trips(noise: str) -> None:
    """``convert(convert(p, s -> d), d -> s) == p`` for every pair of spaces."""
    for sigma in NOISE_SIGMAS[noise]:
        x, p = t64(x_at(0)), t64(x_at(1))
        for src, dst in itertools.product(SPACES, SPACES):
            there = guidekit.convert(p, src, dst, x, sigma, guidekit.Noise(noise))
            back = guidekit.convert(there, dst, src, x, sigma, guidekit.Noise(noise))
            np.testing.assert_allclose(np64(back), np64(p), rtol=1e-10, atol=1e-10,
                                       err_msg=f"{src} -> {dst} -> {src}")


def test_eps_and_flow_closed_forms() -> None:
    """The textbook forms from methods.md: ``x0 = x - sigma eps`` (VE),
    ``x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)`` (VP), ``x0 = x - sigma v`` (flow)."""
    x, sigma = x_at(3), 0.6
    eps = branch("main", "cond", sigma)
    np.testing.assert_allclose(_cond_output("eps", "ve", "x0", x, sigma), x - sigma * eps,
                               rtol=1e-12, atol=1e-12)
    abar = 1.0 / (1.0 + sigma**2)  # sigma = sqrt((1 - abar) / abar)
    np.testing.assert_allclose(_cond_output("eps", "vp", "x0", x, sigma),
                               (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar),
                               rtol=1e-12, atol=1e-12)
    v = eps
    np.testing.assert_allclose(_cond_output("flow", "flow", "x0", x, sigma), x - sigma * v,
                               rtol=1e-12, atol=1e-12)
    # the Euler step of the flow scheduler, x + (sigma_next - sigma) v, lands on
    # (1 - sigma_next) x0 + sigma_next n for the implied x0 and n
    x0 = x - sigma * v
    n = v + x0
    nxt = 0.2
    np.testing.assert_allclose(x + (nxt - sigma) * v, (1 - nxt) * x0 + nxt * n, rtol=1e-12)


def test_v_matches_k_diffusion_vdenoiser() -> None:
    """v-prediction under VE noise matches k-diffusion's ``VDenoiser`` with sigma_data = 1.

    Derivation (sigma_data = 1). The wrapped model is a VP v-model: it sees
    ``z = c_in x`` with ``c_in = 1 / sqrt(s^2 + 1)``. Since ``x = x0 + s n``,
    ``z = alpha x0 + beta n`` with ``alpha = 1 / sqrt(s^2 + 1)``, ``beta = s / sqrt(s^2 + 1)``
    (``alpha^2 + beta^2 = 1``), and its target is ``v = alpha n - beta x0``. Then
    ``alpha z - beta v = (alpha^2 + beta^2) x0 = x0``, so
    ``x0 = alpha c_in x - beta v = x / (s^2 + 1) - s / sqrt(s^2 + 1) v``:
    ``c_skip = 1 / (s^2 + 1)`` and ``c_out = -s / sqrt(s^2 + 1)``.
    """
    for k, s in enumerate((0.05, 0.7, 3.0, 40.0)):
        x = x_at(k, scale=math.sqrt(1 + s * s))
        v = branch("main", "cond", s)
        c_skip, c_out, c_in = 1 / (s * s + 1), -s / math.sqrt(s * s + 1), 1 / math.sqrt(s * s + 1)
        want = c_skip * x + c_out * v
        np.testing.assert_allclose(_cond_output("v", "ve", "x0", x, s), want,
                                   rtol=1e-10, atol=1e-10)
        # the same v read by a VP plan at the model's own input c_in x gives the same x0
        np.testing.assert_allclose(_cond_output("v", "vp", "x0", c_in * x, s), want,
                                   rtol=1e-10, atol=1e-10)
        # and eps under VE at x is eps under VP at c_in x (k-diffusion's eps wrapper)
        np.testing.assert_allclose(_cond_output("eps", "ve", "x0", x, s),
                                   _cond_output("eps", "vp", "x0", c_in * x, s),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("prediction", "noise"),
                         [("eps", "ve"), ("v", "vp"), ("flow", "flow"), ("eps", "vp")])
def test_linear_guidance_is_space_independent(prediction: str, noise: str) -> None:
    """Coefficients summing to one commute with the affine conversions: combining in the
    model's space then converting equals converting each branch then combining."""
    w, s = 4.0, 1.5
    sigma = NOISE_SIGMAS[noise][1]
    x = x_at(4)
    plan = guidekit.compile(CFG(w) + Autoguidance(s), prediction=prediction, noise=noise)
    for out_space in SPACES:
        guided = guidekit.guide(plan, FakeModel(), cond=conditioning("cond"),
                                uncond=conditioning("uncond"), models={"weak": FakeModel("weak")},
                                output=out_space)
        out = np64(guided(t64(x), sigma))
        c, u, cw = (
            convert_oracle(branch(m, n, sigma), prediction, out_space, x, sigma, noise)
            for m, n in (("main", "cond"), ("main", "uncond"), ("weak", "cond"))
        )
        np.testing.assert_allclose(out, u + w * (c - u) + s * (c - cw), rtol=1e-9, atol=1e-9)
