"""Time and peak memory of the EMAG paper's Table 2 rows on the shipped scenes model.

Each expression samples ``--batch`` held-out captions for ``--steps`` Euler steps through
``sample_scenes`` (one batched call per step, the attention engine installed where needed).
Times are interleaved over ``--repeats`` (the order rotated each repeat) and read as the
median ratio to CFG's neighbouring timing; peak memory is the largest running total of CPU
allocations in one profiled run (``torch.profiler``, ``profile_memory=True``) over CFG's.
The paper's figures (SD3 at 1024 px on an A100): EMAG +213 % time and 1.75x memory over CFG,
EMAG-Q +94.5 % and 1.00x, SEG +50 %, SAG +79 %.

    OMP_NUM_THREADS=2 python benchmarks/scenes_cost.py [--batch 60] [--steps 10] [--write F]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import common_args, emit, interleaved, markdown, paired_ratio, pin_threads, spread  # noqa: E402
from memory import peak_bytes  # noqa: E402

from guidekit.models.scenes.model import load_scene_model  # noqa: E402
from guidekit.models.scenes.sample import sample_scenes  # noqa: E402
from guidekit.models.sweep.scenes import SCENES  # noqa: E402

ROWS = (
    "CFG(3)", "CFG(3) + SAG(1)", "CFG(3) + SEG(1)", "CFG(3) | APG(eta=0)", "CFG(3) | CADS()",
    "CFG(3) + EMAG(1.5)", "CFG(3) + EMAGQ(1.5)", "CFG(3) + EMAG(1.5) | APG(eta=0)",
    "CFG(3) + EMAG(1.5) | CADS()", "CFG(3) + PAG(1)",
)


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    args.repeats = args.repeats or 5
    machine = pin_threads(args.threads)
    model = load_scene_model()
    captions = list(SCENES.conditioning(-(-args.batch // 10)).captions[:args.batch])

    def run(text: str) -> Any:
        return sample_scenes(model, text, captions, steps=args.steps, seed=0)

    times = interleaved({t: (lambda t=t: run(t)) for t in ROWS}, args.repeats, warmup=1)
    peaks = {}
    for t in ROWS:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            r = run(t)
        peaks[t] = (peak_bytes(prof)[0], len(r.calls) // args.steps, r.calls[0].rows)
    base_time, base_peak = times[ROWS[0]], peaks[ROWS[0]][0]
    rows = []
    for t in ROWS:
        ratio = paired_ratio(times[t], base_time)
        rows.append((t, f"{peaks[t][1]}", f"{peaks[t][2]}", f"{min(times[t]):.2f}",
                     f"{ratio:.2f} ± {spread([a / b for a, b in zip(times[t], base_time)]):.2f}",
                     f"{peaks[t][0] / 2**20:.0f}", f"{peaks[t][0] / base_peak:.2f}"))
    emit("\n".join([
        machine, f"scenes model, {args.batch} captions, {args.steps} Euler steps, "
        f"{args.repeats} interleaved repeats",
        markdown(("expression", "calls/step", "rows (1st call)", "min s", "time ÷ CFG",
                  "peak MiB", "peak ÷ CFG"), rows),
    ]), args.write)


if __name__ == "__main__":
    main()
