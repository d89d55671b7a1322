"""Branch parallelism (``compile(expr, parallel=group)``) against one process, on this CPU.

Three ways to run the same 10-step Euler sampling of the benchmark DiT
(``benchmarks/_bench.py``: diffusers ``DiTTransformer2DModel``, 16 tokens, 2.12M
parameters) for CFG, CFG + PAG and CFG + EMAG at B = 1, 4, 16:

* ``1 proc x 1 thread``: one process, one torch thread;
* ``1 proc x 2 threads``: one process, two torch threads (the machine's cores);
* ``2 ranks x 1 thread``: two gloo ranks under torchrun, each with one thread, sharing
  each call's branch blocks (``parallel=torch.distributed.group.WORLD``).

Each configuration is a torchrun job of its own (``--worker``; one process for the first
two), the three run one after the other, and the whole round is repeated (``--rounds``) so
that drift of a shared machine shows. Per cell: the median ms/step over ``--repeats``
timed runs (ranks synchronised by a barrier before and after each run). The script checks
that every configuration's samples equal the first's (max abs difference printed).

    OMP_NUM_THREADS=1 python benchmarks/parallel.py [--repeats 5] [--rounds 2] [--write FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import diffusers_dit, emit, euler, labels, load, markdown, schedule  # noqa: E402

CONFIGS = (("1 proc x 1 thread", 1, 1), ("1 proc x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1))


def expressions() -> dict[str, Any]:
    from guidekit import CFG, EMAG, PAG

    return {"CFG(3)": CFG(3), "CFG(3) + PAG(2)": CFG(3) + PAG(2, layers=[5]),
            "CFG(3) + EMAG(1.5)": CFG(3) + EMAG(1.5, layers=(2, 3))}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import guidekit
    from guidekit.attention import install

    dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    world = dist.get_world_size()
    net = diffusers_dit(layers=6)
    sigmas = schedule(args.steps)
    results: dict[str, Any] = {}
    samples: dict[str, torch.Tensor] = {}
    for name, expr in expressions().items():
        plan = guidekit.compile(expr, parallel=dist.group.WORLD if world > 1 else None)
        for b in args.batches:
            c, u = labels(b)
            x0 = sigmas[0] * torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(b))
            times = []
            with torch.no_grad(), install(net, plan) as around:
                def model(x: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor) -> Any:
                    return net(x, timestep=1000.0 * s / (1.0 + s), class_labels=class_labels).sample

                for k in range(args.repeats + 1):  # the first run warms up
                    g = guidekit.guide(plan, model, cond={"class_labels": c},
                                       uncond={"class_labels": u}, sigmas=sigmas,
                                       around_call=around)
                    dist.barrier()
                    t0 = time.perf_counter()
                    out = euler(g, x0, sigmas)
                    dist.barrier()
                    if k:
                        times.append((time.perf_counter() - t0) * 1e3 / args.steps)
            results[f"{name}|{b}"] = statistics.median(times)
            samples[f"{name}|{b}"] = out
    if dist.get_rank() == 0:
        torch.save(samples, args.out + ".pt")
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()  # every rank done before any tears its connections down
    dist.destroy_process_group()


def launch(nproc: int, threads: int, args: argparse.Namespace, out: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), __file__, "--worker", "--threads", str(threads), "--out", out,
           "--repeats", str(args.repeats), "--steps", str(args.steps),
           "--batches", *map(str, args.batches)]
    subprocess.run(cmd, check=True, env={**__import__("os").environ, "OMP_NUM_THREADS": str(threads)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--write", metavar="FILE", default=None)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    start, t0 = load(), time.time()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            got: dict[str, dict[str, float]] = {}
            samples: dict[str, dict[str, torch.Tensor]] = {}
            for label, nproc, threads in CONFIGS:
                out = str(Path(tmp) / f"{r}-{nproc}-{threads}.json")
                launch(nproc, threads, args, out)
                got[label] = json.loads(Path(out).read_text())
                print(f"round {r + 1}, {label}: {got[label]}", flush=True)  # partial results
                samples[label] = torch.load(out + ".pt")
            first = samples[CONFIGS[0][0]]
            diffs = [max(float((samples[c[0]][k] - first[k]).abs().max()) for k in first)
                     for c in CONFIGS[1:]]
            scale = max(float(v.abs().max()) for v in first.values())
            header = ["expression", "B", *(f"{c[0]} ms/step" for c in CONFIGS),
                      "2 ranks / 1 thread", "2 ranks / 2 threads"]
            rows = []
            for key in first:
                name, b = key.split("|")
                t = [got[c[0]][key] for c in CONFIGS]
                rows.append([name, b, *(f"{v:.2f}" for v in t),
                             f"{t[2] / t[0]:.2f}", f"{t[2] / t[1]:.2f}"])
            agree = ", ".join(f"{c[0]} {d:.1e}" for c, d in zip(CONFIGS[1:], diffs))
            lines += [f"round {r + 1}: samples (max |x| {scale:.1f}) differ from "
                      f"{CONFIGS[0][0]}'s by at most: {agree}", "", markdown(header, rows), ""]
    lines.insert(0, f"at start: {start}; at end: {load()}; took {time.time() - t0:.0f} s  \n"
                    f"torch {torch.__version__}, {args.steps} steps, {args.repeats} timed runs "
                    f"per cell (median)\n")
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
