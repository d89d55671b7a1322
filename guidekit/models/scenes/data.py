"""The scenes data set: seeded, procedural RGB scenes with a caption and attribute labels.

``generate(n, seed)`` draws ``n`` scenes uniformly (one or two objects; each attribute
uniform and independent; for two objects, side by side or one above the other), renders
them (:mod:`~guidekit.models.scenes.render`) and captions them, mentioning either object of
a pair first with equal probability. Everything comes from ``numpy.random.default_rng(seed)``
(PCG64), so a seed gives the same images, captions and labels on every machine. ``load``
gives the training and held-out sets, drawn from two independent streams of one seed.
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

from guidekit.models.scenes.attributes import HEADS, scene_labels
from guidekit.models.scenes.render import render
from guidekit.models.scenes.vocab import (
    BACKGROUNDS,
    COLOURS,
    PARTNER,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    caption,
)

#: Image side in pixels (3 channels).
SIDE = 32
TRAIN_SIZE = 20000
TEST_SIZE = 2000


@attrs.frozen(eq=False)
class SceneSet:
    """``images`` ``[N, 3, side, side]`` in [-1, 1], one caption per image, ``labels``
    ``[N, len(HEADS)]`` (columns in :data:`HEADS` order) and the scenes themselves."""

    images: torch.Tensor
    captions: tuple[str, ...]
    labels: torch.Tensor
    scenes: tuple[Scene, ...]

    def __len__(self) -> int:
        return len(self.captions)


@attrs.frozen(eq=False)
class Scenes:
    train: SceneSet
    test: SceneSet


def _pick(rng: np.random.Generator, values: tuple[str, ...]) -> str:
    return values[int(rng.integers(len(values)))]


def _object(rng: np.random.Generator, position: str) -> SceneObject:
    return SceneObject(_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, SIZES), position)


def random_scene(rng: np.random.Generator) -> Scene:
    """One scene, every attribute uniform (see the module docstring)."""
    if rng.integers(2) == 0:
        objects = [_object(rng, _pick(rng, POSITIONS))]
    else:
        first = _pick(rng, ("left", "top"))
        objects = [_object(rng, first), _object(rng, PARTNER[first])]
    return Scene(tuple(objects), _pick(rng, BACKGROUNDS))


def generate(n: int, seed: int = 0, *, side: int = SIDE) -> SceneSet:
    """``n`` captioned scenes from ``default_rng(seed)`` (see the module docstring)."""
    return _generate(n, np.random.default_rng(seed), side)


def _generate(n: int, rng: np.random.Generator, side: int) -> SceneSet:
    if n < 1:
        raise ValueError(f"generate(n={n}): give at least one scene")
    scenes, captions, images = [], [], np.empty((n, 3, side, side), dtype=np.float32)
    for i in range(n):
        scene = random_scene(rng)
        captions.append(caption(scene, second_first=scene.count == 2 and bool(rng.integers(2))))
        images[i] = render(scene, rng, side)
        scenes.append(scene)
    labels = torch.tensor([[scene_labels(s)[h] for h in HEADS] for s in scenes],
                          dtype=torch.long)
    pixels = torch.from_numpy(images) * 2 - 1
    return SceneSet(pixels, tuple(captions), labels, tuple(scenes))


def load(seed: int = 0, *, train: int = TRAIN_SIZE, test: int = TEST_SIZE,
         side: int = SIDE) -> Scenes:
    """Training and held-out scenes from two independent streams of ``seed``."""
    a, b = np.random.SeedSequence(seed).spawn(2)
    return Scenes(_generate(train, np.random.default_rng(a), side),
                  _generate(test, np.random.default_rng(b), side))
