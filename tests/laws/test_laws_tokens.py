"""A law over the hypothesis worlds: conditionings of mixed token lengths padded under the
model's mask (or repeated, where repetition is exact) give what separate calls give.

Every drawn expression without attention-space parts (a plain softmax cross-attention model
has no attention engine site here) runs over a drawn world with each conditioning's
``text`` of its own drawn length: with ``Tokens("text", mask="text_mask")`` every forward
group is ONE call per step, and the guided outputs equal the default run, where the lengths
split each group into one call per length; with lengths drawn from 2, 4 and 8 the same
holds for ``Tokens("text", repeat=True)``. float64, to 1e-9.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import SHAPE, TAGS, World, expressions, worlds

import guidekit
from guidekit import Tokens
from guidekit.errors import GuidanceError, NonFiniteError

WIDTH = 4
F64 = torch.float64


class CrossAttention(torch.nn.Module):
    """``x [B, 3, 4, 4]``: 3 query tokens of 16 attend to ``text [B, L, 4]``; ``text_mask``
    ``[B, L]`` (1 = attend) masks keys out. No positions: repetition is exact."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randn(16, 16, generator=g, dtype=F64) * 0.5
        self.k = torch.randn(WIDTH, 16, generator=g, dtype=F64)
        self.v = torch.randn(WIDTH, 16, generator=g, dtype=F64)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                emb: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = x.flatten(2) @ self.q
        keep = None if text_mask is None else text_mask.bool()[:, None, :]
        h = F.scaled_dot_product_attention(q, text @ self.k, text @ self.v, keep)
        scale = (1 + sigma).reciprocal().view(-1, 1, 1)
        return (0.5 * x.flatten(2) + h * scale + emb.sum(1).view(-1, 1, 1)).view_as(x)


MODELS = {name: CrossAttention(seed) for seed, name in enumerate(("main", "weak", "small"))}


def _conds(world: World, lengths: dict[str, int]) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(world.seed)
    return {
        name: {"text": torch.randn(world.batch, lengths[name], WIDTH, generator=g, dtype=F64),
               "emb": torch.randn(world.batch, 4, generator=g, dtype=F64)}
        for name in TAGS
    }


def _run(plan: guidekit.Plan, world: World, conds: dict[str, dict[str, torch.Tensor]],
         tokens: Tokens | None) -> tuple[list[torch.Tensor], guidekit.Guided]:
    named = dict(conds)
    g = guidekit.guide(plan, MODELS["main"], cond=named.pop("cond"), uncond=named.pop("uncond"),
                       conds=named, models={m: MODELS[m] for m in plan.models if m != "main"},
                       sigmas=[*world.sigmas, 0.0], seed=world.seed, tokens=tokens)
    x = torch.randn(world.batch, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        return [g(x, s) for s in world.sigmas], g


def _plan(expr: guidekit.Expr, world: World) -> guidekit.Plan:
    try:
        plan = guidekit.compile(expr, prediction=world.prediction, noise=world.noise)
    except GuidanceError:
        assume(False)
        raise
    assume(not plan.attention and all(b.perturbation is None for b in plan.branches))
    return plan


def _check(plan: guidekit.Plan, world: World, lengths: dict[str, int], tokens: Tokens) -> None:
    conds = _conds(world, lengths)
    try:
        shared, g = _run(plan, world, conds, tokens)
    except NonFiniteError:
        # CADS with noise_scale=0 zeroes a conditioning where gamma is 0 and rescales it by
        # its std of 0: the model's input is NaN, padded or not (FakeModel never reads it)
        assume(False)
        raise
    separate, s = _run(plan, world, conds, None)
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    schedule = (*world.sigmas, 0.0)  # the run's (a progress schedule reads its step there)
    groups = [len(plan.program(sigma, schedule).groups) for sigma in world.sigmas]
    assert len(g.calls) == sum(groups)  # every group one call, whatever the lengths
    for call in g.calls:
        names = {n for n in TAGS if any(b == {"cond": "c", "uncond": "u"}.get(n, n)
                                        for b in (lab.split("@")[0] for lab in call.branches))}
        mixed = len({lengths[n] for n in names}) > 1
        assert bool(call.tokens) == mixed, (call, lengths)
    assert len(s.calls) >= len(g.calls)


@pytest.mark.parametrize("kind", ["mask", "repeat"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(data=st.data())
def test_mixed_token_lengths_share_a_call_and_equal_separate_calls(
    kind: str, data: st.DataObject
) -> None:
    expr, world = data.draw(expressions()), data.draw(worlds())
    plan = _plan(expr, world)
    sizes = st.integers(1, 5) if kind == "mask" else st.sampled_from([2, 4, 8])
    lengths = {name: data.draw(sizes, label=f"length of {name}") for name in TAGS}
    tokens = Tokens("text", mask="text_mask") if kind == "mask" else Tokens("text", repeat=True)
    _check(plan, world, lengths, tokens)
