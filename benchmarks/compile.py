"""torch.compile with guidance: graphs, graph breaks and recompiles per expression.

Run: ``python benchmarks/compile.py [--threads 2] [--backend eager] [--write FILE]``.

The benchmark DiT (diffusers' ``DiTTransformer2DModel``, 6 layers) is compiled both ways a
user does it -- ``torch.compile(net)`` (an ``OptimizedModule``) and ``net.compile()`` (in
place) -- and sampled with ``guidekit.guide()`` and 8 Euler steps at batch 2, once per
expression after ``torch._dynamo.reset()``. For each it reports, from Dynamo's counters:

* ``frames``: frames Dynamo compiled in the first run (1 = the model call alone);
* ``graphs``: FX graphs captured; ``breaks``: graph breaks;
* ``recompiles``: frames compiled by a second run of the same expression (0 = none);
* ``max |compiled - eager|``: the samples against the uncompiled model's.

The plain plans (CFG, CFG | APG, CFG + Autoguidance) change nothing inside the model, so the
compiled call is the bare model's graph. Plans that use the attention engine (PAG, EMAG) are
listed as measured: the engine's hooks break the graph (their tracing is separate work).
Counts, not timings: the figures do not move with the machine's load.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as bench  # noqa: E402

import guidekit  # noqa: E402
from guidekit import APG, CFG, EMAG, PAG, Autoguidance  # noqa: E402
from guidekit.attention import install  # noqa: E402

STEPS, BATCH = 8, 2
EXPRS: list[tuple[str, Any]] = [
    ("plain", CFG(4)),
    ("plain", CFG(4) | APG(eta=0, momentum=-0.5)),
    ("plain", CFG(4) + Autoguidance(1.5)),
    ("engine", CFG(4) + PAG(3)),
    ("engine", CFG(4) + EMAG(2)),
]
STYLES = ("torch.compile(net)", "net.compile()")


def sample(net: torch.nn.Module, weak: torch.nn.Module, expr: Any) -> torch.Tensor:
    """8 Euler steps of ``expr`` through ``guidekit.guide()`` (the engine installed if the
    plan needs it), from fixed noise."""
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    c, u = bench.labels(BATCH)
    sigmas = bench.schedule(STEPS)

    def fn(m: torch.nn.Module) -> Any:
        def model(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
            return m(x, timestep=1000.0 * sigma / (1.0 + sigma), class_labels=class_labels).sample

        return model

    x = torch.randn(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    engine = install(net, plan) if plan.attention or any(b.perturbation for b in plan.branches) else None
    with engine if engine is not None else contextlib.nullcontext() as around:
        g = guidekit.guide(plan, fn(net), cond={"class_labels": c}, uncond={"class_labels": u},
                           models={"weak": fn(weak)}, sigmas=sigmas, around_call=around)
        return bench.euler(lambda x, s: g(x, s), x, sigmas)


def counts() -> tuple[int, int, int]:
    return (counters["frames"]["ok"], counters["stats"]["unique_graphs"],
            sum(counters["graph_break"].values()))


def measure(style: str, kind: str, expr: Any, backend: str) -> dict[str, Any]:
    net, weak = bench.diffusers_dit(layers=6), bench.diffusers_dit(layers=2, seed=1)
    with torch.no_grad():
        eager = sample(net, weak, expr)
        torch._dynamo.reset()
        counters.clear()
        target: Any
        if style == "net.compile()":
            net.compile(backend=backend)
            target = net
        else:
            target = torch.compile(net, backend=backend)
        out = sample(target, weak, expr)
        frames, graphs, breaks = counts()
        sample(target, weak, expr)
        again = counts()[0] - frames
        net._compiled_call_impl = None
        torch._dynamo.reset()
    return {"style": style, "kind": kind, "expr": repr(expr), "frames": frames, "graphs": graphs,
            "breaks": breaks, "recompiles": again, "diff": float((out - eager).abs().max())}


def main() -> None:
    p = bench.common_args(__doc__.splitlines()[0])
    p.add_argument("--backend", default="eager", help="torch.compile backend (default eager)")
    args = p.parse_args()
    session = bench.Session(args)
    session.intro(f"diffusers DiTTransformer2DModel 6 layers, batch {BATCH}, {STEPS} Euler "
                  f"steps through guidekit.guide(), backend={args.backend!r}, "
                  f"torch {torch.__version__}")
    head = "| compile | plan | expression | frames | graphs | breaks | recompiles (2nd run) | max abs diff vs eager |"
    lines = [head, "|" + "---|" * 8]
    for style in STYLES:
        for kind, expr in EXPRS:
            r = measure(style, kind, expr, args.backend)
            lines.append(f"| `{r['style']}` | {r['kind']} | `{r['expr'].replace('|', chr(92) + '|')}` | {r['frames']} | "
                         f"{r['graphs']} | {r['breaks']} | {r['recompiles']} | {r['diff']:.1e} |")
            print(lines[-1], flush=True)
    session.finish(lines)


if __name__ == "__main__":
    main()
