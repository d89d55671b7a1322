"""Negative prompts, Composable Diffusion and Perp-Neg on a concept the classifier checks.

Each of ``--samples`` held-out captions gets a negative caption that differs in one
attribute: the first object's colour (the classifier's ``colour1``: the left or top object),
moved one place along ``red green blue yellow purple``. So the
negative names something the sample should not show, and the attribute classifier reads
whether it does. Per expression and seed (``sample_scenes`` on the shipped ``scenes``
model, 20 Euler steps) the script reports

* ``colour1``: the share of samples whose first object has the caption's colour;
* ``neg colour``: the share whose first object has the NEGATIVE caption's colour;
* ``accuracy``: per-attribute adherence to the caption, averaged over the attributes;

as mean ± standard deviation over the seeds. The expressions: plain CFG (away from the
empty caption), the negative caption in the unconditional's place (``CFG(w, negative=...)``,
as diffusers' ``negative_prompt`` does), Composable Diffusion with a negative weight
(``u + w (c - u) - s (c_neg - u)``, arXiv 2206.01714; with ``s = w - 1`` it IS
``CFG(w, negative=...)``, ``w c + (1 - w) c_neg``, and guidekit runs it without the ``u``
rows, so the script uses ``s = 1``) and Perp-Neg (arXiv 2304.04968).

    OMP_NUM_THREADS=2 python benchmarks/scenes_negative.py [--samples 200] [--seeds 3]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import attrs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import common_args, emit, markdown, pin_threads  # noqa: E402

from guidekit.models.scenes.attributes import HEADS  # noqa: E402
from guidekit.models.scenes.classifier import adherence, shipped_classifier  # noqa: E402
from guidekit.models.scenes.model import load_scene_model  # noqa: E402
from guidekit.models.scenes.sample import sample_scenes  # noqa: E402
from guidekit.models.scenes.vocab import COLOURS, parse  # noqa: E402
from guidekit.models.scenes.vocab import caption as vocab_caption  # noqa: E402
from guidekit.models.sweep.scenes import SCENES  # noqa: E402

EXPRESSIONS = (
    "Cond()",
    "CFG(1.5)",
    "CFG(1.5, negative='neg')",
    "Uncond() + Toward(1.5) + Toward(-1, 'neg')",
    "PerpNeg(1.5, negative='neg', neg_scale=1)",
    "CFG(3)",
    "CFG(3, negative='neg')",
    "Uncond() + Toward(3) + Toward(-1, 'neg')",
    "PerpNeg(3, negative='neg', neg_scale=1)",
)


def negative_of(caption: str) -> tuple[str, int]:
    """The caption's scene with its first object's colour (the classifier's ``colour1``)
    moved one place along COLOURS, captioned again; and that colour's index."""
    scene = parse(caption)
    first = scene.objects[0]
    colour = COLOURS[(COLOURS.index(first.colour) + 1) % len(COLOURS)]
    moved = attrs.evolve(scene, objects=(attrs.evolve(first, colour=colour),
                                         *scene.objects[1:]))
    return vocab_caption(moved), COLOURS.index(colour)


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    machine = pin_threads(args.threads)
    model, clf = load_scene_model(), shipped_classifier()
    job = SCENES.conditioning(max(1, args.samples // 10))
    captions = list(job.captions[:args.samples])
    labels = job.labels[:args.samples]
    negatives, neg_colour = zip(*(negative_of(c) for c in captions))
    neg_colour_t = torch.tensor(neg_colour)
    col = list(HEADS).index("colour1")
    rows = []
    for text in EXPRESSIONS:
        scores: dict[str, list[float]] = {"colour1": [], "neg colour": [], "accuracy": []}
        for seed in range(args.seeds):
            r = sample_scenes(model, text, captions, steps=args.steps, seed=seed,
                              conds={"neg": list(negatives)})
            with torch.no_grad():
                pred = clf.predict(r.images)
            right = adherence(pred, labels)
            right.pop("all")
            scores["colour1"].append(right["colour1"])
            scores["neg colour"].append(float((pred[:, col] == neg_colour_t).float().mean()))
            scores["accuracy"].append(sum(right.values()) / len(right))
        rows.append((text, *(f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"
                             if len(v) > 1 else f"{v[0]:.3f}" for v in scores.values())))
        print(" | ".join(rows[-1]), flush=True)
    emit("\n".join([
        machine, f"scenes model, {len(captions)} held-out captions, negative = the first "
        f"object's colour moved one place, {args.steps} Euler steps, seeds 0..{args.seeds - 1}",
        markdown(("expression", "colour1", "neg colour", "accuracy"), rows),
    ]), args.write)


if __name__ == "__main__":
    main()
