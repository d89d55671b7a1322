"""What a term or post-processor sees while one model call is combined."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from guidekit.branch import Branch
from guidekit.spaces import Noise, convert


@attrs.define(eq=False)
class StepContext:
    """Branch outputs and step facts for one combine.

    ``native`` holds each computed branch in the model's ``prediction`` space; ``value``
    converts (and caches) on demand. ``level`` is the index of the sampler step (see
    :mod:`guidekit.state`); ``coefs`` the affine coefficients active at this noise level.
    """

    x: torch.Tensor
    sigma: float
    level: int
    seed: int
    prediction: str
    noise: Noise
    coefs: Mapping[Any, float]
    native: Mapping[Branch, torch.Tensor]
    #: the step's :class:`~guidekit.schedules.Level` (noise level and the run's schedule),
    #: set where the plan holds schedules (``None`` otherwise)
    where: Any = None
    _cache: dict[tuple[Branch, str], torch.Tensor] = attrs.field(factory=dict)

    def space_of(self, space: str) -> str:
        return self.prediction if space == "native" else space

    def value(self, branch: Branch, space: str = "native") -> torch.Tensor:
        space = self.space_of(space)
        if space == self.prediction:
            return self.native[branch]
        key = (branch, space)
        if key not in self._cache:
            self._cache[key] = self.convert(self.native[branch], self.prediction, space)
        return self._cache[key]

    def convert(self, pred: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        return convert(pred, self.space_of(src), self.space_of(dst), self.x, self.sigma, self.noise)
