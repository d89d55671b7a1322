"""What the sweep writes: per-configuration statistics over seeds, CSV, markdown, Pareto plots."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guidekit.models.sweep.family import DIGITS, family_of
from guidekit.models.sweep.grid import METHODS

#: the scores of a digit job, summarised over seeds (another family names its own:
#: ``Family.metrics``; every family scores ``accuracy`` and ``fd``, the Pareto axes)
METRICS = DIGITS.metrics


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

    Works on fresh rows and on rows read back from ``runs.csv`` (strings). A configuration
    is a (model, method, scale): a named method or an expression's text (its repr). The
    scores summarised are the model family's ``metrics``. ``*_vs_none`` are the paired
    differences to the unguided ("none") run of the same model and seed.
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
        for key in family_of(model).metrics:
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
    """Every row under the union of the rows' columns, in first-seen order: families score
    different metrics (the scenes' ``exact``), and a cell a row's family has none of is
    left empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
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
        if f"{key}_mean" not in r:  # a score this model's family does not give
            return "-"
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


def pareto_panels(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """One model's summary rows per Pareto panel, in order: one panel per method (a named
    method or a given expression's text), the "none" baseline drawn in every panel."""
    panels: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] != "none":
            panels.setdefault(r["method"], []).append(r)
    return panels


def pareto_plots(summary: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """``pareto-<model>.png``: FD against accuracy, one panel per method (matplotlib): a
    named method or a given expression, titled by its text (``s`` where the scale goes).

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
        methods = pareto_panels(rows)
        if not methods:
            continue
        cols = min(4, len(methods))
        nrows = math.ceil(len(methods) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False,
                                 sharex=True, sharey=True)
        for ax, (method, mine) in zip(axes.flat, methods.items()):
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
            ax.set_title(panel_title(method), fontsize=9)
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(methods):]:
            ax.axis("off")
        for ax in axes[-1]:
            ax.set_xlabel(family_of(model).accuracy_label)
        for ax in axes[:, 0]:
            ax.set_ylabel("FD (lower is better)")
        fig.suptitle(f"{model} model: FD vs accuracy (star: unguided Cond(); "
                     f"{rows[0]['samples']} samples, mean ± std over {rows[0]['seeds']} seed(s))",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
        path = out / f"pareto-{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def panel_title(method: str) -> str:
    """A Pareto panel's title: the method's expression, ``s`` where the scale goes."""
    template = METHODS[method][0] if method in METHODS else method
    return template.replace("{s}", "s")


def _nz(v: float) -> float:
    return 0.0 if math.isnan(v) else v
