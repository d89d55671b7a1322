"""Shared set-up of the k-diffusion adapter tests: a tiny float64 eps network and its schedule.

``EpsNet`` wrapped by k-diffusion's own ``DiscreteEpsDDPMDenoiser`` (the ``setup`` fixture:
main and weak denoisers, Karras sigmas, conditionings, a start latent), and a tiny attention
denoiser for the attention terms. k-diffusion is imported for real, inside the ``K`` fixture,
so the tests that need no k-diffusion (the adapter itself never imports it) run without it.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

B = 2
SHAPE = (2, 4, 4)


class EpsNet(torch.nn.Module):
    """``net(x_in, t, cond=[B, 8]) -> eps`` for ``[B, 2, 4, 4]`` inputs; ``t`` any shape."""

    def __init__(self, seed: int, hidden: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(41, hidden, generator=g, dtype=torch.float64) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(hidden, 32, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        h = torch.cat([x.flatten(1), cond, t / 1000], 1)
        return (torch.tanh(h @ self.a) @ self.b).view_as(x)


def alphas_cumprod() -> torch.Tensor:
    # Stable Diffusion's "scaled_linear" DDPM schedule: sigma from 0.029 to 14.6
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.fixture(scope="module")
def K():
    """k-diffusion itself (a plain import: the environment must provide it)."""
    return importlib.import_module("k_diffusion")


@pytest.fixture(scope="module")
def setup(K):
    ac = alphas_cumprod()
    main, weak = EpsNet(0), EpsNet(1, hidden=4)
    return {
        "ac": ac, "main": main, "weak": weak,
        "den": K.external.DiscreteEpsDDPMDenoiser(main, ac, quantize=False),
        "weak_den": K.external.DiscreteEpsDDPMDenoiser(weak, ac, quantize=False),
        "sigmas": K.sampling.get_sigmas_karras(5, 0.03, 14.6, rho=7).double(),
        "cond": torch.randn(B, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
        "uncond": torch.zeros(B, 8, dtype=torch.float64),
        "x": torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
    }


class Attention(torch.nn.Module):
    """Two-head self-attention through ``F.scaled_dot_product_attention`` ([B, H, L, D])."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=torch.float64)
        with torch.no_grad():
            self.qkv.weight[: 2 * dim].mul_(4.0)  # peaked maps, so PAG's identity map matters

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = (t.view(b, n, 2, d // 2).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class AttentionDenoiser(torch.nn.Module):
    """An x0 denoiser ``(x [B, 2, 4, 4], sigma [B], cond [B, 8])`` attending over 16 pixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.inp = torch.nn.Linear(2, 8, dtype=torch.float64)
        self.attn = Attention()
        self.out = torch.nn.Linear(8, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c_in = (sigma**2 + 1).rsqrt().view(-1, 1, 1)
        h = self.inp(x.flatten(2).transpose(1, 2) * c_in) + cond[:, None]
        h = h + self.attn(h)
        return (x.flatten(2) * c_in**2 + self.out(h).transpose(1, 2)).view_as(x)
