"""The sweep's grid: methods and their scales, one job per (model, method, scale, seed).

A method is a named entry of :data:`METHODS` or a guidance expression given as text
(:class:`~guidekit.models.sweep.exprs.Expr`); what a job conditions on and how it is scored
belong to its model's family (:mod:`~guidekit.models.sweep.family`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import attrs

from guidekit.errors import GuidanceError
from guidekit.models.cache import ModelCache
from guidekit.models.sweep.exprs import Expr, fmt_scale
from guidekit.models.sweep.family import family_of

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


def expression(method: str, scale: float) -> str:
    """The guidance text of ``method`` at ``scale`` (read by ``guidekit.parse``)."""
    return METHODS[method][0].format(s=fmt_scale(scale))


@attrs.frozen
class Job:
    """One sweep job. ``seed`` seeds the sampling (noise, plan state): jobs that differ only
    in method or scale share their initial noise, so comparisons are paired.

    ``template`` is the text of an expression method (``{s}`` where the scale goes; ``scale``
    None where it has none); ``None`` for a named method of :data:`METHODS`.
    """

    index: int
    model: str
    method: str
    scale: float | None
    seed: int
    template: str | None = None

    @property
    def text(self) -> str:
        if self.template is not None:
            return Expr(self.template, self.method).text(self.scale)
        assert self.scale is not None  # a named method always has its scale
        return expression(self.method, self.scale)


def check_methods(methods: Iterable[str] | None = None) -> list[str]:
    """The requested methods in order (all of :data:`METHODS` for ``None``); unknown names
    raise ``ValueError`` naming the choices."""
    wanted = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    return wanted


def unsupported(models: ModelCache, model: str, method: str | Expr,
                scale: float | None = None) -> str | None:
    """Why ``model`` cannot run ``method`` (a GuidanceError from a one-step probe), or None.

    ``method`` is a name of :data:`METHODS` (probed at its first default scale) or an
    expression (probed at ``scale``). Probed, not assumed: a method the model cannot feed
    is reported, not faked.
    """
    if isinstance(method, Expr):
        text = method.text(scale)
    else:
        text = expression(method, METHODS[method][1][0])
    try:
        family_of(model).probe(models, model, text)
    except GuidanceError as err:
        return f"{type(err).__name__}: {err}"
    return None


def make_jobs(models: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
              scales: Sequence[float] | None = None, exprs: Sequence[Expr] = (),
              skip: Collection[tuple[str, str]] = ()) -> list[Job]:
    """The grid in a fixed order: model, method, scale, seed (``index`` is the position);
    per model the named ``methods`` first, then ``exprs``; ``(model, method)`` pairs in
    ``skip`` (a method that model cannot run) are left out of that model only.

    ``scales`` replaces every method's default scales (the "none" baseline keeps its 0) and
    is the grid of every expression with ``{s}``; one without runs once per seed.
    """
    jobs: list[Job] = []
    for model in models:
        for method in methods:
            if (model, method) in skip:
                continue
            grid = METHODS[method][1] if scales is None or method == "none" else tuple(scales)
            for scale in grid:
                for seed in seeds:
                    jobs.append(Job(len(jobs), model, method, float(scale), int(seed)))
        for expr in exprs:
            at: Sequence[float | None] = tuple(scales or ()) if expr.swept else (None,)
            for s in at:
                for seed in seeds:
                    jobs.append(Job(len(jobs), model, expr.method,
                                    None if s is None else float(s), int(seed), expr.template))
    return jobs


def run_job(job: Job, models: ModelCache, *, per_digit: int, steps: int) -> dict[str, Any]:
    """Sample and score one job; a CSV row (``seconds`` is the only non-reproducible field).

    ``per_digit``: samples per class of the model's family (digits: per digit).
    """
    family = family_of(job.model)
    cond = family.conditioning(per_digit)
    result = family.sample(models, job.model, job.text, cond, steps=steps, seed=job.seed)
    return {
        "index": job.index, "model": job.model, "method": job.method,
        "scale": fmt_scale(job.scale), "expression": job.text, "seed": job.seed,
        "samples": len(cond), "steps": steps,
        **family.score(result.images, cond),
        "calls": len(result.calls), "rows": sum(c.rows for c in result.calls),
        "seconds": result.seconds,
    }
