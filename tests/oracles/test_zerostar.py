"""Oracle for CFG-Zero*, https://arxiv.org/abs/2503.18886.

Per sample ``a = <c, u> / ||u||^2`` and ``out = a u + w (c - a u)`` (the official code's form,
``u`` scaled by ``a`` inside the difference too); the output is zero for the first ``k``
sampler steps ("zero-init"). Steps are schedule levels: a sampler's extra call between two
levels (a midpoint) or a second call at the same level belongs to the current step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import guidekit
from guidekit import CFGZeroStar

from ._support import FakeModel, branch, conditioning, np64, t64, x_at

FLOW_SIGMAS = (0.95, 0.8, 0.6, 0.4, 0.2, 0.05)
VE_SIGMAS = (14.0, 6.0, 2.5, 1.0, 0.4, 0.1)
W = 4.0


def zerostar_oracle(c: np.ndarray, u: np.ndarray, w: float) -> np.ndarray:
    """``a u + w (c - a u)`` with ``a = <c, u> / ||u||^2`` per sample."""
    cf, uf = c.reshape(len(c), -1), u.reshape(len(u), -1)
    a = ((cf * uf).sum(1) / (uf * uf).sum(1)).reshape(-1, *([1] * (c.ndim - 1)))
    return a * u + w * (c - a * u)


def _calls(sigmas: tuple[float, ...]) -> list[tuple[int, float, np.ndarray]]:
    """``(step, sigma, x)`` for a sampler that, per step, evaluates at the level, then (odd
    steps) once more at the same level, then at the geometric midpoint to the next level."""
    out = []
    for k, s in enumerate(sigmas):
        out.append((k, s, x_at(k)))
        if k % 2 == 1:
            out.append((k, s, x_at(50 + k)))
        if k + 1 < len(sigmas):
            out.append((k, float(np.sqrt(s * sigmas[k + 1])), x_at(100 + k)))
    return out


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize(
    ("prediction", "noise", "sigmas"),
    [("flow", "flow", FLOW_SIGMAS), ("eps", "ve", VE_SIGMAS)],
)
def test_zerostar_formula_and_zero_init(
    k: int, prediction: str, noise: str, sigmas: tuple[float, ...]
) -> None:
    """Zero for the first ``k`` sampler steps (midpoints and repeats included), then the
    optimised-scale formula, computed in the model's own space."""
    plan = guidekit.compile(CFGZeroStar(W, zero_init_steps=k), prediction=prediction, noise=noise)
    guided = guidekit.guide(plan, FakeModel("main"), cond=conditioning("cond"),
                            uncond=conditioning("uncond"), sigmas=sigmas)
    zeros = 0
    for step, sigma, x in _calls(sigmas):
        out = np64(guided(t64(x), sigma))
        if step < k:
            np.testing.assert_array_equal(out, np.zeros_like(out), err_msg=f"sigma {sigma}")
            zeros += 1
        else:
            c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
            np.testing.assert_allclose(out, zerostar_oracle(c, u, W), rtol=1e-9, atol=1e-9,
                                       err_msg=f"sigma {sigma}")
    # step 0 has one call + a midpoint, step 1 two calls + a midpoint
    assert zeros == {0: 0, 1: 2, 2: 5}[k]
    assert guided.steps == len(sigmas)


def test_zerostar_scale_is_per_sample_and_not_plain_cfg() -> None:
    """``a`` differs between samples; the result is neither plain CFG nor a batch-wide ``a``."""
    sigma = FLOW_SIGMAS[2]
    plan = guidekit.compile(CFGZeroStar(W), prediction="flow", noise="flow")
    guided = guidekit.guide(plan, FakeModel("main"), cond=conditioning("cond"),
                            uncond=conditioning("uncond"))
    out = np64(guided(t64(x_at(0)), sigma))
    c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
    a_batch = (c * u).sum() / (u * u).sum()
    np.testing.assert_allclose(out, zerostar_oracle(c, u, W), rtol=1e-9, atol=1e-9)
    assert not np.allclose(out, u + W * (c - u))
    assert not np.allclose(out, a_batch * u + W * (c - a_batch * u))


def test_zerostar_when_c_is_a_multiple_of_u() -> None:
    """If ``c = lam u`` then ``a = lam`` and the output is ``c`` for every ``w``."""
    lam = 1.7

    u = branch("main", "uncond", 0.5)

    def model(x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        # row with tag t is sample t % 1000 of u, times lam on conditional rows
        rows = [u[t % 1000] * (lam if t < 2000 else 1.0) for t in cond["tag"].tolist()]
        return t64(np.stack(rows))

    plan = guidekit.compile(CFGZeroStar(W), prediction="flow", noise="flow")
    guided = guidekit.guide(plan, model, cond=conditioning("cond"), uncond=conditioning("uncond"))
    out = np64(guided(t64(x_at(0)), 0.5))
    np.testing.assert_allclose(out, lam * branch("main", "uncond", 0.5), rtol=1e-9)


def test_zerostar_zero_uncond_is_guarded() -> None:
    """The documented ``1e-8`` guard: a sample whose ``u`` is exactly zero gets ``a = 0``, so
    the output is ``w c`` there (not NaN); the other sample follows the formula."""

    def model(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.view(-1, *([1] * (x.ndim - 1)))
        return torch.where(y == 0, 0.0, torch.ones_like(x) * (1.0 + y))  # y = 0: zero output

    plan = guidekit.compile(CFGZeroStar(W), prediction="eps", noise="ve")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    guided = guidekit.guide(plan, model, cond={"y": torch.tensor([1.0, 1.0])},
                            uncond={"y": torch.tensor([0.0, 0.5])}, sigmas=[2.0, 1.0])
    out = np64(guided(x, 2.0))  # sample 0's unconditional is zero
    c = np.full((2, 3, 4, 4), 2.0)
    np.testing.assert_allclose(out[0], W * c[0], rtol=0, atol=0)
    np.testing.assert_allclose(out[1], zerostar_oracle(c, np.full((2, 3, 4, 4), 1.5), W)[1],
                               rtol=1e-8, atol=0)  # the guard's 1e-8 / ||u||^2, amplified by w
