"""Per-step cost of a guidekit plan vs calling the model by hand with the same rows.

Run: ``python benchmarks/overhead.py [--threads 2] [--repeats N] [--write FILE]``.

For each guidance expression and batch size it times a short sampling loop (Euler, VE noise,
eps prediction) two ways, interleaved:

* guided: ``guidekit.guide(plan, model, ...)`` called once per step;
* baseline: the same model calls on inputs whose conditioning is concatenated once before
  the loop, and the combine written out by hand (``u + w (c - u)``, APG in float64, the
  autoguidance term), i.e. what one would write without guidekit.

It prints the guided / baseline time ratio per configuration (median over repeats of the
ratio of neighbouring timings), first with a small DiT, then with a trivially cheap model
(a per-class scale) where the difference of the two is guidekit's own Python cost per step.
It also checks that both ways give the same samples.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as bench  # noqa: E402

import guidekit  # noqa: E402
from guidekit import APG, CFG, Autoguidance  # noqa: E402

BATCHES = (1, 8, 32)
W = 7.0
ETA, MOMENTUM, THRESHOLD = 0.0, -0.5, 5.0
W_AG, S_AG = 3.0, 1.0


def configs() -> list[tuple[str, guidekit.Expr]]:
    return [
        ("CFG(7)", CFG(W)),
        ("CFG(7) | APG(eta=0, momentum=-0.5, norm_threshold=5)",
         CFG(W) | APG(eta=ETA, momentum=MOMENTUM, norm_threshold=THRESHOLD)),
        ("CFG(3) + Autoguidance(1)", CFG(W_AG) + Autoguidance(S_AG)),
    ]


# -- the hand-written baselines -----------------------------------------------------------------


def _apg_by_hand(
    c: torch.Tensor, u: torch.Tensor, x: torch.Tensor, sigma: float, m: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """APG (arXiv 2410.02416, Algorithm 1) on eps predictions, VE noise: via x0 and back."""
    x64 = x.double()
    c0 = x64 - sigma * c.double()
    u0 = x64 - sigma * u.double()
    d = c0 - u0
    m = d if m is None else d + MOMENTUM * m
    d = m
    norm = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    d = d * torch.clamp(THRESHOLD / norm, max=1.0)
    unit = c0 / c0.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    par = (d * unit).sum((1, 2, 3), keepdim=True) * unit
    out0 = c0 + (W - 1.0) * ((d - par) + ETA * par)
    return ((x64 - out0) / sigma).to(c.dtype), m


def baseline_loop(
    name: str, main: bench.Model, weak: bench.Model, cond: torch.Tensor, uncond: torch.Tensor,
    x_init: torch.Tensor, sigmas: list[float],
) -> Callable[[], torch.Tensor]:
    """One sampling run without guidekit, for configuration ``name``."""
    b = x_init.shape[0]
    labels2 = torch.cat([cond, uncond])  # concatenated once, outside the loop

    def run() -> torch.Tensor:
        m = None  # APG's momentum, carried from step to step

        def predict(x: torch.Tensor, s: float) -> torch.Tensor:
            nonlocal m
            out = main(torch.cat([x, x]), torch.full((2 * b,), s), class_labels=labels2)
            c, u = out[:b], out[b:]
            if name.startswith("CFG(7) |"):
                y, m = _apg_by_hand(c, u, x, s, m)
                return y
            if name.startswith("CFG(7)"):
                return u + W * (c - u)
            cw = weak(x, torch.full((b,), s), class_labels=cond)
            return u + W_AG * (c - u) + S_AG * (c - cw)

        return bench.euler(predict, x_init.clone(), sigmas)

    return run


def guided_loop(
    expr: guidekit.Expr, main: bench.Model, weak: bench.Model, cond: torch.Tensor,
    uncond: torch.Tensor, x_init: torch.Tensor, sigmas: list[float],
) -> Callable[[], torch.Tensor]:
    """The same run through a compiled plan (one ``Guided`` reused, reset per run)."""
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    models = {"weak": weak} if "weak" in plan.models else None
    guided = guidekit.guide(
        plan, main, cond={"class_labels": cond}, uncond={"class_labels": uncond},
        models=models, sigmas=sigmas,
    )

    def run() -> torch.Tensor:
        guided.reset()
        return bench.euler(guided, x_init.clone(), sigmas)

    return run


# -- measurement --------------------------------------------------------------------------------


def measure(
    main: bench.Model, weak: bench.Model, steps: int, repeats: int, rtol: float
) -> list[dict[str, Any]]:
    sigmas = bench.schedule(steps)
    results = []
    for name, expr in configs():
        for b in BATCHES:
            torch.manual_seed(b)
            x_init = torch.randn(b, 1, 8, 8) * sigmas[0]
            cond, uncond = bench.labels(b, seed=b)
            guided = guided_loop(expr, main, weak, cond, uncond, x_init, sigmas)
            base = baseline_loop(name, main, weak, cond, uncond, x_init, sigmas)
            # Same model calls on the same rows: the samples must agree (float noise only).
            bench.check_agree({"baseline": base(), "guided": guided()}, rtol, f"{name}, B={b}")
            t = bench.interleaved({"guided": guided, "baseline": base}, repeats)
            results.append({
                "config": name, "batch": b,
                "guided": bench.median(t["guided"]) / steps,
                "baseline": bench.median(t["baseline"]) / steps,
                "ratio": bench.paired_ratio(t["guided"], t["baseline"]),
                "spread": bench.spread([g / h for g, h in zip(t["guided"], t["baseline"])]),
                "diff": bench.median([g - h for g, h in zip(t["guided"], t["baseline"])]) / steps,
            })
    return results


def cheap_model() -> bench.Model:
    """A model that costs almost nothing: ``a x + b`` with a per-class scale and offset map.

    The offset keeps ``c - u`` from being parallel to ``c`` (with a pure scale APG's
    orthogonal part would be rounding noise, amplified by ``w - 1``).
    """
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.5, 0.6, bench.NUM_CLASSES + 1).view(-1, 1, 1, 1)
    offset = torch.randn(bench.NUM_CLASSES + 1, 1, 8, 8, generator=g)

    def model(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return x * scale[class_labels] + offset[class_labels]

    return model


def main() -> None:
    p = bench.common_args(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="sampling steps per timed run (DiT)")
    args = p.parse_args()
    session = bench.Session(args)
    repeats = args.repeats or 15

    with torch.inference_mode():
        dit, dit_desc = bench.make_dit(layers=6, seed=0, plain=args.plain)
        weak, weak_desc = bench.make_dit(layers=3, seed=1, plain=args.plain)
        session.intro(
            f"main model: {dit_desc}", f"weak model (Autoguidance): {weak_desc}",
            f"{args.steps} steps per run, {repeats} interleaved repeats (+2 warm-up), "
            f"ratio = median over repeats of guided/baseline\n",
        )
        rows_dit = measure(dit, weak, args.steps, repeats, rtol=1e-4)

        cheap_steps = 50
        cheap = cheap_model()
        rows_cheap = measure(cheap, cheap_model(), cheap_steps, max(repeats, 30), rtol=1e-5)

    head = ["config", "B", "baseline ms/step", "guided ms/step", "guided/baseline"]
    table_dit = [
        [str(r["config"]), str(r["batch"]), f"{r['baseline'] * 1e3:.2f}",
         f"{r['guided'] * 1e3:.2f}", f"{r['ratio']:.3f} ± {r['spread']:.3f}"]
        for r in rows_dit
    ]
    head_cheap = ["config", "B", "baseline us/step", "guided us/step", "guidekit us/step",
                  "guided/baseline"]
    table_cheap = [
        [str(r["config"]), str(r["batch"]), f"{r['baseline'] * 1e6:.0f}",
         f"{r['guided'] * 1e6:.0f}", f"{r['diff'] * 1e6:.0f}", f"{r['ratio']:.2f}"]
        for r in rows_cheap
    ]
    print("DiT model: per-step time, guided vs hand-written (± half the IQR of the ratio)")
    print(bench.text_table(head, table_dit))
    print(f"\nTrivially cheap model ({cheap_steps} steps per run): guidekit's own cost per step "
          f"(guidekit us/step = median of guided - baseline)")
    print(bench.text_table(head_cheap, table_cheap))

    session.finish(
        [bench.markdown(head, table_dit), "",
         f"Trivially cheap model, {cheap_steps} steps per run:", "",
         bench.markdown(head_cheap, table_cheap)],
        notes=[f"main model: {dit_desc}; weak model: {weak_desc}",
               f"{args.steps} steps per run, {repeats} interleaved repeats"],
    )


if __name__ == "__main__":
    main()
