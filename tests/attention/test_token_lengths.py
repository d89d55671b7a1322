"""Prompts of different token lengths in one batched call, on real tiny diffusers models.

Padded under the model's own ``encoder_attention_mask`` (``UNet2DConditionModel``,
``PixArtTransformer2DModel``) and repeated to a common multiple (the UNet's cross-attention
has no positions), a call equals the model run on each prompt alone within 1e-5 (fp32);
undeclared, the prompts run as separate calls. PAG's perturbed rows follow the padded rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import guidekit
from guidekit import CFG, PAG, Cond, Tokens, Uncond
from guidekit.attention import install

from ._tiny import BATCH, tiny_pixart, tiny_unet

TEXT, MASK = "encoder_hidden_states", "encoder_attention_mask"
PADDED = Tokens(TEXT, mask=MASK)


def _text(length: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {TEXT: torch.randn(BATCH, length, width, generator=g)}


def _x() -> torch.Tensor:
    return torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(5))


def _unet_fn(unet: Any) -> Callable[..., torch.Tensor]:
    return lambda x, sigma, **kw: unet(x, sigma, **kw).sample


def _pixart_fn(model: Any) -> Callable[..., torch.Tensor]:
    added = {"resolution": None, "aspect_ratio": None}
    return lambda x, sigma, **kw: model(x, timestep=sigma, added_cond_kwargs=added, **kw).sample


def _guided(
    fn: Callable[..., torch.Tensor], expr: Any, conds: dict[str, dict[str, torch.Tensor]],
    tokens: Any = None, around_call: Any = None, plan: Any = None,
) -> tuple[torch.Tensor, guidekit.Guided]:
    plan = plan if plan is not None else guidekit.compile(expr, prediction="eps")
    named = dict(conds)
    g = guidekit.guide(plan, fn, cond=named.pop("cond"), uncond=named.pop("uncond", None),
                       conds=named, tokens=tokens, around_call=around_call)
    with torch.no_grad():
        return g(_x(), 500.0), g


def _alone(fn: Callable[..., torch.Tensor], cond: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return fn(_x(), torch.full((BATCH,), 500.0), **cond)


def test_unet_negative_prompt_padded_under_its_mask_equals_each_prompt_alone() -> None:
    fn = _unet_fn(tiny_unet())
    c, u, neg = _text(7, 32, 1), _text(3, 32, 2), _text(11, 32, 3)
    expr = CFG(6) - 2 * (Cond("neg") - Uncond())
    out, g = _guided(fn, expr, {"cond": c, "uncond": u, "neg": neg}, PADDED)
    a, b, n = _alone(fn, c), _alone(fn, u), _alone(fn, neg)
    torch.testing.assert_close(out, b + 6 * (a - b) - 2 * (n - b), rtol=0, atol=1e-5)
    [call] = g.calls
    assert (call.rows, call.branches) == (3 * BATCH, ("c", "u", "neg"))
    assert call.tokens == (
        f"padded {TEXT!r} to 11 tokens under {MASK!r} (cond 7, uncond 3, neg 11)"
    )


def test_unet_repetition_to_a_common_multiple_is_exact() -> None:
    fn = _unet_fn(tiny_unet())
    c, u = _text(8, 32, 1), _text(4, 32, 2)
    out, g = _guided(fn, CFG(5), {"cond": c, "uncond": u}, Tokens(TEXT, repeat=True))
    a, b = _alone(fn, c), _alone(fn, u)
    torch.testing.assert_close(out, b + 5 * (a - b), rtol=0, atol=1e-5)
    assert [r.rows for r in g.calls] == [2 * BATCH]
    assert g.calls[0].tokens == f"repeated {TEXT!r} to 8 tokens (cond 8, uncond 4)"


def test_unet_undeclared_lengths_run_separate_calls() -> None:
    fn = _unet_fn(tiny_unet())
    c, neg = _text(8, 32, 1), _text(5, 32, 2)
    out, g = _guided(fn, CFG(7, negative="neg"), {"cond": c, "neg": neg})
    a, n = _alone(fn, c), _alone(fn, neg)
    torch.testing.assert_close(out, n + 7 * (a - n), rtol=0, atol=1e-5)
    assert [r.branches for r in g.calls] == [("c",), ("neg",)]
    assert "separate call 2 of 2" in str(g.plan)


def test_pixart_negative_prompt_padded_under_its_mask_equals_each_prompt_alone() -> None:
    fn = _pixart_fn(tiny_pixart())
    c, neg = _text(6, 32, 1), _text(9, 32, 2)
    c[MASK] = torch.ones(BATCH, 6)  # the pipeline's own mask: kept and padded
    out, g = _guided(fn, CFG(4.5, negative="neg"), {"cond": c, "neg": neg}, PADDED)
    a, n = _alone(fn, c), _alone(fn, neg)
    torch.testing.assert_close(out, n + 4.5 * (a - n), rtol=0, atol=1e-5)
    assert [r.rows for r in g.calls] == [2 * BATCH]


def test_pag_rows_follow_the_padded_call() -> None:
    unet = tiny_unet()
    fn = _unet_fn(unet)
    expr = CFG(4, negative="neg") + PAG(2)
    plan = guidekit.compile(expr, prediction="eps")
    conds = {"cond": _text(7, 32, 1), "neg": _text(4, 32, 2)}
    with install(unet, plan) as around_call:
        padded, g = _guided(fn, expr, conds, PADDED, around_call, plan)
    with install(unet, plan) as around_call:
        separate, s = _guided(fn, expr, conds, None, around_call, plan)
    torch.testing.assert_close(padded, separate, rtol=0, atol=1e-5)
    c, neg, pag = (b.label for b in plan.branches)
    assert [r.branches for r in g.calls] == [(c, neg, pag)]
    assert [r.branches for r in s.calls] == [(c, pag), (neg,)]
