"""The scenes denoiser (issue 13) under guidekit: a random-init PixArt with cross-attention
over caption tokens, guided by CFG + NAG and CFG + EMAG with a named negative caption.

Oracles: hand-written Euler loops, one branch per model call, with NAG written out as an
explicit-map cross-attention processor (the paper's equations, https://arxiv.org/abs/2505.21179)
and EMAG's moving average at ``beta = 0`` (the map replaced by itself: no change).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, EMAG, NAG, Cond, GuidanceValueError, Uncond
from guidekit.attention import install
from guidekit.attention.layers import cross_attention_table, layer_table
from guidekit.models.scenes.model import SceneModel

D64 = torch.float64
B = 2
STEPS = 3
CAPTIONS = ["a small red circle on the left on a black background",
            "a large blue square left of a small green triangle on a grey background"]
NEGATIVES = ["a large yellow circle at the top on a white background",
             "a small purple square on the right on a black background"]


def _woken(seed: int = 0) -> SceneModel:
    """A small random-init model whose zero-initialised outputs are made non-zero (else the
    cross-attention and the output are 0 and no guidance can show), in float64."""
    m = SceneModel.fresh(seed=seed, layers=2, head_dim=16, text_width=32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.networks.parameters():
            if not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        for block in m.transformer.transformer_blocks:  # peaked maps, as in tests/attention
            for attn in (block.attn1, block.attn2):
                attn.to_q.weight.mul_(3)
                attn.to_k.weight.mul_(3)
    m.networks.to(D64)
    return m


@pytest.fixture(scope="module")
def model() -> SceneModel:
    return _woken()


def _x0() -> torch.Tensor:
    return torch.randn((B, 3, 32, 32), generator=torch.Generator().manual_seed(7), dtype=D64)


def test_the_denoiser_has_64_image_tokens_and_cross_attention() -> None:
    m = SceneModel.fresh(layers=2, head_dim=16, text_width=32)
    t = m.transformer
    assert (t.config.sample_size // t.config.patch_size) ** 2 == 64
    cross = cross_attention_table(t).paths
    assert cross == ("transformer_blocks.0.attn2", "transformer_blocks.1.attn2")
    assert layer_table(t).paths == ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")
    # zero-initialised output: a fresh model predicts 0 whatever the caption
    with torch.no_grad():
        out = m.model_fn(torch.randn(B, 3, 32, 32), torch.full((B,), 0.5),
                         **m.conditions(CAPTIONS))
    assert out.shape == (B, 3, 32, 32) and not out.any()


def test_the_prediction_depends_on_the_caption_and_not_on_padding(model: SceneModel) -> None:
    x, s = _x0(), torch.full((B,), 0.6, dtype=D64)
    with torch.no_grad():
        a = model.model_fn(x, s, **model.conditions(CAPTIONS))
        b = model.model_fn(x, s, **model.conditions(NEGATIVES))
        c = model.conditions(CAPTIONS)
        c["encoder_hidden_states"] = torch.where(
            c["encoder_attention_mask"].bool()[..., None], c["encoder_hidden_states"], 5.0)
        padded = model.model_fn(x, s, **c)
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(padded, a, rtol=0, atol=1e-9)


# -- the reference: one branch per call, NAG written out -------------------------------------------


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


class RefCross:
    """PixArt's cross-attention with explicit maps; with ``nag=(phi, tau, alpha)`` the output
    is extrapolated away from the same queries' attention over ``negative`` (layer context
    ``[B, L, C]``, additive mask ``[B, 1, L]``)."""

    def __init__(self, nag: tuple[float, float, float] | None = None,
                 negative: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.nag, self.negative = nag, negative

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        assert encoder_hidden_states is not None and attention_mask is not None
        q = _heads(attn.to_q(hidden_states), attn.heads)

        def attend(ctx: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            k, v = _heads(attn.to_k(ctx), attn.heads), _heads(attn.to_v(ctx), attn.heads)
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[:, None]
            return logits.softmax(-1) @ v

        z = attend(encoder_hidden_states, attention_mask)
        if self.nag is not None:
            assert self.negative is not None
            phi, tau, alpha = self.nag
            zn = attend(*self.negative)
            zt = phi * z - (phi - 1) * zn
            r = zt.abs().sum((1, 3), keepdim=True) / z.abs().sum((1, 3), keepdim=True)
            z = alpha * (zt * torch.clamp(r, max=tau) / r) + (1 - alpha) * z
        b, _, n, _ = z.shape
        return attn.to_out[1](attn.to_out[0](z.transpose(1, 2).reshape(b, n, -1)))


@contextlib.contextmanager
def _cross_processors(m: SceneModel, proc: Any) -> Iterator[None]:
    blocks = m.transformer.transformer_blocks
    saved = [blk.attn2.processor for blk in blocks]
    try:
        for blk in blocks:
            blk.attn2.set_processor(proc)
        yield
    finally:
        for blk, p in zip(blocks, saved):
            blk.attn2.set_processor(p)


def _layer_negative(m: SceneModel, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The negative caption as PixArt's blocks see it: projected, mask made additive."""
    ctx = m.transformer.caption_projection(cond["encoder_hidden_states"])
    bias = (1 - cond["encoder_attention_mask"].to(D64)) * -10000.0
    return ctx, bias[:, None]


def _euler(d: Callable[[torch.Tensor, float], torch.Tensor], sig: list[float]) -> torch.Tensor:
    x = _x0()
    for i in range(STEPS):
        x = x + (sig[i + 1] - sig[i]) * d(x, sig[i])
    return x


def _guided(m: SceneModel, expr: Any, conds: dict[str, Any], **kw: Any) -> tuple[Any, list]:
    plan = m.compile(expr, **kw)
    sig = m.sigmas(STEPS)
    with torch.no_grad(), install(m.transformer, plan) as around:
        g = guidekit.guide(plan, m.model_fn, cond=conds["cond"], uncond=conds.get("uncond"),
                           conds={k: v for k, v in conds.items() if k not in ("cond", "uncond")},
                           sigmas=sig, around_call=around)
        x = _euler(g, sig.tolist())
    return x, list(g.calls)


def _branch(m: SceneModel, x: torch.Tensor, s: float, cond: dict[str, torch.Tensor],
            proc: Any = None) -> torch.Tensor:
    rows = torch.full((x.shape[0],), s, dtype=D64)
    with contextlib.ExitStack() as stack:
        if proc is not None:
            stack.enter_context(_cross_processors(m, proc))
        return m.model_fn(x, rows, **cond)


@pytest.fixture(scope="module")
def conds(model: SceneModel) -> dict[str, dict[str, torch.Tensor]]:
    return {"cond": model.conditions(CAPTIONS), "uncond": model.conditions([""] * B),
            "neg": model.conditions(NEGATIVES)}


def test_cfg_with_a_negative_caption_plus_nag_equals_the_written_out_equations(
        model: SceneModel, conds) -> None:
    c, n = conds["cond"], conds["neg"]
    y, calls = _guided(model, CFG(3, negative="neg") | NAG(4, negative="neg"),
                       {"cond": c, "neg": n})
    assert [(r.rows, r.branches) for r in calls] == [(2 * B, ("c", "neg"))] * STEPS
    with torch.no_grad():
        ref_nag = RefCross((4.0, 2.5, 0.25), _layer_negative(model, n))

        def d(x: torch.Tensor, s: float) -> torch.Tensor:
            neg = _branch(model, x, s, n, RefCross())
            return neg + 3 * (_branch(model, x, s, c, ref_nag) - neg)

        ref = _euler(d, model.sigmas(STEPS).tolist())
        plain, _ = _guided(model, CFG(3, negative="neg"), {"cond": c, "neg": n})
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-9)
    assert (y - plain).abs().max() > 1e-3  # NAG really changed the run


def test_nag_away_from_a_named_caption_beside_plain_cfg(model: SceneModel, conds) -> None:
    """CFG(3) - (Cond('neg') - Uncond()) | NAG(4, negative='neg'): c, u and neg share one
    call; NAG's negative is the neg rows' own context."""
    c, u, n = conds["cond"], conds["uncond"], conds["neg"]
    expr = (CFG(3) - (Cond("neg") - Uncond())) | NAG(4, negative="neg")
    y, calls = _guided(model, expr, conds)
    assert [(r.rows, r.branches) for r in calls] == [(3 * B, ("c", "u", "neg"))] * STEPS
    with torch.no_grad():
        ref_nag = RefCross((4.0, 2.5, 0.25), _layer_negative(model, n))

        def d(x: torch.Tensor, s: float) -> torch.Tensor:
            cc, uu = _branch(model, x, s, c, ref_nag), _branch(model, x, s, u)
            return uu + 3 * (cc - uu) - (_branch(model, x, s, n) - uu)

        ref = _euler(d, model.sigmas(STEPS).tolist())
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-9)


def test_nag_without_the_negative_rows_builds_their_mask_as_pixart_does(
        model: SceneModel, conds) -> None:
    """The negative is not one of CFG's rows: guidekit projects its caption itself and makes
    its mask additive as PixArt does before its blocks ((1 - m) * -10000)."""
    c, u, n = conds["cond"], conds["uncond"], conds["neg"]
    y, calls = _guided(model, CFG(3) | NAG(4, negative="neg"), conds)
    assert [(r.rows, r.branches) for r in calls] == [(2 * B, ("c", "u"))] * STEPS
    alone, alone_calls = _guided(model, Cond() | NAG(4), {"cond": c, "uncond": u})
    assert [r.rows for r in alone_calls] == [B] * STEPS  # NAG alone adds no rows
    with torch.no_grad():
        away_neg = RefCross((4.0, 2.5, 0.25), _layer_negative(model, n))
        away_u = RefCross((4.0, 2.5, 0.25), _layer_negative(model, u))

        def d(x: torch.Tensor, s: float) -> torch.Tensor:
            uu = _branch(model, x, s, u, RefCross())
            return uu + 3 * (_branch(model, x, s, c, away_neg) - uu)

        ref = _euler(d, model.sigmas(STEPS).tolist())
        ref_alone = _euler(lambda x, s: _branch(model, x, s, c, away_u),
                           model.sigmas(STEPS).tolist())
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(alone, ref_alone, rtol=0, atol=1e-9)
    # without its caption mask the negative cannot be masked: refused, naming the key
    bare = {k: v for k, v in n.items() if k != "encoder_attention_mask"}
    with pytest.raises(GuidanceValueError, match="encoder_attention_mask"):
        _guided(model, CFG(3) | NAG(4, negative="neg"), {**conds, "neg": bare})


def test_cfg_with_a_negative_caption_plus_emag(model: SceneModel, conds) -> None:
    c, n = conds["cond"], conds["neg"]
    both = {"cond": c, "neg": n}
    plain, _ = _guided(model, CFG(3, negative="neg"), both)
    with torch.no_grad():
        def d(x: torch.Tensor, s: float) -> torch.Tensor:
            neg = _branch(model, x, s, n)
            return neg + 3 * (_branch(model, x, s, c) - neg)

        ref = _euler(d, model.sigmas(STEPS).tolist())
    torch.testing.assert_close(plain, ref, rtol=0, atol=1e-9)
    # beta = 0: the average IS this step's map, replacing it changes nothing
    same, calls = _guided(model, CFG(3, negative="neg") + EMAG(2, beta=0.0), both)
    assert [r.rows for r in calls] == [3 * B] * STEPS
    assert calls[0].branches[:2] == ("c", "neg") and "EMA" in calls[0].branches[2]
    torch.testing.assert_close(same, ref, rtol=0, atol=1e-9)
    moved, _ = _guided(model, CFG(3, negative="neg") + EMAG(2), both)
    assert torch.isfinite(moved).all()
    assert (moved - ref).abs().max() > 1e-3  # the average lags from the second step on
