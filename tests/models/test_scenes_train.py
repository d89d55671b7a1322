"""Training the scenes models (issue 13): caption dropout, a seeded run, the entry point, the
attribute classifier. Tiny runs only; the real ones are ``python -m
guidekit.models.scenes.train``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidekit.models.scenes.attributes import HEADS
from guidekit.models.scenes.classifier import AttributeClassifier, adherence, attribute_loss
from guidekit.models.scenes.data import generate
from guidekit.models.scenes.model import build_networks, load_scene_model
from guidekit.models.scenes.tokenizer import Tokenizer
from guidekit.models.scenes.train import drop_captions, main, run_classifier, train_text_diffusion
from guidekit.models.schedules import FlowConvention
from guidekit.models.store import read


def test_caption_dropout_gives_the_empty_caption_at_rate_p() -> None:
    tok = Tokenizer()
    ids, mask = tok.encode(list(generate(50, seed=0).captions) * 40)
    out_ids, out_mask = drop_captions(ids, mask, 0.1, torch.Generator().manual_seed(0))
    empty_ids, empty_mask = tok.encode("")
    dropped = (out_ids == empty_ids).all(1)
    assert 0.08 < float(dropped.float().mean()) < 0.12
    assert (out_mask[dropped] == empty_mask).all()
    assert torch.equal(out_ids[~dropped], ids[~dropped])
    assert torch.equal(drop_captions(ids, mask, 0.0)[0], ids)


def _tiny_run(steps: int, seed: int = 0):
    data = generate(32, seed=0)
    ids, mask = Tokenizer().encode(data.captions)
    nets = build_networks(1, head_dim=16, text_width=16, text_layers=1,
                          generator=torch.Generator().manual_seed(seed))
    return train_text_diffusion(nets, FlowConvention(), data.images, ids, mask, steps=steps,
                                batch=16, lr=3e-3, log=None, seed=seed)


def test_a_training_run_is_seeded_and_returns_the_ema_copy() -> None:
    a, b = _tiny_run(3), _tiny_run(3)
    assert a.losses == b.losses
    assert not a.model.training
    assert a.model.transformer.proj_out.weight.abs().sum() > 0  # moved from the zero init
    assert _tiny_run(3, seed=1).losses != a.losses


@pytest.mark.slow
def test_a_tiny_training_run_lowers_the_loss() -> None:
    losses = _tiny_run(60).losses
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_the_entry_point_writes_a_loadable_model(tmp_path) -> None:
    args = ["scenes", "--steps", "2", "--train-size", "8", "--out", str(tmp_path),
            "--threads", "1"]
    assert main(args) == 0
    path = tmp_path / "scenes.safetensors"
    tensors, meta = read(path)
    assert meta["format"] == "guidekit-scenes-pixart/1" and meta["steps"] == "2"
    assert meta["caption_drop"] == "0.1" and meta["threads"] == "1"
    assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
    m = load_scene_model(path)
    assert m.prediction == "flow" and not m.networks.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = m.model_fn(x, torch.full((2,), 0.5), **m.conditions(["", ""]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_the_classifier_has_one_head_per_attribute() -> None:
    torch.manual_seed(0)
    clf = AttributeClassifier()
    data = generate(6, seed=2)
    with torch.no_grad():
        logits = clf(data.images)
    assert {k: v.shape for k, v in logits.items()} == {k: (6, n) for k, n in HEADS.items()}
    assert clf.predict(data.images).shape == data.labels.shape
    assert float(attribute_loss(logits, data.labels)) > 0
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        clf(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="one column per head"):
        attribute_loss(logits, data.labels[:, :3])


def test_adherence_scores_each_head_and_the_whole_scene() -> None:
    labels = generate(4, seed=0).labels
    pred = labels.clone()
    assert adherence(pred, labels) == {**{k: 1.0 for k in HEADS}, "all": 1.0}
    pred[0, list(HEADS).index("colour1")] += 1
    scores = adherence(pred, labels)
    assert scores["colour1"] == 0.75 and scores["all"] == 0.75 and scores["shape1"] == 1.0


def test_the_classifier_entry_point_scores_held_out_scenes(tmp_path) -> None:
    scores = run_classifier(0, tmp_path, steps=2, train_size=16, test_size=8)
    assert set(scores) == {*HEADS, "all"}
    _, meta = read(tmp_path / "scenes-classifier.safetensors")
    assert meta["heads"] == ",".join(HEADS) and "test_accuracy_all" in meta
