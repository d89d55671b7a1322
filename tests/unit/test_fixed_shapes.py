"""compile(expr, fixed_shapes=True): one row count per run while gated terms switch, so a
compiled model compiles once; the output equals the default's."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from attention._tiny import BATCH, dit_fn, tiny_dit

import guidekit
from guidekit import CFG, PAG, Autoguidance, GuidanceTypeError
from guidekit.attention import install

COND = {"class_labels": torch.tensor([3, 7])}
UNCOND = {"class_labels": torch.tensor([0, 0])}
SIGMAS = (14.0, 9.0, 4.0, 0.8, 0.3)  # PAG off, on, on, off, off
EXPR = CFG(5) + PAG(2, layers=[0, 1]).between(1, 10)


def run(fixed: bool, compiled: bool) -> tuple[torch.Tensor, list[int], int]:
    """Outputs at SIGMAS, the rows of each call and the frames Dynamo compiled."""
    model = tiny_dit()
    plan = guidekit.compile(EXPR, fixed_shapes=fixed)
    fn = dit_fn(model)
    if compiled:
        fn = torch.compile(fn, backend="eager")
    x = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["frames"]["ok"]
    with torch.no_grad(), install(model, plan) as around:
        guided = guidekit.guide(plan, fn, cond=COND, uncond=UNCOND, around_call=around)
        outs = torch.stack([guided(x, s) for s in SIGMAS])
    rows = [c.rows for c in guided.calls]
    return outs, rows, torch._dynamo.utils.counters["frames"]["ok"] - before


def test_fixed_shapes_compile_once_and_equal_the_default() -> None:
    default, default_rows, default_compiles = run(fixed=False, compiled=True)
    fixed, fixed_rows, fixed_compiles = run(fixed=True, compiled=True)
    assert default_rows == [4, 6, 6, 4, 4] and fixed_rows == [6] * 5
    assert (default_compiles, fixed_compiles) == (2, 1)
    torch.testing.assert_close(fixed, default, rtol=0, atol=1e-6)
    eager, _, _ = run(fixed=False, compiled=False)
    torch.testing.assert_close(fixed, eager, rtol=0, atol=1e-5)


def test_fixed_shapes_keep_every_branch_but_drop_never_used_ones() -> None:
    plan = guidekit.compile(CFG(3) + Autoguidance(1).between(1, 5) + 0 * Autoguidance(2, model="tiny"),
                            fixed_shapes=True)
    assert [g.model for g in plan.groups] == ["main", "weak"]
    assert {plan.rows(s, batch=2) for s in (10.0, 2.0, 0.5)} == {6}
    assert plan.program(10.0).formula == guidekit.compile(CFG(3)).program(10.0).formula
    text = str(plan)
    assert "weak [c@weak] 1xB rows" in text.split("sigma in (5, inf]")[1].splitlines()[0]


def test_fixed_shapes_must_be_a_bool() -> None:
    with pytest.raises(GuidanceTypeError, match="fixed_shapes"):
        guidekit.compile(CFG(3), fixed_shapes="yes")  # type: ignore[arg-type]




def test_fixed_shapes_and_parallel_keep_one_call_instead_of_a_timed_split() -> None:
    """The default split would time a second call shape; one shape per run is the point of
    fixed shapes, so ``max_rows=None`` means one call there (an explicit budget still counts)."""
    assert guidekit.compile(CFG(5) + PAG(2), fixed_shapes=True).max_rows == "one call"
    assert guidekit.compile(CFG(5) + PAG(2)).max_rows is None  # the auto default
    assert guidekit.compile(CFG(5) + PAG(2), fixed_shapes=True, max_rows=2).max_rows == 2
