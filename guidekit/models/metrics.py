"""Sample quality of generated digits: class accuracy, Fréchet distance, diversity.

All three read the evaluation classifier (:mod:`guidekit.models.classifier`):

* **accuracy**: the share of samples the classifier assigns to the REQUESTED label;
* **fd**: the Fréchet distance (as in FID, Heusel et al., https://arxiv.org/abs/1706.08500)
  between Gaussians fitted to the classifier's 64-d features of the samples and of the
  held-out real digits. The real statistics are shipped (``reference.safetensors``), so no
  data set and no scikit-learn are needed. FD depends on the sample count (a bias of order
  1/N): compare values only at equal counts. The reference file also records the floor,
  the FD of the real training digits against the held-out ones;
* **diversity**: per requested class, the mean pairwise feature distance between samples,
  averaged over classes; **diversity_gap** is the mean over classes of ``|diversity_c -
  real_c|`` against the held-out real digits of that class. Raw diversity rewards artifacts
  (noisy samples are far apart), so read the gap, not the raw value, as quality.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from guidekit.models.dit import CLASSES


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features`` ``[N, D]`` in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray
) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` for two Gaussians.

    ``tr (C1 C2)^(1/2)`` is computed as ``tr (S C2 S)^(1/2)`` with ``S = C1^(1/2)``: the
    same eigenvalues, but of a symmetric PSD matrix, so plain ``eigh`` is accurate (no scipy).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    c1, c2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    s = _psd_sqrt(c1)
    m = s @ c2 @ s
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    # clipped at 0: rounding in the square roots of (near-)singular covariances can leave
    # a tiny negative value where the distance is 0
    return max(float(diff @ diff + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt), 0.0)


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of distinct rows (NaN for fewer than 2 rows)."""
    f = np.asarray(features, dtype=np.float64)
    n = f.shape[0]
    if n < 2:
        return math.nan
    sq = (f * f).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0, None)
    iu = np.triu_indices(n, k=1)
    return float(np.sqrt(d2[iu]).mean())


def class_diversity(features: np.ndarray, labels: np.ndarray, classes: int = CLASSES) -> np.ndarray:
    """Mean pairwise feature distance within each class ``[classes]`` (NaN if < 2 samples)."""
    labels = np.asarray(labels)
    return np.array([mean_pairwise_distance(features[labels == c]) for c in range(classes)])


@attrs.frozen(eq=False)
class Reference:
    """Classifier-feature statistics of the held-out real digits (shipped)."""

    mean: np.ndarray
    cov: np.ndarray
    class_diversity: np.ndarray
    count: int
    #: FD of the real training digits against the held-out ones: the best reachable value
    floor_fd: float
    #: the classifier's accuracy on the held-out digits
    classifier_accuracy: float

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "mean": torch.from_numpy(self.mean),
            "cov": torch.from_numpy(self.cov),
            "class_diversity": torch.from_numpy(self.class_diversity),
        }

    def metadata(self) -> dict[str, object]:
        return {
            "count": self.count, "floor_fd": repr(self.floor_fd),
            "classifier_accuracy": repr(self.classifier_accuracy),
        }


def load_reference(path: str | Path | None = None) -> Reference:
    """The shipped reference statistics."""
    from guidekit.models.store import read, weight_path

    t, meta = read(path or weight_path("reference"))
    return Reference(
        mean=t["mean"].double().numpy(), cov=t["cov"].double().numpy(),
        class_diversity=t["class_diversity"].double().numpy(), count=int(meta["count"]),
        floor_fd=float(meta["floor_fd"]), classifier_accuracy=float(meta["classifier_accuracy"]),
    )


@functools.lru_cache(maxsize=1)
def _default_classifier() -> Any:
    from guidekit.models.classifier import load_classifier

    return load_classifier()


@functools.lru_cache(maxsize=1)
def _default_reference() -> Reference:
    return load_reference()


@attrs.frozen
class Metrics:
    """Quality of one batch of samples (see the module doc for the definitions)."""

    accuracy: float
    fd: float
    diversity: float
    diversity_gap: float
    samples: int = 0
    class_diversity: tuple[float, ...] = ()

    def __str__(self) -> str:
        return (
            f"accuracy {self.accuracy:.3f}  FD {self.fd:.2f}  diversity {self.diversity:.2f} "
            f"(gap {self.diversity_gap:.2f})  [{self.samples} samples]"
        )


@torch.no_grad()
def classify(
    images: torch.Tensor, classifier: Any = None, batch: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, 64], predicted labels [N])`` of images ``[N, 1, 8, 8]`` in [-1, 1]."""
    clf = classifier if classifier is not None else _default_classifier()
    feats, preds = [], []
    for lo in range(0, images.shape[0], batch):
        x = images[lo : lo + batch].detach().float().cpu()
        f = clf.features(x)
        feats.append(f.double().numpy())
        preds.append(clf.head(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def evaluate(
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    *,
    classifier: Any = None,
    reference: Reference | None = None,
) -> Metrics:
    """Accuracy, FD, diversity and diversity gap of ``images`` generated for ``labels``.

    Needs at least 2 samples; FD is only comparable between equal sample counts.
    """
    ref = reference if reference is not None else _default_reference()
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    feats, preds = classify(images, classifier)
    mu, cov = feature_stats(feats)
    div = class_diversity(feats, labels)
    present = ~np.isnan(div)
    if present.any():
        diversity = float(div[present].mean())
        gap = float(np.abs(div[present] - ref.class_diversity[present]).mean())
    else:
        diversity = gap = math.nan
    return Metrics(
        accuracy=float((preds == labels).mean()),
        fd=frechet_distance(mu, cov, ref.mean, ref.cov),
        diversity=diversity,
        diversity_gap=gap,
        samples=int(labels.shape[0]),
        class_diversity=tuple(float(v) for v in div),
    )
