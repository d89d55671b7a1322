"""Fake models with known per-branch outputs, shared by the oracle tests.

Each conditioning carries an integer ``tag`` tensor (one id per sample, distinct per
conditioning), so a fake model can tell which branch a row belongs to and return a fixed,
known tensor for it. The oracles then recompute those tensors with :func:`branch_value`
and apply the paper's formulas in numpy float64; guidekit is only ever used through
``guidekit.compile`` + ``guidekit.guide`` / ``plan.step``.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

#: first tag of each conditioning; sample ``i`` of conditioning ``name`` has tag ``base + i``
TAG_BASE = {"cond": 1000, "uncond": 2000, "style": 3000, "neg": 4000, "neg2": 5000, "cond2": 6000}
SHAPE = (2, 3, 4)  # non-batch shape of x and of every prediction
BATCH = 3


def tags(name: str, batch: int = BATCH) -> torch.Tensor:
    """The ``tag`` tensor of conditioning ``name``: int64, so CADS leaves it alone."""
    return torch.arange(batch, dtype=torch.int64) + TAG_BASE[name]


def conditioning(name: str, *, batch: int = BATCH, **extra: torch.Tensor) -> dict[str, Any]:
    """A conditioning dict holding the branch tag plus ``extra`` tensors."""
    return {"tag": tags(name, batch), **extra}


def branch_value(model: str, tag: int, sigma: float, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """The fixed output of ``model`` for the row tagged ``tag`` at noise level ``sigma``.

    Per-sample scales and offsets differ (``tag % 4``, ``tag % 3``) so that formulas taking
    statistics per sample are told apart from ones taking them over the whole batch.
    """
    seed = zlib.crc32(f"{model}|{tag}|{sigma:.12e}".encode())
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * (1.0 + tag % 4) + 0.5 * (tag % 3)


def branch(model: str, cond: str, sigma: float, batch: int = BATCH) -> np.ndarray:
    """What the fake ``model`` returns for every sample of conditioning ``cond`` at ``sigma``."""
    base = TAG_BASE[cond]
    return np.stack([branch_value(model, base + i, sigma) for i in range(batch)])


def x_at(step: int, batch: int = BATCH, scale: float = 1.0) -> np.ndarray:
    """A reproducible sampler state for ``step`` (the oracles use the same array)."""
    rng = np.random.default_rng(12345 + step)
    return rng.standard_normal((batch, *SHAPE)) * scale


class FakeModel:
    """``model(x, sigma, **cond)`` returning :func:`branch_value` per row; records its calls."""

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.calls: list[dict[str, Any]] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],)
        self.calls.append(
            {
                "rows": x.shape[0],
                "x": x.detach().clone(),
                "sigma": sigma.detach().clone(),
                **{k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                   for k, v in cond.items()},
            }
        )
        s = float(sigma[0])
        rows = [branch_value(self.name, int(t), s) for t in cond["tag"].tolist()]
        return torch.from_numpy(np.stack(rows)).to(x.dtype)

    def row_tags(self) -> list[list[int]]:
        """The tags each call received, call by call."""
        return [c["tag"].tolist() for c in self.calls]


def t64(a: np.ndarray) -> torch.Tensor:
    """numpy -> float64 torch tensor (the dtype every oracle test runs guidekit in)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def np64(t: torch.Tensor) -> np.ndarray:
    """guidekit's output as a float64 numpy array."""
    assert t.dtype == torch.float64, t.dtype
    return t.detach().numpy()


def noise_coefficients(noise: str, sigma: float) -> tuple[float, float]:
    """``(a, b)`` with ``x = a x0 + b n``, written out from methods.md, not from guidekit."""
    if noise == "ve":  # k-diffusion / EDM: x = x0 + sigma n
        return 1.0, sigma
    if noise == "vp":  # DDPM with sigma = sqrt((1 - abar) / abar): a = sqrt(abar)
        a = 1.0 / np.sqrt(1.0 + sigma**2)
        return a, sigma * a
    if noise == "flow":  # rectified flow: x = (1 - sigma) x0 + sigma n
        return 1.0 - sigma, sigma
    raise AssertionError(noise)
