"""The training data: scikit-learn's 8x8 handwritten digits, split 80/20 per class.

``load_digits`` (1797 images, values 0..16) is scaled to [-1, 1] and split with a fixed seed,
stratified so that every class keeps the same 80/20 proportion. scikit-learn is imported only
here and only when the data is loaded (the ``train`` extra); sampling and metrics never need it.
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

TEST_FRACTION = 0.2


@attrs.frozen(eq=False)
class Digits:
    """Train and held-out images (``[N, 1, 8, 8]`` in [-1, 1]) with integer labels ``[N]``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def to_pixels(raw: np.ndarray) -> torch.Tensor:
    """Digit images with values 0..16 as a float tensor ``[N, 1, 8, 8]`` in [-1, 1]."""
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32)).reshape(-1, 1, 8, 8)
    return x / 8.0 - 1.0


def stratified_split(
    labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)``: within each class, ``round(test_fraction * n)`` held out.

    Deterministic for a seed (numpy's PCG64), independent of the scikit-learn version.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load(seed: int = 0) -> Digits:
    """The digits split used to train and evaluate the bundled models (needs scikit-learn)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "training the bundled models needs scikit-learn: pip install 'guidekit[train]'"
        ) from err
    bunch = load_digits()
    images = to_pixels(bunch.images)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    tr, te = stratified_split(bunch.target, TEST_FRACTION, seed)
    return Digits(images[tr], labels[tr], images[te], labels[te])
