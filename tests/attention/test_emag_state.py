"""EMAG's state as an explicit, named value: the engine only records observations, the
term's pure update makes the next state; plus its numerics (float64 runs, a NaN sample)
and its errors (a batch change)."""

from __future__ import annotations

import contextlib
import gc
import math
import weakref
from typing import Any

import pytest
import torch

import guidekit
from guidekit import APG, CFG, EMAG, EMAGQ, PAG, GuidanceValueError
from guidekit.attention.ema import EMAState, StepMemo

from ._tiny import BATCH, dit_fn, tiny_dit
from .test_emag import LABELS, NULL, PATHS, SIGMAS, guided_run, reference_run, start


def guided(
    model: Any, plan: Any, around: Any, labels: torch.Tensor = LABELS, **options: Any
) -> Any:
    return guidekit.guide(plan, dit_fn(model), cond={"class_labels": labels},
                          uncond={"class_labels": torch.full_like(labels, 10)},
                          sigmas=SIGMAS, around_call=around, **options)


def names(expr: object) -> list[str]:
    return [n for n, _ in guidekit.compile(expr, prediction="eps").components]


def test_state_names_are_readable_and_stable() -> None:
    assert names(CFG(2) + EMAG(1.5, layers=(1, 2)) | APG(momentum=-0.5)) == ["APG", "EMAG"]
    # an unrelated term renames nothing; a second EMAG is "EMAG#2"
    assert names(CFG(2) + PAG(1, layers=0) + EMAG(1.5, layers=(1, 2)) | APG(momentum=-0.5)) == [
        "APG", "EMAG"]
    assert names(CFG(2) + EMAG(1.5, layers=(1, 2)) + EMAG(1, layers=(2, 3)) + EMAGQ(1, layers=1)) == [
        "EMAG", "EMAG#2", "EMAGQ"]
    assert names(CFG(2) + PAG(1, layers=0)) == []  # nothing stateful, nothing named


def test_run_state_named_shows_each_component() -> None:
    model = tiny_dit(num_layers=4)
    plan = guidekit.compile(CFG(2) + EMAG(1.5, layers=(1, 2)) | APG(momentum=-0.5),
                            prediction="eps", noise="ve")
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        g = guided(model, plan, around)
        g(start(), SIGMAS[0])
        named = g.state.named()
    assert list(named) == ["APG", "EMAG"]
    assert isinstance(named["EMAG"], EMAState) and named["EMAG"].steps == 1
    assert set(named["EMAG"].ema) == {PATHS[1], PATHS[2]}
    assert named["APG"].momentum is not None


def test_update_is_pure_and_is_the_terms_own() -> None:
    term = EMAG(1.0, layers=(0,), beta=0.5)
    a0, a1 = torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3)
    first = term.update(EMAState(), StepMemo({"l": a0}, {"l": 2}, None, 2))
    assert first.steps == 1 and first.delta["l"] == 0.0
    torch.testing.assert_close(first.ema["l"], a0)
    held = first.ema["l"].clone()
    second = term.update(first, StepMemo({"l": a1}, {"l": 2}, "l", 2))
    torch.testing.assert_close(second.ema["l"], 0.5 * a0 + 0.5 * a1)
    assert second.delta["l"] == pytest.approx(float((0.5 * a0 - 0.5 * a1).abs().mean()))
    assert second.used == "l" and second.steps == 2
    torch.testing.assert_close(first.ema["l"], held, rtol=0, atol=0)  # the input is untouched
    with pytest.raises(GuidanceValueError, match="observed 1 of the 2 samples"):
        term.update(first, StepMemo({"l": a1}, {"l": 1}, None, 2))


def test_a_step_never_mutates_the_state_it_starts_from() -> None:
    model = tiny_dit(num_layers=4)
    plan = guidekit.compile(CFG(2) + EMAG(1.5, layers=(1, 2)), prediction="eps", noise="ve")
    x = start()
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        state = plan.init(sigmas=SIGMAS)
        models = {"main": dit_fn(model)}
        conds = {"cond": {"class_labels": LABELS}, "uncond": {"class_labels": NULL}}
        for sigma in SIGMAS[:3]:
            before = state.named()["EMAG"]
            kept = {p: t.clone() for p, t in before.ema.items()}
            _, state = plan.step(state, x, sigma, conds, models, around_call=around)
            for p, t in kept.items():
                torch.testing.assert_close(before.ema[p], t, rtol=0, atol=0)
            assert state.named()["EMAG"] is not before


def test_a_nan_sample_leaves_the_healthy_sample_unchanged() -> None:
    """The layer-selection statistic ignores a non-finite sample: the healthy one gets the
    same layers, and the same output, as in a batch without the NaN sample (float64, so
    that batch-size round-off stays far below the tolerance)."""
    model = tiny_dit(num_layers=4).double()
    plan = guidekit.compile(CFG(3) + EMAG(2, layers=(1, 2)), prediction="eps", noise="ve")
    x = start().double()
    x[1] = float("nan")

    def run(x: torch.Tensor, labels: torch.Tensor) -> tuple[list[torch.Tensor], list[str | None]]:
        outs, used = [], []
        # the NaN sample is the point here: warn (once) instead of the default error
        with torch.no_grad(), guidekit.attention.install(model, plan) as around, \
                pytest.warns(guidekit.errors.NonFiniteWarning) if labels.shape[0] > 1 \
                else contextlib.nullcontext():
            g = guided(model, plan, around, labels, nonfinite="warn")
            for i, sigma in enumerate(SIGMAS[:-1]):
                out = g(x, sigma)
                outs.append(out)
                used.append(g.state.named()["EMAG"].used)
                x = x + (SIGMAS[i + 1] - sigma) * out
        return outs, used

    both, used_both = run(x, LABELS)
    alone, used_alone = run(x[:1], LABELS[:1])
    assert used_both == used_alone and all(u is not None for u in used_both[1:])
    assert torch.isnan(both[-1][1]).all()
    for a, b in zip(both, alone):
        torch.testing.assert_close(a[:1], b, rtol=0, atol=1e-6)


def test_float64_runs_stay_float64() -> None:
    """A float64 model: averages and explicit softmaxes in float64, so the run matches a
    float64 separate-pass reference to ~1e-9 (float32 maths left 1e-7), also where the gate
    keeps EMAG off."""
    model = tiny_dit(num_layers=4).double()
    x = start().double()
    ref, used, emas = reference_run(model, x, 2.0, 1.5, PATHS[1:3], window=(0.3, 1.6))
    outs, states, _ = guided_run(model, x, CFG(2) + EMAG(1.5, layers=(1, 2)).between(0.3, 1.6))
    assert [st.used for st in states] == used
    for a, b in zip(outs, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    for p, e in emas[-1].items():
        assert states[-1].ema[p].dtype == torch.float64
        torch.testing.assert_close(states[-1].ema[p], e, rtol=0, atol=1e-12)


def test_a_batch_change_names_both_shapes() -> None:
    model = tiny_dit(num_layers=4)
    plan = guidekit.compile(CFG(2) + EMAG(1.5, layers=(1, 2)), prediction="eps", noise="ve")
    x = start()
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        g = guided(model, plan, around)
        g(x, SIGMAS[0])
        g.conds = {"cond": {"class_labels": LABELS[:1]}, "uncond": {"class_labels": NULL[:1]}}
        with pytest.raises(GuidanceValueError) as err:
            g(x[:1], SIGMAS[1])
    message = str(err.value)
    assert "[1, 2, 16, 16]" in message and f"[{BATCH}, 2, 16, 16]" in message, message
    assert "reset()" in message


def test_a_preset_too_deep_for_the_model_names_the_preset() -> None:
    from ._joint_models import tiny_sd3

    model = tiny_sd3(layers=2)
    sigmas = torch.linspace(1, 0.05, 12).tolist() + [0.0]
    plan = guidekit.compile(EMAG.sd3(sigmas), prediction="flow", noise="flow")
    with pytest.raises(GuidanceValueError) as err:
        guidekit.attention.install(model, plan)
    message = str(err.value)
    for part in ("EMAG.sd3(...) preset", "SD3-Medium", "has 2 attention layers", "layers="):
        assert part in message, message
    # the paper's choice scaled to the depth works on the same model
    guidekit.attention.install(model, guidekit.compile(
        EMAG.sd3(sigmas, layers=None), prediction="flow", noise="flow"))


@pytest.mark.parametrize("expr", [CFG(2) + EMAG(1.5, layers=(1, 2)), CFG(2) + EMAGQ(1.5, layers=(1, 2))])
def test_the_engine_keeps_no_step_state_once_the_run_is_gone(expr: Any) -> None:
    # each step's ForwardState holds that step's observed maps (queries); the engine's route
    # cache must not keep any of them alive for as long as it is installed
    model = tiny_dit(num_layers=4)
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    seen: list[weakref.ref[Any]] = []
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:

        def recording(layout: Any) -> Any:
            seen.append(weakref.ref(layout.state))
            return around(layout)

        run = guided(model, plan, recording)
        x = start()
        for sigma in SIGMAS[:-1]:
            x = x - 0.1 * run(x, sigma)
        del run
        gc.collect()
        assert len(seen) == len(SIGMAS) - 1
        assert all(ref() is None for ref in seen)


def test_spread_is_the_mean_of_the_finite_samples_means() -> None:
    """EMAG's per-layer ``delta``: ``mean |E - A|`` per sample, averaged over the finite
    samples (one fused |E - A| sum when all are finite)."""
    from guidekit.attention.ema_state import spread

    g = torch.Generator().manual_seed(0)
    a, c = torch.rand(3, 2, 4, 4, generator=g), torch.rand(3, 2, 4, 4, generator=g)
    per = (a - c).abs().flatten(1).mean(dim=1)
    assert spread(a, c) == pytest.approx(float(per.mean()), rel=1e-6)
    c[1, 0, 0, 0] = float("nan")
    assert spread(a, c) == pytest.approx(float(per[[0, 2]].mean()), rel=1e-6)
    c[0, 0, 0, 0] = c[2, 0, 0, 0] = float("inf")
    assert math.isnan(spread(a, c))
    d = torch.rand(3, 2, 4, 4, generator=g)
    assert spread(a.half(), d) == spread(a.half(), d.half())  # in the average's dtype
