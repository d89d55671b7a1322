"""Command line: ``python -m guidekit demo`` (also installed as ``guidekit demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEMO_HELP = """\
Sample a few toy images with guidance in a hand-written Euler loop around a tiny torch model
(the exact denoiser of Gaussian class blobs, with a degraded copy as Autoguidance's weak
model). Prints the compiled plan, plan.explain(...) for the schedule, and the model calls made
at each step, then checks that every step ran exactly one model call per forward group with
active_branches x B rows. Runs in about a second on a CPU and downloads nothing.

This is the stand-in demo of the core issue: the demo with a real bundled diffusion model
comes in a later issue.
"""

DEMO_EPILOG = """\
examples:
  python -m guidekit demo
  python -m guidekit demo --guidance "CFG(3) | APG(eta=0)"
  python -m guidekit demo --guidance "CFG(5).between(0.3, 5)" --batch 8 --max-rows 8
  python -m guidekit demo --guidance "CFG(3) | CADS(noise_scale=0.2)"
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


def build_parser() -> argparse.ArgumentParser:
    """The ``guidekit`` argument parser (one sub-command, ``demo``, for now)."""
    parser = argparse.ArgumentParser(
        prog="guidekit",
        description="guidekit: composable diffusion guidance compiled to one batched forward "
        "per step.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the custom-sampler demo with a tiny model (bundled-model demo: later issue)",
        description=DEMO_HELP,
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--guidance", "-g", default=None, metavar="EXPR",
        help="guidance expression, read by guidekit.parse (no eval); default: "
        "CFG(3) + Autoguidance(1).between(0.3, 5) | APG(eta=0, momentum=-0.5)",
    )
    demo.add_argument("--steps", type=_positive, default=12, help="Euler steps (default 12)")
    demo.add_argument("--batch", "-b", type=_positive, default=4, help="batch size B (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="seed for labels, noise and CADS")
    demo.add_argument(
        "--max-rows", type=_max_rows, default=None, metavar="N|auto",
        help="row budget per model call (default: one call per forward group)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m guidekit`` and the ``guidekit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "demo":
        parser.print_help()
        return 2
    from guidekit.demo import run_demo
    from guidekit.errors import GuidanceError

    try:
        run_demo(args.guidance, steps=args.steps, batch=args.batch, seed=args.seed,
                 max_rows=args.max_rows)
    except GuidanceError as err:  # bad expressions or settings: a message, not a traceback
        print(f"guidekit demo: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
