"""The bundled models loaded once per run, and the digit labels the demo and the sweep sample."""

from __future__ import annotations

from typing import Any

import torch

#: Digit classes sampled by the demo and the sweep (one column each in the demo's grid).
DIGITS = 10


def weak_name(model: str) -> str:
    """The weaker sibling that serves as Autoguidance's ``weak`` model."""
    return f"{model}-weak"


class ModelCache:
    """Loads each bundled model once, on ``device``: the digit models through
    ``guidekit.models.load``, the scenes models through ``load_scene_model``."""

    def __init__(self, device: Any = "cpu"):
        self.device = device
        self._models: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        if name not in self._models:
            from guidekit.models import load
            from guidekit.models.store import SCENE_MODELS

            if name in SCENE_MODELS:
                from guidekit.models.scenes.model import load_scene_model

                self._models[name] = load_scene_model(name=name, device=self.device)
            else:
                self._models[name] = load(name, device=self.device)
        return self._models[name]


def digit_labels(per_digit: int) -> torch.Tensor:
    """``per_digit`` samples of every digit, digit-major: ``0 0 .. 1 1 .. 9 9``."""
    return torch.arange(DIGITS).repeat_interleave(per_digit)
