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
    #: the noise coefficients ``(a, b)`` at ``sigma``, made on first use
    _ab: tuple[float, float] | None = None

    def space_of(self, space: str) -> str:
        return self.prediction if space == "native" else space

    def coefficients(self) -> tuple[float, float]:
        """``(a, b)`` with ``x = a x0 + b n`` at this step's ``sigma``."""
        ab = self._ab
        if ab is None:
            ab = self._ab = self.noise.coefficients(self.sigma)
        return ab

    def value(self, branch: Branch, space: str = "native") -> torch.Tensor:
        if space == "native" or space == self.prediction:
            return self.native[branch]
        key = (branch, space)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = self.convert(self.native[branch], self.prediction, space)
        return out

    def convert(self, pred: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        src, dst = self.space_of(src), self.space_of(dst)
        if src == dst:
            return pred
        return convert(pred, src, dst, self.x, self.sigma, self.noise, self.coefficients())
