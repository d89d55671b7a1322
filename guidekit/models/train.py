"""Train the bundled models: ``python -m guidekit.models.train NAME --seed 0``.

NAME is one of ``classifier``, ``reference``, ``eps``, ``flow``, ``eps-weak``, ``flow-weak``
or ``all`` (in that order: the reference statistics need the classifier). Each run is seeded
and, with the same torch build and thread count, reproduces the shipped file; it prints its
loss and timing as it goes. Needs scikit-learn for the data (``pip install 'guidekit[train]'``).

Diffusion models: AdamW (lr 1e-3), batch 128, labels dropped to the null class once per
batch with p = 0.1, an EMA of the weights (decay 0.999, warmed up as ``(1 + k) / (10 + k)``)
is what gets saved, in float16. The step counts are chosen to leave the main models clearly
short of perfect so that guidance has something to fix (docs/models.md has the numbers); the
weak siblings, for Autoguidance, are the same network trained for fewer steps.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import numpy as np
import torch

from guidekit.models.bundled import network_prediction
from guidekit.models.classifier import Classifier, load_classifier, shift_augment
from guidekit.models.dit import HEAD_DIM, HEADS, build_dit, drop_labels
from guidekit.models.schedules import Convention, convention
from guidekit.models.store import save, weight_path

FORMAT = "guidekit-bundled-dit/1"
M = TypeVar("M", bound=torch.nn.Module)


@attrs.frozen
class Recipe:
    """How one bundled diffusion model is trained."""

    prediction: str
    layers: int
    steps: int
    batch: int = 128
    lr: float = 1e-3
    ema: float = 0.999
    label_drop: float = 0.1
    heads: int = HEADS
    head_dim: int = HEAD_DIM


RECIPES: dict[str, Recipe] = {
    "eps": Recipe("eps", layers=6, steps=1500),
    "flow": Recipe("flow", layers=6, steps=600),
    # The weak siblings are the same network trained for two thirds of the steps (with the
    # same seed, they are earlier EMA snapshots of the main runs). Weaker ones (2-layer
    # models; fewer steps) ignore the class more, which turns Autoguidance into CFG with its
    # loss of diversity; see docs/models.md.
    "eps-weak": Recipe("eps", layers=6, steps=1000),
    "flow-weak": Recipe("flow", layers=6, steps=400),
}
ORDER = ("classifier", "reference", "eps", "flow", "eps-weak", "flow-weak")


@attrs.frozen(eq=False)
class TrainResult:
    """The EMA model, the per-step training losses and the wall time."""

    model: Any
    losses: list[float]
    seconds: float


def _say(*args: Any) -> None:
    print(*args, flush=True)


def train_diffusion(
    model: torch.nn.Module,
    conv: Convention,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    seed: int = 0,
    batch: int = 128,
    lr: float = 1e-3,
    ema: float = 0.999,
    label_drop: float = 0.1,
    log: Callable[..., None] | None = _say,
    log_every: int = 100,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` (a DiT from :func:`~guidekit.models.dit.build_dit`) on ``images``.

    Every step draws a batch with replacement, drops labels to the null class with
    probability ``label_drop`` and noises the batch by ``conv`` (its training target is the
    model's prediction). Returns the EMA copy in eval mode. ``on_checkpoint(step, ema_model)``
    is called after each step listed in ``checkpoints`` (the learning rate is constant, so a
    checkpoint equals a shorter run with the same seed).
    """
    gen = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x0, y = images[idx], drop_labels(labels[idx], label_drop, gen)
        x, sigma, target = conv.training_batch(x0, gen)
        pred = network_prediction(model, conv, x, sigma, y)
        return torch.nn.functional.mse_loss(pred, target)

    return fit_with_ema(model, batch_loss, steps=steps, lr=lr, ema=ema, log=log,
                        log_every=log_every, checkpoints=checkpoints,
                        on_checkpoint=on_checkpoint)


def fit_with_ema(
    model: torch.nn.Module,
    batch_loss: Callable[[], torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    ema: float = 0.999,
    log: Callable[..., None] | None = _say,
    log_every: int = 100,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """The bundled diffusion models' optimisation loop: ``batch_loss()`` draws and scores one
    batch; AdamW at a constant ``lr``, gradient norm clipped at 1, and an EMA copy (decay
    ``ema``, warmed up as ``(1 + k) / (10 + k)``) that is returned in eval mode."""
    model.train()
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses: list[float] = []
    start = time.perf_counter()
    marks = set(checkpoints)
    for k in range(steps):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(ema, (1 + k) / (10 + k))
        with torch.no_grad():
            for pe, pm in zip(ema_model.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(float(loss.detach()))
        if log is not None and ((k + 1) % log_every == 0 or k + 1 == steps):
            took = time.perf_counter() - start
            recent = float(np.mean(losses[-log_every:]))
            log(f"  step {k + 1:5d}/{steps}  loss {recent:.4f}  {took:6.1f} s "
                f"({(k + 1) / took:.1f} steps/s)")
        if on_checkpoint is not None and k + 1 in marks:
            on_checkpoint(k + 1, ema_model)
    return TrainResult(ema_model, losses, time.perf_counter() - start)


def diffusion_metadata(
    name: str, recipe: Recipe, seed: int, steps: int, dtype: torch.dtype = torch.float16
) -> dict[str, object]:
    conv = convention(recipe.prediction)
    return {
        "format": FORMAT, "name": name, "prediction": recipe.prediction, "noise": conv.noise,
        "layers": recipe.layers, "heads": recipe.heads, "head_dim": recipe.head_dim,
        "steps": steps, "seed": seed, "batch": recipe.batch, "lr": recipe.lr,
        "ema": recipe.ema, "label_drop": recipe.label_drop, "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": f"python -m guidekit.models.train {name} --seed {seed}",
    }


def train_model(
    name: str, seed: int, out: Path, *, steps: int | None = None,
    checkpoints: Sequence[int] = (), dtype: torch.dtype = torch.float16,
) -> TrainResult:
    """Train and save the bundled diffusion model ``name`` (EMA weights, float16 by default)."""
    from guidekit.models import data

    recipe = RECIPES[name]
    total = steps or recipe.steps
    digits = data.load()
    conv = convention(recipe.prediction)
    torch.manual_seed(seed)
    model = build_dit(
        recipe.layers, heads=recipe.heads, head_dim=recipe.head_dim,
        generator=torch.Generator().manual_seed(seed),
    )
    params = sum(p.numel() for p in model.parameters())
    _say(f"{name}: DiT {recipe.layers} layers ({params / 1e6:.2f}M parameters), "
         f"{recipe.prediction} prediction, {total} steps, seed {seed}, "
         f"{torch.get_num_threads()} threads")

    def keep(step: int, ema_model: torch.nn.Module) -> None:
        path = out / f"{name}-step{step}.safetensors"
        save(ema_model.state_dict(), path, diffusion_metadata(name, recipe, seed, step, dtype),
             dtype)
        _say(f"  checkpoint {path}")

    result = train_diffusion(
        model, conv, digits.train_images, digits.train_labels, steps=total, seed=seed,
        batch=recipe.batch, lr=recipe.lr, ema=recipe.ema, label_drop=recipe.label_drop,
        checkpoints=checkpoints, on_checkpoint=keep,
    )
    path = save(result.model.state_dict(), weight_path(name, out),
                diffusion_metadata(name, recipe, seed, total, dtype), dtype)
    _say(f"{name}: {result.seconds:.1f} s, wrote {path}")
    return result


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, *, steps: int = 1500, seed: int = 0,
    batch: int = 128, lr: float = 2e-3, log: Callable[..., None] | None = _say,
) -> Classifier:
    """Train the evaluation CNN with ±1-pixel shift augmentation (AdamW, cosine decay)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Classifier()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x = shift_augment(images[idx], gen)
        return torch.nn.functional.cross_entropy(model(x), labels[idx])

    return fit_classifier(model, batch_loss, steps=steps, lr=lr, log=log)


def fit_classifier(
    model: M, batch_loss: Callable[[], torch.Tensor], *, steps: int,
    lr: float = 2e-3, log: Callable[..., None] | None = _say,
) -> M:
    """The evaluation classifiers' loop: AdamW (weight decay 1e-4) with cosine decay over
    ``steps``; returns ``model`` in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.perf_counter()
    model.train()
    for k in range(steps):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (k + 1) % 250 == 0:
            log(f"  step {k + 1:5d}/{steps}  loss {loss.item():.4f}  "
                f"{time.perf_counter() - start:.1f} s")
    return model.eval()


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def run_classifier(seed: int, out: Path) -> None:
    from guidekit.models import data

    digits = data.load()
    start = time.perf_counter()
    model = train_classifier(digits.train_images, digits.train_labels, seed=seed)
    acc = accuracy(model, digits.test_images, digits.test_labels)
    path = save(model.state_dict(), weight_path("classifier", out), {
        "format": "guidekit-digits-classifier/1", "seed": seed, "test_accuracy": acc,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": f"python -m guidekit.models.train classifier --seed {seed}",
    })
    _say(f"classifier: held-out accuracy {acc:.4f}, {time.perf_counter() - start:.1f} s, "
         f"wrote {path}")


def run_reference(seed: int, out: Path) -> None:
    """Feature statistics of the held-out digits under the SAVED classifier."""
    from guidekit.models import data
    from guidekit.models.metrics import (
        Reference,
        class_diversity,
        classify,
        feature_stats,
        frechet_distance,
    )

    digits = data.load()
    clf = load_classifier(weight_path("classifier", out))
    test_f, test_pred = classify(digits.test_images, clf)
    train_f, _ = classify(digits.train_images, clf)
    mu, cov = feature_stats(test_f)
    floor = frechet_distance(*feature_stats(train_f), mu, cov)
    test_y = digits.test_labels.numpy()
    ref = Reference(
        mean=mu, cov=cov, class_diversity=class_diversity(test_f, test_y),
        count=int(test_f.shape[0]), floor_fd=floor,
        classifier_accuracy=float((test_pred == test_y).mean()),
    )
    meta = {"format": "guidekit-digits-reference/1", "seed": seed, **ref.metadata(),
            "command": f"python -m guidekit.models.train reference --seed {seed}"}
    path = save(ref.tensors(), weight_path("reference", out), meta)
    _say(f"reference: {ref.count} held-out digits, classifier accuracy "
         f"{ref.classifier_accuracy:.4f}, FD floor (train vs held-out) {floor:.3f}, "
         f"real diversity {np.round(ref.class_diversity, 2).tolist()}, wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m guidekit.models.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("name", choices=(*ORDER, "all"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None,
                        help="override the recipe's training steps (diffusion models)")
    parser.add_argument("--checkpoints", default="",
                        help="comma-separated steps at which to also save the EMA weights")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the package's weights folder)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="storage precision of diffusion weights (shipped: float16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or weight_path("eps").parent
    names = ORDER if args.name == "all" else (args.name,)
    marks = [int(s) for s in args.checkpoints.split(",") if s.strip()]
    for name in names:
        start = time.perf_counter()
        if name == "classifier":
            run_classifier(args.seed, out)
        elif name == "reference":
            run_reference(args.seed, out)
        else:
            train_model(name, args.seed, out, steps=args.steps, checkpoints=marks,
                        dtype=getattr(torch, args.dtype))
        _say(f"[{name} done in {time.perf_counter() - start:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
