"""``guidekit sweep``: a grid of guidance scales per method on the bundled models.

Every job is one (model, method, scale, seed). A method is a named one (``METHODS``) or any
guidance expression given as text (``exprs``; ``{s}`` where the swept scale goes), parsed
and probed on every model before anything is sampled. A job samples ``samples`` per class
through its model's family and scores the result there (digits: ``guidekit.models.sample``,
``guidekit.models.evaluate``: class accuracy, Fréchet distance to held-out real digits,
diversity gap). The sweep writes

* ``runs.csv``: one line per job;
* ``summary.csv`` and ``summary.md``: per (model, method, scale) the mean and the sample
  standard deviation (ddof 1) over seeds (an expression's method is its repr);
* ``pareto-<model>.png``: FD against accuracy, one panel per method, Pareto-optimal
  configurations joined (needs matplotlib: ``pip install 'guidekit[plots]'``);
* ``speed.csv``: per-step time ratios measured in the same run (guided step / bare batched
  forward of the same rows, one call vs a call per branch, EMAG / CFG, ...).

Scale-out: run it under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node 2
--standalone -m guidekit sweep ...``) and each process takes every ``world``-th job; rank 0
gathers the metrics through torchrun's store (no process group), writes the files and
measures the speed figures alone. Seeds belong to jobs, not to ranks, and every process pins
the same number of torch threads, so the numbers equal a single process's exactly (on the
same device type; only the ``seconds`` column differs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from guidekit.errors import GuidanceValueError
from guidekit.models.cache import ModelCache
from guidekit.models.sweep.distributed import gather, init_distributed
from guidekit.models.sweep.exprs import Expr, check_exprs, fmt_scale
from guidekit.models.sweep.family import family_of
from guidekit.models.sweep.grid import check_methods, make_jobs, run_job, unsupported
from guidekit.models.sweep.report import markdown_table, pareto_plots, summarize, write_csv
from guidekit.models.sweep.speed import speed_figures, speed_table


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
    exprs: Sequence[str] = (),
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
    keeps the current setting. ``exprs``: guidance expressions run besides ``methods``
    (``{s}`` swept over ``scales``; without it, once per seed; ``methods`` None with
    expressions runs only the "none" baseline besides them); a bad one, or one a model
    cannot run, raises GuidanceValueError naming it before anything is sampled. See the
    module doc for the files.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    for model in models:
        family_of(model)  # an unknown model: refused before anything loads
    given = check_exprs(exprs, scales)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        ctx = init_distributed(device)
        say = (echo or (lambda _: None)) if ctx.rank == 0 else (lambda _: None)
        cache = ModelCache(ctx.device)
        # given expressions alone run with the baseline they are paired with
        keep = check_methods(["none"] if methods is None and given else methods)
        notes: list[str] = []
        skip = set()
        for method in keep:
            for m in models:
                why = unsupported(cache, m, method)
                if why:  # left out on that model only: the others still run it
                    notes.append(f"{method} left out on {m}: {why}")
                    skip.add((m, method))
        refuse_unsupported(cache, models, given, scales)
        jobs = make_jobs(models, keep, seeds, scales, given, skip=skip)
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


def refuse_unsupported(cache: ModelCache, models: Sequence[str], exprs: Sequence[Expr],
                       scales: Sequence[float] | None) -> None:
    """Raise GuidanceValueError naming the expression, the model and why, for the first
    given expression a model cannot run (probed at its first scale).

    A named method a model cannot run is left out with a note; a given one was asked for.
    """
    for expr in exprs:
        scale = float(scales[0]) if expr.swept and scales else None
        for model in models:
            why = unsupported(cache, model, expr, scale)
            if why:
                at = f" at scale {fmt_scale(scale)}" if scale is not None else ""
                raise GuidanceValueError(f"sweep expression {expr.template!r}{at} cannot run "
                                         f"on model {model!r}: {why}")
