"""EMAG and EMAG-Q on a tiny real DiT: a whole sampling run against an independent
step-by-step reference written from methods.md (separate passes, maps recorded and replaced
by a processor written here), plus rows, calls, state and restoration."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import guidekit
from guidekit import CFG, EMAG, EMAGQ, Cond, GuidanceValueError
from guidekit.attention.ema import EMAState

from ._tiny import BATCH, dit_fn, ref_processors, tiny_dit, tiny_plain

SIGMAS = [3.0, 2.2, 1.5, 1.0, 0.6, 0.35, 0.15, 0.0]
LABELS = torch.tensor([3, 7])
NULL = torch.full((BATCH,), 10)


def reference_run(
    model: Any, x: torch.Tensor, w: float, s: float, candidates: list[str], *,
    averages: str = "map", beta: float = 0.988, window: tuple[float, float] | None = None,
) -> tuple[list[torch.Tensor], list[str | None], list[dict[str, torch.Tensor]]]:
    """Euler sampling with ``u + w (c - u) + s (c - e)`` from separate passes (methods.md)."""
    fn = dit_fn(model)
    ema: dict[str, torch.Tensor] = {}
    delta: dict[str, float] = {}
    outs, used, emas = [], [], []
    with torch.no_grad(), ref_processors(model, candidates) as procs:
        for i, sigma in enumerate(SIGMAS[:-1]):
            sig = torch.full((BATCH,), sigma)
            # the layer: largest delta of the PREVIOUS step (ties: first candidate)
            chosen = max(candidates, key=lambda p: delta[p]) if delta else None
            for proc in procs.values():
                proc.mode = "record"
            c = fn(x, sig, LABELS)
            for p, proc in procs.items():
                cur = proc.maps if averages == "map" else proc.queries
                ema[p] = cur.clone() if p not in ema else beta * ema[p] + (1 - beta) * cur
                delta[p] = float((ema[p] - cur).abs().mean())
            for proc in procs.values():
                proc.mode = None
            u = fn(x, sig, NULL)
            active = window is None or window[0] < sigma <= window[1]
            if active:
                if chosen is not None:
                    procs[chosen].mode = averages
                    procs[chosen].replacement = ema[chosen]
                e = fn(x, sig, LABELS)
                for proc in procs.values():
                    proc.mode = None
                out = u + w * (c - u) + s * (c - e)
            else:
                out = u + w * (c - u)
            used.append(chosen if active else None)
            outs.append(out)
            emas.append({p: t.clone() for p, t in ema.items()})
            x = x + (SIGMAS[i + 1] - sigma) * out
    return outs, used, emas


def guided_run(
    model: Any, x: torch.Tensor, expr: Any, **plan_kw: Any
) -> tuple[list[torch.Tensor], list[Any], list[guidekit.CallRecord]]:
    plan = guidekit.compile(expr, prediction="eps", noise="ve", **plan_kw)
    outs, states = [], []
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        guided = guidekit.guide(
            plan, dit_fn(model), cond={"class_labels": LABELS}, uncond={"class_labels": NULL},
            sigmas=SIGMAS, around_call=around,
        )
        for i, sigma in enumerate(SIGMAS[:-1]):
            out = guided(x, sigma)
            outs.append(out)
            states.append(next((v for v in guided.state.current if isinstance(v, EMAState)), None))
            x = x + (SIGMAS[i + 1] - sigma) * out
    return outs, states, guided.calls


def start(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]


PATHS = [f"transformer_blocks.{i}.attn1" for i in range(4)]


def test_emag_whole_run_matches_reference() -> None:
    model = tiny_dit(num_layers=4)
    x = start()
    ref, used, emas = reference_run(model, x, 2.0, 1.5, PATHS[1:3])
    outs, states, calls = guided_run(model, x, CFG(2) + EMAG(1.5, layers=(1, 2)))
    # the layer choice really changes over the run in this set-up (otherwise it tests little)
    assert len({u for u in used if u is not None}) >= 1
    assert used[0] is None and all(u is not None for u in used[1:])
    for i, (a, b) in enumerate(zip(outs, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {i}")
    for i, st in enumerate(states):
        assert st.steps == i + 1
        assert st.used == used[i]
        for p, e in emas[i].items():
            torch.testing.assert_close(st.ema[p], e, rtol=1e-5, atol=1e-6)
    assert [c.rows for c in calls] == [3 * BATCH] * (len(SIGMAS) - 1)
    assert {c.branches for c in calls} == {("c", "u", "c[EMAMap((1, 2))]")}


def test_emag_does_something() -> None:
    model = tiny_dit(num_layers=4)
    x = start()
    with_emag, _, _ = guided_run(model, x, CFG(2) + EMAG(3, layers=(1, 2)))
    without, _, _ = guided_run(model, x, CFG(2))
    assert (with_emag[-1] - without[-1]).abs().max() > 1e-3


def test_window_adds_no_rows_but_keeps_averaging() -> None:
    model = tiny_dit(num_layers=4)
    x = start()
    window = (0.3, 1.6)
    ref, used, emas = reference_run(model, x, 2.0, 1.5, PATHS[1:3], window=window)
    outs, states, calls = guided_run(model, x, CFG(2) + EMAG(1.5, layers=(1, 2)).between(*window))
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    rows = [c.rows for c in calls]
    active = [window[0] < s <= window[1] for s in SIGMAS[:-1]]
    assert rows == [3 * BATCH if a else 2 * BATCH for a in active]
    assert [st.steps for st in states] == list(range(1, len(SIGMAS)))  # averaged every step
    assert [st.used for st in states] == used


def test_emag_q_whole_run_matches_reference() -> None:
    model = tiny_dit(num_layers=4)
    x = start(2)
    ref, used, emas = reference_run(model, x, 1.5, 2.0, PATHS[1:4], averages="query")
    outs, states, calls = guided_run(model, x, CFG(1.5) + EMAGQ(2, layers=(1, 2, 3)))
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [st.used for st in states] == used
    for p, e in emas[-1].items():
        torch.testing.assert_close(states[-1].ema[p], e, rtol=1e-5, atol=1e-6)


def test_paper_parametrisation_is_the_same_expression() -> None:
    assert EMAG.paper(7, 1.5) == CFG(7) + EMAG(3.5)
    assert repr(EMAG.dit()) == "CFG(1.5) + EMAG(3, layers=(12, 13, 14, 15))"
    sigmas = torch.linspace(14, 0.03, 28).tolist() + [0.0]
    sd3 = EMAG.sd3(sigmas)
    gate = sd3.terms[1] if hasattr(sd3, "terms") else None
    plan = guidekit.compile(sd3)
    active = [any("EMAMap" in b.label for b in plan.program(s).branches) for s in sigmas[:-1]]
    assert active == [5 <= i <= 22 for i in range(28)], gate


def test_row_budget_split_equals_one_call() -> None:
    model = tiny_dit(num_layers=4)
    x = start(3)
    one, s1, _ = guided_run(model, x, CFG(2) + EMAG(1.5, layers=(1, 2)))
    split, s2, calls = guided_run(model, x, CFG(2) + EMAG(1.5, layers=(1, 2)), max_rows=3)
    for a, b in zip(one, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [st.used for st in s1] == [st.used for st in s2]
    assert {c.rows for c in calls} == {3}  # 6 rows in calls of 3: cond and EMAG rows split


def test_state_once_per_step_with_repeated_calls() -> None:
    model = tiny_dit(num_layers=4)
    plan = guidekit.compile(CFG(2) + EMAG(1.5, layers=(1, 2)), prediction="eps", noise="ve")
    x = start()
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        g = guidekit.guide(plan, dit_fn(model), cond={"class_labels": LABELS},
                           uncond={"class_labels": NULL}, sigmas=SIGMAS, around_call=around)
        g(x, SIGMAS[0])
        g(x, SIGMAS[1])
        first = g(x, SIGMAS[2])
        again = g(x, SIGMAS[2])  # Heun's second evaluation at the same level
        mid = g(x, 1.2)  # a midpoint (not in the schedule): reads, commits nothing
        st = next(v for v in g.state.current if isinstance(v, EMAState))
    torch.testing.assert_close(first, again)
    assert st.steps == 3
    assert mid.shape == x.shape


def test_fp16_state_buffers() -> None:
    model = tiny_dit(num_layers=4)
    x = start()
    full, _, _ = guided_run(model, x, CFG(2) + EMAG(1.5, layers=(1, 2)))
    half, states, _ = guided_run(
        model, x, CFG(2) + EMAG(1.5, layers=(1, 2), state_dtype="float16")
    )
    assert all(t.dtype == torch.float16 for t in states[-1].ema.values())
    assert states[-1].nbytes * 2 == sum(t.numel() * 4 for t in states[-1].ema.values())
    torch.testing.assert_close(half[-1], full[-1], rtol=0, atol=2e-2)


def test_processors_restored_after_run_and_error() -> None:
    model = tiny_dit(num_layers=4)
    before = {p: model.get_submodule(p).processor for p in PATHS}
    x = start()
    ref = dit_fn(model)(x, torch.full((BATCH,), 1.0), LABELS)
    plan = guidekit.compile(CFG(2) + EMAG(1.5, layers=(1, 2)), prediction="eps", noise="ve")
    with pytest.raises(KeyboardInterrupt), guidekit.attention.install(model, plan) as around:
        g = guidekit.guide(plan, dit_fn(model), cond={"class_labels": LABELS},
                           uncond={"class_labels": NULL}, around_call=around)
        g(x, 2.0)
        raise KeyboardInterrupt
    assert {p: model.get_submodule(p).processor for p in PATHS} == before
    torch.testing.assert_close(dit_fn(model)(x, torch.full((BATCH,), 1.0), LABELS), ref,
                               rtol=0, atol=0)


def test_needs_the_engine_even_outside_its_window() -> None:
    plan = guidekit.compile(Cond() + EMAG(1, layers=(1,)).between(0.5, 1))
    model = tiny_dit(num_layers=4)
    g = guidekit.guide(plan, dit_fn(model), cond={"class_labels": LABELS})
    with pytest.raises(GuidanceValueError, match="state inside the model's forward"):
        g(start(), 3.0)  # EMAG inactive at sigma 3, but its averages must still be taken


def test_bad_parameters_name_the_term() -> None:
    with pytest.raises(GuidanceValueError, match=r"beta"):
        EMAG(1, beta=1.0)
    with pytest.raises(GuidanceValueError, match=r"state_dtype"):
        EMAG(1, state_dtype="int8")
    with pytest.raises(GuidanceValueError, match=r"lam"):
        EMAGQ(1, lam=0)
    model = tiny_dit(num_layers=4)
    plan = guidekit.compile(CFG(2) + EMAG(1, layers=(7,)))
    with pytest.raises(GuidanceValueError, match="out of range"):
        guidekit.attention.install(model, plan)


def test_default_candidates_scale_the_papers_dit_choice() -> None:
    model = tiny_dit(num_layers=4)
    plan = guidekit.compile(CFG(2) + EMAG(1))
    engine = guidekit.attention.install(model, plan)
    (paths,) = engine.layers.values()
    assert paths == ("transformer_blocks.2.attn1",)  # [12/28, 16/28) of 4 blocks
    from guidekit.attention.ema import MovingAverage

    table = tuple(f"b{i}" for i in range(28))
    assert MovingAverage.default_layers(table) == ("b12", "b13", "b14", "b15")


def test_plain_sdpa_module() -> None:
    """A plain module (attention through F.scaled_dot_product_attention) runs EMAG too, and
    EMAG's conditional rows equal the unguided conditional prediction."""
    from ._tiny import SelfAttention

    model = tiny_plain()
    plan = guidekit.compile(Cond() + EMAG(2, layers=(0, 1)), prediction="eps", noise="ve")
    x = torch.randn(BATCH, 4, 8, 8)
    rows: list[torch.Tensor] = []

    def fn(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x, sigma, y)
        rows.append(out)
        return out

    with torch.no_grad(), guidekit.attention.install(model, plan, attention_class=SelfAttention) as around:
        g = guidekit.guide(plan, fn, cond={"y": LABELS}, around_call=around, sigmas=SIGMAS)
        for s in SIGMAS[:3]:
            g(x, s)
        plain_c = model(x, torch.full((BATCH,), SIGMAS[2]), LABELS)
    torch.testing.assert_close(rows[-1][:BATCH], plain_c, rtol=1e-5, atol=1e-5)
    assert (rows[-1][BATCH:] - rows[-1][:BATCH]).abs().max() > 1e-4
    assert F.scaled_dot_product_attention is torch.nn.functional.scaled_dot_product_attention


def test_headline_expression_is_one_call_of_four_row_blocks() -> None:
    """``CFG(7) + PAG(3) + EMAG(1.5) | APG(eta=0)``: c, u, the PAG and the EMAG rows in ONE
    model call of 4 x B rows per step, equal to the same terms computed in separate calls."""
    from guidekit import APG, PAG

    model = tiny_dit(num_layers=4)
    expr = CFG(7) + PAG(3, layers=-1) + EMAG(1.5, layers=(1, 2)) | APG(eta=0)
    x = start(5)
    one, _, calls = guided_run(model, x, expr)
    split, _, split_calls = guided_run(model, x, expr, max_rows=BATCH)
    assert [c.rows for c in calls] == [4 * BATCH] * (len(SIGMAS) - 1)
    assert calls[0].branches == ("c", "u", "c[IdentityAttention((-1,))]", "c[EMAMap((1, 2))]")
    assert len(split_calls) == 4 * (len(SIGMAS) - 1)
    for a, b in zip(one, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unfused", [False, True], ids=["fused", "segments"])
def test_conditional_rows_keep_the_layers_own_attention(
    unfused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMAG watches the conditional rows of its candidate layers (their map, made
    explicitly) but does not compute them: they go through the layer's own attention with
    the other plain rows, so the guided call's conditional rows are the unhooked model's
    conditional prediction (checked at a step where EMAG holds averages and perturbs)."""
    model = tiny_dit()
    plan = guidekit.compile(CFG(3) + EMAG(1.5), prediction="eps", noise="ve")
    x = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    rows: list[torch.Tensor] = []
    fn = dit_fn(model)

    def recorded(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        rows.append(out := fn(x, sigma, class_labels))
        return out

    import guidekit.attention.ema as ema

    products: list[int] = []  # the explicit map x value products of a step's calls
    explicit = ema.apply_probs

    def counted(probs: torch.Tensor, value: torch.Tensor, heads: int | None) -> torch.Tensor:
        products.append(probs.shape[0])
        return explicit(probs, value, heads)

    monkeypatch.setattr(ema, "apply_probs", counted)
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        if unfused:
            for m in model.modules():
                if hasattr(getattr(m, "processor", None), "fusable"):
                    m.processor.fusable = False  # type: ignore[union-attr]
        g = guidekit.guide(plan, recorded, cond={"class_labels": LABELS},
                           uncond={"class_labels": NULL}, around_call=around, sigmas=SIGMAS)
        for s in SIGMAS[:3]:
            products.clear()
            g(x, s)
    # only the EMAG rows of the selected layer take the explicit product (the observed
    # conditional rows of every candidate layer do not)
    assert products == [BATCH]
    with torch.no_grad():
        plain_c = fn(x, torch.full((BATCH,), SIGMAS[2]), LABELS)
    assert rows[-1].shape[0] == 3 * BATCH  # c, u and the EMAG rows in one call
    # equal up to the round-off of a batch of 3 B rows against one of B (the same kernels)
    torch.testing.assert_close(rows[-1][:BATCH], plain_c, rtol=1e-6, atol=1e-6)
    assert (rows[-1][2 * BATCH:] - rows[-1][:BATCH]).abs().max() > 1e-4
