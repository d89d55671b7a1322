"""guidekit's default split vs one call vs one call per branch vs diffusers' guiders.

Re-measures issue 14's table in one interleaved run (1 torch thread by default): per model,
batch ``B`` and expression, one Euler run per variant, in a random order every repeat (a
rotation would have each variant always follow the same one), and each ratio the median
over repeats of the ratio of timings in the same repeat.

Variants: ``default`` (``guidekit.compile(expr)``: the auto split; one plan for all
repeats, run before the timing until its trials have decided, up to 12 runs), ``fresh``
(the same with a new plan every run, so every run pays the trial: what a one-shot call
costs), ``one call``
(``max_rows="one call"``), ``per branch`` (``max_rows="branch"``) and ``diffusers`` (its own
guider driven the way its modular denoise loop drives it: ``ClassifierFreeGuidance``,
``PerturbedAttentionGuidance``, ``SkipLayerGuidance``, ``AdaptiveProjectedGuidance``).

Models: the bundled digits DiT (16 tokens, ``guidekit.models.load("eps")``) and a
compute-bound random-weight diffusers ``DiTTransformer2DModel`` (width 256: 8 heads of 32,
6 layers, 8M parameters) at 64 and 256 tokens. The guidekit variants must give the same
samples (relative 1e-4); the largest difference from the diffusers guider is printed
(``PAG`` / ``SLG`` are gated off at step 0 as diffusers' window is).

    python benchmarks/default_split.py --quick            # a few minutes on one thread
    python benchmarks/default_split.py --write split.md   # the whole table
    python benchmarks/default_split.py --models dit256 --batches 4 16 64 --exprs CFG
    python benchmarks/default_split.py --models dit64 --batches 4 16 --cpu-time  # CPU clock
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as bench  # noqa: E402

import guidekit  # noqa: E402
from guidekit import APG, CFG, PAG, SLG  # noqa: E402
from guidekit.attention import install  # noqa: E402
from guidekit.split import split_label  # noqa: E402

W, S, NORM = 5.0, 3.0, 15.0
#: (model, batches) of the full table and of --quick
FULL = {"digits": (1, 16), "dit64": (1, 4, 16, 64), "dit256": (1, 4, 16, 64)}
QUICK = {"digits": (1, 16), "dit64": (1, 4), "dit256": (1,)}
VARIANTS = ("default", "fresh", "one call", "per branch", "diffusers")


class Model:
    """One benchmark model: its network, guidekit model function, schedule and labels."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "digits":
            from guidekit.models import load

            b = load("eps")
            self.net, self.fn, self.mid = b.transformer, b.model_fn, 5
            self.prediction, self.noise = b.prediction, b.convention.guidekit_noise()
            self.shape, self.null = b.shape, b.null_class
            self.schedule = lambda steps: b.sigmas(steps)[:-1].tolist()
            self.tokens = 16
        else:
            from diffusers import DiTTransformer2DModel

            side = {"dit64": 16, "dit256": 32}[name]
            torch.manual_seed(0)
            net: Any = DiTTransformer2DModel(
                sample_size=side, patch_size=2, in_channels=1, out_channels=1, num_layers=6,
                num_attention_heads=8, attention_head_dim=32, num_embeds_ada_norm=10,
            ).eval()
            self.net = bench._randomised(net)

            def fn(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> Any:
                return self.net(x, timestep=bench._timestep(sigma), class_labels=class_labels).sample

            self.fn, self.mid, self.prediction, self.noise = fn, 3, "eps", "ve"
            self.shape, self.null, self.tokens = (1, side, side), bench.NULL_CLASS, (side // 2) ** 2
            self.schedule = bench.schedule
        params = sum(p.numel() for p in self.net.parameters())
        self.line = f"{name}: {self.tokens} tokens, {params / 1e6:.2f}M parameters"


def expressions(m: Model, sigmas: list[float]) -> dict[str, Any]:
    """guidekit's expression and diffusers' guider per table column."""
    from diffusers.guiders import (
        AdaptiveProjectedGuidance,
        ClassifierFreeGuidance,
        PerturbedAttentionGuidance,
        SkipLayerGuidance,
    )
    from diffusers.hooks import LayerSkipConfig

    # diffusers' perturbation guiders are off at step 0 (a strict window): gate ours alike
    after0 = (0.0, sigmas[1] * (1 + 1e-9))
    return {
        "CFG": (CFG(W), lambda: ClassifierFreeGuidance(guidance_scale=W)),
        "PAG": (CFG(W) + PAG(S, layers=m.mid).between(*after0), lambda: PerturbedAttentionGuidance(
            guidance_scale=W, perturbed_guidance_scale=S, perturbed_guidance_start=0.0,
            perturbed_guidance_stop=1.0, perturbed_guidance_layers=[m.mid])),
        # skip_layer_guidance_layers=[k] builds LayerSkipConfig(k), whose int indices its own
        # hook cannot take (diffusers 0.42.1, TypeError): pass the config with a list
        "SLG": (CFG(W) + SLG(S, layers=m.mid).between(*after0), lambda: SkipLayerGuidance(
            guidance_scale=W, skip_layer_guidance_scale=S, skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0,
            skip_layer_config=LayerSkipConfig(indices=[m.mid], fqn="auto"))),
        "APG": (CFG(W) | APG(eta=0, norm_threshold=NORM), lambda: AdaptiveProjectedGuidance(
            guidance_scale=W, eta=0.0, adaptive_projected_guidance_rescale=NORM)),
    }


def guided_run(m: Model, expr: Any, max_rows: Any, x0: torch.Tensor, conds: dict[str, Any],
               sigmas: list[float], fresh: bool) -> tuple[Callable[[], torch.Tensor], Any]:
    """One Euler run through ``guidekit.guide``; ``fresh``: a new plan every run."""
    holder: dict[str, Any] = {}

    def plan() -> Any:
        if fresh or "plan" not in holder:
            holder["plan"] = guidekit.compile(expr, prediction=m.prediction, noise=m.noise,
                                              max_rows=max_rows)
        return holder["plan"]

    @torch.no_grad()
    def run() -> torch.Tensor:
        p = plan()
        with contextlib.ExitStack() as stack:
            around = None
            if any(b.perturbation is not None for b in p.branches):
                around = stack.enter_context(install(m.net, p))
            g = guidekit.guide(p, m.fn, cond=conds["cond"], uncond=conds["uncond"],
                               sigmas=sigmas, around_call=around)
            return bench.euler(lambda x, s: g(x, s), x0.clone(), sigmas)

    return run, holder


def peer_run(m: Model, make: Callable[[], Any], x0: torch.Tensor, conds: dict[str, Any],
             sigmas: list[float]) -> Callable[[], torch.Tensor]:
    """One Euler run with diffusers' guider choosing and combining the batches."""
    from gpu import peer_predict

    guider = make()
    cond, uncond = conds["cond"], conds["uncond"]

    @torch.no_grad()
    def run() -> torch.Tensor:
        predict = peer_predict(guider, m.fn, m.net, cond, uncond, len(sigmas))
        steps = iter(range(len(sigmas)))
        return bench.euler(lambda x, s: predict(next(steps), x, s), x0.clone(), sigmas)

    return run


def deciding(plan: Any) -> bool:
    """Whether an auto split plan has a group still on trial."""
    policy = plan.policy
    return any(policy.deciding(*key) for key in getattr(policy, "timings", {}))


def measure(m: Model, batch: int, steps: int, repeats: int, names: list[str] | None = None,
            warm_runs: int = 12, clock: Callable[[Callable[[], Any]], float] = bench.timed,
            ) -> list[dict[str, Any]]:
    sigmas = m.schedule(steps)
    torch.manual_seed(batch)
    x0 = torch.randn(batch, *m.shape) * sigmas[0]
    labels = torch.arange(batch) % 10
    conds = {"cond": {"class_labels": labels},
             "uncond": {"class_labels": torch.full_like(labels, m.null)}}
    rows = []
    for ename, (expr, guider) in expressions(m, sigmas).items():
        if names and ename not in names:
            continue
        variants: dict[str, Callable[[], Any]] = {}
        plans: dict[str, Any] = {}
        for v, max_rows in (("default", None), ("fresh", None), ("one call", "one call"),
                            ("per branch", "branch")):
            variants[v], plans[v] = guided_run(m, expr, max_rows, x0, conds, sigmas, v == "fresh")
        variants["diffusers"] = peer_run(m, guider, x0, conds, sigmas)
        outs = {v: fn() for v, fn in variants.items()}
        # "default" is a plan reused: run it until every trial has decided (its later runs
        # pay none); "fresh" shows what a one-shot run pays.
        for _ in range(warm_runs):
            if not deciding(plans["default"]["plan"]):
                break
            variants["default"]()
        peer = outs.pop("diffusers")
        bench.check_agree(outs, 1e-4, f"{m.name} B={batch} {ename}")
        peer_diff = float((peer - outs["one call"]).abs().max() / outs["one call"].abs().max())
        # warmed up above; a random order per repeat: no variant always follows the same one
        t = bench.interleaved(variants, repeats, warmup=0, clock=clock, shuffle=True)
        one, branch = bench.median(t["one call"]), bench.median(t["per branch"])
        best = "one call" if one <= branch else "per branch"
        chosen = plans["default"]["plan"].policy.chosen
        rows.append({
            "model": m.name, "tokens": m.tokens, "B": batch, "expr": ename,
            "one": one / steps * 1e3, "branch": branch / steps * 1e3,
            "branch/one": bench.paired_ratio(t["per branch"], t["one call"]),
            "default/best": bench.paired_ratio(t["default"], t[best]),
            "fresh/best": bench.paired_ratio(t["fresh"], t[best]),
            "default/diffusers": bench.paired_ratio(t["default"], t["diffusers"]),
            "best/diffusers": bench.paired_ratio(t[best], t["diffusers"]),
            "chose": ", ".join(sorted({split_label(r, b, c) for (_, r, b), c in chosen.items()})),
            "peer": peer_diff,
        })
        print(fmt_row(rows[-1]), flush=True)
        print(trial_times(plans["default"]["plan"].policy), flush=True)
    return rows


def trial_times(policy: Any) -> str:
    """The default plan's trial timings (ms per timed group, per candidate chunk): why it
    chose what it chose."""
    parts = []
    for (group, rows, batch), seen in getattr(policy, "timings", {}).items():
        cands = "; ".join(f"{split_label(rows, batch, c)}: "
                          + " ".join(f"{t * 1e3:.0f}" for t in ts) for c, ts in seen.items())
        parts.append(f"  trial {group} at {rows} rows: {cands}")
    return "\n".join(parts) or "  (no trial)"


HEADER = ["model", "tokens", "B", "expr", "one call ms/step", "per branch ms/step",
          "per branch / one call", "default / best fixed", "fresh plan / best fixed",
          "default / diffusers", "best fixed / diffusers", "default chose",
          "rel. diff vs diffusers"]


def cells(r: dict[str, Any]) -> list[str]:
    return [r["model"], str(r["tokens"]), str(r["B"]), r["expr"], f"{r['one']:.1f}",
            f"{r['branch']:.1f}", f"{r['branch/one']:.3f}", f"{r['default/best']:.3f}",
            f"{r['fresh/best']:.3f}", f"{r['default/diffusers']:.3f}",
            f"{r['best/diffusers']:.3f}", r["chose"], f"{r['peer']:.1e}"]


def fmt_row(r: dict[str, Any]) -> str:
    return "  ".join(f"{h}={c}" for h, c in zip(HEADER, cells(r)))


def main() -> None:
    p = bench.common_args(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    p.add_argument("--quick", action="store_true", help="fewer batches, steps and repeats")
    p.add_argument("--steps", type=int, default=None, help="Euler steps per run")
    p.add_argument("--models", nargs="*", default=None, choices=sorted(FULL))
    p.add_argument("--batches", nargs="*", type=int, default=None,
                   help="batch sizes (default: the grid's per model)")
    p.add_argument("--exprs", nargs="*", default=None, choices=["CFG", "PAG", "SLG", "APG"])
    p.add_argument("--cpu-time", action="store_true", help="time the thread's CPU time, not "
                   "wall time (with one torch thread all of the work; other load on the "
                   "machine then adds no time)")
    args = p.parse_args()
    clock = bench.thread_timed if args.cpu_time else bench.timed
    grid = QUICK if args.quick else FULL
    steps = args.steps or (4 if args.quick else 10)
    repeats = args.repeats or (3 if args.quick else 9)
    session = bench.Session(args)
    models = [Model(n) for n in (args.models or grid)]
    clock_line = f"clock: {'thread CPU' if args.cpu_time else 'wall'} time"
    session.intro(*(m.line for m in models),
                  f"{steps} steps per run, {repeats} interleaved repeats, w={W}, s={S}", clock_line)
    rows: list[dict[str, Any]] = []
    for m in models:
        for batch in args.batches or grid[m.name]:
            rows += measure(m, batch, steps, repeats, args.exprs, clock=clock)
    table = bench.markdown(HEADER, [cells(r) for r in rows])
    print("\n" + bench.text_table(HEADER, [cells(r) for r in rows]))
    session.finish([table], notes=[m.line for m in models] + [
        f"{steps} steps per run, {repeats} interleaved repeats, w={W}, s={S}", clock_line])


if __name__ == "__main__":
    main()
