"""One call of K x B rows vs K calls of B rows vs ``max_rows="auto"``, on a small DiT.

Run: ``python benchmarks/split.py [--threads 2] [--repeats N] [--steps S] [--write FILE]``.

A forward group of ``K`` branches at sampler batch ``B`` can run as one model call of
``K x B`` rows (``max_rows=None``) or as ``K`` calls of ``B`` rows (``max_rows=B``);
``max_rows="auto"`` (:class:`guidekit.AutoSplit`) times both on the first steps of a run and
keeps the faster. For ``K = 2`` (``CFG(7)``: c, u) and ``K = 3`` (``CFG(7)`` plus a push away
from a second class label: c, u, o) at ``B = 1, 8, 32`` this script times runs of ``S`` steps
of each, interleaved, and reports:

* ``split/one``: K calls of B rows over one call (> 1: one call is faster);
* ``auto run/best``: a fresh auto run (its trial steps included) over the faster fixed policy;
* ``auto steady/best``: the same once auto has chosen (a long run's per-step cost);
* what auto chose in each fresh run.

It asserts that every policy gives the same samples up to float noise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as bench  # noqa: E402

import guidekit  # noqa: E402
from guidekit import CFG  # noqa: E402
from guidekit.branch import Branch  # noqa: E402
from guidekit.split import AutoSplit, Splitter, make_splitter  # noqa: E402
from guidekit.terms.base import DirectionTerm, finite, to_float  # noqa: E402

BATCHES = (1, 8, 32)


@attrs.frozen(repr=False)
class AwayFrom(DirectionTerm):
    """``scale (c - o)``: push away from the prediction for a second class label ``o``.

    A benchmark-only term that puts a third branch (conditioning ``"other"``) into the main
    model's forward group, so that ``CFG(7) + AwayFrom(2)`` runs ``3 x B`` rows per step.
    """

    scale: float = attrs.field(converter=to_float, validator=finite)
    _name: ClassVar[str] = "AwayFrom"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)

    def negative(self) -> Branch:
        return Branch(cond="other")


EXPRS: dict[int, guidekit.Expr] = {2: CFG(7), 3: CFG(7) + AwayFrom(2)}


def make_run(
    plan: guidekit.Plan, model: bench.Model, conds: dict[str, dict[str, torch.Tensor]],
    x_init: torch.Tensor, sigmas: list[float], splitter: Splitter | None,
) -> Callable[[], torch.Tensor]:
    """One Euler run of ``len(sigmas)`` steps; ``splitter=None``: a fresh one per run."""

    def run() -> torch.Tensor:
        # make_splitter(policy): a fresh copy with empty decision tables (plan.splitter()
        # would share the plan's decisions, so only the first run would pay the trial)
        split = make_splitter(plan.policy) if splitter is None else splitter
        state = plan.init(0, sigmas)

        def predict(x: torch.Tensor, s: float) -> torch.Tensor:
            nonlocal state
            y, state = plan.step(state, x, s, conds, {"main": model}, splitter=split)
            return y

        x = bench.euler(predict, x_init.clone(), sigmas)
        run.last_splitter = split  # type: ignore[attr-defined]
        return x

    return run


def measure(model: bench.Model, steps: int, repeats: int) -> list[dict[str, Any]]:
    sigmas = bench.schedule(steps)
    results = []
    for k, expr in EXPRS.items():
        for b in BATCHES:
            torch.manual_seed(b)
            x_init = torch.randn(b, 1, 8, 8) * sigmas[0]
            cond, uncond = bench.labels(b, seed=b)
            other = (cond + 1) % bench.NUM_CLASSES
            conds = {
                "cond": {"class_labels": cond}, "uncond": {"class_labels": uncond},
                "other": {"class_labels": other},
            }
            one_plan = guidekit.compile(expr, prediction="eps", noise="ve", max_rows="one call")
            split_plan = guidekit.compile(expr, prediction="eps", noise="ve", max_rows=b)
            # no gate: this script compares the timing policy itself at every size
            auto_plan = guidekit.compile(expr, prediction="eps", noise="ve",
                                         max_rows=AutoSplit(min_seconds=0.0))
            assert one_plan.rows(sigmas[0], b) == k * b
            steady = AutoSplit(min_seconds=0.0)
            auto_run = make_run(auto_plan, model, conds, x_init, sigmas, None)
            variants = {
                "one": make_run(one_plan, model, conds, x_init, sigmas, None),
                "split": make_run(split_plan, model, conds, x_init, sigmas, None),
                "auto": auto_run,
                "steady": make_run(auto_plan, model, conds, x_init, sigmas, steady),
            }
            # Every policy runs the same rows through the same model: same samples up to the
            # float noise of different batch shapes (auto's timing must not change outputs).
            bench.check_agree({n: fn() for n, fn in variants.items()}, 1e-4, f"K={k}, B={b}")
            picks: list[int] = []

            def auto_and_record(
                fn: Callable[[], torch.Tensor] = auto_run, picks: list[int] = picks
            ) -> None:
                fn()
                chosen = fn.last_splitter.chosen  # type: ignore[attr-defined]
                picks.extend(chosen.values())

            timed_variants: dict[str, Callable[[], Any]] = {**variants, "auto": auto_and_record}
            t = bench.interleaved(timed_variants, repeats)
            picks = picks[-repeats:]  # the timed runs only
            one, split = bench.median(t["one"]), bench.median(t["split"])
            best = "one" if one <= split else "split"
            results.append({
                "K": k, "B": b,
                "one": one / steps, "split": split / steps,
                "split/one": bench.paired_ratio(t["split"], t["one"]),
                "auto/best": bench.paired_ratio(t["auto"], t[best]),
                "steady/best": bench.paired_ratio(t["steady"], t[best]),
                "best": best,
                "picked_one": sum(1 for p in picks if p == k * b),
                "picked_split": sum(1 for p in picks if p == b),
                "steady_pick": "one" if max(steady.chosen.values()) == k * b else "split",
                "runs": len(picks),
            })
    return results


def main() -> None:
    p = bench.common_args(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="sampling steps per timed run")
    args = p.parse_args()
    session = bench.Session(args)
    repeats = args.repeats or 10
    with torch.inference_mode():
        model, desc = bench.make_dit(layers=6, seed=0, plain=args.plain)
        session.intro(
            f"model: {desc}",
            f"{args.steps} steps per run, {repeats} interleaved repeats (+2 warm-up); ratios are "
            f"medians over repeats of neighbouring timings\n",
        )
        rows = measure(model, args.steps, repeats)

    head = ["K", "B", "one call ms/step", "K calls ms/step", "split/one", "auto run/best",
            "auto steady/best", "auto chose (fresh runs)", "steady chose", "better"]
    table = [
        [str(r["K"]), str(r["B"]), f"{r['one'] * 1e3:.2f}", f"{r['split'] * 1e3:.2f}",
         f"{r['split/one']:.3f}", f"{r['auto/best']:.3f}", f"{r['steady/best']:.3f}",
         f"one {r['picked_one']}/{r['runs']}, split {r['picked_split']}/{r['runs']}",
         str(r["steady_pick"]), str(r["best"])]
        for r in rows
    ]
    print(bench.text_table(head, table))
    session.finish(
        [bench.markdown(head, table)],
        notes=[f"model: {desc}", f"{args.steps} steps per run, {repeats} interleaved repeats"],
    )


if __name__ == "__main__":
    main()
