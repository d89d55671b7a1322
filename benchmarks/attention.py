"""Attention-space guidance per step: EMAG / CFG, EMAG-Q / CFG, PAG + CFG in one call vs
separate calls, and the memory of EMAG's state.

    python benchmarks/attention.py [--threads 2] [--repeats 30] [--tokens 64] [--write FILE]

The model is diffusers' ``DiTTransformer2DModel`` (6 blocks, 4 heads of 32 dims; ``--tokens``
image tokens, 64 by default = a 16 x 16 latent with patch 2). Each variant times one guided
step (``guided(x, sigma)``) in steady state: the run has taken two steps, so EMAG has its
averages and a selected layer, and every timed call re-evaluates the same level (the
repeated-level path of ``guidekit.state``, which recomputes the same step). Variants are
interleaved and each ratio is the median of per-repeat ratios (see ``_bench.py``).

"separate calls" is the same plan with ``max_rows=B``: one model call per branch, as the
official EMAG code and diffusers' guiders run them (the attention engine still routes rows).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _bench as bench  # noqa: E402

import guidekit  # noqa: E402
from guidekit import CFG, EMAG, EMAGQ, PAG  # noqa: E402
from guidekit.attention.ema import EMAState  # noqa: E402


def make_model(tokens: int, layers: int = 6) -> Any:
    from diffusers import DiTTransformer2DModel

    side = int(math.isqrt(tokens)) * 2
    torch.manual_seed(0)
    net = DiTTransformer2DModel(
        sample_size=side, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        num_attention_heads=4, attention_head_dim=32, num_embeds_ada_norm=bench.NUM_CLASSES,
    ).eval()
    with torch.no_grad():  # adaLN-zero would make every block an identity
        for p in net.parameters():
            if float(p.abs().sum()) == 0.0:
                p.normal_(0.0, 0.02)
    return net, side


def stepper(
    net: Any, side: int, expr: Any, batch: int, max_rows: int | None = None
) -> tuple[Callable[[], torch.Tensor], Any]:
    """A function running one guided step in steady state, and the Guided object."""
    plan = guidekit.compile(expr, prediction="eps", noise="vp", max_rows=max_rows)
    c, u = bench.labels(batch)
    x = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(0))
    sigmas = [3.0, 2.0, 1.0]

    def model(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return net(x, timestep=bench._timestep(sigma), class_labels=class_labels).sample

    engine = guidekit.attention.install(net, plan)
    around = engine.__enter__() if plan.branches and any(
        b.perturbation is not None for b in plan.branches
    ) else None
    guided = guidekit.guide(plan, model, cond={"class_labels": c},
                            uncond={"class_labels": u}, sigmas=sigmas, around_call=around)
    with torch.no_grad():
        guided(x, sigmas[0])
        guided(x, sigmas[1])

    def step() -> torch.Tensor:
        with torch.no_grad():
            return guided(x, sigmas[1])

    step.engine = engine if around is not None else None  # type: ignore[attr-defined]
    return step, guided


def main() -> None:
    p = bench.common_args(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64, help="image tokens (a square number)")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    print(bench.pin_threads(args.threads))
    print(bench.load())
    repeats = args.repeats or 30
    net, side = make_model(args.tokens)
    params = sum(q.numel() for q in net.parameters())
    print(f"diffusers DiTTransformer2DModel: 6 blocks, 4 heads x 32, {args.tokens} tokens, "
          f"{params / 1e6:.2f}M parameters; batch B = {args.batch}")
    b = args.batch
    candidates = (2, 3)
    variants = {
        "CFG(3)": (CFG(3), None),
        "CFG(3) + EMAG(1.5)": (CFG(3) + EMAG(1.5, layers=candidates), None),
        "CFG(3) + EMAGQ(1.5)": (CFG(3) + EMAGQ(1.5, layers=candidates), None),
        "CFG(3) + PAG(2)": (CFG(3) + PAG(2, layers=-1), None),
        "CFG(3) + PAG(2), separate calls": (CFG(3) + PAG(2, layers=-1), b),
        "CFG(3) + EMAG(1.5), separate calls": (CFG(3) + EMAG(1.5, layers=candidates), b),
    }
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    guided: dict[str, Any] = {}
    for name, (expr, max_rows) in variants.items():
        # one engine per model at a time: each variant gets its own copy (same weights)
        steps[name], guided[name] = stepper(make_model(args.tokens)[0], side, expr, b, max_rows)
    try:
        times = bench.interleaved(steps, repeats)
    finally:
        for s in steps.values():
            if s.engine is not None:  # type: ignore[attr-defined]
                s.engine.__exit__(None, None, None)  # type: ignore[attr-defined]
    base = times["CFG(3)"]
    rows = []
    for name in variants:
        rows_per_step = guided[name].plan.rows(2.0, b)
        nfe = guided[name].plan.nfe(2.0, b)
        rows.append([
            name, f"{nfe}", f"{rows_per_step}",
            f"{bench.median(times[name]) * 1e3:.1f}",
            f"{bench.paired_ratio(times[name], base):.2f}",
            f"±{bench.spread(times[name]) * 100:.0f}%",
        ])
    header = ["step", "calls", "rows", "ms / step", "÷ CFG step", "spread"]
    print(bench.text_table(header, rows))
    sep = bench.paired_ratio(times["CFG(3) + PAG(2), separate calls"], times["CFG(3) + PAG(2)"])
    sep_e = bench.paired_ratio(
        times["CFG(3) + EMAG(1.5), separate calls"], times["CFG(3) + EMAG(1.5)"]
    )
    print(f"PAG + CFG: separate calls / one call = {sep:.2f}")
    print(f"EMAG + CFG: separate calls / one call = {sep_e:.2f}")

    # memory of EMAG's state: exact bytes of the averages, fp32 and fp16
    mem_rows = []
    for dtype in ("float32", "float16"):
        for expr in (EMAG(1.5, layers=candidates, state_dtype=dtype),
                     EMAGQ(1.5, layers=candidates, state_dtype=dtype)):
            _, g = stepper(make_model(args.tokens)[0], side, CFG(3) + expr, b)
            st = next(v for v in g.state.current if isinstance(v, EMAState))
            mem_rows.append([repr(expr), f"{st.nbytes / 1024:.0f} KiB",
                             f"{st.nbytes / (params * 4):.3f}"])
            g.around_call.__self__.__exit__(None, None, None)  # the engine stepper entered
    print(bench.text_table(["state", "bytes", "÷ fp32 weights"], mem_rows))
    print(bench.load())
    if args.write:
        Path(args.write).write_text(
            bench.markdown(header, rows) + "\n\n" + bench.markdown(
                ["state", "bytes", "÷ fp32 weights"], mem_rows) + "\n"
        )


if __name__ == "__main__":
    main()
