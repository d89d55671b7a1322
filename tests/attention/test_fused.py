"""The fused path of a hooked ``AttnProcessor2_0`` layer (projections once over all rows,
the attention core per segment) gives what the per-segment path gives, and is taken only
for the stock processor."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import guidekit
from guidekit import CFG, EMAG, PAG, SEG
from guidekit.attention.fused import is_stock_processor

from ._tiny import BATCH, dit_fn, tiny_dit

SIGMAS = [3.0, 2.2, 1.5, 1.0, 0.0]
LABELS = torch.tensor([3, 7])
NULL = torch.full((BATCH,), 10)


def _hooked(model: torch.nn.Module) -> list[Any]:
    return [m.processor for m in model.modules()
            if hasattr(getattr(m, "processor", None), "fusable")]


def _run(expr: Any, fuse: bool) -> tuple[list[torch.Tensor], list[bool]]:
    model = tiny_dit(num_layers=3)
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    x = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        procs = _hooked(model)
        fusable = [p.fusable for p in procs]
        for p in procs:
            p.fusable = fuse
        g = guidekit.guide(plan, dit_fn(model), cond={"class_labels": LABELS},
                           uncond={"class_labels": NULL}, sigmas=SIGMAS, around_call=around)
        for sigma in SIGMAS[:-1]:
            outs.append(g(x, sigma))
    return outs, fusable


def test_fused_equals_segments_for_pag_emag_seg() -> None:
    expr = CFG(3) + PAG(2, layers=-1) + EMAG(1.5, layers=(0, 1)) + SEG(1.0, layers=1)
    fused, fusable = _run(expr, True)
    segments, _ = _run(expr, False)
    assert fusable and all(fusable)  # DiT's layers carry the stock processor
    for a, b in zip(fused, segments):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused[0], _run(CFG(3), True)[0][0])  # the terms did something


def test_only_the_stock_processor_is_fused() -> None:
    class Custom(AttnProcessor2_0):
        pass

    assert is_stock_processor(AttnProcessor2_0())
    assert not is_stock_processor(Custom())
    model = tiny_dit(num_layers=3)
    model.transformer_blocks[2].attn1.set_processor(Custom())
    plan = guidekit.compile(CFG(3) + PAG(2, layers=-1))
    with guidekit.attention.install(model, plan):
        assert [p.fusable for p in _hooked(model)] == [False]
