"""torch.compile's gain with and without the attention engine: compiled / eager per run.

    OMP_NUM_THREADS=1 python benchmarks/compile_speed.py [--backend inductor] [--repeats 10]

The benchmark DiT (diffusers' ``DiTTransformer2DModel``, 6 layers, 16 tokens) samples 10
Euler steps at B = 1 through ``guidekit.guide()``, eagerly and as ``torch.compile(net)``
(the same module: the engine hooks its original), the engine installed when the plan
perturbs a branch. Per expression: the first compiled run (compiling included), the
frames Dynamo compiled in the first run and in every later run, then ``--repeats`` eager
and compiled runs interleaved, their thread CPU times paired; the figure is the median of
``compiled / eager``. A later run that compiled a frame (a guard failing on the engine's
state) would show here as a recompile and as a ratio near 1.

Each expression also has a bare partner: the same 10 steps calling a copy of the model (no
engine, no guidekit) on as many rows per step as the plan's call (its rows built by hand,
the first row taken as the step's prediction), eager and compiled (a compiled wrapper of
its own), timed in the same interleaved repeats. ``guided / bare`` eager and compiled
compare a run with guidekit (and the engine) against the same model calls without them.
guidekit's Python cost per step is about the same compiled or not, so it is a larger share
of a compiled run and every compiled ratio reads above its eager one; the engine costs
nothing extra under compile when an engine row's compiled ratio is no worse than plain
CFG's. The third row runs the gated expression with
``compile(..., fixed_shapes=True)``: three rows at every step, one graph.

Both runners also clock the thread CPU time spent inside the model calls alone (the
compiled wrapper's call, dynamo's guard check and the engine's traced processors
included): "in the calls" compiled, guided / bare, is what the engine adds to the compiled
call itself, and "outside the calls" is the rest of a step (guidekit's plan, or the bare
loop's few ops) in ms per run. "bare: compiled / eager" is what compiling gains on the
bare partner's calls alone: the same row counts, so the workload's own ratio. Last, in
``--repeats`` more compiled runs each model call is also made on the compiled bare copy
with the very same inputs (the engine active for the guided one), the order alternating:
"same inputs, compiled: guided call / bare call" (median over runs of the summed times) is
the engine's cost inside the compiled call alone, with plain CFG (no engine) as the control.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as bench  # noqa: E402

import guidekit  # noqa: E402
from guidekit import APG, CFG, EMAG, PAG  # noqa: E402
from guidekit.attention import install  # noqa: E402

STEPS = 10
FIXED = "CFG(5) + PAG(2).between(1, 10), fixed_shapes=True"
EXPRESSIONS: dict[str, Any] = {
    "CFG(5)": CFG(5),
    "CFG(5) + PAG(2).between(1, 10)": CFG(5) + PAG(2).between(1, 10),
    FIXED: CFG(5) + PAG(2).between(1, 10),
}
HEADLINE = {"CFG(7) + PAG(3) + EMAG(1.5) | APG(eta=0)": CFG(7) + PAG(3) + EMAG(1.5) | APG(eta=0)}


def _plan(expr: Any, fixed: bool) -> Any:
    return guidekit.compile(expr, prediction="eps", noise="ve", fixed_shapes=fixed)


class Clock:
    """Thread CPU seconds spent inside the model calls of the current run; with a
    ``partner`` (the compiled bare copy), each call is also made on it with the same
    inputs, the two in alternating order, and its seconds kept apart."""

    def __init__(self) -> None:
        self.inside = 0.0
        self.partner: torch.nn.Module | None = None
        self.partner_inside = 0.0
        self._flip = False

    def call(self, m: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        self._flip = not self._flip
        if self.partner is not None and self._flip:
            self.partner_inside += _seconds(self.partner, args, kwargs)[1]
        out, took = _seconds(m, args, kwargs)
        self.inside += took
        if self.partner is not None and not self._flip:
            self.partner_inside += _seconds(self.partner, args, kwargs)[1]
        return out


def _seconds(m: torch.nn.Module, args: Any, kwargs: Any) -> tuple[Any, float]:
    start = time.thread_time()
    out = m(*args, **kwargs)
    return out, time.thread_time() - start


def clocked(run: Callable[[torch.nn.Module], torch.Tensor], m: torch.nn.Module,
            clock: Clock, total: list[float], inside: list[float]) -> None:
    """One timed run: its thread CPU time, and the part of it spent in the model calls."""
    clock.inside = 0.0
    total.append(bench.thread_timed(lambda: run(m)))
    inside.append(clock.inside)


def runner(net: torch.nn.Module, expr: Any, fixed: bool = False,
           clock: Clock | None = None) -> Callable[[torch.nn.Module], torch.Tensor]:
    """One sampling run of ``expr`` through ``guidekit.guide()`` on a given module (the
    eager net or its compiled wrapper), the engine installed on ``net`` if needed."""
    call = (clock or Clock()).call
    plan = _plan(expr, fixed)
    c, u = bench.labels(1)
    sigmas = bench.schedule(STEPS)
    x0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    uses_engine = any(b.perturbation is not None for b in plan.branches)

    def run(m: torch.nn.Module) -> torch.Tensor:
        def fn(x: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
            return call(m, x, timestep=1000.0 * s / (1.0 + s), class_labels=class_labels).sample

        engine = install(net, plan) if uses_engine else contextlib.nullcontext()
        with torch.no_grad(), engine as around:
            g = guidekit.guide(plan, fn, cond={"class_labels": c}, uncond={"class_labels": u},
                               sigmas=sigmas, around_call=around)
            return bench.euler(lambda x, s: g(x, s), x0, sigmas)

    return run


def bare_runner(expr: Any, fixed: bool = False,
                clock: Clock | None = None) -> Callable[[torch.nn.Module], torch.Tensor]:
    """The same steps without guidekit: the model called on as many rows per step as the
    plan's one call (x repeated, the labels built once per row count), row 0 the step's
    prediction."""
    call = (clock or Clock()).call
    plan = _plan(expr, fixed)
    c, u = bench.labels(1)
    sigmas = bench.schedule(STEPS)
    x0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    rows = [plan.rows(s, 1) for s in sigmas]
    labels = {k: torch.cat([c, u, *[c] * (k - 2)]) for k in set(rows)}

    def run(m: torch.nn.Module) -> torch.Tensor:
        step = iter(rows)

        def predict(x: torch.Tensor, s: float) -> torch.Tensor:
            k = next(step)
            t = torch.full((k,), 1000.0 * s / (1.0 + s))
            return call(m, torch.cat([x] * k), timestep=t, class_labels=labels[k]).sample[:1]

        with torch.no_grad():
            return bench.euler(predict, x0, sigmas)

    return run


def measure(
    net: torch.nn.Module, expr: Any, backend: str, repeats: int, fixed: bool = False,
) -> list[str]:
    """First compiled run (s), frames compiled in it and in the later runs, eager and
    compiled ms per run, their paired ratio, guided / bare eager and compiled, and the
    compiled samples' largest deviation; then, compiled, the ms per run spent in the model
    calls and outside them, guided / bare."""
    clock, clock_bare = Clock(), Clock()
    run = runner(net, expr, fixed, clock)
    bare, bare_net = bare_runner(expr, fixed, clock_bare), copy.deepcopy(net)
    torch._dynamo.reset()
    counters.clear()
    compiled: Any = torch.compile(net, backend=backend)
    eager_out = run(net)
    first = bench.timed(lambda: run(compiled))
    frames = counters["frames"]["ok"]
    compiled_bare: Any = torch.compile(bare_net, backend=backend)
    for _ in range(2):  # its compiles (one per row count) before anything is timed
        bare(compiled_bare)
    frames_bare = counters["frames"]["ok"]
    eager, comp, eager_bare, comp_bare = [], [], [], []
    inside: dict[str, list[float]] = {k: [] for k in ("eager", "comp", "eager_bare", "comp_bare")}
    for _ in range(repeats):
        clocked(run, net, clock, eager, inside["eager"])
        clocked(run, compiled, clock, comp, inside["comp"])
        clocked(bare, bare_net, clock_bare, eager_bare, inside["eager_bare"])
        clocked(bare, compiled_bare, clock_bare, comp_bare, inside["comp_bare"])
    ms = lambda xs: bench.median(xs) * 1e3  # noqa: E731
    same: list[float] = []  # the engine inside a compiled call: the same inputs, A/B
    clock.partner = compiled_bare
    for _ in range(repeats):
        clock.inside = clock.partner_inside = 0.0
        run(compiled)
        same.append(clock.inside / clock.partner_inside)
    clock.partner = None
    outside = [t - i for t, i in zip(comp, inside["comp"])]
    outside_bare = [t - i for t, i in zip(comp_bare, inside["comp_bare"])]
    diff = float((run(compiled) - eager_out).abs().max())
    later = counters["frames"]["ok"] - frames_bare
    return [f"{first:.1f}", str(frames), str(later), f"{bench.median(eager) * 1e3:.1f}",
            f"{bench.median(comp) * 1e3:.1f}", f"{bench.paired_ratio(comp, eager):.2f}",
            f"{bench.paired_ratio(comp_bare, eager_bare):.2f}",
            f"{bench.paired_ratio(eager, eager_bare):.3f}",
            f"{bench.paired_ratio(comp, comp_bare):.3f}", f"{diff:.1e}",
            f"{ms(inside['comp']):.1f} / {ms(inside['comp_bare']):.1f}",
            f"{ms(outside):.2f} / {ms(outside_bare):.2f}", f"{bench.median(same):.3f}"]


def main() -> None:
    p = bench.common_args(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor)")
    p.add_argument("--headline", action="store_true", help="also the engine-cost benchmark's "
                   "headline expression (EMAG: three frames to compile, minutes on 2 cores)")
    args = p.parse_args()
    session = bench.Session(args)
    net = bench.diffusers_dit()
    session.intro(bench.describe(net, "diffusers DiTTransformer2DModel", 6)
                  + f"; B = 1, {STEPS} Euler steps, backend={args.backend!r}")
    repeats = args.repeats or 10
    exprs = {**EXPRESSIONS, **(HEADLINE if args.headline else {})}
    rows = []
    for name, expr in exprs.items():
        rows.append([name, *measure(net, expr, args.backend, repeats, name == FIXED)])
        print(rows[-1], flush=True)
    header = ["expression", "first compiled run s", "frames (1st run)",
              f"frames ({repeats + 1} later runs)", "eager ms/run", "compiled ms/run",
              "compiled / eager", "bare: compiled / eager", "guided / bare, eager", "guided / bare, compiled",
              "max |compiled - eager|", "in the calls, compiled: guided / bare ms/run",
              "outside the calls, compiled: guided / bare ms/run",
              "same inputs, compiled: guided call / bare call"]
    print(bench.text_table(header, rows))
    session.finish([bench.markdown(header, rows)],
                   [f"{repeats} interleaved repeats, medians, thread CPU time"])


if __name__ == "__main__":
    main()
