"""Prompt adherence of the scenes model: ``python -m guidekit.models.scenes.evaluate``.

Samples the captions of the first ``--samples`` held-out scenes (``data.load(seed).test``,
never seen in training) under ``CFG(w)`` for each ``--scales`` value (20 Euler steps by
default, one noise seed for every scale) and scores the attribute classifier's predictions
on the samples against the captions' scenes, per attribute and on every attribute at once
(:func:`~.classifier.adherence`). The same classifier's accuracy on the real held-out scenes
is the ceiling the samples are read against, unconditional samples scored against the
same captions the floor.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from guidekit.models.scenes.attributes import HEADS
from guidekit.models.scenes.classifier import AttributeClassifier, adherence
from guidekit.models.scenes.data import TEST_SIZE, load
from guidekit.models.scenes.model import SceneModel
from guidekit.models.scenes.sample import sample_scenes

COLUMNS = (*HEADS, "all")


def adherence_rows(
    model: SceneModel, classifier: AttributeClassifier, scales: Sequence[float], *,
    samples: int = 200, steps: int = 20, seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{"real": ..., "unconditional": ..., "CFG(w)": ...}``: per-attribute adherence of
    the first ``samples`` held-out scenes, of unconditional samples (the empty caption: the
    chance floor) and of samples at each CFG scale, all against those scenes' captions."""
    if not 1 <= samples <= TEST_SIZE:
        raise ValueError(f"samples={samples}: use 1..{TEST_SIZE} (the held-out scenes)")
    test = load(seed, train=1, test=TEST_SIZE).test
    captions, labels = list(test.captions[:samples]), test.labels[:samples]
    with torch.no_grad():
        rows = {"real": adherence(classifier.predict(test.images[:samples]), labels)}
        # the floor: samples that never saw their caption, scored against it
        free = sample_scenes(model, "Cond()", [""] * samples, steps=steps, seed=seed).images
        rows["unconditional"] = adherence(classifier.predict(free), labels)
        for w in scales:
            images = sample_scenes(model, f"CFG({w:g})", captions, steps=steps, seed=seed).images
            rows[f"CFG({w:g})"] = adherence(classifier.predict(images), labels)
    return rows


def table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table, one row per entry of :func:`adherence_rows`."""
    lines = ["| | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from guidekit.models.scenes.classifier import load_scene_classifier
    from guidekit.models.scenes.model import load_scene_model

    parser = argparse.ArgumentParser(prog="python -m guidekit.models.scenes.evaluate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--scales", default="1,3,5", help="comma-separated CFG scales")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped one")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="default: the shipped one")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.scales.split(",") if s.strip()]
    rows = adherence_rows(load_scene_model(args.model), load_scene_classifier(args.classifier),
                          scales, samples=args.samples, steps=args.steps, seed=args.seed)
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
