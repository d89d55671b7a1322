"""The bundled-model demo: every digit under a handful of guidance expressions.

``python -m guidekit demo`` runs :func:`run_model_demo`: it loads the shipped digit models
(:mod:`guidekit.models.bundled`: an eps-prediction DiT, a rectified-flow DiT and their weaker
siblings for Autoguidance), samples every digit under each expression with guidekit inside a
plain Euler loop, scores the samples with the shipped classifier (class accuracy against
the requested digit, Fréchet distance to held-out real digits) and

* prints a table: expression, model, model calls, rows per step, seconds, accuracy, FD;
* writes a labelled PNG grid: one row per expression, one column per digit.

It also checks what the table claims: every step ran ``plan.rows(sigma, N)`` rows, in one
call per forward group when there is no row budget. An expression the bundled models
cannot run stops the demo with guidekit's error (which names the term and the fix).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

import guidekit
from guidekit.models.cache import DIGITS, ModelCache, digit_labels, weak_name
from guidekit.models.grid import render_grid
from guidekit.split import FixedSplit

#: The demo's main guidance scale: the bundled models are deliberately under-trained, so
#: a mild CFG already fixes most wrong digits (docs/benchmarks.md has the sweep).
W = 1.5


@attrs.frozen
class Entry:
    """One demo row: guidance text (read by ``guidekit.parse``) on a bundled model."""

    model: str
    text: str

    @property
    def label(self) -> str:
        return f"{self.model}: {self.text}"


def default_entries() -> list[Entry]:
    """The demo's expressions: unguided, CFG, CFG + PAG, CFG + EMAG (with APG), CADS,
    Autoguidance, and the flow model."""
    w = f"{W:g}"
    return [
        Entry("eps", "Cond()"),
        Entry("eps", f"CFG({w})"),
        Entry("eps", f"CFG({w}) + PAG(1)"),
        Entry("eps", f"CFG({w}) + EMAG(1)"),
        Entry("eps", f"CFG({w}) + EMAG(1) | APG(eta=0)"),
        Entry("eps", f"CFG({w}) | CADS()"),
        Entry("eps", "Cond() + Autoguidance(1)"),
        Entry("flow", "Cond()"),
        Entry("flow", f"CFG({w})"),
        Entry("flow", f"CFG({w}) + Autoguidance(1)"),
    ]


def negative_entries(model: str) -> list[Entry]:
    """``--negative``'s comparison: CFG against the null class and against the digit."""
    w = f"{W:g}"
    return [Entry(model, f"CFG({w})"), Entry(model, f"CFG({w}, negative='neg')")]


def rows_per_step(plan: Any, sigmas: torch.Tensor, batch: int) -> list[int]:
    """``plan.rows(sigma, batch)`` at every step of the schedule (the final 0 excluded)."""
    levels = [float(s) for s in sigmas]
    return [plan.rows(s, batch, levels) for s in levels[:-1]]


def one_call(plan: Any) -> bool:
    """Whether the plan's split policy is one call per forward group, always."""
    return plan.policy == FixedSplit(None)


def check_calls(plan: Any, calls: Sequence[Any], sigmas: torch.Tensor, batch: int,
                budget: bool) -> None:
    """Raise ``AssertionError`` unless the recorded calls match the plan, step by step.

    Every step must run ``plan.rows(sigma, batch)`` rows in all; without a row budget, in
    exactly one call per forward group.
    """
    levels = [float(v) for v in sigmas]
    for i, s in enumerate(levels[:-1]):
        made = [c for c in calls if c.step == i]
        want = plan.rows(s, batch, levels)
        got = sum(c.rows for c in made)
        if got != want:
            raise AssertionError(f"step {i} (sigma {s:.4g}): {got} rows ran, plan.rows says {want}")
        groups = len(plan.program(s, tuple(levels)).groups)
        if not budget and len(made) != groups:
            raise AssertionError(
                f"step {i} (sigma {s:.4g}): {len(made)} calls for {groups} forward groups"
            )


@attrs.frozen(eq=False)
class DemoRow:
    """The result of one entry: samples, calls, timing and metrics."""

    entry: Entry
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    calls: int = 0
    rows: tuple[int, ...] = ()
    seconds: float = math.nan
    accuracy: float = math.nan
    fd: float = math.nan
    #: where the auto policy timed smaller calls, the split it kept ("" where it timed none)
    split: str = ""

    @property
    def rows_text(self) -> str:
        """Rows per step: one number, or ``lo-hi`` where a gate changes it across steps."""
        if not self.rows:
            return "-"
        lo, hi = min(self.rows), max(self.rows)
        return str(lo) if lo == hi else f"{lo}-{hi}"


@attrs.frozen(eq=False)
class ModelDemo:
    """What :func:`run_model_demo` did: one :class:`DemoRow` per entry and the grid."""

    rows: list[DemoRow]
    samples: int
    steps: int
    grid: Path | None
    seconds: float

    def table(self) -> str:
        return format_table(self.rows, self.samples)


def run_entry(entry: Entry, models: ModelCache, labels: torch.Tensor, *, steps: int, seed: int,
              max_rows: int | str | None = None, conds: dict[str, int] | None = None) -> DemoRow:
    """Sample ``labels`` under ``entry`` (``conds``: labels of named conditionings, see
    :func:`guidekit.models.sample`) and score the samples."""
    from guidekit.models import evaluate, sample

    bundled = models(entry.model)
    expr = guidekit.parse(entry.text)
    weak = models(weak_name(entry.model)) if _uses_weak(expr, bundled) else None
    result = sample(bundled, expr, labels, steps=steps, seed=seed, weak=weak, max_rows=max_rows,
                    conds=conds)
    plan, sigmas, batch = result.plan, bundled.sigmas(steps), labels.shape[0]
    # the auto split keeps one call per group unless it measured a split faster: check
    # one call per group wherever no call record says it split
    split = not one_call(plan) and any(not c.split.startswith("one call") for c in result.calls)
    check_calls(plan, result.calls, sigmas, batch, budget=split)
    metrics = evaluate(result.images, labels)
    return DemoRow(
        entry, images=result.images, labels=labels, calls=len(result.calls),
        rows=tuple(rows_per_step(plan, sigmas, batch)), seconds=result.seconds,
        accuracy=metrics.accuracy, fd=metrics.fd,
        split=result.calls[-1].split if split and result.calls else "",
    )


def _negative(entries: Sequence[Entry], negative: int | None) -> dict[str, int] | None:
    """Parse every entry first (a typo fails before any model loads); a ``negative`` digit
    must be read by one of them."""
    exprs = [guidekit.parse(e.text) for e in entries]
    if negative is None:
        return None
    if not 0 <= negative <= DIGITS - 1:
        raise guidekit.GuidanceValueError(
            f"negative={negative}: a digit 0..{DIGITS - 1} for the conditioning 'neg'"
        )
    if not any("neg" in guidekit.compile(e).conditionings for e in exprs):
        raise guidekit.GuidanceValueError(
            f"negative={negative} labels the conditioning 'neg', which no expression reads: "
            f"add one that does, e.g. --guidance \"CFG({W:g}, negative='neg')\""
        )
    return {"neg": negative}


def _uses_weak(expr: Any, bundled: Any) -> bool:
    """True when the compiled plan has a forward group on a model other than ``main``."""
    plan = bundled.compile(expr)
    return any(g.model != "main" for g in plan.groups)


def format_table(rows: Sequence[DemoRow], samples: int) -> str:
    """The demo's table (FD is comparable only within one table: it depends on N)."""
    head = ("expression", "model", "calls", "rows/step", "seconds", "accuracy", "FD")
    body = []
    for r in rows:
        body.append((r.entry.text, r.entry.model, str(r.calls), r.rows_text,
                     f"{r.seconds:.1f}", f"{r.accuracy:.3f}", f"{r.fd:.2f}"))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = "  ".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return f"{first}  {rest}".rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    out.append(f"N = {samples} samples per expression ({samples // DIGITS} per digit); "
               "rows/step = plan.rows(sigma, N); FD is comparable only at equal N")
    return "\n".join(out)


def run_model_demo(
    entries: Sequence[Entry] | None = None,
    *,
    per_digit: int = 20,
    steps: int = 20,
    seed: int = 0,
    max_rows: int | str | None = None,
    out: str | Path | None = "guidekit-demo.png",
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    device: Any = "cpu",
    threads: int | None = None,
    negative: int | None = None,
) -> ModelDemo:
    """Sample every digit under each entry, print the table, write the grid PNG.

    Args:
        entries: what to run; ``None`` for :func:`default_entries`.
        per_digit: samples per digit (N = 10 per_digit per expression).
        steps: Euler steps on each model's schedule.
        seed: seeds the initial noise (identical across entries) and the plans' state.
        max_rows: the split policy (``guidekit.compile``'s ``max_rows``; ``None``: the
            default auto split, ``"one call"``: one call per forward group).
        out: the PNG path, or ``None`` for no image.
        progress: a tqdm progress bar over the entries (on stderr).
        echo: where the table goes (``None``: silent).
        device: torch device of the models.
        threads: pin torch's CPU threads for the run (restored afterwards); ``None`` keeps
            the current setting. With other processes on the machine, one thread is often
            many times faster than two for models this small.
        negative: a digit for the conditioning ``neg`` (``CFG(w, negative='neg')`` steers
            away from it instead of from the null class); with no ``entries``, the demo
            compares ``CFG(w)`` and ``CFG(w, negative='neg')`` on the eps model.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_model_demo(entries, per_digit=per_digit, steps=steps, seed=seed,
                               max_rows=max_rows, out=out, progress=progress, echo=echo,
                               device=device, negative=negative)
    finally:
        torch.set_num_threads(old_threads)


def _run_model_demo(entries: Sequence[Entry] | None, *, per_digit: int, steps: int, seed: int,
                    max_rows: int | str | None, out: str | Path | None, progress: bool,
                    echo: Callable[[str], None] | None, device: Any,
                    negative: int | None = None) -> ModelDemo:
    from tqdm.auto import tqdm

    say = echo or (lambda _: None)
    start = time.perf_counter()
    if entries is None:
        entries = default_entries() if negative is None else negative_entries("eps")
    conds = _negative(entries, negative)
    models = ModelCache(device)
    labels = digit_labels(per_digit)
    rows: list[DemoRow] = []
    bar = tqdm(entries, desc="guidekit demo", unit="expr", disable=not progress, leave=False)
    for e in bar:
        bar.set_postfix_str(e.label, refresh=True)
        rows.append(run_entry(e, models, labels, steps=steps, seed=seed, max_rows=max_rows,
                              conds=conds))
    bar.close()
    grid = None
    if out is not None and rows:
        grid = Path(out)
        grid.parent.mkdir(parents=True, exist_ok=True)
        render_grid(rows).save(grid)
    result = ModelDemo(rows, int(labels.shape[0]), steps, grid, time.perf_counter() - start)
    say(result.table())
    if negative is not None:
        say(f"negative 'neg' = digit {negative} for every sample")
    one = max_rows in (None, "auto", "one call", "all")
    split = [f"{r.entry.label} ({r.split})" for r in rows if r.split]
    say("check: every step ran plan.rows(sigma, N) rows"
        + (", one model call per forward group" if one else "")
        + (f" except where the auto split timed smaller calls (the split it kept): "
           f"{'; '.join(split)}" if one and split else ""))
    if grid is not None:
        say(f"wrote {grid} (rows: expressions; columns: digits 0-9, first sample of each)")
    say(f"total {result.seconds:.1f} s, {steps} Euler steps, {torch.get_num_threads()} torch thread(s)")
    return result
