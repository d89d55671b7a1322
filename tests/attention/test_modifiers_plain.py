"""NAG and PLADIS on plain modules that call ``scaled_dot_product_attention`` themselves,
against references written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import guidekit
from guidekit import CFG, NAG, PLADIS, Cond, GuidanceValueError
from guidekit.attention import install

from ._modifiers_reference import D64, close, inputs
from ._tiny import BATCH, SelfAttention, tiny_plain
from .test_extrapolation import bisect_entmax

# -- plain modules (scaled_dot_product_attention) ----------------------------------------------------


class CrossAttention(torch.nn.Module):
    """Cross-attention through ``F.scaled_dot_product_attention`` ([B, H, L, D])."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = (torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim),
                                     torch.nn.Linear(dim, dim))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(ctx).chunk(2, dim=-1)
        o = F.scaled_dot_product_attention(self.split(self.q(h)), self.split(k), self.split(v))
        return self.out(o.transpose(1, 2).reshape(h.shape))


class TextModel(torch.nn.Module):
    """``model(x [B, 4, 8, 8], sigma [B], text [B, L, 16])``: one cross-attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.cross, self.mlp = (torch.nn.Linear(4, 16), CrossAttention(16, 2),
                                          torch.nn.Linear(16, 4))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(2).transpose(1, 2)) * sigma[:, None, None]
        h = h + self.cross(h, text)
        return self.mlp(h).transpose(1, 2).reshape(x.shape)


def nag_cross_reference(m: CrossAttention, h: torch.Tensor, ctx: torch.Tensor,
                        neg: torch.Tensor, phi: float, tau: float, a: float) -> torch.Tensor:
    def attend(c: torch.Tensor) -> torch.Tensor:
        k, v = m.kv(c).chunk(2, dim=-1)
        q, k, v = m.split(m.q(h)), m.split(k), m.split(v)
        return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v

    zp, zn = attend(ctx), attend(neg)
    zt = phi * zp - (phi - 1) * zn
    r = zt.abs().sum((1, 3), keepdim=True) / zp.abs().sum((1, 3), keepdim=True)
    z = a * zt * torch.clamp(r, max=tau) / r + (1 - a) * zp
    return m.out(z.transpose(1, 2).reshape(h.shape))


def test_nag_on_a_plain_module_reads_the_uncond_rows() -> None:
    torch.manual_seed(0)
    model = TextModel().double()
    x, _, _ = inputs()
    g = torch.Generator().manual_seed(9)
    cond = {"text": 3 * torch.randn(BATCH, 5, 16, generator=g, dtype=D64)}
    uncond = {"text": 3 * torch.randn(BATCH, 5, 16, generator=g, dtype=D64)}
    expr = CFG(2) | NAG(4, layers="cross")
    plan = guidekit.compile(expr)
    with torch.no_grad():
        with install(model, plan) as around_call:
            gd = guidekit.guide(plan, model, cond=cond, uncond=uncond, around_call=around_call)
            y = gd(x, 0.7)
        s = torch.full((BATCH,), 0.7, dtype=D64)
        u = model(x, s, uncond["text"])
        model.cross.forward = lambda h, ctx: nag_cross_reference(  # type: ignore[method-assign]
            model.cross, h, ctx, uncond["text"], 4.0, 2.5, 0.25
        )
        c = model(x, s, cond["text"])
        del model.cross.forward
    close(y, u + 2 * (c - u), 1e-9)
    # without u rows in the call a plain module cannot make the negative keys: it says so
    plan = guidekit.compile(Cond() | NAG(4, layers="cross"))
    with install(model, plan) as around_call, pytest.raises(GuidanceValueError, match="same model call"):
        guidekit.guide(plan, model, cond=cond, uncond=uncond, around_call=around_call)(x, 0.7)


def test_pladis_on_a_plain_self_attention_module() -> None:
    model = tiny_plain().double()
    x, _, _ = inputs()
    cond = {"y": torch.tensor([3, 7])}
    plan = guidekit.compile(Cond() | PLADIS(1.5, layers=1))
    with torch.no_grad():
        with install(model, plan, attention_class=SelfAttention) as around_call:
            y = guidekit.guide(plan, model, cond=cond, around_call=around_call)(x, 2.0)
        attn = model.blocks[1].attn

        def reference(h: torch.Tensor) -> torch.Tensor:
            q, k, v = (attn.split(t) for t in attn.qkv(h).chunk(3, dim=-1))
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            dense = logits.softmax(-1)
            out = (dense + 1.5 * (bisect_entmax(logits, 1.5) - dense)) @ v
            return attn.proj(attn.merge(out))

        attn.forward = reference  # type: ignore[method-assign]
        want = model(x, torch.full((BATCH,), 2.0, dtype=D64), cond["y"])
        del attn.forward
    close(y, want, 1e-9)
