"""Peak CPU memory per guidance term, and what EMAG and EMAG-Q keep between steps.

A diffusers ``DiTTransformer2DModel`` (6 layers, 4 heads of 32 dims, random weights) at 64
or 256 image tokens samples ``--steps`` Euler steps at batch B under each expression, with
the attention engine installed. ``torch.profiler`` (``profile_memory=True``) records every
CPU allocation and free of the run; the figures are:

* ``peak MiB``: the largest total of bytes allocated during the run and not yet freed
  (what the run adds on top of the weights and inputs held before it);
* ``÷ CFG``: that peak over CFG's at the same size;
* ``held MiB``: of that, what is still allocated when the run ends (the run object alive);
* ``kept MiB``: the size of the current state (EMAG's averages: ``EMAState.nbytes``), and
  the layers it holds them for;
* ``softmax / step``: explicit softmax calls per step (a materialised attention map; the
  model's own attention is fused ``scaled_dot_product_attention``).

The script also checks that EMAG keeps maps only for its candidate layers, of exactly
``B x heads x T x T`` floats each, and EMAG-Q queries of ``B x heads x T x head_dim``.

    OMP_NUM_THREADS=1 python benchmarks/memory.py [--tokens 64 256] [--batch 4] [--write FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import _randomised, emit, euler, labels, load, markdown, schedule  # noqa: E402

import guidekit  # noqa: E402
from guidekit import CFG, EMAG, EMAGQ, PAG, SAG, SEG  # noqa: E402
from guidekit.attention import install  # noqa: E402

HEADS, DIM, LAYERS, CANDIDATES = 4, 32, 6, (2, 3)


def expressions() -> dict[str, Any]:
    return {
        "CFG(3)": CFG(3),
        "CFG(3) + PAG(2)": CFG(3) + PAG(2, layers=[5]),
        "CFG(3) + EMAG(1.5)": CFG(3) + EMAG(1.5, layers=CANDIDATES),
        "CFG(3) + EMAG(1.5, state_dtype='float16')":
            CFG(3) + EMAG(1.5, layers=CANDIDATES, state_dtype="float16"),
        "CFG(3) + EMAGQ(1.5)": CFG(3) + EMAGQ(1.5, layers=CANDIDATES),
        "CFG(3) + SEG(2)": CFG(3) + SEG(2, layers=[5]),
        "CFG(3) + SAG(0.75)": CFG(3) + SAG(0.75, layers=[5]),
    }


def dit(tokens: int) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    side = int(round(tokens**0.5)) * 2  # patch 2
    torch.manual_seed(0)
    net = DiTTransformer2DModel(
        sample_size=side, patch_size=2, in_channels=1, out_channels=1, num_layers=LAYERS,
        num_attention_heads=HEADS, attention_head_dim=DIM, num_embeds_ada_norm=10,
    ).eval()  # type: ignore[attr-defined]
    return _randomised(net)


def peak_bytes(prof: Any) -> tuple[int, int]:
    """Largest running total of the profiled allocations minus frees, in time order, and the
    total still held at the end."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak, total


def measure(net: torch.nn.Module, expr: Any, batch: int, steps: int) -> dict[str, Any]:
    plan = guidekit.compile(expr)
    c, u = labels(batch)
    side = net.config.sample_size
    x0 = 10.0 * torch.randn(batch, 1, side, side, generator=torch.Generator().manual_seed(0))
    sigmas = schedule(steps)

    def model(x: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor) -> Any:
        return net(x, timestep=1000.0 * s / (1.0 + s), class_labels=class_labels).sample

    with torch.no_grad(), install(net, plan) as around:
        def run() -> Any:
            g = guidekit.guide(plan, model, cond={"class_labels": c}, uncond={"class_labels": u},
                               sigmas=sigmas, around_call=around)
            euler(g, x0, sigmas)
            return g

        run()  # warm-up: lazily made buffers are not the term's
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            g = run()
    softmax = sum(1 for e in prof.events() if e.name == "aten::_softmax")
    kept, layers = 0, []
    for value in g.state.named().values():
        if hasattr(value, "ema"):  # EMAG's averages
            kept += value.nbytes
            layers += sorted(value.ema)
    peak, held = peak_bytes(prof)
    return {"peak": peak, "held": held, "kept": kept, "layers": layers, "softmax": softmax / steps,
            "rows": plan.rows(sigmas[0], batch)}


def check_state(results: dict[str, Any], tokens: int, batch: int) -> None:
    """EMAG: maps for the candidate layers only; EMAG-Q: queries; both exact in size."""
    paths = [f"transformer_blocks.{i}.attn1" for i in CANDIDATES]
    for name, per_float, size in (
        ("CFG(3) + EMAG(1.5)", 4, tokens * tokens),
        ("CFG(3) + EMAG(1.5, state_dtype='float16')", 2, tokens * tokens),
        ("CFG(3) + EMAGQ(1.5)", 4, tokens * DIM),
    ):
        r = results[name]
        assert r["layers"] == paths, (name, r["layers"])
        want = len(paths) * batch * HEADS * size * per_float
        assert r["kept"] == want, (name, r["kept"], want)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--write", metavar="FILE", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    start, t0 = load(), time.time()
    lines = []
    for tokens in args.tokens:
        net = dit(tokens)
        weights = sum(t.numel() * t.element_size() for t in net.parameters())
        results = {name: measure(net, e, args.batch, args.steps)
                   for name, e in expressions().items()}
        check_state(results, tokens, args.batch)
        base = results["CFG(3)"]["peak"]
        header = ["expression", "rows", "peak MiB", "÷ CFG", "held MiB", "kept MiB", "kept for",
                  "softmax / step"]
        rows = [[name, str(r["rows"]), f"{r['peak'] / 2**20:.2f}", f"{r['peak'] / base:.2f}",
                 f"{r['held'] / 2**20:.2f}", f"{r['kept'] / 2**20:.2f}",
                 ", ".join(r["layers"]) or "-", f"{r['softmax']:g}"]
                for name, r in results.items()]
        lines += [f"{tokens} tokens, B = {args.batch}, {args.steps} steps; fp32 weights "
                  f"{weights / 2**20:.2f} MiB", "", markdown(header, rows), ""]
    lines.insert(0, f"at start: {start}; at end: {load()}; took {time.time() - t0:.0f} s; "
                    f"torch {torch.__version__}, 1 thread\n")
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
