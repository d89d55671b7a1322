"""Oracle for CFG rescale, https://arxiv.org/abs/2305.08891 (section 3.4).

``x = u + w (c - u)``; ``x_r = x std(c) / std(x)`` with the std taken per sample over all
non-batch dims; ``out = phi x_r + (1 - phi) x``. The oracle uses numpy's population std
(ddof 0): the formula only uses the ratio of two stds, so the choice of ddof cancels.
"""

from __future__ import annotations

import numpy as np
import pytest

import guidekit
from guidekit import CFG, Autoguidance, Rescale

from ._support import BATCH, FakeModel, branch, conditioning, np64, t64, x_at

SIGMAS = (0.9, 0.5, 0.2)  # valid for every noise convention used below
W = 6.0


def per_sample_std(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).std(axis=1, ddof=0).reshape(-1, *([1] * (a.ndim - 1)))


def rescale_oracle(guided: np.ndarray, c: np.ndarray, phi: float) -> np.ndarray:
    x_r = guided * per_sample_std(c) / per_sample_std(guided)
    return phi * x_r + (1.0 - phi) * guided


def _run(expr: guidekit.Expr, prediction: str, noise: str, **models: FakeModel) -> list[np.ndarray]:
    plan = guidekit.compile(expr, prediction=prediction, noise=noise)
    guided = guidekit.guide(plan, FakeModel("main"), cond=conditioning("cond"),
                            uncond=conditioning("uncond"), models=models)
    return [np64(guided(t64(x_at(k)), s)) for k, s in enumerate(SIGMAS)]


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
@pytest.mark.parametrize(("prediction", "noise"), [("eps", "ve"), ("v", "vp"), ("flow", "flow")])
def test_rescale_matches_formula(phi: float, prediction: str, noise: str) -> None:
    """``CFG(w) | Rescale(phi)`` in the model's own space (the paper's is v-prediction)."""
    outs = _run(CFG(W) | Rescale(phi), prediction, noise)
    for out, sigma in zip(outs, SIGMAS):
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        want = rescale_oracle(u + W * (c - u), c, phi)
        np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)


def test_rescale_phi_one_restores_conditional_std_per_sample() -> None:
    """With phi = 1 every sample's std equals its conditional prediction's std."""
    (out, *_) = _run(CFG(W) | Rescale(1.0), "eps", "ve")
    c = branch("main", "cond", SIGMAS[0])
    np.testing.assert_allclose(per_sample_std(out), per_sample_std(c), rtol=1e-12)
    # the samples' stds differ, so a batch-wide std would fail the check above
    assert np.ptp(per_sample_std(c)) > 0.5


def test_rescale_of_autoguided_cfg() -> None:
    """Rescale acts on the whole guided prediction and uses the main model's ``c``."""
    s, phi = 2.0, 0.7
    outs = _run(CFG(W) + Autoguidance(s) | Rescale(phi), "eps", "ve", weak=FakeModel("weak"))
    for out, sigma in zip(outs, SIGMAS):
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        cw = branch("weak", "cond", sigma)
        want = rescale_oracle(u + W * (c - u) + s * (c - cw), c, phi)
        np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
    assert out.shape[0] == BATCH
