"""The attribute classifier: a small CNN with one head per scene attribute.

Used to measure prompt adherence of generated scenes: each head of
:data:`~.attributes.HEADS` (count, position, each object's shape / colour / size, the
background) predicts its attribute from the image, so a sample can be scored against the
scene its caption describes, attribute by attribute and as a whole. Its 128-d penultimate
features can serve a Fréchet distance, as the digits classifier's do.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from guidekit.models.scenes.attributes import HEADS

FEATURES = 128


class AttributeClassifier(nn.Module):
    """Four 3x3 conv layers (32, 64, 128, 128 channels, three 2x2 max-pools) on
    ``[N, 3, 32, 32]`` in [-1, 1], a 128-d feature layer and a linear head per attribute."""

    def __init__(self, heads: dict[str, int] | None = None) -> None:
        super().__init__()
        self.head_sizes = dict(heads or HEADS)
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, FEATURES), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURES, n) for k, n in self.head_sizes.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, 128]``."""
        if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
            raise ValueError(
                f"AttributeClassifier takes [N, 3, 32, 32] images in [-1, 1], got {tuple(x.shape)}"
            )
        return self.body(x)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head, ``{name: [N, classes]}``."""
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels ``[N, len(heads)]`` (columns in head order)."""
        return torch.stack([v.argmax(1) for v in self(x).values()], dim=1)


def attribute_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The sum over heads of the cross entropy against ``labels`` ``[N, heads]``."""
    if labels.ndim != 2 or labels.shape[1] != len(logits):
        raise ValueError(
            f"attribute_loss: labels must be [N, {len(logits)}] (one column per head), got "
            f"{tuple(labels.shape)}"
        )
    return sum(  # type: ignore[return-value]
        nn.functional.cross_entropy(v, labels[:, j]) for j, v in enumerate(logits.values())
    )


def adherence(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-head accuracy of ``predicted`` against the captions' ``labels`` (both
    ``[N, heads]``), and ``"all"``: the fraction of samples right on every head."""
    if predicted.shape != labels.shape:
        raise ValueError(
            f"adherence: predicted {tuple(predicted.shape)} and labels {tuple(labels.shape)} "
            f"differ"
        )
    right = predicted == labels
    out = {k: float(right[:, j].float().mean()) for j, k in enumerate(HEADS)}
    out["all"] = float(right.all(1).float().mean())
    return out


def load_scene_classifier(path: str | Path | None = None) -> AttributeClassifier:
    """The shipped attribute classifier, or the one at ``path`` (eval mode, float32)."""
    from guidekit.models.store import read, weight_path

    path = path or weight_path("scenes-classifier")
    state, meta = read(path)
    if not meta.get("format", "").startswith("guidekit-scenes-classifier/"):
        raise ValueError(f"{path} is not a scenes attribute classifier "
                         f"(format {meta.get('format')!r})")
    model = AttributeClassifier()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


@functools.lru_cache(maxsize=1)
def shipped_classifier() -> AttributeClassifier:
    """The shipped attribute classifier, loaded once per process (the demo and the sweep
    score every job with it)."""
    return load_scene_classifier()
