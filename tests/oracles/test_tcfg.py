"""Oracle for tangential CFG (TCFG), https://arxiv.org/abs/2503.18137.

Per sample: stack the flattened ``c`` and ``u`` into a 2 x D matrix, take its SVD, project
``u`` on the top right singular vector ``v1`` (``u' = <u, v1> v1``) and return
``u' + w (c - u')``. A singular vector is defined only up to sign; ``u'`` is quadratic in
``v1`` so the sign does not matter, which the oracle checks as well.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import guidekit
from guidekit import TCFG

from ._support import FakeModel, branch, conditioning, np64, t64, x_at

W = 3.0


def tcfg_oracle(c: np.ndarray, u: np.ndarray, w: float, flip: bool = False) -> np.ndarray:
    """TCFG per sample with numpy's SVD; ``flip`` negates ``v1`` (must change nothing)."""
    out = np.empty_like(c)
    for i in range(len(c)):
        m = np.stack([c[i].ravel(), u[i].ravel()])  # 2 x D
        _, _, vt = np.linalg.svd(m, full_matrices=False)
        v1 = -vt[0] if flip else vt[0]
        u_proj = (u[i].ravel() @ v1) * v1
        out[i] = (u_proj + w * (c[i].ravel() - u_proj)).reshape(c.shape[1:])
    return out


def _guided(model: Callable[..., torch.Tensor], prediction: str = "eps", noise: str = "ve") -> guidekit.Guided:
    plan = guidekit.compile(TCFG(W), prediction=prediction, noise=noise)
    return guidekit.guide(plan, model, cond=conditioning("cond"), uncond=conditioning("uncond"))


@pytest.mark.parametrize("sigma", [0.1, 0.35, 0.8, 2.0, 5.5, 13.0])
def test_tcfg_matches_svd_projection(sigma: float) -> None:
    """Several random ``(c, u)`` pairs (one per sigma): guidekit equals the numpy oracle."""
    out = np64(_guided(FakeModel())(t64(x_at(0)), sigma))
    c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
    want = tcfg_oracle(c, u, W)
    np.testing.assert_allclose(tcfg_oracle(c, u, W, flip=True), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-9)
    assert not np.allclose(out, u + W * (c - u))  # the projection really changed u


def _fixed_model(c: np.ndarray, u: np.ndarray) -> Callable[..., torch.Tensor]:
    def model(x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        rows = [c[t % 1000] if t < 2000 else u[t % 1000] for t in cond["tag"].tolist()]
        return t64(np.stack(rows))

    return model


@pytest.mark.parametrize("seed", range(5))
def test_tcfg_sign_invariance_random_inputs(seed: int) -> None:
    """Random inputs, including negated ones: the result follows the oracle either way, and
    negating both ``c`` and ``u`` negates the output (the SVD's sign choice is irrelevant)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((3, 2, 3, 4)) + rng.standard_normal((3, 1, 1, 1))
    u = 0.6 * c + rng.standard_normal(c.shape)
    out = np64(_guided(_fixed_model(c, u))(t64(x_at(0)), 1.0))
    out_neg = np64(_guided(_fixed_model(-c, -u))(t64(x_at(0)), 1.0))
    np.testing.assert_allclose(out, tcfg_oracle(c, u, W), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out_neg, -out, rtol=1e-9, atol=1e-9)


def test_tcfg_rank_one_is_plain_cfg() -> None:
    """If ``u`` is a multiple of ``c`` (rank 1), ``u`` lies on ``v1``: ``u' = u``, plain CFG."""
    rng = np.random.default_rng(7)
    c = rng.standard_normal((3, 2, 3, 4))
    u = np.array([0.5, -1.2, 2.0]).reshape(-1, 1, 1, 1) * c
    out = np64(_guided(_fixed_model(c, u))(t64(x_at(0)), 1.0))
    np.testing.assert_allclose(out, u + W * (c - u), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("prediction", "noise"), [("flow", "flow"), ("v", "vp")])
def test_tcfg_runs_in_model_space(prediction: str, noise: str) -> None:
    """TCFG is evaluated on the model's own predictions, whatever their space."""
    sigma = 0.5
    out = np64(_guided(FakeModel(), prediction, noise)(t64(x_at(0)), sigma))
    want = tcfg_oracle(branch("main", "cond", sigma), branch("main", "uncond", sigma), W)
    np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-9)
