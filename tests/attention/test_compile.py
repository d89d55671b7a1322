"""torch.compile with the attention engine: no graph break per hooked layer, and compiles
bounded by the distinct active-branch sets (counted on CPU with ``backend="eager"``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo

import guidekit
from guidekit import CFG, EMAG, GAG, NAG, PAG, PLADIS, SEG
from guidekit.attention import install

from ._tiny import BATCH, dit_fn, pixart_fn, tiny_dit, tiny_pixart

COND = {"class_labels": torch.tensor([3, 7])}
UNCOND = {"class_labels": torch.tensor([0, 0])}


def first_call(model: Any, plan: Any, fn: Any = None, cond: Any = COND,
               uncond: Any = UNCOND) -> tuple[Any, ...]:
    """The first model call of a guided step: its arguments and row layout."""
    calls: list[Any] = []
    fn = fn or dit_fn(model)

    def recording(*args: Any, **kw: Any) -> Any:
        calls.append((args, kw))
        return fn(*args, **kw)

    layouts: list[Any] = []
    x = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), install(model, plan) as around:
        def ac(layout: Any) -> Any:
            layouts.append(layout)
            return around(layout)

        guidekit.guide(plan, recording, cond=cond, uncond=uncond, around_call=ac)(x, 1.0)
    return calls[0][0], calls[0][1], layouts[0]


@pytest.mark.parametrize("expr", [CFG(3) + PAG(2, layers=[0, 1]), CFG(3) + SEG(2, layers=[0, 1]),
                                  CFG(3) + EMAG(1.5)], ids=["PAG", "SEG", "EMAG"])
def test_hooked_layers_do_not_break_the_graph(expr: Any) -> None:
    model = tiny_dit()
    plan = guidekit.compile(expr)
    args, kw, layout = first_call(model, plan)
    torch._dynamo.reset()
    with torch.no_grad(), install(model, plan) as around, around(layout):
        explained = torch._dynamo.explain(dit_fn(model))(*args, **kw)
        eager = dit_fn(model)(*args, **kw)
        compiled = torch.compile(dit_fn(model), backend="eager")(*args, **kw)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expr", [CFG(3) | NAG(2), CFG(3) | PLADIS(1.5), CFG(3) | GAG(5),
                                  CFG(3) | PLADIS(2, sparse="sparsemax") | NAG(3)],
                         ids=["NAG", "PLADIS", "GAG", "PLADIS-sparsemax+NAG"])
def test_modifiers_in_cross_attention_do_not_break_the_graph(expr: Any) -> None:
    """PLADIS / GAG's sort-based sparse maps trace without data-dependent control flow
    (they broke the graph once per hooked layer: 15 breaks on this model)."""
    model = tiny_pixart()
    fn = pixart_fn(model)
    g = torch.Generator().manual_seed(2)
    cond, uncond = ({"text": torch.randn(BATCH, 5, 32, generator=g)} for _ in range(2))
    plan = guidekit.compile(expr)
    args, kw, layout = first_call(model, plan, fn, cond, uncond)
    torch._dynamo.reset()
    with torch.no_grad(), install(model, plan) as around, around(layout):
        explained = torch._dynamo.explain(fn)(*args, **kw)
        eager = fn(*args, **kw)
        compiled = torch.compile(fn, backend="eager")(*args, **kw)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expr", [
    CFG(5) + PAG(2, layers=[0, 1]).between(1, 10),
    CFG(5) + PAG(2, layers=[0]).between(1, 10) + SEG(2, layers=[2]).between(0.5, 5),
], ids=["PAG-gated", "PAG-and-SEG-gated"])
def test_recompiles_are_bounded_by_the_distinct_active_sets(expr: Any) -> None:
    """Over 10 steps the active-branch set changes at every gate edge; the compiled model
    compiles at most once per distinct set in the first run and never again (same engine
    or a new install)."""
    model = tiny_dit()
    plan = guidekit.compile(expr)
    compiled = torch.compile(dit_fn(model), backend="eager")
    x = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = [12.0, 9.0, 7.0, 4.0, 3.0, 2.0, 0.8, 0.6, 0.3, 0.2]
    torch._dynamo.reset()
    counts, sets = [], set()
    engine = install(model, plan)
    for fresh in (False, False, True):  # a first run, the same engine again, a new install
        if fresh:
            engine = install(model, plan)
        before = torch._dynamo.utils.counters["frames"]["ok"]
        with torch.no_grad(), engine as around:
            def ac(layout: Any, around: Any = around) -> Any:
                sets.add(tuple(b for b, _, _ in layout.blocks))
                return around(layout)

            guided = guidekit.guide(plan, compiled, cond=COND, uncond=UNCOND, around_call=ac)
            for s in sigmas:
                guided(x, s)
        counts.append(torch._dynamo.utils.counters["frames"]["ok"] - before)
    assert len(sets) == (2 if "SEG" not in repr(expr) else 4), sets
    assert 1 <= counts[0] <= len(sets) and counts[1:] == [0, 0], (counts, len(sets))


@pytest.mark.parametrize("expr", [
    CFG(5) + PAG(2, layers=[0]).between(1, 10),
    CFG(5) + PAG(2, layers=[0]) + EMAG(1.5, layers=[1, 2]),
], ids=["PAG-gated", "PAG-and-EMAG"])
def test_a_second_run_of_the_compiled_model_recompiles_nothing(expr: Any) -> None:
    """With the engine installed, a second run of the same compiled model (same engine,
    then a new install) compiles no frame: ``error_on_recompile`` makes any recompile, from
    a guard on the engine's state or the run's, fail the run. The second run's samples
    equal the first's (EMAG's state starts afresh)."""
    model = tiny_dit()
    plan = guidekit.compile(expr)
    compiled = torch.compile(dit_fn(model), backend="eager")
    noise = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigmas = [12.0, 9.0, 4.0, 2.0, 0.8, 0.3]
    torch._dynamo.reset()
    engine = install(model, plan)

    def run() -> torch.Tensor:
        with torch.no_grad(), engine as around:
            guided = guidekit.guide(plan, compiled, cond=COND, uncond=UNCOND,
                                    around_call=around, sigmas=sigmas)
            x = noise * sigmas[0]
            for s, s_next in zip(sigmas, [*sigmas[1:], 0.0]):
                x = x + (s_next - s) * guided(x, s)
        return x

    first = run()
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    assert frames >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = run()
        engine = install(model, plan)  # a new install: new routes, the same graphs
        third = run()
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(third, first, rtol=0, atol=0)
