"""The scenes data set (issue 13): seeded, captions parse back, every attribute value appears."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidekit.models.scenes.attributes import HEADS, scene_from_labels, scene_labels
from guidekit.models.scenes.data import generate, load
from guidekit.models.scenes.render import RGB, render
from guidekit.models.scenes.vocab import (
    WORDS,
    Scene,
    SceneObject,
    caption,
    parse,
)


@pytest.fixture(scope="module")
def scenes():
    return generate(400, seed=3)


def test_the_same_seed_gives_the_same_images_captions_and_labels(scenes) -> None:
    again = generate(400, seed=3)
    assert torch.equal(again.images, scenes.images)
    assert again.captions == scenes.captions
    assert torch.equal(again.labels, scenes.labels)
    other = generate(400, seed=4)
    assert other.captions != scenes.captions
    assert not torch.equal(other.images, scenes.images)


def test_images_are_rgb_in_range(scenes) -> None:
    assert scenes.images.shape == (400, 3, 32, 32)
    assert scenes.images.dtype == torch.float32
    assert float(scenes.images.min()) >= -1 and float(scenes.images.max()) <= 1
    assert generate(2, seed=0, side=16).images.shape == (2, 3, 16, 16)


def test_captions_parse_back_to_the_attributes(scenes) -> None:
    for text, scene, row in zip(scenes.captions, scenes.scenes, scenes.labels.tolist()):
        assert parse(text) == scene
        assert scene_from_labels(dict(zip(HEADS, row))) == scene
        assert set(text.split()) <= set(WORDS)


def test_every_attribute_value_appears(scenes) -> None:
    for j, (head, classes) in enumerate(HEADS.items()):
        assert set(scenes.labels[:, j].tolist()) == set(range(classes)), head
    words = {w for c in scenes.captions for w in c.split()}
    assert words == set(WORDS)


def test_either_object_of_a_pair_may_be_mentioned_first() -> None:
    a = SceneObject("circle", "red", "small", "left")
    b = SceneObject("square", "blue", "large", "right")
    scene = Scene((a, b), "black")
    first = caption(scene)
    second = caption(scene, second_first=True)
    assert first == "a small red circle left of a large blue square on a black background"
    assert second == "a large blue square right of a small red circle on a black background"
    assert parse(first) == parse(second) == scene
    top = Scene((SceneObject("triangle", "green", "small", "top"),
                 SceneObject("circle", "yellow", "small", "bottom")), "grey")
    assert caption(top, second_first=True).startswith("a small yellow circle below a small")
    one = Scene((SceneObject("square", "purple", "large", "bottom"),), "white")
    assert caption(one) == "a large purple square at the bottom on a white background"
    assert parse(caption(one)) == one


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a small red circle on the top on a black background", r"word 7: expected 'left' or 'right', got 'top'"),
        ("a tiny red circle on the left on a black background", "word 2: expected 'small' or 'large'"),
        ("a small red circle left of a blue square on a black background", "word 8: expected 'small' or 'large', got 'blue'"),
        ("a small red circle on the left", "the end of the caption"),
        ("a small red circle on the left on a black background now", "got 'now'"),
    ],
)
def test_a_caption_outside_the_grammar_is_refused_where_it_fails(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse(text)


def test_scenes_that_cannot_exist_are_refused() -> None:
    a = SceneObject("circle", "red", "small", "right")
    b = SceneObject("square", "blue", "large", "left")
    with pytest.raises(ValueError, match="the left or top one first"):
        Scene((a, b), "black")
    with pytest.raises(ValueError, match="1 or 2 objects"):
        Scene((), "black")
    labels = scene_labels(Scene((a,), "grey"))
    with pytest.raises(ValueError, match="head shape2"):
        scene_from_labels({**labels, "shape2": 0})


def test_the_rendered_colours_are_where_the_caption_says() -> None:
    scene = parse("a large red square left of a large blue circle on a white background")
    img = render(scene, np.random.default_rng(0), 32)
    left, right, corner = img[:, 16, 8], img[:, 16, 24], img[:, 1, 1]
    for got, name in ((left, "red"), (right, "blue"), (corner, "white")):
        assert np.abs(got - np.asarray(RGB[name])).max() < 0.06, name


def test_load_gives_disjoint_seeded_streams() -> None:
    a = load(0, train=20, test=10)
    b = load(0, train=20, test=10)
    assert torch.equal(a.train.images, b.train.images) and a.test.captions == b.test.captions
    assert len(a.train) == 20 and len(a.test) == 10
    assert not torch.equal(a.train.images[:10], a.test.images)
