"""``guidekit sweep``: a grid of guidance scales per method on the bundled digit models.

Every job is one (model, method, scale, seed): sample every digit ``samples`` times with
``guidekit.models.sample`` and score the result with ``guidekit.models.evaluate`` (class
accuracy, Fréchet distance to held-out real digits, diversity gap). The sweep writes

* ``runs.csv``: one line per job;
* ``summary.csv`` and ``summary.md``: per (model, method, scale) the mean and the sample
  standard deviation (ddof 1) over seeds;
* ``pareto-<model>.png``: FD against accuracy, one panel per method, Pareto-optimal
  configurations joined (needs matplotlib: ``pip install 'guidekit[plots]'``);
* ``speed.csv``: per-step time ratios measured in the same run (guided step / bare batched
  forward of the same rows, one call vs a call per branch, EMAG / CFG, ...).

Scale-out: run it under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node 2
--standalone -m guidekit sweep ...``) and each process takes every ``world``-th job; rank 0
gathers the metrics (``gather_object``; gloo on CPU, nccl on GPU), writes the files and
measures the speed figures alone. Seeds belong to jobs, not to ranks, and every process pins
the same number of torch threads, so the numbers equal a single process's exactly (on the
same device type; only the ``seconds`` column differs).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from guidekit.demo_models import DIGITS, ModelCache, digit_labels, weak_name
from guidekit.errors import GuidanceError

#: ``method -> (expression template with {s}, default scales)``. "none" is the unguided
#: conditional baseline every Pareto plot shows. Combinations fix CFG at a mild 1.5 (the
#: best FD of CFG alone on both bundled models, docs/benchmarks.md) and sweep the partner.
#: The grid is small on purpose: 24 configurations per model x 3 seeds (144 jobs) take
#: about 4 minutes on 2 CPU cores; ``--scales`` or :func:`make_jobs` give other grids.
METHODS: dict[str, tuple[str, tuple[float, ...]]] = {
    "none": ("Cond()", (0.0,)),
    "CFG": ("CFG({s})", (1.25, 1.5, 2.0, 3.0)),
    "PAG": ("Cond() + PAG({s})", (0.5, 1.0, 2.0)),
    "CFG+PAG": ("CFG(1.5) + PAG({s})", (0.5, 1.0)),
    "Autoguidance": ("Cond() + Autoguidance({s})", (0.5, 1.0, 2.0)),
    "APG": ("CFG({s}) | APG(eta=0)", (1.5, 2.0, 3.0)),
    "CADS": ("CFG({s}) | CADS()", (1.5, 2.0, 3.0)),
    "EMAG": ("Cond() + EMAG({s})", (1.0, 3.0, 10.0)),
    "CFG+EMAG": ("CFG(1.5) + EMAG({s})", (1.0, 3.0)),
}
METRICS = ("accuracy", "fd", "diversity", "diversity_gap")


def fmt_scale(scale: float) -> str:
    return f"{scale:g}"


def expression(method: str, scale: float) -> str:
    """The guidance text of ``method`` at ``scale`` (read by ``guidekit.parse``)."""
    return METHODS[method][0].format(s=fmt_scale(scale))


@attrs.frozen
class Job:
    """One sweep job. ``seed`` seeds the sampling (noise, plan state): jobs that differ only
    in method or scale share their initial noise, so comparisons are paired."""

    index: int
    model: str
    method: str
    scale: float
    seed: int

    @property
    def text(self) -> str:
        return expression(self.method, self.scale)


def check_methods(methods: Iterable[str] | None = None) -> list[str]:
    """The requested methods in order (all of :data:`METHODS` for ``None``); unknown names
    raise ``ValueError`` naming the choices."""
    wanted = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    return wanted


def unsupported(models: ModelCache, model: str, method: str) -> str | None:
    """Why ``model`` cannot run ``method`` (a GuidanceError from a one-step probe), or None.

    Probed, not assumed: a method the model cannot feed is reported, not faked.
    """
    from guidekit.models import sample

    text = expression(method, METHODS[method][1][0])
    bundled = models(model)
    weak = models(weak_name(model)) if "Autoguidance" in text else None
    try:
        sample(bundled, text, [0, 1], steps=1, seed=0, weak=weak)
    except GuidanceError as err:
        return f"{type(err).__name__}: {err}"
    return None


def make_jobs(models: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
              scales: Sequence[float] | None = None) -> list[Job]:
    """The grid in a fixed order: model, method, scale, seed (``index`` is the position).

    ``scales`` replaces every method's default scales (the "none" baseline keeps its 0).
    """
    jobs: list[Job] = []
    for model in models:
        for method in methods:
            grid = METHODS[method][1] if scales is None or method == "none" else tuple(scales)
            for scale in grid:
                for seed in seeds:
                    jobs.append(Job(len(jobs), model, method, float(scale), int(seed)))
    return jobs


def run_job(job: Job, models: ModelCache, *, per_digit: int, steps: int) -> dict[str, Any]:
    """Sample and score one job; a CSV row (``seconds`` is the only non-reproducible field)."""
    from guidekit.models import evaluate, sample

    labels = digit_labels(per_digit)
    bundled = models(job.model)
    weak = models(weak_name(job.model)) if "Autoguidance" in job.text else None
    result = sample(bundled, job.text, labels, steps=steps, seed=job.seed, weak=weak)
    m = evaluate(result.images, labels)
    return {
        "index": job.index, "model": job.model, "method": job.method,
        "scale": fmt_scale(job.scale), "expression": job.text, "seed": job.seed,
        "samples": int(labels.shape[0]), "steps": steps,
        "accuracy": m.accuracy, "fd": m.fd, "diversity": m.diversity,
        "diversity_gap": m.diversity_gap,
        "calls": len(result.calls), "rows": sum(c.rows for c in result.calls),
        "seconds": result.seconds,
    }


@attrs.frozen
class Dist:
    """This process's place in a torch.distributed run (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    gloo on CPU, nccl on GPU (each rank on ``cuda:LOCAL_RANK``). ``device`` "auto" is
    CUDA when available, else CPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, device)
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def gather(rows: list[dict[str, Any]], ctx: Dist) -> list[dict[str, Any]] | None:
    """All ranks' rows on rank 0, in job order (``None`` on the other ranks)."""
    if not ctx.active:
        return sorted(rows, key=lambda r: r["index"])
    import torch.distributed as dist

    parts: list[Any] | None = [None] * ctx.world if ctx.rank == 0 else None
    dist.gather_object(rows, parts, dst=0)
    if parts is None:
        return None
    return sorted((r for part in parts for r in part), key=lambda r: r["index"])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1); NaN std for one value, NaN if any is."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation (ddof 1; NaN for one seed) per configuration.

    Works on fresh rows and on rows read back from ``runs.csv`` (strings). ``*_vs_none``
    are the paired differences to the unguided ("none") run of the same model and seed.
    """
    base = {(r["model"], r["seed"]): r for r in rows if r["method"] == "none"}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["scale"]), []).append(r)
    out = []
    for (model, method, scale), rs in groups.items():
        row: dict[str, Any] = {"model": model, "method": method, "scale": scale,
                               "expression": rs[0]["expression"], "seeds": len(rs),
                               "samples": rs[0]["samples"]}
        for key in METRICS:
            values = [float(r[key]) for r in rs]
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
        # paired with the unguided baseline run of the same model and seed (same initial
        # noise): the seed-to-seed spread of a difference is much smaller than of a level
        for key in ("accuracy", "fd"):
            deltas = [float(r[key]) - float(base[(model, r["seed"])][key])
                      for r in rs if (model, r["seed"]) in base]
            row[f"{key}_vs_none_mean"], row[f"{key}_vs_none_std"] = (
                mean_std(deltas) if deltas else (math.nan, math.nan))
        row["rows_per_step"] = float(rs[0]["rows"]) / float(rs[0]["steps"])
        row["seconds_mean"] = statistics.fmean(float(r["seconds"]) for r in rs)
        out.append(row)
    return out


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table: mean ± std over seeds; "Δ vs none" is the
    difference to the unguided run of the same seed (paired), mean ± std over seeds."""

    def pm(r: dict[str, Any], key: str, digits: int) -> str:
        mean, std = r[f"{key}_mean"], r[f"{key}_std"]
        return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")

    lines = ["| model | expression | accuracy | FD | diversity gap | Δ accuracy vs none "
             "| Δ FD vs none | rows/step |", "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        expr = str(r["expression"]).replace("|", "\\|")  # a pipe would end the table cell
        lines.append(f"| {r['model']} | `{expr}` | {pm(r, 'accuracy', 3)} | "
                     f"{pm(r, 'fd', 1)} | {pm(r, 'diversity_gap', 2)} | "
                     f"{pm(r, 'accuracy_vs_none', 3)} | {pm(r, 'fd_vs_none', 1)} | "
                     f"{r['rows_per_step']:g} |")
    return "\n".join(lines)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (accuracy, FD) no other point beats on both (higher
    accuracy, lower FD), sorted by accuracy."""
    keep = []
    for i, (a, f) in enumerate(points):
        dominated = any(
            (a2 >= a and f2 <= f) and (a2 > a or f2 < f) for j, (a2, f2) in enumerate(points)
            if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def pareto_plots(summary: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """``pareto-<model>.png``: FD against accuracy, one panel per method (matplotlib).

    Each panel shows the method's configurations (mean, error bars one std over seeds,
    labelled by scale), the unguided baseline (star) and the Pareto front of both.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in dict.fromkeys(r["model"] for r in summary):
        rows = [r for r in summary if r["model"] == model]
        base = [r for r in rows if r["method"] == "none"]
        methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
        if not methods:
            continue
        cols = min(4, len(methods))
        nrows = math.ceil(len(methods) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False,
                                 sharex=True, sharey=True)
        for ax, method in zip(axes.flat, methods):
            mine = [r for r in rows if r["method"] == method]
            pts = mine + base
            xy = [(r["accuracy_mean"], r["fd_mean"]) for r in pts]
            front = pareto_front(xy)
            ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "-", color="0.7",
                    zorder=1)
            ax.errorbar([r["accuracy_mean"] for r in mine], [r["fd_mean"] for r in mine],
                        xerr=[_nz(r["accuracy_std"]) for r in mine],
                        yerr=[_nz(r["fd_std"]) for r in mine], fmt="o", capsize=2, zorder=2)
            for r in mine:
                ax.annotate(r["scale"], (r["accuracy_mean"], r["fd_mean"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            for r in base:
                ax.plot(r["accuracy_mean"], r["fd_mean"], "k*", markersize=9, zorder=3)
            ax.set_title(METHODS[method][0].format(s="s"), fontsize=9)
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(methods):]:
            ax.axis("off")
        for ax in axes[-1]:
            ax.set_xlabel("class accuracy")
        for ax in axes[:, 0]:
            ax.set_ylabel("FD (lower is better)")
        fig.suptitle(f"{model} model: FD vs accuracy (star: unguided Cond(); "
                     f"{rows[0]['samples']} samples, mean ± std over {rows[0]['seeds']} seed(s))",
                     fontsize=10)
        fig.tight_layout()
        path = out / f"pareto-{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _nz(v: float) -> float:
    return 0.0 if math.isnan(v) else v


# --------------------------------------------------------------------------- speed figures


def _half_iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[2] - q[0]) / 2


def speed_figures(models: ModelCache, *, model: str = "eps", batch: int = 100, steps: int = 10,
                  repeats: int = 5) -> list[dict[str, Any]]:
    """Per-step time ratios on one bundled model, with the torch threads as they are set.

    * ``guided / bare``: a guided sampling step (``guidekit.models.sample``: the batched
      call, the combine and the Euler update) against one bare ``model_fn`` call on the same
      rows at the same noise levels;
    * ``sequential / one call``: the same expression with ``max_rows = N`` (one call per
      branch, run one after the other) against one batched call;
    * ``term / CFG``: the cost of an extra term on top of CFG, step for step;
    * ``guidekit / diffusers guider``: the same guidance (CFG; CFG + PAG in the last block)
      through diffusers' own guiders in the loop of its modular pipelines
      (:mod:`guidekit.models.guider_loop`: one forward per condition, PAG's hooks put in and
      taken out around each batch) against guidekit's one batched call.

    Every variant runs once to warm up, then ``repeats`` times, interleaved (the order
    rotates every repeat, so drift of a shared machine hits all variants alike). A ratio is
    the median over repeats of the per-repeat ratio; ``spread`` is half its interquartile
    range.
    """
    from guidekit.models import sample
    from guidekit.models.guider_loop import pag_expression, sample_with_guider

    bundled = models(model)
    sigmas = bundled.sigmas(steps)
    labels = digit_labels(max(1, -(-batch // DIGITS)))[:batch]
    n = int(labels.shape[0])
    cuda = str(bundled.device).startswith("cuda")

    def guided(text: str, max_rows: int | None = None) -> Callable[[], float]:
        weak = models(weak_name(model)) if "Autoguidance" in text else None

        def once() -> float:
            return sample(bundled, text, labels, steps=steps, seed=0, weak=weak,
                          max_rows=max_rows).seconds / steps

        return once

    def bare(rows: int, which: str = model) -> Callable[[], float]:
        net = models(which)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((rows, *net.shape), generator=gen).to(net.device)
        y = torch.arange(rows).remainder(net.classes).to(net.device)
        levels = [torch.full((rows,), s, device=net.device) for s in sigmas[:-1].tolist()]

        @torch.no_grad()
        def once() -> float:
            start = time.perf_counter()
            for sig in levels:
                net.model_fn(x, sig, y)
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / steps

        return once

    def peer(guider: Any) -> Callable[[], float]:
        def once() -> float:  # set_state at every step: one guider serves every run
            return sample_with_guider(bundled, guider, labels, steps=steps, seed=0).seconds / steps

        return once

    from diffusers.guiders import ClassifierFreeGuidance, PerturbedAttentionGuidance

    last = int(bundled.transformer.config.num_layers) - 1
    pag_gated = pag_expression(3, 2, sigmas)
    variants: dict[str, Callable[[], float]] = {
        "bare N": bare(n), "bare 2N": bare(2 * n), "bare 3N": bare(3 * n),
        "weak N": bare(n, weak_name(model)),
        "Cond()": guided("Cond()"),
        "CFG(3)": guided("CFG(3)"), "CFG(3) split": guided("CFG(3)", max_rows=n),
        "CFG(3) + PAG(2)": guided("CFG(3) + PAG(2)"),
        "CFG(3) + PAG(2) split": guided("CFG(3) + PAG(2)", max_rows=n),
        "CFG(3) + Autoguidance(1)": guided("CFG(3) + Autoguidance(1)"),
        "CFG(3) + EMAG(1)": guided("CFG(3) + EMAG(1)"),
        "PAG gated": guided(pag_gated),
        "diffusers CFG": peer(ClassifierFreeGuidance(guidance_scale=3.0)),
        "diffusers PAG": peer(PerturbedAttentionGuidance(
            guidance_scale=3.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
            perturbed_guidance_stop=1.0, perturbed_guidance_layers=[last])),
    }
    names = list(variants)
    for name in names:  # warm-up: first-call allocations, lazy imports, engine set-up
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(variants[name]())
    times["bare 2N + weak N"] = [a + b for a, b in zip(times["bare 2N"], times["weak N"])]

    def ratio(figure: str, num: str, den: str, rows: int, num_label: str = "",
              den_label: str = "") -> dict[str, Any]:
        per_repeat = [a / b for a, b in zip(times[num], times[den])]
        return {"figure": figure, "numerator": num_label or num,
                "denominator": den_label or den, "ratio": statistics.median(per_repeat),
                "spread": _half_iqr(per_repeat),
                "numerator_ms": 1e3 * statistics.median(times[num]),
                "denominator_ms": 1e3 * statistics.median(times[den]),
                "rows": rows, "batch": n, "steps": steps, "repeats": repeats, "model": model,
                "threads": torch.get_num_threads(), "device": str(bundled.device)}

    g = "guided step / bare forward"
    out = [
        ratio(g, "Cond()", "bare N", n, den_label="bare N rows"),
        ratio(g, "CFG(3)", "bare 2N", 2 * n, den_label="bare 2N rows"),
        ratio(g, "CFG(3) + PAG(2)", "bare 3N", 3 * n, den_label="bare 3N rows"),
        ratio(g, "CFG(3) + EMAG(1)", "bare 3N", 3 * n, den_label="bare 3N rows"),
        ratio(g, "CFG(3) + Autoguidance(1)", "bare 2N + weak N", 3 * n,
              den_label="bare 2N rows + weak model N rows"),
        ratio("sequential calls / one call", "CFG(3) split", "CFG(3)", 2 * n,
              "CFG(3), max_rows=N: 2 calls", "CFG(3): 1 call"),
        ratio("sequential calls / one call", "CFG(3) + PAG(2) split", "CFG(3) + PAG(2)", 3 * n,
              "CFG(3) + PAG(2), max_rows=N: 3 calls", "CFG(3) + PAG(2): 1 call"),
        ratio("term / CFG", "CFG(3) + PAG(2)", "CFG(3)", 3 * n),
        ratio("term / CFG", "CFG(3) + EMAG(1)", "CFG(3)", 3 * n),
        ratio("term / CFG", "CFG(3) + Autoguidance(1)", "CFG(3)", 3 * n),
        ratio("guidekit / diffusers guider", "CFG(3)", "diffusers CFG", 2 * n,
              den_label="ClassifierFreeGuidance(3): 2 calls of N"),
        ratio("guidekit / diffusers guider", "PAG gated", "diffusers PAG", 3 * n,
              num_label="CFG(3) + PAG(2) from step 1: 1 call",
              den_label="PerturbedAttentionGuidance(3, 2, last block): 3 calls of N"),
    ]
    return out


def speed_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| figure | numerator | denominator | ratio | ms per step |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['figure']} | {r['numerator']} | {r['denominator']} | "
                     f"{r['ratio']:.2f} ± {r['spread']:.2f} | "
                     f"{r['numerator_ms']:.1f} / {r['denominator_ms']:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- driver


@attrs.frozen(eq=False)
class SweepResult:
    """What rank 0 wrote (other ranks get ``rows == []``)."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    speed: list[dict[str, Any]]
    files: list[Path]
    notes: list[str]
    seconds: float


def run_sweep(
    *,
    models: Sequence[str] = ("eps", "flow"),
    methods: Sequence[str] | None = None,
    scales: Sequence[float] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    per_digit: int = 20,
    steps: int = 20,
    out: str | Path = "guidekit-sweep",
    threads: int | None = 1,
    device: str = "auto",
    speed: bool = True,
    speed_batch: int = 100,
    speed_steps: int = 10,
    speed_repeats: int = 5,
    plots: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> SweepResult:
    """Run the sweep (sharded over ranks under torchrun); rank 0 writes ``out``.

    ``threads`` pins torch's intra-op threads for the run (restored afterwards); ``None``
    keeps the current setting. See the module doc for the files.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        ctx = init_distributed(device)
        say = (echo or (lambda _: None)) if ctx.rank == 0 else (lambda _: None)
        cache = ModelCache(ctx.device)
        keep, notes = check_methods(methods), []
        runnable = []
        for method in keep:
            reasons = {m: unsupported(cache, m, method) for m in models}
            for m, why in reasons.items():
                if why:
                    notes.append(f"{method} left out on {m}: {why}")
            if not any(reasons.values()):
                runnable.append(method)
        jobs = make_jobs(models, runnable, seeds, scales)
        mine = jobs[ctx.rank::ctx.world]
        bar = tqdm(mine, desc=f"guidekit sweep [rank {ctx.rank}/{ctx.world}]", unit="job",
                   disable=not progress or ctx.rank != 0, leave=False)
        local = []
        for job in bar:
            bar.set_postfix_str(f"{job.model}: {job.text} seed {job.seed}", refresh=False)
            # rank: who ran the job (bookkeeping only; the metrics do not depend on it)
            local.append({**run_job(job, cache, per_digit=per_digit, steps=steps),
                          "rank": ctx.rank})
        bar.close()
        rows = gather(local, ctx)
        if rows is None:  # not rank 0: done
            return SweepResult([], [], [], [], notes, time.perf_counter() - start)
        target = Path(out)
        files = [write_csv(target / "runs.csv", rows)]
        summary = summarize(rows)
        files.append(write_csv(target / "summary.csv", summary))
        (target / "summary.md").write_text(markdown_table(summary) + "\n")
        files.append(target / "summary.md")
        say(markdown_table(summary))
        if plots:
            try:
                files += pareto_plots(summary, target)
            except ImportError:
                notes.append("Pareto plots need matplotlib: pip install 'guidekit[plots]'")
        speed_rows: list[dict[str, Any]] = []
        if speed:
            speed_rows = speed_figures(cache, batch=speed_batch, steps=speed_steps,
                                       repeats=speed_repeats)
            files.append(write_csv(target / "speed.csv", speed_rows))
            say("")
            say(f"per-step speed, {speed_rows[0]['model']} model, N = {speed_rows[0]['batch']}, "
                f"{speed_rows[0]['threads']} torch thread(s), {speed_rows[0]['device']}, "
                f"{speed_steps} steps per run, median of {speed_repeats} interleaved repeats "
                "± half the interquartile range:")
            say(speed_table(speed_rows))
        for note in notes:
            say(note)
        took = time.perf_counter() - start
        say(f"{len(rows)} jobs on {ctx.world} process(es) in {took:.1f} s; wrote "
            + ", ".join(str(f) for f in files))
        return SweepResult(rows, summary, speed_rows, files, notes, took)
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
