"""bf16 / fp16 / fp32: how far guidekit's batched rows and guided output are from separate
passes on a tiny diffusers DiT (issue 11; figures in docs/reliability.md#numerics).

Reference: each branch run alone (B rows), combined in float32. Measured on CPU over 6 seeds
(B = 3): the branch rows of the batched call equal the separate passes (0 in bf16 / fp16,
2.3e-7 relative in fp32); the guided output differs by the combine's own rounding in the
model's dtype: 5.3e-3 (CFG) and 1.4e-2 (CFG + PAG) relative in bf16, 9.7e-4 / 1.4e-3 in fp16,
3.1e-7 / 4.6e-7 in fp32. The bounds below are about twice those figures.
"""

from __future__ import annotations

import logging

import pytest
import torch
from attention._tiny import dit_fn, tiny_dit, value_only

import guidekit
from guidekit import CFG, PAG
from guidekit.attention import install

pytestmark = pytest.mark.outcome("correct")
B = 3
LABELS = {"class_labels": torch.tensor([3, 7, 1])}
NULL = {"class_labels": torch.tensor([0, 0, 0])}

# dtype: (branch rows, CFG(3), CFG(3) + PAG(2)) relative bounds
BOUNDS = {
    torch.float32: (1e-6, 1e-6, 1e-6),
    torch.bfloat16: (4e-3, 1.2e-2, 3e-2),
    torch.float16: (1e-3, 2e-3, 3e-3),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_rows_and_guided_output_against_separate_passes(dtype, seed):
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # .to(dtype)'s keep-in-fp32 notice
    model = tiny_dit(seed=seed).to(dtype)
    fn = dit_fn(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g).to(dtype)
    sig = torch.full((B,), 0.7, dtype=dtype)
    branch, cfg, pag = BOUNDS[dtype]
    with torch.no_grad():
        c, u = fn(x, sig, **LABELS), fn(x, sig, **NULL)
        with value_only(model, ("transformer_blocks.1.attn1",)):
            p = fn(x, sig, **LABELS)
        both = fn(torch.cat([x, x]), torch.cat([sig, sig]),
                  class_labels=torch.cat([LABELS["class_labels"], NULL["class_labels"]]))
        assert max(rel(both[:B], c), rel(both[B:], u)) <= branch
        ref = u.float() + 3 * (c.float() - u.float())
        y = guidekit.guide(guidekit.compile(CFG(3)), fn, cond=LABELS, uncond=NULL)(x, 0.7)
        assert y.dtype == dtype and rel(y, ref) <= cfg
        plan = guidekit.compile(CFG(3) + PAG(2, layers=1))
        with install(model, plan) as around:
            y = guidekit.guide(plan, fn, cond=LABELS, uncond=NULL, around_call=around)(x, 0.7)
        assert rel(y, ref + 2 * (c.float() - p.float())) <= pag
