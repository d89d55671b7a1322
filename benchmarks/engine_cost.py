"""The attention engine's Python cost per step: a guided step minus a bare forward of the
same rows, on the benchmark DiT at B = 1.

    OMP_NUM_THREADS=1 python benchmarks/engine_cost.py [--threads 1] [--repeats 40]
    OMP_NUM_THREADS=1 python benchmarks/engine_cost.py --segments  # + the per-segment path
    OMP_NUM_THREADS=1 python benchmarks/engine_cost.py --profile   # the top Python hot spots
    OMP_NUM_THREADS=1 python benchmarks/engine_cost.py --cold      # hot vs cold, stub model

The model is diffusers' ``DiTTransformer2DModel`` of ``_bench.py`` (16 tokens, 6 layers,
2.12M parameters). Each expression's step is one guided step in steady state (the run has
taken two steps, so EMAG has its averages and a selected layer; every timed call
re-evaluates the same level). Its "bare" partner is one call of the same model function
(sigma to timestep, the model, ``.sample``) on an unhooked copy of the model (same
weights), one copy per pair, on as many rows as the guided step's one call. Guided and bare calls
are interleaved in pairs (the order rotates); the figure is the median over repeats of
``guided - bare``: everything guidekit adds to the model call, the attention engine's
routing and perturbed maths included. The clock is the timing thread's CPU time
(``time.thread_time``; ``--wall`` for wall time): on a shared machine a descheduled thread
adds wall time but no CPU time. "extra ATen ops" counts the operators (kernel launches) the
guided step dispatches beyond the bare call's, "extra Python calls" the Python function
calls (``sys.setprofile``'s call events) it makes beyond the bare call's: figures no load
changes.
"""

from __future__ import annotations

import copy
import cProfile
import pstats
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import _bench as bench  # noqa: E402

import guidekit  # noqa: E402
from guidekit import APG, CFG, EMAG, PAG  # noqa: E402

B = 1
SIGMAS = [3.0, 2.0, 1.0]

EXPRESSIONS: dict[str, Any] = {
    "CFG(7)": CFG(7),
    "CFG(7) + PAG(3)": CFG(7) + PAG(3),
    "CFG(7) + EMAG(1.5)": CFG(7) + EMAG(1.5),
    "CFG(7) + PAG(3) + EMAG(1.5) | APG(eta=0)": CFG(7) + PAG(3) + EMAG(1.5) | APG(eta=0),
}


def _forward(net: torch.nn.Module) -> Callable[..., torch.Tensor]:
    def model(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return net(x, timestep=bench._timestep(sigma), class_labels=class_labels).sample
    return model


def guided_step(
    net: torch.nn.Module, expr: Any, model: Callable[..., torch.Tensor] | None = None,
) -> tuple[Callable[[], Any], Any, int]:
    """One steady-state guided step of ``expr`` on ``net`` (or around ``model``, with the
    engine still installed on ``net``), its engine, and its row count."""
    plan = guidekit.compile(expr, prediction="eps", noise="vp")
    c, u = bench.labels(B)
    x = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    engine = guidekit.attention.install(net, plan)
    around = engine.__enter__()
    guided = guidekit.guide(plan, model or _forward(net), cond={"class_labels": c},
                            uncond={"class_labels": u}, sigmas=SIGMAS, around_call=around)
    with torch.no_grad():
        guided(x, SIGMAS[0])
        guided(x, SIGMAS[1])

    def step() -> Any:
        with torch.no_grad():
            return guided(x, SIGMAS[1])

    return step, engine, plan.rows(SIGMAS[1], B)


def bare_step(net: torch.nn.Module, rows: int) -> Callable[[], Any]:
    """One call of the same model function as the guided step's (sigma to timestep
    included) on ``rows`` rows of ``net``, the inputs built beforehand."""
    x = torch.randn(rows, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(rows) % bench.NUM_CLASSES
    sigma = torch.full((rows,), SIGMAS[1])
    model = _forward(net)

    def step() -> Any:
        with torch.no_grad():
            return model(x, sigma, labels)

    return step


def paired(
    steps: dict[str, Callable[[], Any]], pairs: list[tuple[str, str, int]], repeats: int,
    clock: Callable[[Callable[[], Any]], float] = bench.timed,
) -> dict[str, list[float]]:
    """Seconds per call, each guided step timed right next to its bare partner (which one
    goes first alternates), the expressions in a rotating order."""
    out: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(repeats):
        k = r % len(pairs)
        for guided, bare, _ in pairs[k:] + pairs[:k]:
            for n in ((guided, bare) if r % 2 else (bare, guided)):
                out[n].append(clock(steps[n]))
    return out


#: the expressions ``--cold`` times with a stub model (no attention term: nothing to hook)
STUB_EXPRESSIONS: dict[str, Any] = {"CFG(7)": CFG(7), "CFG(7) | APG(eta=0)": CFG(7) | APG(eta=0)}


def cold_and_hot(net: torch.nn.Module, repeats: int) -> list[list[str]]:
    """guidekit's own step (the engine installed, as in the main table) around a stub model
    that returns fixed rows, timed hot (steps back to back) and cold (each right after a
    bare forward of ``net``, which evicts the CPU caches as the real model call inside a
    guided step does)."""
    out = []
    for name, expr in STUB_EXPRESSIONS.items():
        rows = guidekit.compile(expr).rows(SIGMAS[1], B)
        fixed = torch.randn(rows, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        step, engine, _ = guided_step(copy.deepcopy(net), expr, lambda *a, out=fixed, **k: out)
        evict = bare_step(net, rows)
        hot: list[float] = []
        cold: list[float] = []
        try:
            for _ in range(repeats):
                hot.append(bench.thread_timed(step))
                evict()
                cold.append(bench.thread_timed(step))
        finally:
            engine.__exit__(None, None, None)
        out.append([name, str(rows), f"{bench.median(hot) * 1e6:.0f}",
                    f"{bench.median(cold) * 1e6:.0f}", f"{bench.paired_ratio(cold, hot):.2f}"])
    return out


def unfuse(model: torch.nn.Module) -> None:
    """Send every hooked layer of ``model`` down the per-segment path (projections per
    segment, guidekit.attention.route.assemble) instead of the fused one: the engine as it
    was before guidekit.attention.fused, for a before/after in one run."""
    for m in model.modules():
        proc = getattr(m, "processor", None)
        if hasattr(proc, "fusable"):
            proc.fusable = False  # type: ignore[union-attr]


class _Count(TorchDispatchMode):
    """Counts the ATen operators dispatched (kernel launches, independent of the clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def op_count(fn: Callable[[], Any]) -> int:
    """ATen operators one call of ``fn`` dispatches."""
    with _Count() as count:
        fn()
    return count.ops


def call_count(fn: Callable[[], Any]) -> int:
    """Python function calls (Python and built-in) one call of ``fn`` makes: like the
    operator count, a measure of the step's work that no load on the machine changes."""
    count = 0

    def tick(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(tick)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def profile(step: Callable[[], Any], calls: int, top: int) -> None:
    """cProfile of ``calls`` steps: the top functions by own time and by cumulative time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main() -> None:
    p = bench.common_args(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    p.add_argument("--profile", action="store_true", help="print a cProfile summary of the "
                   "headline expression's step instead of timing")
    p.add_argument("--segments", action="store_true", help="also time each perturbed "
                   "expression with the per-segment path (the engine before fused.py)")
    p.add_argument("--wall", action="store_true", help="time wall clock instead of the "
                   "thread's CPU time")
    p.add_argument("--top", type=int, default=25, help="rows of the profile summary")
    p.add_argument("--cold", action="store_true", help="time guidekit's step with a stub "
                   "model instead, back to back (hot) and right after a bare forward (cold)")
    args = p.parse_args()
    session = bench.Session(args)
    net = bench.diffusers_dit()
    session.intro(bench.describe(net, "diffusers DiTTransformer2DModel", 6) + f"; B = {B}")
    if args.cold:
        header = ["expression (stub model)", "rows", "hot us/step", "cold us/step",
                  "cold / hot"]
        table = cold_and_hot(net, args.repeats or 300)
        print(bench.text_table(header, table))
        session.finish([bench.markdown(header, table)], ["thread CPU time, medians"])
        return
    if args.profile:
        name = list(EXPRESSIONS)[-1]
        step, engine, _ = guided_step(copy.deepcopy(net), EXPRESSIONS[name])
        for _ in range(20):
            step()
        print(f"cProfile of 200 steps of {name}")
        profile(step, 200, args.top)
        engine.__exit__(None, None, None)
        return
    repeats = args.repeats or 40
    steps: dict[str, Callable[[], Any]] = {}
    engines = []
    pairs = []
    variants = [(name, expr, True) for name, expr in EXPRESSIONS.items()]
    if args.segments:
        variants += [(f"{name}, segments", expr, False) for name, expr in EXPRESSIONS.items()
                     if name != "CFG(7)"]
    for name, expr, fuse in variants:
        # one engine per model at a time: each variant gets its own copy (same weights)
        model = copy.deepcopy(net)
        step, engine, rows = guided_step(model, expr)
        if not fuse:
            unfuse(model)
        engines.append(engine)
        steps[name] = step
        # its bare partner on a copy of its own, used as often as the guided copy: one bare
        # model shared by every pair ran 4x as often, its module objects warmer in the CPU
        # caches than any guided copy, which read as engine cost (about 0.3 ms a step)
        steps[f"bare {rows} rows of {name}"] = bare_step(copy.deepcopy(net), rows)
        pairs.append((name, f"bare {rows} rows of {name}", rows))
    try:
        for s in steps.values():  # warm up
            for _ in range(5):
                s()
        ops = {n: op_count(s) for n, s in steps.items()}
        calls = {n: call_count(s) for n, s in steps.items()}
        clock = bench.timed if args.wall else bench.thread_timed
        times = paired(steps, pairs, repeats, clock)
    finally:
        for engine in engines:
            engine.__exit__(None, None, None)
    rows_out = []
    for name, bare, rows in pairs:
        diffs = [g - b for g, b in zip(times[name], times[bare])]
        rows_out.append([
            name, str(rows), f"{bench.median(times[bare]) * 1e3:.2f}",
            f"{bench.median(times[name]) * 1e3:.2f}", f"{bench.median(diffs) * 1e3:.2f}",
            f"{bench.paired_ratio(times[name], times[bare]):.3f}", str(ops[name] - ops[bare]),
            str(calls[name] - calls[bare]),
        ])
    header = ["expression", "rows", "bare ms", "guided ms/step", "guided - bare ms",
              "guided / bare", "extra ATen ops", "extra Python calls"]
    print(bench.text_table(header, rows_out))
    notes = [f"{repeats} paired repeats, medians, {'wall' if args.wall else 'thread CPU'} time"]
    for name in EXPRESSIONS:
        if f"{name}, segments" in times:
            ratio = bench.paired_ratio(times[name], times[f"{name}, segments"])
            notes.append(f"{name}: guided step, fused / segments = {ratio:.3f}")
            print(notes[-1])
    session.finish([bench.markdown(header, rows_out)], notes)


if __name__ == "__main__":
    main()
