"""Train the scenes models: ``python -m guidekit.models.scenes.train NAME --seed 0 --threads 1``.

NAME is ``scenes`` (the text-conditioned denoiser and its token encoder, trained jointly),
``scenes-weak`` (the same run stopped early, for Autoguidance), ``scenes-fast`` (the
few-step sibling, a reflow of ``scenes``: :mod:`~.reflow`) or ``scenes-classifier`` (the
attribute classifier); all four are shipped. Each run is seeded, pins its torch threads
(``--threads``; the shipped denoisers were written with 2) and prints its loss as it goes;
with the same torch build and threads it reproduces the shipped file tensor for tensor.

Denoiser: rectified flow (``prediction="flow"``, :mod:`guidekit.models.schedules`), AdamW
(lr 1e-3, constant, so ``--checkpoints`` equal shorter runs), batch 64, gradient norm
clipped at 1, captions replaced by the empty caption with p = 0.1 (caption dropout: the
unconditional branch of CFG), EMA of both networks (decay 0.999, warmed up as
``(1 + k) / (10 + k)``) saved in float16; 3500 steps on 20,000 scenes, about 18 minutes on
two CPU threads. Classifier: 2000 steps, AdamW with cosine decay, stored in float16 and
scored on the held-out scenes after that rounding.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import torch

from guidekit.models.scenes.attributes import HEADS
from guidekit.models.scenes.classifier import AttributeClassifier, adherence, attribute_loss
from guidekit.models.scenes.data import TEST_SIZE, TRAIN_SIZE
from guidekit.models.scenes.denoiser import HEAD_DIM, LAYERS
from guidekit.models.scenes.denoiser import HEADS as ATTN_HEADS
from guidekit.models.scenes.model import SceneNetworks, build_networks
from guidekit.models.scenes.tokenizer import Tokenizer
from guidekit.models.schedules import Convention, convention
from guidekit.models.store import WEIGHTS_DIR, save
from guidekit.models.train import TrainResult, _say, fit_classifier, fit_with_ema

FORMAT = "guidekit-scenes-pixart/1"
NAMES = ("scenes", "scenes-weak", "scenes-fast", "scenes-classifier")


@attrs.frozen
class Recipe:
    """How one scenes denoiser is trained."""

    steps: int
    prediction: str = "flow"
    layers: int = LAYERS
    heads: int = ATTN_HEADS
    head_dim: int = HEAD_DIM
    text_width: int = 64
    text_layers: int = 2
    batch: int = 64
    lr: float = 1e-3
    ema: float = 0.999
    caption_drop: float = 0.1


RECIPES: dict[str, Recipe] = {
    "scenes": Recipe(steps=3500),
    # the weak sibling for Autoguidance: the same run, two thirds of the steps (as for digits)
    "scenes-weak": Recipe(steps=2300),
}


def drop_captions(
    ids: torch.Tensor, mask: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each row by the empty caption (``<bos> <eos>``, unconditional) with probability
    ``p``."""
    empty_ids, empty_mask = Tokenizer(ids.shape[1]).encode("")
    drop = (torch.rand(ids.shape[0], generator=generator) < p)[:, None]
    return torch.where(drop, empty_ids, ids), torch.where(drop, empty_mask, mask)


def train_text_diffusion(
    networks: SceneNetworks,
    conv: Convention,
    images: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    steps: int,
    seed: int = 0,
    batch: int = 64,
    lr: float = 1e-3,
    ema: float = 0.999,
    caption_drop: float = 0.1,
    log: Callable[..., None] | None = _say,
    log_every: int = 50,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train the encoder and denoiser jointly on ``images`` and their tokenised captions.

    Every step draws a batch with replacement, drops captions with probability
    ``caption_drop`` and noises the batch by ``conv``. Returns the EMA copy (eval mode);
    ``on_checkpoint(step, ema)`` runs after each step in ``checkpoints`` (the learning rate
    is constant, so a checkpoint equals a shorter run with the same seed).
    """
    gen = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        tok, m = drop_captions(ids[idx], mask[idx], caption_drop, gen)
        x, sigma, target = conv.training_batch(images[idx], gen)
        return torch.nn.functional.mse_loss(networks(conv, x, sigma, tok, m), target)

    return fit_with_ema(networks, batch_loss, steps=steps, lr=lr, ema=ema, log=log,
                        log_every=log_every, checkpoints=checkpoints,
                        on_checkpoint=on_checkpoint)


def metadata(name: str, recipe: Recipe, seed: int, steps: int, train_size: int,
             dtype: torch.dtype) -> dict[str, object]:
    return {
        "format": FORMAT, "name": name, **attrs.asdict(recipe), "steps": steps, "seed": seed,
        "noise": convention(recipe.prediction).noise, "train_size": train_size,
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "command": f"python -m guidekit.models.scenes.train {name} "
        f"--seed {seed} --threads {torch.get_num_threads()}",
    }


def train_model(name: str, seed: int, out: Path, *, steps: int | None = None,
                train_size: int = TRAIN_SIZE, dtype: torch.dtype = torch.float16,
                checkpoints: Sequence[int] = ()) -> TrainResult:
    """Train and save the scenes denoiser ``name`` (EMA weights of both networks), and its
    EMA at each step of ``checkpoints`` as ``<name>-step<k>.safetensors``."""
    from guidekit.models.scenes import data

    recipe = RECIPES[name]
    total = steps or recipe.steps
    scenes = data.load(seed, train=train_size, test=1)
    ids, mask = Tokenizer().encode(scenes.train.captions)
    torch.manual_seed(seed)
    nets = build_networks(recipe.layers, heads=recipe.heads, head_dim=recipe.head_dim,
                          text_width=recipe.text_width, text_layers=recipe.text_layers,
                          generator=torch.Generator().manual_seed(seed))
    params = sum(p.numel() for p in nets.parameters())
    _say(f"{name}: PixArt {recipe.layers} layers + encoder {recipe.text_layers} layers "
         f"({params / 1e6:.2f}M parameters), {recipe.prediction}, {total} steps, "
         f"{train_size} scenes, seed {seed}, {torch.get_num_threads()} threads")

    def keep(step: int, ema_model: torch.nn.Module) -> None:
        path = save(ema_model.state_dict(), out / f"{name}-step{step}.safetensors",
                    metadata(name, recipe, seed, step, train_size, dtype), dtype)
        _say(f"  checkpoint {path}")

    result = train_text_diffusion(
        nets, convention(recipe.prediction), scenes.train.images, ids, mask, steps=total,
        seed=seed, batch=recipe.batch, lr=recipe.lr, ema=recipe.ema,
        caption_drop=recipe.caption_drop, checkpoints=checkpoints, on_checkpoint=keep,
    )
    path = save(result.model.state_dict(), out / f"{name}.safetensors",
                metadata(name, recipe, seed, total, train_size, dtype), dtype)
    _say(f"{name}: {result.seconds:.1f} s, wrote {path}")
    return result


def run_reflow(seed: int, out: Path, *, steps: int | None = None,
               teacher: Path | None = None, checkpoints: Sequence[int] = (),
               dtype: torch.dtype = torch.float16) -> TrainResult:
    """Distil and save the few-step sibling ``scenes-fast`` from ``teacher`` (default: the
    shipped ``scenes``), :mod:`~.reflow`: teacher pairs for the first training captions,
    then straight-line fine-tuning."""
    from guidekit.models.scenes import data
    from guidekit.models.scenes.model import load_scene_model
    from guidekit.models.scenes.reflow import ReflowRecipe, teacher_pairs, train_reflow

    recipe = ReflowRecipe()
    total = steps or recipe.steps
    model = load_scene_model(teacher)
    captions = data.load(seed, train=recipe.pairs, test=1).train.captions
    _say(f"scenes-fast: reflow of {teacher or 'the shipped scenes'}: {recipe.pairs} pairs "
         f"under {recipe.teacher_guidance} ({recipe.teacher_steps} Euler steps, "
         f"{recipe.uncond:g} unconditional), then {total} steps, seed {seed}, "
         f"{torch.get_num_threads()} threads")
    pairs = teacher_pairs(model, captions, recipe, seed=seed)
    keys = ("prediction", "layers", "heads", "head_dim", "text_width", "text_layers")

    def meta(step: int) -> dict[str, object]:
        return {
            "format": FORMAT, "name": "scenes-fast", **{k: model.metadata[k] for k in keys},
            **{f"reflow_{k}": v for k, v in attrs.asdict(recipe).items()}, "steps": step,
            "seed": seed, "noise": model.convention.noise,
            "teacher": str(teacher or "scenes"), "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": f"python -m guidekit.models.scenes.train scenes-fast --seed {seed} "
            f"--threads {torch.get_num_threads()}",
        }

    def keep(step: int, ema_model: torch.nn.Module) -> None:
        path = save(ema_model.state_dict(), out / f"scenes-fast-step{step}.safetensors",
                    meta(step), dtype)
        _say(f"  checkpoint {path}")

    result = train_reflow(model, pairs, recipe, seed=seed, steps=total,
                          checkpoints=checkpoints, on_checkpoint=keep)
    path = save(result.model.state_dict(), out / "scenes-fast.safetensors", meta(total), dtype)
    _say(f"scenes-fast: {result.seconds:.1f} s of fine-tuning, wrote {path}")
    return result


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, *, steps: int = 2000, seed: int = 0,
    batch: int = 128, lr: float = 2e-3, log: Callable[..., None] | None = _say,
) -> AttributeClassifier:
    """Train the attribute classifier (summed cross entropy over heads, AdamW, cosine decay)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AttributeClassifier()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        return attribute_loss(model(images[idx]), labels[idx])

    return fit_classifier(model, batch_loss, steps=steps, lr=lr, log=log)


def run_classifier(seed: int, out: Path, *, steps: int = 2000, train_size: int = TRAIN_SIZE,
                   test_size: int = TEST_SIZE) -> dict[str, float]:
    """Train, score on the held-out scenes and save the attribute classifier."""
    from guidekit.models.scenes import data

    scenes = data.load(seed, train=train_size, test=test_size)
    model = train_classifier(scenes.train.images, scenes.train.labels, steps=steps, seed=seed)
    # stored in float16: score the rounded weights, which are what loading gives back
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        scores = adherence(model.predict(scenes.test.images), scenes.test.labels)
    path = save(model.state_dict(), out / "scenes-classifier.safetensors", {
        "format": "guidekit-scenes-classifier/1", "seed": seed, "steps": steps,
        "heads": ",".join(HEADS), "train_size": train_size, "test_size": test_size,
        **{f"test_accuracy_{k}": v for k, v in scores.items()}, "dtype": "float16",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": f"python -m guidekit.models.scenes.train scenes-classifier --seed {seed} "
        f"--threads {torch.get_num_threads()}",
    }, torch.float16)
    _say("scenes-classifier: held-out accuracy "
         + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f"; wrote {path}")
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m guidekit.models.scenes.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("name", choices=NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None,
                        help="override the recipe's training steps")
    parser.add_argument("--checkpoints", default="",
                        help="comma-separated steps at which to also save the EMA weights")
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE,
                        help="number of generated training scenes")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR,
                        help="output folder (default: the package's weights folder)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="storage precision of the denoiser weights")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="scenes-fast: the teacher's file (default: the shipped scenes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    marks = [int(k) for k in args.checkpoints.split(",") if k.strip()]
    if args.name == "scenes-classifier":
        run_classifier(args.seed, args.out, steps=args.steps or 2000,
                       train_size=args.train_size)
    elif args.name == "scenes-fast":
        run_reflow(args.seed, args.out, steps=args.steps, teacher=args.teacher,
                   checkpoints=marks, dtype=getattr(torch, args.dtype))
    else:
        train_model(args.name, args.seed, args.out, steps=args.steps,
                    train_size=args.train_size, dtype=getattr(torch, args.dtype),
                    checkpoints=marks)
    _say(f"[{args.name} done in {time.perf_counter() - start:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
