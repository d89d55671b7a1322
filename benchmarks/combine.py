"""The linear combine of one call's rows: one kernel (``lerp`` / one matrix product) against a
multiply and an add per branch, at latent sizes from the benchmark DiT's to SDXL's.

    OMP_NUM_THREADS=1 python benchmarks/combine.py [--threads 1] [--repeats 200]

For each expression and per-sample size ``n`` (channels x height x width), a guided step's
model output of ``K x B`` rows (random values) goes through ``Plan._combine`` twice, the
two interleaved: as the plan does it (the call's output handed over: one kernel) and term by
term (no call output: ``y = a0 r0``, then ``y += ai ri``). The figure is the median over
repeats of the time per combine, hot (the loop does nothing else, so unlike a sampler step
nothing evicts the caches between combines), and the ratio of neighbouring timings. Both
results are checked to agree (relative 1e-6) before timing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _bench as bench  # noqa: E402

import guidekit  # noqa: E402
from guidekit import CFG  # noqa: E402
from guidekit.context import StepContext  # noqa: E402

B = 2
SIZES = {"benchmark DiT (1x8x8)": (1, 8, 8), "SD 1.5 at 512 (4x64x64)": (4, 64, 64),
         "SDXL at 1024 (4x128x128)": (4, 128, 128)}
EXPRESSIONS = {
    "CFG(7)": CFG(7),
    "CFG(7) + (CFG(3, negative='neg') - CFG(3))": CFG(7) + (CFG(3, negative="neg") - CFG(3)),
    "CFG(7) + PAG(3) + EMAG(1.5)": CFG(7) + guidekit.PAG(3) + guidekit.EMAG(1.5),
}


def main() -> None:
    p = bench.common_args(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    args = p.parse_args()
    session = bench.Session(args)
    repeats = args.repeats or 200
    session.intro(f"B = {B}; {repeats} interleaved repeats, medians")
    rows = []
    for name, expr in EXPRESSIONS.items():
        plan = guidekit.compile(expr, prediction="eps", noise="vp")
        prog = plan.program(1.0)
        (group,) = prog.groups
        k = len(group.branches)
        for size_name, shape in SIZES.items():
            x = torch.randn(B, *shape)
            full = torch.randn(k * B, *shape)
            native = dict(zip(group.branches, full.split_with_sizes([B] * k)))
            ctx = StepContext(x=x, sigma=1.0, level=0, seed=0, prediction="eps",
                              noise=plan.noise, coefs=prog.coef_map, native=native)
            one = plan._combine(prog, ctx, [full])
            by_terms = plan._combine(prog, ctx)
            assert torch.allclose(one, by_terms, rtol=1e-6, atol=1e-6 * float(by_terms.abs().max()))
            times: dict[str, list[float]] = {"one": [], "terms": []}
            for r in range(repeats):
                for variant in (("one", "terms") if r % 2 else ("terms", "one")):
                    whole = [full] if variant == "one" else []
                    start = time.perf_counter()
                    plan._combine(prog, ctx, whole)
                    times[variant].append(time.perf_counter() - start)
            rows.append([name, str(k), size_name, f"{bench.median(times['terms']) * 1e6:.1f}",
                         f"{bench.median(times['one']) * 1e6:.1f}",
                         f"{bench.paired_ratio(times['one'], times['terms']):.2f}"])
    header = ["expression", "rows per sample", "latent", "term by term us", "one kernel us",
              "one kernel / term by term"]
    print(bench.text_table(header, rows))
    session.finish([bench.markdown(header, rows)], [f"B = {B}, {repeats} repeats"])


if __name__ == "__main__":
    main()
