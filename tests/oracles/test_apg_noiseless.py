"""APG and dynamic thresholding at a level with no noise left (flow time t = 1, sigma = 0
under VE): every x0 is x there, so guidekit applies the limit of the paper's map as
sigma -> 0 in the model's own space.

The oracle is Algorithm 1 (``test_apg.apg_step``, numpy float64) run at a tiny sigma on a
model whose predictions are smooth in sigma: the guided prediction is continuous there,
so guidekit's value at sigma = 0 must agree with it to O(sigma). Where the limit is
infinite (momentum carried from earlier steps; a thresholding that would clip x itself)
the call is refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import guidekit
from guidekit import APG, CFG, DynamicThreshold, GuidanceValueError

from ._support import branch_value, conditioning, np64, t64, x_at
from .test_apg import apg_step, from_x0, to_x0

W = 4.0
TINY = 1e-7


def _pred(tag: int, x: np.ndarray, sigma: float) -> np.ndarray:
    """A prediction smooth in sigma: fixed per row, plus x and sigma terms."""
    return branch_value("a", tag, 0.0) + 0.3 * x + sigma * branch_value("b", tag, 0.0)


def smooth(x: torch.Tensor, sigma: torch.Tensor, tag: torch.Tensor) -> torch.Tensor:
    rows = [_pred(int(t), x[i].numpy(), float(sigma[i])) for i, t in enumerate(tag)]
    return torch.from_numpy(np.stack(rows))


def _guided(expr: guidekit.Expr, prediction: str, noise: str) -> guidekit.Guided:
    plan = guidekit.compile(expr, prediction=prediction, noise=noise)
    return guidekit.guide(plan, smooth, cond=conditioning("cond"), uncond=conditioning("uncond"))


def _branch(name: str, x: np.ndarray, sigma: float) -> np.ndarray:
    base = {"cond": 1000, "uncond": 2000}[name]
    return np.stack([_pred(base + i, x[i], sigma) for i in range(len(x))])


SPACES = [("flow", "flow"), ("eps", "ve")]


@pytest.mark.outcome("correct")
@pytest.mark.parametrize("eta", [0.0, 0.3])
@pytest.mark.parametrize(("prediction", "noise"), SPACES)
def test_apg_at_no_noise_is_the_limit_of_algorithm_1(prediction, noise, eta):
    r = 0.5  # clips at every ordinary level here, never in the limit (D -> 0)
    guided = _guided(CFG(W) | APG(eta=eta, norm_threshold=r), prediction, noise)
    x = x_at(0)
    out = np64(guided(t64(x), 0.0))
    c = to_x0(_branch("cond", x, TINY), prediction, x, TINY, noise)
    u = to_x0(_branch("uncond", x, TINY), prediction, x, TINY, noise)
    want_x0, _ = apg_step(c, u, W, eta, r, 0.0, None)
    want = from_x0(want_x0, prediction, x, TINY, noise)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    plain = _branch("uncond", x, 0.0) + W * (_branch("cond", x, 0.0) - _branch("uncond", x, 0.0))
    assert np.abs(out - plain).max() > 0.1  # APG acts there: not plain CFG (the old skip)


@pytest.mark.outcome("error")
def test_apg_momentum_carried_into_no_noise_is_refused():
    guided = _guided(CFG(W) | APG(eta=0, momentum=-0.5), "flow", "flow")
    guided(t64(x_at(0)), 0.5)
    with pytest.raises(GuidanceValueError, match=r"at sigma = 0 .* momentum carried .* "
                                                 r"momentum=0"):
        guided(t64(x_at(1)), 0.0)


@pytest.mark.outcome("correct")
def test_apg_momentum_with_no_history_has_its_limit():
    # a run's first step at no noise: nothing carried, m = D -> 0 as for momentum=0
    x = x_at(0)
    moving = np64(_guided(CFG(W) | APG(momentum=-0.5), "flow", "flow")(t64(x), 0.0))
    still = np64(_guided(CFG(W) | APG(), "flow", "flow")(t64(x), 0.0))
    np.testing.assert_allclose(moving, still, rtol=1e-12, atol=1e-12)


@pytest.mark.outcome("correct")
def test_threshold_at_no_noise_leaves_an_unclipped_sample():
    x = 0.2 * x_at(0) / np.abs(x_at(0)).max()  # inside [-1, 1]: nothing to clip
    out = np64(_guided(CFG(W) | DynamicThreshold(0.9), "flow", "flow")(t64(x), 0.0))
    np.testing.assert_allclose(out, np64(_guided(CFG(W), "flow", "flow")(t64(x), 0.0)))


@pytest.mark.outcome("error")
def test_threshold_that_would_clip_the_sample_at_no_noise_is_refused():
    x = 3.0 * x_at(0)
    with pytest.raises(GuidanceValueError, match=r"DynamicThreshold.* at sigma = 0 .* clip"):
        _guided(CFG(W) | DynamicThreshold(0.9), "flow", "flow")(t64(x), 0.0)
