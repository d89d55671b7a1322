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
"""

from __future__ import annotations

import contextlib
import copy
import sys
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


def runner(net: torch.nn.Module, expr: Any, fixed: bool = False) -> Callable[[torch.nn.Module], torch.Tensor]:
    """One sampling run of ``expr`` through ``guidekit.guide()`` on a given module (the
    eager net or its compiled wrapper), the engine installed on ``net`` if needed."""
    plan = _plan(expr, fixed)
    c, u = bench.labels(1)
    sigmas = bench.schedule(STEPS)
    x0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    uses_engine = any(b.perturbation is not None for b in plan.branches)

    def run(m: torch.nn.Module) -> torch.Tensor:
        def fn(x: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
            return m(x, timestep=1000.0 * s / (1.0 + s), class_labels=class_labels).sample

        engine = install(net, plan) if uses_engine else contextlib.nullcontext()
        with torch.no_grad(), engine as around:
            g = guidekit.guide(plan, fn, cond={"class_labels": c}, uncond={"class_labels": u},
                               sigmas=sigmas, around_call=around)
            return bench.euler(lambda x, s: g(x, s), x0, sigmas)

    return run


def bare_runner(expr: Any, fixed: bool = False) -> Callable[[torch.nn.Module], torch.Tensor]:
    """The same steps without guidekit: the model called on as many rows per step as the
    plan's one call (x repeated, the labels built once per row count), row 0 the step's
    prediction."""
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
            return m(torch.cat([x] * k), timestep=t, class_labels=labels[k]).sample[:1]

        with torch.no_grad():
            return bench.euler(predict, x0, sigmas)

    return run


def measure(
    net: torch.nn.Module, expr: Any, backend: str, repeats: int, fixed: bool = False,
) -> list[str]:
    """First compiled run (s), frames compiled in it and in the later runs, eager and
    compiled ms per run, their paired ratio, guided / bare eager and compiled, and the
    compiled samples' largest deviation."""
    run = runner(net, expr, fixed)
    bare, bare_net = bare_runner(expr, fixed), copy.deepcopy(net)
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
    for _ in range(repeats):
        eager.append(bench.thread_timed(lambda: run(net)))
        comp.append(bench.thread_timed(lambda: run(compiled)))
        eager_bare.append(bench.thread_timed(lambda: bare(bare_net)))
        comp_bare.append(bench.thread_timed(lambda: bare(compiled_bare)))
    diff = float((run(compiled) - eager_out).abs().max())
    later = counters["frames"]["ok"] - frames_bare
    return [f"{first:.1f}", str(frames), str(later), f"{bench.median(eager) * 1e3:.1f}",
            f"{bench.median(comp) * 1e3:.1f}", f"{bench.paired_ratio(comp, eager):.2f}",
            f"{bench.paired_ratio(eager, eager_bare):.3f}",
            f"{bench.paired_ratio(comp, comp_bare):.3f}", f"{diff:.1e}"]


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
              "compiled / eager", "guided / bare, eager", "guided / bare, compiled",
              "max |compiled - eager|"]
    print(bench.text_table(header, rows))
    session.finish([bench.markdown(header, rows)],
                   [f"{repeats} interleaved repeats, medians, thread CPU time"])


if __name__ == "__main__":
    main()
