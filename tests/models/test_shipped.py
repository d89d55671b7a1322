"""The shipped weight files: present, float16 where documented, self-describing, and usable
without scikit-learn."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from guidekit.models.store import NAMES, WEIGHTS_DIR, read, save, weight_path
from guidekit.models.train import RECIPES


@pytest.mark.parametrize("name", NAMES)
def test_every_weight_file_is_shipped_and_describes_itself(name: str) -> None:
    tensors, meta = read(weight_path(name))
    assert meta["command"] == f"python -m guidekit.models.train {name} --seed 0"
    if name in RECIPES:
        recipe = RECIPES[name]
        assert all(t.dtype == torch.float16 for t in tensors.values())
        assert meta["prediction"] == recipe.prediction
        assert int(meta["layers"]) == recipe.layers and int(meta["steps"]) == recipe.steps


def test_weights_stay_small() -> None:
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    assert total < 20e6, total  # four 2.1M-parameter DiTs in float16 + classifier


def test_store_round_trip_and_errors(tmp_path: object) -> None:
    path = save({"a": torch.arange(3.0), "i": torch.arange(2)}, f"{tmp_path}/x.safetensors",
                {"k": 1}, torch.float16)
    t, meta = read(path)
    assert t["a"].dtype == torch.float16 and t["i"].dtype == torch.int64 and meta == {"k": "1"}
    with pytest.raises(ValueError, match="unknown weight file"):
        weight_path("nope")
    with pytest.raises(FileNotFoundError, match="guidekit.models.train"):
        read(f"{tmp_path}/missing.safetensors")


def test_sampling_and_metrics_do_not_import_scikit_learn() -> None:
    code = (
        "import sys, torch; from guidekit.models import load, sample, evaluate; "
        "r = sample(load('eps-weak'), 'CFG(2)', [1, 2], steps=2); evaluate(r.images, [1, 2]); "
        "assert 'sklearn' not in sys.modules, 'sklearn imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
