"""The sweep's speed figures: per-step time ratios measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from guidekit.models.cache import DIGITS, ModelCache, digit_labels, weak_name


def _half_iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[2] - q[0]) / 2


def speed_figures(models: ModelCache, *, model: str = "eps", batch: int = 100, steps: int = 10,
                  repeats: int = 5) -> list[dict[str, Any]]:
    """Per-step time ratios on one bundled model, with the torch threads as they are set.

    * ``guided / bare``: a guided sampling step (``guidekit.models.sample``: the batched
      call, the combine and the Euler update) against one bare ``model_fn`` call on the same
      rows at the same noise levels;
    * ``sequential / one call``: the same expression with ``max_rows = N`` (one call per
      branch, run one after the other) against one batched call;
    * ``term / CFG``: the cost of an extra term on top of CFG, step for step;
    * ``guidekit / diffusers guider``: the same guidance (CFG; CFG + PAG in the last block)
      through diffusers' own guiders in the loop of its modular pipelines
      (:mod:`guidekit.models.guider_loop`: one forward per condition, PAG's hooks put in and
      taken out around each batch) against guidekit's one batched call.

    Every variant runs once to warm up, then ``repeats`` times, interleaved (the order
    rotates every repeat, so drift of a shared machine hits all variants alike). A ratio is
    the median over repeats of the per-repeat ratio; ``spread`` is half its interquartile
    range.
    """
    from guidekit.models import sample
    from guidekit.models.guider_loop import pag_expression, sample_with_guider

    bundled = models(model)
    sigmas = bundled.sigmas(steps)
    labels = digit_labels(max(1, -(-batch // DIGITS)))[:batch]
    n = int(labels.shape[0])
    cuda = str(bundled.device).startswith("cuda")

    def guided(text: str, max_rows: int | str = "one call") -> Callable[[], float]:
        weak = models(weak_name(model)) if "Autoguidance" in text else None

        def once() -> float:
            return sample(bundled, text, labels, steps=steps, seed=0, weak=weak,
                          max_rows=max_rows).seconds / steps

        return once

    def bare(rows: int, which: str = model) -> Callable[[], float]:
        net = models(which)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((rows, *net.shape), generator=gen).to(net.device)
        y = torch.arange(rows).remainder(net.classes).to(net.device)
        levels = [torch.full((rows,), s, device=net.device) for s in sigmas[:-1].tolist()]

        @torch.no_grad()
        def once() -> float:
            start = time.perf_counter()
            for sig in levels:
                net.model_fn(x, sig, y)
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / steps

        return once

    def peer(guider: Any) -> Callable[[], float]:
        def once() -> float:  # set_state at every step: one guider serves every run
            return sample_with_guider(bundled, guider, labels, steps=steps, seed=0).seconds / steps

        return once

    from diffusers.guiders import ClassifierFreeGuidance, PerturbedAttentionGuidance

    last = int(bundled.transformer.config.num_layers) - 1
    pag_gated = pag_expression(3, 2, sigmas)
    variants: dict[str, Callable[[], float]] = {
        "bare N": bare(n), "bare 2N": bare(2 * n), "bare 3N": bare(3 * n),
        "weak N": bare(n, weak_name(model)),
        "Cond()": guided("Cond()"),
        "CFG(3)": guided("CFG(3)"), "CFG(3) split": guided("CFG(3)", max_rows=n),
        "CFG(3) + PAG(2)": guided("CFG(3) + PAG(2)"),
        "CFG(3) + PAG(2) split": guided("CFG(3) + PAG(2)", max_rows=n),
        "CFG(3) + Autoguidance(1)": guided("CFG(3) + Autoguidance(1)"),
        "CFG(3) + EMAG(1)": guided("CFG(3) + EMAG(1)"),
        "PAG gated": guided(pag_gated),
        "diffusers CFG": peer(ClassifierFreeGuidance(guidance_scale=3.0)),
        "diffusers PAG": peer(PerturbedAttentionGuidance(
            guidance_scale=3.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
            perturbed_guidance_stop=1.0, perturbed_guidance_layers=[last])),
    }
    names = list(variants)
    for name in names:  # warm-up: first-call allocations, lazy imports, engine set-up
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(variants[name]())
    times["bare 2N + weak N"] = [a + b for a, b in zip(times["bare 2N"], times["weak N"])]

    def ratio(figure: str, num: str, den: str, rows: int, num_label: str = "",
              den_label: str = "") -> dict[str, Any]:
        per_repeat = [a / b for a, b in zip(times[num], times[den])]
        return {"figure": figure, "numerator": num_label or num,
                "denominator": den_label or den, "ratio": statistics.median(per_repeat),
                "spread": _half_iqr(per_repeat),
                "numerator_ms": 1e3 * statistics.median(times[num]),
                "denominator_ms": 1e3 * statistics.median(times[den]),
                "rows": rows, "batch": n, "steps": steps, "repeats": repeats, "model": model,
                "threads": torch.get_num_threads(), "device": str(bundled.device)}

    g = "guided step / bare forward"
    out = [
        ratio(g, "Cond()", "bare N", n, den_label="bare N rows"),
        ratio(g, "CFG(3)", "bare 2N", 2 * n, den_label="bare 2N rows"),
        ratio(g, "CFG(3) + PAG(2)", "bare 3N", 3 * n, den_label="bare 3N rows"),
        ratio(g, "CFG(3) + EMAG(1)", "bare 3N", 3 * n, den_label="bare 3N rows"),
        ratio(g, "CFG(3) + Autoguidance(1)", "bare 2N + weak N", 3 * n,
              den_label="bare 2N rows + weak model N rows"),
        ratio("sequential calls / one call", "CFG(3) split", "CFG(3)", 2 * n,
              "CFG(3), max_rows=N: 2 calls", "CFG(3): 1 call"),
        ratio("sequential calls / one call", "CFG(3) + PAG(2) split", "CFG(3) + PAG(2)", 3 * n,
              "CFG(3) + PAG(2), max_rows=N: 3 calls", "CFG(3) + PAG(2): 1 call"),
        ratio("term / CFG", "CFG(3) + PAG(2)", "CFG(3)", 3 * n),
        ratio("term / CFG", "CFG(3) + EMAG(1)", "CFG(3)", 3 * n),
        ratio("term / CFG", "CFG(3) + Autoguidance(1)", "CFG(3)", 3 * n),
        ratio("guidekit / diffusers guider", "CFG(3)", "diffusers CFG", 2 * n,
              den_label="ClassifierFreeGuidance(3): 2 calls of N"),
        ratio("guidekit / diffusers guider", "PAG gated", "diffusers PAG", 3 * n,
              num_label="CFG(3) + PAG(2) from step 1: 1 call",
              den_label="PerturbedAttentionGuidance(3, 2, last block): 3 calls of N"),
    ]
    return out


def speed_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| figure | numerator | denominator | ratio | ms per step |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['figure']} | {r['numerator']} | {r['denominator']} | "
                     f"{r['ratio']:.2f} ± {r['spread']:.2f} | "
                     f"{r['numerator_ms']:.1f} / {r['denominator_ms']:.1f} |")
    return "\n".join(lines)
