"""The sweep's grid: methods and their scales, one job per (model, method, scale, seed)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from guidekit.errors import GuidanceError
from guidekit.models.cache import ModelCache, digit_labels, weak_name

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
