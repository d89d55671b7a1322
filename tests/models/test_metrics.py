"""Metrics of the bundled models against independent closed forms.

Fréchet distance oracles (written here, numpy only, no matrix square roots):
* commuting covariances ``Q diag(a) Q^T`` and ``Q diag(b) Q^T``: ``|m1 - m2|^2 +
  sum (sqrt a - sqrt b)^2``;
* any two 2x2 covariances: ``tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))`` for ``M = C1 C2``
  (whose eigenvalues are real and non-negative).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from guidekit.models.metrics import (
    Reference,
    class_diversity,
    evaluate,
    feature_stats,
    frechet_distance,
    load_reference,
    mean_pairwise_distance,
)


def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("d, seed", [(1, 0), (3, 1), (16, 2), (64, 3)])
def test_fd_commuting_gaussians(d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = _rotation(rng, d)
    a, b = rng.uniform(0.01, 5, d), rng.uniform(0.01, 5, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = float(((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = frechet_distance(m1, q @ np.diag(a) @ q.T, m2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_fd_non_commuting_2x2(seed: int) -> None:
    rng = np.random.default_rng(10 + seed)
    g1, g2 = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
    c1, c2 = g1 @ g1.T + 0.1 * np.eye(2), g2 @ g2.T + 0.1 * np.eye(2)
    assert not np.allclose(c1 @ c2, c2 @ c1)  # the case the commuting oracle cannot cover
    m = c1 @ c2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    m1, m2 = rng.standard_normal(2), rng.standard_normal(2)
    expected = float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(m2, c2, m1, c1) == pytest.approx(expected, rel=1e-9)


def test_fd_of_identical_gaussians_is_zero_and_singular_covariances_work() -> None:
    rng = np.random.default_rng(0)
    f = rng.standard_normal((5, 8))  # 5 samples in 8-d: a rank-4 covariance
    mu, cov = feature_stats(f)
    # singular: square roots of rounding-level eigenvalues (1e-16) contribute ~1e-8 each
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)
    # rank-deficient both sides, disjoint supports: FD = tr C1 + tr C2 (sqrt term 0)
    c1, c2 = np.diag([1.0, 0, 0]), np.diag([0, 4.0, 0])
    assert frechet_distance(np.zeros(3), c1, np.zeros(3), c2) == pytest.approx(5.0)


def test_feature_stats_and_pairwise_distance_match_loops() -> None:
    rng = np.random.default_rng(1)
    f = rng.standard_normal((7, 3))
    mu, cov = feature_stats(f)
    manual = sum(np.outer(r - f.mean(0), r - f.mean(0)) for r in f) / 6
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(cov, manual, rtol=1e-12)
    pairs = [np.linalg.norm(f[i] - f[j]) for i, j in itertools.combinations(range(7), 2)]
    assert mean_pairwise_distance(f) == pytest.approx(np.mean(pairs), rel=1e-12)
    assert math.isnan(mean_pairwise_distance(f[:1]))
    labels = np.array([0, 0, 1, 1, 1, 2, 0])
    div = class_diversity(f, labels, classes=4)
    assert div[1] == pytest.approx(mean_pairwise_distance(f[[2, 3, 4]]))
    assert math.isnan(div[2]) and math.isnan(div[3])


class _StubClassifier:
    """Features = the first 4 pixels; predicted class = argmax over the first 10 pixels."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return f


def test_evaluate_with_a_known_classifier_and_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(4)
    images = 0.1 * torch.randn(40, 1, 8, 8, generator=gen)
    flat = images.view(40, -1)
    flat[torch.arange(40), labels] = 5.0  # classified as the label...
    flat[:8, 0:10] = 0.0
    flat[torch.arange(8), (labels[:8] + 1) % 10] = 5.0  # ...except the first 8 rows
    rng = np.random.default_rng(0)
    ref = Reference(
        mean=rng.standard_normal(10), cov=np.diag(rng.uniform(0.5, 2, 10)),
        class_diversity=np.full(10, 3.0), count=100, floor_fd=0.0, classifier_accuracy=1.0,
    )
    m = evaluate(images, labels, classifier=_StubClassifier(), reference=ref)
    assert m.accuracy == pytest.approx(32 / 40)
    f = flat[:, :10].double().numpy()
    assert m.fd == pytest.approx(frechet_distance(*feature_stats(f), ref.mean, ref.cov), rel=1e-9)
    div = class_diversity(f, labels.numpy())
    assert m.diversity == pytest.approx(div.mean())
    assert m.diversity_gap == pytest.approx(np.abs(div - 3.0).mean())
    assert m.samples == 40 and len(m.class_diversity) == 10
    with pytest.raises(ValueError, match="labels"):
        evaluate(images, labels[:5], classifier=_StubClassifier(), reference=ref)


def test_shipped_reference_is_consistent() -> None:
    ref = load_reference()
    assert ref.mean.shape == (64,) and ref.cov.shape == (64, 64)
    np.testing.assert_allclose(ref.cov, ref.cov.T)
    assert np.linalg.eigvalsh(ref.cov).min() > -1e-8
    assert ref.classifier_accuracy > 0.97
    assert 300 < ref.count < 400
    assert ref.floor_fd > 0 and np.isfinite(ref.class_diversity).all()
