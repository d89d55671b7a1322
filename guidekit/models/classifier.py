"""The evaluation classifier: a small CNN on 8x8 digits, logits and 64-d features.

Used only to measure generated digits (:mod:`guidekit.models.metrics`): its logits give class
accuracy against the requested label, its penultimate features (64-d, after ReLU) the
Fréchet distance and the diversity, in the way Inception features serve FID.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FEATURES = 64


class Classifier(nn.Module):
    """Three 3x3 conv layers (32, 64, 128 channels, two 2x2 max-pools), a 64-d feature layer
    and a linear head over the 10 classes."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 2 * 2, FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, 64]`` of images ``[N, 1, 8, 8]`` in [-1, 1]."""
        return self.body(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, 10]``."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def shift_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with background (-1)."""
    n = x.shape[0]
    pad = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    h, w = x.shape[-2:]
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def load_classifier(path: str | Path | None = None) -> Classifier:
    """The shipped evaluation classifier (eval mode, float32)."""
    from guidekit.models.store import read, weight_path

    model = Classifier()
    state, _ = read(path or weight_path("classifier"))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()
