"""Named conditionings through the k-diffusion adapter, with k-diffusion's own samplers:
Toward / Perp-Neg against hand-written loops, ICG's pool drawn per step."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, ICG, PerpNeg, Toward
from guidekit.adapters.kdiffusion import KDiffusionGuided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kdiffusion_helpers as helpers  # noqa: E402
from _kdiffusion_helpers import B  # noqa: E402

K, setup = helpers.K, helpers.setup


def _perp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample: the part of ``a`` perpendicular to ``b``."""
    af, bf = a.flatten(1), b.flatten(1)
    return (af - (af * bf).sum(1, keepdim=True) / (bf * bf).sum(1, keepdim=True) * bf).view_as(a)


@pytest.fixture(scope="module")
def neg(setup: dict[str, Any]) -> torch.Tensor:
    return torch.randn(B, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


@torch.no_grad()
@pytest.mark.parametrize("which", ["negative prompt", "perp-neg"])
def test_named_negatives_match_a_hand_written_euler_loop(K, setup, neg, which) -> None:
    den, sigmas, w, s = setup["den"], setup["sigmas"], 5.0, 2.0
    expr = CFG(w) - Toward(s, "neg") if which == "negative prompt" else PerpNeg(w, neg_scale=s)
    guided = KDiffusionGuided(
        expr, den, cond=setup["cond"], uncond=setup["uncond"], conds={"neg": neg}, sigmas=sigmas
    )
    x0 = setup["x"] * sigmas[0]
    out = K.sampling.sample_euler(guided, x0, sigmas, disable=True)
    assert [c.rows for c in guided.calls] == [3 * B] * (len(sigmas) - 1)
    x = x0
    for i in range(len(sigmas) - 1):
        sig = sigmas[i] * x.new_ones(B)
        c, u, n = (den(x, sig, cond=k) for k in (setup["cond"], setup["uncond"], neg))
        if which == "negative prompt":
            d = u + w * (c - u) - s * (n - u)
        else:
            d = u + w * ((c - u) - s * _perp(n - u, c - u))
        x = x + (x - d) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    torch.testing.assert_close(out, x, rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_icg_draws_one_pool_row_per_sample_per_step_under_heun(K, setup) -> None:
    den, sigmas, w = setup["den"], setup["sigmas"], 3.0
    pool = torch.randn(6, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recorded(x: torch.Tensor, sigma: torch.Tensor, *, cond: torch.Tensor) -> torch.Tensor:
        out = den(x, sigma, cond=cond)
        calls.append((sigma.clone(), cond.clone(), out.clone()))
        return out

    guided = KDiffusionGuided(ICG(w), recorded, cond=setup["cond"], conds={"icg": pool},
                              sigmas=sigmas, seed=4)
    returned: list[torch.Tensor] = []

    def model(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        returned.append(guided(x, sigma, **kw))
        return returned[-1]

    K.sampling.sample_heun(model, setup["x"] * sigmas[0], sigmas, disable=True)
    assert len(calls) == len(returned) == 2 * (len(sigmas) - 1) - 1
    drawn_at: dict[float, list[int]] = {}
    for (sigma, cond, out), y in zip(calls, returned):
        assert cond.shape == (2 * B, 8) and torch.equal(cond[:B], setup["cond"])
        # every u_r row is exactly one pool member
        idx = [int((pool == row).all(1).nonzero()) for row in cond[B:]]
        # the same level (Heun's corrector, then the next step's predictor) draws once
        assert drawn_at.setdefault(float(sigma[0]), idx) == idx
        c, u_r = out[:B], out[B:]
        torch.testing.assert_close(y, u_r + w * (c - u_r), rtol=1e-12, atol=1e-12)
    assert len({tuple(v) for v in drawn_at.values()}) > 1
