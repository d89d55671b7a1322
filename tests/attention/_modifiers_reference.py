"""The modifiers' reference for the attention tests: explicit maps, one branch at a time.

``RefCross`` is an explicit-map cross-attention processor (sparse maps by bisection);
``branch`` runs one branch through the model with given processors and ``guided`` the same
expression through guidekit's one batched call, so a test combines the guidance by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

import guidekit
from guidekit.attention import install

from ._tiny import BATCH, pixart_fn, tiny_pixart, tiny_unet, unet_fn, value_only
from .test_extrapolation import bisect_entmax

D64 = torch.float64


def inputs(dtype: torch.dtype = D64, seed: int = 0, tokens: int = 5, width: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, 8, 8, generator=g).to(dtype)
    cond = {"text": torch.randn(BATCH, tokens, width, generator=g).to(dtype)}
    uncond = {"text": 0.5 * torch.randn(BATCH, tokens, width, generator=g).to(dtype)}
    return x, cond, uncond


def model_and_fn(kind: str, dtype: torch.dtype = D64) -> tuple[torch.nn.Module, Any]:
    model = (tiny_pixart() if kind == "pixart" else tiny_unet()).to(dtype)
    return model, (pixart_fn(model) if kind == "pixart" else unet_fn(model))


def context_of(model: torch.nn.Module, text: torch.Tensor) -> torch.Tensor:
    """The cross-attention context the model makes of a text tensor (PixArt projects it)."""
    proj = getattr(model, "caption_projection", None)
    return text if proj is None else proj(text)


# -- the reference: explicit maps, one branch at a time ----------------------------------------------


class RefCross:
    """A diffusers cross-attention with explicit maps, written for these tests.

    ``mode``: None (softmax), "pladis" or "gag" (with ``lam``, ``eta``, ``zeta``,
    ``alpha`` of the sparse map); ``nag`` (phi, tau, alpha) extrapolates away from the
    output for ``negative`` (the layer context of the negative prompt, ``[B, L, C]``).
    """

    def __init__(self, mode: str | None = None, lam: float = 0.0, eta: float | None = None,
                 zeta: float = 0.0, alpha: float = 1.5, nag: tuple | None = None,
                 negative: torch.Tensor | None = None) -> None:
        self.mode, self.lam, self.eta, self.zeta, self.alpha = mode, lam, eta, zeta, alpha
        self.nag, self.negative = nag, negative

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: Any = None) -> torch.Tensor:
        assert attention_mask is None and encoder_hidden_states is not None
        assert attn.group_norm is None and attn.spatial_norm is None and not attn.norm_cross
        assert not attn.residual_connection and attn.rescale_output_factor == 1
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            b, n, c = t.shape
            return t.view(b, n, heads, c // heads).transpose(1, 2)

        q = split(attn.to_q(hidden_states))

        def attention(ctx: torch.Tensor) -> torch.Tensor:
            k, v = split(attn.to_k(ctx)), split(attn.to_v(ctx))
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            dense = logits.softmax(-1)
            if self.mode is None:
                return dense @ v
            sparse = bisect_entmax(logits, self.alpha).to(q.dtype)
            if self.mode == "pladis":
                return ((1 - self.lam) * dense + self.lam * sparse) @ v
            s, d = sparse @ v, dense @ v
            delta = s - d
            par = (delta * s).sum(-1, keepdim=True) / (s * s).sum(-1, keepdim=True) * s
            g = par + self.zeta * (delta - par)
            norm = g.norm(dim=-1, keepdim=True)
            clamp = 1.0 if self.eta is None else torch.clamp(self.eta / norm, max=1.0)
            return s + self.lam * clamp * g

        z = attention(encoder_hidden_states)
        if self.nag is not None:
            phi, tau, a = self.nag
            zn = attention(self.negative)
            zt = phi * z - (phi - 1) * zn
            r = zt.abs().sum((1, 3), keepdim=True) / z.abs().sum((1, 3), keepdim=True)
            zh = zt * torch.clamp(r, max=tau) / r
            z = a * zh + (1 - a) * z
        b, _, n, _ = z.shape
        out = z.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def cross_layers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith("attn2") and m is not None]


@contextmanager
def processors_on(model: torch.nn.Module, procs: dict[str, Any]) -> Iterator[None]:
    saved = {p: model.get_submodule(p).processor for p in procs}
    try:
        for p, proc in procs.items():
            model.get_submodule(p).set_processor(proc)
        yield
    finally:
        for p, proc in saved.items():
            model.get_submodule(p).set_processor(proc)


def branch(model, fn, x, sigma, text, procs: dict[str, Any] | None = None,
           perturbed: tuple[str, ...] = ()) -> torch.Tensor:
    """One branch alone: reference processors in the named cross-attention layers and
    PAG's identity map (the tests' own value_only) in ``perturbed``."""
    s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype)
    with processors_on(model, procs or {}), value_only(model, perturbed):
        return fn(x, s, text)  # type: ignore[no-any-return]


def guided(model, fn, expr, x, sigma, cond, uncond, **kw: Any):
    plan = guidekit.compile(expr, **kw)
    with install(model, plan) as around_call:
        g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around_call)
        y = g(x, sigma)
    return y, g.calls


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), f"max abs error {err:.3g}"
