"""ICG on the shipped digit models: the pool is every real label (never the null class)."""

from __future__ import annotations

import pytest
import torch

from guidekit import ICG
from guidekit.models import Bundled, load, sample
from guidekit.models.sampling import initial_state
from guidekit.pools import pool_indices

# batched and separate calls round differently; see tests/models/test_sampling.py
ATOL = 2e-3
LABELS = torch.tensor([0, 3, 7, 9])


@pytest.fixture(scope="module")
def eps() -> Bundled:
    return load("eps")


def test_icg_samples_match_a_hand_written_loop(eps: Bundled) -> None:
    """``u_r + w (c - u_r)``, ``u_r`` under one real label per sample per step, drawn by the
    run's seeded draws (guidekit.pools' contract), in one call of 2 B rows per step."""
    w, steps, seed = 2.5, 4, 11
    res = sample(eps, ICG(w), LABELS, steps=steps, seed=seed)
    assert [c.rows for c in res.calls] == [2 * len(LABELS)] * steps
    y, sig, x = initial_state(eps, LABELS, steps, seed)
    with torch.no_grad():
        for i in range(steps):
            sr = torch.full((len(y),), float(sig[i]))
            drawn = pool_indices(eps.classes, len(y), seed, i, "icg")  # real labels 0..9
            c, u_r = eps.model_fn(x, sr, y), eps.model_fn(x, sr, drawn)
            x = x + (sig[i + 1] - sig[i]) * (u_r + w * (c - u_r))
    torch.testing.assert_close(res.images, x.clamp(-1, 1), rtol=0, atol=ATOL)


def test_icg_never_draws_the_null_class(eps: Bundled) -> None:
    seen: list[torch.Tensor] = []

    def spy(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs["class_labels"].clone())

    handle = eps.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        sample(eps, ICG(3), LABELS.repeat(4), steps=6, seed=0)
    finally:
        handle.remove()
    b = len(LABELS) * 4
    assert all(s.shape == (2 * b,) and torch.equal(s[:b], LABELS.repeat(4)) for s in seen)
    drawn = torch.cat([s[b:] for s in seen])
    assert drawn.max() < eps.null_class and len(set(drawn.tolist())) == eps.classes
