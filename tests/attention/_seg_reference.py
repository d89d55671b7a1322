"""SEG's independent references for the attention tests: NumPy query blur and oracle runs.

The reference blurs the queries with NumPy (an explicit 2-D kernel, ``np.pad(mode="reflect")``
and a double loop over the kernel taps, written from the SEG paper and methods.md, not from
guidekit) and takes an explicit softmax, on each layer's token grid given BY THE TEST
(guidekit derives it from the model input). ``run_and_compare`` runs guidekit's ONE call of
``3 x B`` rows against a reference of separate model calls at every step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

import guidekit
from guidekit.attention import install

from ._tiny import BATCH

TOL = 1e-9
H, W = 8, 12  # a non-square latent
SIGMAS = (5.0, 2.0, 0.5, 0.0)


# -- an independent NumPy reference of SEG's query blur ------------------------------------------


def np_taps(k: int, sigma: float) -> np.ndarray:
    x = np.arange(k, dtype=np.float64) - (k - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def np_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Blur ``img [C, h, w]`` as the SEG paper's code does: kernel ``ceil(6 sigma) + 1``
    made odd, at most the axis length (plus one when even), reflect padding, 2-D kernel
    (outer product), explicit sum over the taps. ``sigma > 9999``: the mean."""
    if sigma > 9999:
        return np.broadcast_to(img.mean(axis=(1, 2), keepdims=True), img.shape).copy()
    c = math.ceil(6 * sigma)
    k = c if c % 2 == 1 else c + 1
    _, h, w = img.shape
    kh = min(k, h if h % 2 else h + 1)
    kw = min(k, w if w % 2 else w + 1)
    kernel = np.outer(np_taps(kh, sigma), np_taps(kw, sigma))
    padded = np.pad(img, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)), mode="reflect")
    out = np.zeros_like(img)
    for a in range(kh):
        for b in range(kw):
            out += kernel[a, b] * padded[:, a : a + h, b : b + w]
    return out


def np_seg_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, grid: tuple[int, int],
                     sigma: float) -> np.ndarray:
    """``[b, n, heads, d]`` queries blurred per (sample, head, channel) over ``grid``, then
    softmax attention over the keys (``[b, m, heads, d]``); returns ``[b, n, heads, d]``."""
    b, n, heads, d = q.shape
    h, w = grid
    assert h * w == n
    qb = np.empty_like(q)
    for i in range(b):
        img = q[i].transpose(1, 2, 0).reshape(heads * d, h, w)  # channel-major images
        qb[i] = np_blur(img, sigma).reshape(heads, d, n).transpose(2, 0, 1)
    logits = np.einsum("bnhd,bmhd->bhnm", qb, k) / math.sqrt(d)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhnm,bmhd->bnhd", p, v)


def to_np(t: torch.Tensor, heads: int) -> np.ndarray:
    b, n, c = t.shape
    return t.detach().double().numpy().reshape(b, n, heads, c // heads)


def from_np(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    b, n, heads, d = a.shape
    return torch.from_numpy(a.reshape(b, n, heads * d)).to(like.dtype)


class NumpySEGProcessor:
    """Self-attention of a diffusers ``Attention`` (no norms, 3-D input) with NumPy-blurred
    queries on the grid the test names."""

    def __init__(self, grid: tuple[int, int], sigma: float) -> None:
        self.grid, self.sigma = grid, sigma

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None) -> torch.Tensor:
        assert encoder_hidden_states is None and attn.norm_q is None
        h = attn.heads
        q, k, v = (to_np(f(hidden_states), h) for f in (attn.to_q, attn.to_k, attn.to_v))
        out = from_np(np_seg_attention(q, k, v, self.grid, self.sigma), hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def seg_processors(model: torch.nn.Module, grids: dict[str, tuple[int, int]],
                   sigma: float) -> Iterator[None]:
    saved = {p: model.get_submodule(p).get_processor() for p in grids}
    try:
        for p, g in grids.items():
            model.get_submodule(p).set_processor(NumpySEGProcessor(g, sigma))
        yield
    finally:
        for p, proc in saved.items():
            model.get_submodule(p).set_processor(proc)


# -- guidekit's one call against separate reference calls ----------------------------------------


def run_and_compare(
    plan: guidekit.Plan, module: torch.nn.Module, fn: Callable[..., torch.Tensor],
    cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None,
    reference: Callable[[torch.Tensor, float], torch.Tensor], sigmas: tuple[float, ...] = SIGMAS,
    shape: tuple[int, ...] = (BATCH, 4, H, W), **install_kw: Any,
) -> tuple[float, guidekit.Guided]:
    """Euler over ``sigmas``; at every step compare with ``reference`` at the same ``x``."""
    torch.manual_seed(1)
    x = sigmas[0] * torch.randn(*shape, dtype=torch.float64)
    worst = 0.0
    with torch.no_grad(), install(module, plan, **install_kw) as around:
        guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond or cond, around_call=around)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            y = guided(x, s)
            assert torch.isfinite(y).all()
            ref = reference(x, s)
            worst = max(worst, (y - ref).abs().max().item())
            x = x + (s_next - s) * y
    return worst, guided


def seg_reference(
    module: torch.nn.Module, fn: Callable[..., torch.Tensor], cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None, w: float, s: float,
    grids: dict[str, tuple[int, int]], blur: float, gaps: list[float],
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """``u + w (c - u) + s (c - g)`` (``c + s (c - g)`` without ``uncond``), three calls."""

    def ref(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        c = fn(x, sig, **cond)
        with seg_processors(module, grids, blur):
            g = fn(x, sig, **cond)
        gaps.append((c - g).abs().max().item())
        if uncond is None:
            return c + s * (c - g)
        u = fn(x, sig, **uncond)
        return u + w * (c - u) + s * (c - g)

    return ref


def texts(width: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return (
        {"text": torch.randn(BATCH, 5, width, generator=g, dtype=torch.float64)},
        {"text": torch.randn(BATCH, 5, width, generator=g, dtype=torch.float64) * 0.1},
    )


def check_calls(guided: guidekit.Guided, steps: int, branches: int) -> None:
    """One model call per step, of ``branches x B`` rows."""
    assert len(guided.calls) == steps
    assert all(c.rows == branches * BATCH and len(c.branches) == branches for c in guided.calls)
