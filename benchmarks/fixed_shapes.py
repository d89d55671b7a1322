"""Fixed shapes (``compile(expr, fixed_shapes=True)``): compiles and rows per run of a
``torch.compile``-d diffusers DiT (``backend="eager"`` on CPU) under gated expressions.

For each expression, default and fixed shapes: a 10-step Euler run twice with one engine,
counting the frames Dynamo compiled in each run (``torch._dynamo.utils.counters``), the
model rows of a run, and the largest difference of the fixed-shape sample from the
default's.

    OMP_NUM_THREADS=1 python benchmarks/fixed_shapes.py [--write FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import diffusers_dit, emit, euler, labels, markdown, schedule  # noqa: E402

import guidekit  # noqa: E402
from guidekit import CFG, EMAG, PAG, SEG  # noqa: E402
from guidekit.attention import install  # noqa: E402

B, STEPS = 2, 10
EXPRESSIONS = {
    "CFG(5) + PAG(2).between(1, 10)": CFG(5) + PAG(2, layers=[5]).between(1, 10),
    "CFG(5) + SEG(2).between(1, 10)": CFG(5) + SEG(2, layers=[5]).between(1, 10),
    "CFG(5).between(0.5, 10)": CFG(5).between(0.5, 10),
    "CFG(5) + EMAG(1.5).between(1, 10)": CFG(5) + EMAG(1.5, layers=(2, 3)).between(1, 10),
}


def measure(expr: Any, fixed: bool) -> tuple[list[int], int, torch.Tensor]:
    net = diffusers_dit(layers=6)
    plan = guidekit.compile(expr, fixed_shapes=fixed)

    def model(x: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor) -> Any:
        return net(x, timestep=1000.0 * s / (1.0 + s), class_labels=class_labels).sample

    fn = torch.compile(model, backend="eager")
    c, u = labels(B)
    sigmas = schedule(STEPS)
    x0 = sigmas[0] * torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counts, rows = [], 0
    with torch.no_grad(), install(net, plan) as around:
        for _ in range(2):
            before = torch._dynamo.utils.counters["frames"]["ok"]
            g = guidekit.guide(plan, fn, cond={"class_labels": c}, uncond={"class_labels": u},
                               sigmas=sigmas, around_call=around)
            out = euler(g, x0, sigmas)
            counts.append(torch._dynamo.utils.counters["frames"]["ok"] - before)
            rows = sum(r.rows for r in g.calls)
    return counts, rows, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", metavar="FILE", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    header = ["expression", "compiles (run 1, run 2)", "fixed: compiles", "rows per run",
              "fixed: rows", "max |fixed - default|"]
    rows = []
    for name, expr in EXPRESSIONS.items():
        d_counts, d_rows, d_out = measure(expr, False)
        f_counts, f_rows, f_out = measure(expr, True)
        rows.append([name, str(tuple(d_counts)), str(tuple(f_counts)), str(d_rows), str(f_rows),
                     f"{float((f_out - d_out).abs().max()):.1e}"])
    text = (f"torch {torch.__version__}, backend eager, B = {B}, {STEPS} steps\n\n"
            + markdown(header, rows))
    emit(text, args.write)


if __name__ == "__main__":
    main()
