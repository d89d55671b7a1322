"""The shipped weight files: present, float16 where documented, self-describing, and usable
without scikit-learn."""

from __future__ import annotations

import sys

import pytest
import torch

from guidekit.models import data, evaluate, load, sample
from guidekit.models.store import NAMES, SCENE_NAMES, WEIGHTS_DIR, read, save, weight_path
from guidekit.models.train import RECIPES


@pytest.mark.parametrize("name", NAMES)
def test_every_weight_file_is_shipped_and_describes_itself(name: str) -> None:
    tensors, meta = read(weight_path(name))
    if name in SCENE_NAMES:  # tests/models/test_scenes_shipped.py checks them further
        assert meta["command"] == (f"python -m guidekit.models.scenes.train {name} --seed 0 "
                                   f"--threads {meta['threads']}")
        assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
        return
    assert meta["command"] == f"python -m guidekit.models.train {name} --seed 0"
    if name in RECIPES:
        recipe = RECIPES[name]
        assert all(t.dtype == torch.float16 for t in tensors.values())
        assert meta["prediction"] == recipe.prediction
        assert int(meta["layers"]) == recipe.layers and int(meta["steps"]) == recipe.steps


def test_weights_stay_small() -> None:
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    # four 0.58M-parameter DiTs in float16, classifier, reference; three scenes PixArts
    # (0.56M each: scenes, scenes-weak, scenes-fast) and the attribute classifier (0.5M),
    # all float16
    assert total < 10.5e6, total


def test_store_round_trip_and_errors(tmp_path: object) -> None:
    path = save({"a": torch.arange(3.0), "i": torch.arange(2)}, f"{tmp_path}/x.safetensors",
                {"k": 1}, torch.float16)
    t, meta = read(path)
    assert t["a"].dtype == torch.float16 and t["i"].dtype == torch.int64 and meta == {"k": "1"}
    with pytest.raises(ValueError, match="unknown weight file"):
        weight_path("nope")
    with pytest.raises(FileNotFoundError, match="guidekit.models.train"):
        read(f"{tmp_path}/missing.safetensors")


def test_sampling_and_metrics_work_without_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # any `import sklearn` now fails
    with pytest.raises(ImportError):
        import sklearn  # noqa: F401
    r = sample(load("eps-weak"), "CFG(2)", [1, 2], steps=2)
    m = evaluate(r.images, [1, 2])
    assert 0 <= m.accuracy <= 1 and m.fd >= 0
    with pytest.raises(ImportError, match="guidekit\\[train\\]"):
        data.load()
