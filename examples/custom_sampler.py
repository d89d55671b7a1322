"""guidekit in a hand-written Euler sampler around a tiny torch model (runs in ~1 s on a CPU).

    python examples/custom_sampler.py
    python examples/custom_sampler.py --guidance "CFG(3) | APG(eta=0)" --batch 8

The code lives in :mod:`guidekit.models.toy` (so ``python -m guidekit demo --toy`` runs the same thing):
a class-conditional ``model(x, sigma, y)`` with a null class for the unconditional branch and
a degraded copy for Autoguidance, Karras sigmas, and the loop

    guided = guidekit.guide(plan, model, cond={"y": labels}, uncond={"y": null_labels},
                            models={"weak": weak}, sigmas=sigmas)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * guided(x, sigma)

It prints ``print(plan)``, ``plan.explain(sigmas, batch=B)`` and the model calls of every step
read from ``guided.calls``, and fails unless each step made exactly one call per forward group
with ``active_branches x B`` rows. README.md has a self-contained 30-line version.
"""

from __future__ import annotations

import sys

from guidekit.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["demo", "--toy", *sys.argv[1:]]))
