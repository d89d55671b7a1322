"""One attention engine shared by threads that each sample their own run: the runs equal
the same runs made one after the other (the engine's per-call state is taken in turn)."""

from __future__ import annotations

import threading
from typing import Any

import torch

import guidekit
from guidekit import CFG, EMAG, PAG

from ._tiny import dit_fn, tiny_dit
from .test_emag import LABELS, NULL, SIGMAS

EXPR = CFG(2) + PAG(1.5, layers=0) + EMAG(1.5, layers=(1, 2))
RUNS = 4


def sample(plan: Any, model: Any, around: Any, seed: int, barrier: Any = None) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]
    labels = (LABELS + seed) % 10
    g = guidekit.guide(plan, dit_fn(model), cond={"class_labels": labels},
                       uncond={"class_labels": NULL}, sigmas=SIGMAS, around_call=around)
    if barrier is not None:
        barrier.wait()
    for i, sigma in enumerate(SIGMAS[:-1]):
        x = x + (SIGMAS[i + 1] - sigma) * g(x, sigma)
    assert g.steps == len(SIGMAS) - 1
    return x


@torch.no_grad()
def test_threads_with_separate_runs_equal_sequential_runs() -> None:
    model = tiny_dit(num_layers=4)
    plan = guidekit.compile(EXPR, prediction="eps", noise="ve")
    with guidekit.attention.install(model, plan) as around:
        sequential = [sample(plan, model, around, seed) for seed in range(RUNS)]
        results: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(RUNS)

        def worker(seed: int) -> None:
            try:
                with torch.no_grad():
                    results[seed] = sample(plan, model, around, seed, barrier)
            except BaseException as err:  # reported below, with the thread's error
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(RUNS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    for seed in range(RUNS):
        torch.testing.assert_close(results[seed], sequential[seed], rtol=0, atol=0)
