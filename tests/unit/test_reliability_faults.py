"""Issue 11: faults inside a run (an exception or KeyboardInterrupt in any model call, with or
without the attention engine) leave the run's state and the user's model as they were, and
state misuse that guidekit can honour behaves correctly."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import guidekit
from guidekit import APG, CADS, CFG, PAG, SEG, SLG, Autoguidance

B = 2
SIGMAS = [4.0, 2.0, 1.0, 0.5, 0.0]
EXPRS = {
    "apg": CFG(3) | APG(eta=0, momentum=-0.5),
    "autoguidance": CFG(2) + Autoguidance(1.5) | APG(eta=0, momentum=-0.5),
    "cads": CFG(3) | CADS(noise_scale=0.3),
}


class Boom(Exception):
    pass


def net(seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64)

    def fn(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w) + y.view(-1, 1)

    return fn


def faulty(fn: Any, at: int, error: type[BaseException]) -> Any:
    calls = [0]

    def model(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == at:
            raise error("fault")
        return fn(*args, **kwargs)  # type: ignore[no-any-return]

    return model


def make(expr: Any, main: Any, weak: Any) -> Any:
    y = torch.tensor([1.0, 2.0], dtype=torch.float64)
    return guidekit.guide(guidekit.compile(expr), main, cond={"y": y}, uncond={"y": y * 0},
                          models={"weak": weak}, sigmas=SIGMAS, seed=1)


def sample(g: Any, steps: int = 4) -> torch.Tensor:
    x = torch.ones(B, 3, dtype=torch.float64)
    for s in SIGMAS[:steps]:
        x = x + 0.1 * g(x, s)
    return x


@pytest.mark.outcome("restored")
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt, RuntimeError], ids=lambda e: e.__name__)
@pytest.mark.parametrize("at", [1, 3])
@pytest.mark.parametrize(("name", "which"), [("apg", "main"), ("cads", "main"),
                                             ("autoguidance", "main"), ("autoguidance", "weak")])
def test_a_fault_in_a_model_call_leaves_the_state_and_a_retry_equals_a_clean_run(
    name, which, at, error
):
    expr = EXPRS[name]
    clean = sample(make(expr, net(0), net(1)))
    main, weak = net(0), net(1)
    if which == "main":
        main = faulty(main, at, error)
    else:
        weak = faulty(weak, at, error)
    g = make(expr, main, weak)
    x = torch.ones(B, 3, dtype=torch.float64)
    done = 0
    while done < 4:
        before = g.state
        try:
            x = x + 0.1 * g(x, SIGMAS[done])
        except (Boom, KeyboardInterrupt, RuntimeError):
            assert g.state is before and g.steps == done  # nothing of the failed call stayed
            continue  # the sampler retries the same step
        done += 1
    assert torch.equal(x, clean)


@pytest.mark.outcome("restored")
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt], ids=lambda e: e.__name__)
@pytest.mark.parametrize("expr", [CFG(3) + PAG(2, layers=1), CFG(3) + SEG(2, layers=1),
                                  CFG(3) + SLG(1, layers=1)], ids=str)
def test_a_fault_inside_the_engine_restores_the_model(expr, error):
    from attention._tiny import dit_fn, processors, tiny_dit

    from guidekit.attention import install

    model = tiny_dit()
    before_proc = processors(model)
    before_fwd = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    fn = dit_fn(model)
    plan = guidekit.compile(expr)
    x = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"class_labels": torch.tensor([3, 7])}, {"class_labels": torch.tensor([0, 0])}
    with pytest.raises(error), torch.no_grad(), install(model, plan) as around:
        g = guidekit.guide(plan, faulty(fn, 2, error), cond=cond, uncond=uncond,
                           around_call=around)
        g(x, 2.0)
        g(x, 1.0)
    assert processors(model) == before_proc
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == before_fwd
    with torch.no_grad():
        plain = fn(x, torch.full((B,), 1.0), **cond)
        assert torch.equal(plain, dit_fn(tiny_dit())(x, torch.full((B,), 1.0), **cond))


@pytest.mark.outcome("correct")
@pytest.mark.parametrize("name", list(EXPRS))
def test_reset_after_a_run_equals_a_fresh_run(name):
    g = make(EXPRS[name], net(0), net(1))
    first = sample(g)
    with pytest.raises(guidekit.GuidanceValueError, match="rose"):
        g(torch.ones(B, 3, dtype=torch.float64), SIGMAS[0])  # a new run on old state
    g.reset()
    assert torch.equal(sample(g), first)


@pytest.mark.outcome("correct")
def test_reset_with_a_new_schedule_replaces_the_old_one():
    g = make(EXPRS["apg"], net(0), net(1))
    sample(g)
    nine = [8.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.0]
    g.reset(sigmas=nine)
    assert g.state.schedule == tuple(nine) and g.steps == 0
    x = torch.ones(B, 3, dtype=torch.float64)
    for s in nine[:-1]:
        x = g(x, s)
    assert g.steps == 9


@pytest.mark.outcome("correct")
@pytest.mark.parametrize("name", list(EXPRS))
def test_threads_with_separate_runs_equal_sequential_runs(name):
    expected = sample(make(EXPRS[name], net(0), net(1)))
    out: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        out[i] = sample(make(EXPRS[name], net(0), net(1)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(out[i], expected) for i in range(3))
