"""Command line: ``python -m guidekit demo|sweep`` (also installed as ``guidekit``).

The commands run the bundled models, so the parser lives with them; ``guidekit/__main__.py``
only calls :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEMO_HELP = """\
Sample every digit with the bundled models (small DiTs trained on 8x8 digits, shipped with
guidekit: an eps-prediction model, a rectified-flow model and a weaker sibling of each that
serves as Autoguidance's weak model) under a handful of guidance expressions: unguided
Cond(), CFG, CFG + PAG, CFG + EMAG, CFG + EMAG | APG, CFG | CADS, Autoguidance, and the
flow model. Shows a progress bar, prints a table (expression, model, model calls, rows per
step, seconds, class accuracy, FD against held-out real digits) and writes a labelled PNG
grid (rows: expressions, columns: digits). Then the text-conditioned scenes model (a tiny
PixArt over caption tokens, shipped too) samples a few captions under unguided, CFG,
CFG + PAG, CFG + EMAG, and its few-step sibling at 2 steps unguided, with GAG and with
NAG: a table
(adherence: the attribute classifier's agreement with the caption) and a second grid,
one row per caption. Under two minutes on 2 CPU cores; no download.

--toy runs the original tiny demo instead: a hand-written Euler loop around the exact
denoiser of Gaussian class blobs, printing the compiled plan, plan.explain(...) and the
model calls of every step (about a second).
"""

DEMO_EPILOG = """\
examples:
  python -m guidekit demo
  python -m guidekit demo --guidance "CFG(3) + PAG(1.5) | APG(eta=0)" --guidance "CFG(3)"
  python -m guidekit demo --model flow --guidance "CFG(2) + Autoguidance(1)" --samples 20
  python -m guidekit demo --negative 3 --samples 5
  python -m guidekit demo --caption "a small red circle on the left on a black background" \
      --negative-caption "a small blue circle on the left on a black background"
  python -m guidekit demo --model scenes-fast --steps 1 -g "Cond()" -g "Cond() | GAG(2)"
  python -m guidekit demo --toy --guidance "CFG(5).between(0.3, 5)" --batch 8 --max-rows 8
"""

SWEEP_HELP = """\
A grid of guidance scales per method (CFG, PAG, CFG + PAG, Autoguidance, APG, CADS, EMAG,
CFG + EMAG) or per guidance expression of your own (--expr, --exprs; {s} where the swept
scale goes) on the bundled eps and flow models (or the text-conditioned scenes and
scenes-fast: --models scenes,scenes-fast), over several seeds: class accuracy, FD and
diversity gap with mean and spread over seeds. Every expression is parsed, and tried on
every model for one step, before anything is sampled. Writes runs.csv, summary.csv,
summary.md, pareto-<model>.png (needs matplotlib: pip install 'guidekit[plots]') and
speed.csv (per-step time ratios) to --out. Shard it over processes with torchrun: each process takes
every n-th job, rank 0 gathers and writes; the numbers equal a single process's.
"""

SWEEP_EPILOG = """\
examples:
  python -m guidekit sweep --out sweep
  python -m guidekit sweep --models eps --methods none,CFG,PAG --seeds 2 --samples 10
  python -m guidekit sweep --expr "CFG(1.5) + EMAG(1)" --expr "CFG({s}) | APG(eta=0)" \
      --scales 1.5 3
  python -m guidekit sweep --exprs mine.txt --scales 1.5,2,3 --methods none,CFG
  python -m guidekit sweep --models scenes-fast --exprs benchmarks/scenes/fewstep.txt --steps 2
  torchrun --nproc_per_node 2 --standalone -m guidekit sweep --out sweep
  python -m torch.distributed.run --nproc_per_node 2 --standalone -m guidekit sweep
"""


def _max_rows(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``guidekit`` argument parser: sub-commands ``demo`` and ``sweep``."""
    parser = argparse.ArgumentParser(
        prog="guidekit",
        description="guidekit: composable diffusion guidance compiled to one batched forward "
        "per step.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="sample every digit with the bundled models under several expressions",
        description=DEMO_HELP, epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--guidance", "-g", action="append", default=None, metavar="EXPR",
        help="guidance expression, read by guidekit.parse (no eval); repeat for several. "
        "Default: the demo's list (bundled demo) or CFG(3) + Autoguidance(1).between(0.3, 5) "
        "| APG(eta=0, momentum=-0.5) (--toy)",
    )
    demo.add_argument("--model", choices=("eps", "flow", "scenes", "scenes-fast"),
                      default=None,
                      help="bundled model for --guidance expressions (default eps); with no "
                      "--guidance, only that model's family (digits or scenes) runs")
    demo.add_argument("--samples", "-n", type=_positive, default=20,
                      help="samples PER DIGIT, so 10x as many per expression (default 20, as "
                      "in the sweep, so FD is comparable with docs/benchmarks.md)")
    demo.add_argument("--steps", type=_positive, default=None,
                      help="Euler steps (default 20; 12 with --toy)")
    demo.add_argument("--seed", type=int, default=0, help="seed for noise, labels and CADS")
    demo.add_argument("--out", "-o", default="guidekit-demo.png",
                      help="grid PNG path (default guidekit-demo.png)")
    demo.add_argument("--threads", type=_positive, default=1,
                      help="torch CPU threads (default 1: the models are tiny, and more "
                      "threads only help on an idle machine)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument(
        "--max-rows", type=_max_rows, default=None, metavar="N|auto",
        help="row budget per model call (default: one call per forward group)",
    )
    demo.add_argument("--negative", type=int, default=None, metavar="DIGIT",
                      help="a digit for the conditioning 'neg': CFG(w, negative='neg') steers "
                      "away from it; alone, compares CFG(1.5) with CFG(1.5, negative='neg')")
    demo.add_argument("--caption", "-c", action="append", default=None, metavar="TEXT",
                      help="a caption for the scenes model (repeat for several rows; words of "
                      "the scenes grammar, docs/models.md); runs only the scenes part")
    demo.add_argument("--negative-caption", default=None, metavar="TEXT",
                      help="a caption for the scenes conditioning 'neg'; alone, adds "
                      "CFG(1.5, negative='neg') and the same with NAG to the scenes entries")
    demo.add_argument("--toy", action="store_true",
                      help="the tiny toy demo (exact Gaussian-blob denoiser, ~1 s)")
    demo.add_argument("--batch", "-b", type=_positive, default=4,
                      help="batch size B of the --toy demo (default 4)")

    sweep = sub.add_parser(
        "sweep", help="guidance scales x methods x seeds on the bundled models (CSV, plots)",
        description=SWEEP_HELP, epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("--models", type=_names, default=["eps", "flow"],
                       help="comma-separated bundled models: eps, flow, scenes, scenes-fast "
                       "(default eps,flow)")
    sweep.add_argument("--methods", type=_names, default=None,
                       help="comma-separated methods (default: all this guidekit has; with "
                       "--expr/--exprs only the unguided baseline 'none'): "
                       "none,CFG,PAG,CFG+PAG,Autoguidance,APG,CADS,EMAG,CFG+EMAG")
    sweep.add_argument("--expr", "-e", action="append", default=[], metavar="EXPR",
                       help="a guidance expression to sweep, read by guidekit.parse; {s} "
                       "where the scale goes (swept over --scales), without it run once per "
                       "seed; repeat for several")
    sweep.add_argument("--exprs", metavar="FILE", default=None,
                       help="a file of guidance expressions, one per line (# comments)")
    sweep.add_argument("--scales", type=_floats, nargs="+", default=None,
                       help="scales (space- or comma-separated) replacing every method's "
                       "default grid; the grid of every expression with {s}")
    sweep.add_argument("--seeds", type=_positive, default=3, help="seeds 0..n-1 (default 3)")
    sweep.add_argument("--samples", "-n", type=_positive, default=20,
                       help="samples PER DIGIT per job (default 20: 200 per job; FD depends "
                       "on the count, so compare only runs with the same --samples)")
    sweep.add_argument("--steps", type=_positive, default=20, help="Euler steps (default 20)")
    sweep.add_argument("--out", "-o", default="guidekit-sweep", help="output folder")
    sweep.add_argument("--threads", type=_positive, default=1,
                       help="torch threads per process (default 1; pinned for timings)")
    sweep.add_argument("--device", default="auto",
                       help="cpu, cuda or auto (default: cuda when available)")
    sweep.add_argument("--no-speed", action="store_true", help="skip the speed figures")
    sweep.add_argument("--speed-batch", type=_positive, default=100,
                       help="samples N in the speed figures (default 100)")
    sweep.add_argument("--speed-steps", type=_positive, default=10,
                       help="steps per timed run (default 10)")
    sweep.add_argument("--speed-repeats", type=_positive, default=5,
                       help="timed runs per figure, median taken (default 5)")
    sweep.add_argument("--no-plot", action="store_true", help="skip the Pareto plots")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from guidekit.errors import GuidanceError

    if args.toy:
        from guidekit.models.toy import run_demo

        if args.guidance is not None and len(args.guidance) > 1:
            print("guidekit demo: --toy runs one --guidance expression", file=sys.stderr)
            return 2
        if args.negative is not None:
            print("guidekit demo: --negative labels the bundled models' 'neg'; the --toy "
                  "demo has no digits", file=sys.stderr)
            return 2
        try:
            run_demo(args.guidance[0] if args.guidance else None, steps=args.steps or 12,
                     batch=args.batch, seed=args.seed, max_rows=args.max_rows)
        except GuidanceError as err:  # bad expressions or settings: a message, not a traceback
            print(f"guidekit demo: {err}", file=sys.stderr)
            return 2
        return 0

    from guidekit.models.demo import Entry, run_model_demo

    scenes_asked = (args.caption is not None or args.negative_caption is not None
                    or (args.model or "").startswith("scenes"))
    if scenes_asked and args.negative is not None:
        print("guidekit demo: --negative is a digit for the digit models; give the scenes "
              "model a --negative-caption", file=sys.stderr)
        return 2
    if scenes_asked and args.model in ("eps", "flow"):
        print(f"guidekit demo: --caption and --negative-caption are for the scenes models, "
              f"not --model {args.model}", file=sys.stderr)
        return 2
    # digits: unless only the scenes were asked for; scenes: with the digits' default list
    digits = not scenes_asked
    scenes = scenes_asked or (args.guidance is None and args.model is None
                              and args.negative is None)
    try:
        if digits:
            entries = None
            if args.guidance is not None:
                entries = [Entry(args.model or "eps", text) for text in args.guidance]
            run_model_demo(entries, per_digit=args.samples, steps=args.steps or 20,
                           seed=args.seed, max_rows=args.max_rows, out=args.out,
                           progress=not args.no_progress, threads=args.threads,
                           negative=args.negative)
        if scenes:
            _scenes_demo(args)
    except GuidanceError as err:
        print(f"guidekit demo: {err}", file=sys.stderr)
        return 2
    return 0


def _scenes_demo(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from guidekit.models.scenes.demo import FAST_STEPS, SceneEntry, run_scene_demo

    entries = None
    if args.guidance is not None:
        model = args.model or "scenes"
        steps = args.steps or (FAST_STEPS if model == "scenes-fast" else 20)
        entries = [SceneEntry(model, text, steps) for text in args.guidance]
    out = Path(args.out)
    old = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run_scene_demo(entries, args.caption, negative=args.negative_caption, seed=args.seed,
                       out=out.with_name(f"{out.stem}-scenes{out.suffix or '.png'}"))
    finally:
        torch.set_num_threads(old)


def _sweep(args: argparse.Namespace) -> int:
    from guidekit.errors import GuidanceError
    from guidekit.models.sweep import METHODS, read_exprs, run_sweep, sweep_models

    bad = [m for m in args.models if m not in sweep_models()] + [
        m for m in args.methods or () if m not in METHODS
    ]
    if bad:  # a message, not a traceback from deep inside the run
        print(f"guidekit sweep: unknown model or method {bad}; models: "
              f"{', '.join(sweep_models())}; methods: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    exprs = list(args.expr)
    if args.exprs is not None:
        try:
            exprs += read_exprs(args.exprs)
        except OSError as err:
            print(f"guidekit sweep: cannot read --exprs {args.exprs!r}: {err}", file=sys.stderr)
            return 2
    methods = args.methods
    if methods is None and exprs:  # the expressions and the baseline they are paired with
        methods = ["none"]
    scales = None if args.scales is None else [s for group in args.scales for s in group]
    try:
        run_sweep(
            models=args.models, methods=methods, scales=scales, exprs=exprs,
            seeds=range(args.seeds), per_digit=args.samples, steps=args.steps, out=args.out,
            threads=args.threads, device=args.device, speed=not args.no_speed,
            speed_batch=args.speed_batch, speed_steps=args.speed_steps,
            speed_repeats=args.speed_repeats, plots=not args.no_plot,
            progress=not args.no_progress,
        )
    except GuidanceError as err:  # a bad or unsupported expression: refused before sampling
        print(f"guidekit sweep: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m guidekit`` and the ``guidekit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "sweep":
        return _sweep(args)
    parser.print_help()
    return 2
