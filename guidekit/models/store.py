"""The shipped weight files: where they live and how they are written and read.

Every file is ``guidekit/models/weights/<name>.safetensors`` with string metadata (what it
is, how it was trained). Diffusion models are stored in float16 (half the size; the measured
quality is unchanged, docs/models.md) and always loaded back as float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: The scenes denoisers (:func:`guidekit.models.scenes.model.load_scene_model`).
SCENE_MODELS = ("scenes", "scenes-weak", "scenes-fast")
#: The files that ``python -m guidekit.models.scenes.train`` writes (the rest are the digits').
SCENE_NAMES = (*SCENE_MODELS, "scenes-classifier")
NAMES = ("eps", "flow", "eps-weak", "flow-weak", "classifier", "reference", *SCENE_NAMES)


def weight_path(name: str, directory: str | Path | None = None) -> Path:
    """Path of the shipped file ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"unknown weight file {name!r}: use one of {', '.join(map(repr, NAMES))}")
    return Path(directory or WEIGHTS_DIR) / f"{name}.safetensors"


def save(
    tensors: dict[str, torch.Tensor],
    path: str | Path,
    metadata: dict[str, object],
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``tensors`` (cast to ``dtype`` when it is given, floating ones only)."""
    from safetensors.torch import save_file

    out = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in tensors.items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={k: str(v) for k, v in metadata.items()})
    path.chmod(0o644)  # package data: readable by everyone (safetensors writes 0600)
    return path


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a weight file, tensors as stored."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        trainer = ("guidekit.models.scenes.train" if path.stem.startswith("scenes")
                   else "guidekit.models.train")
        raise FileNotFoundError(
            f"{path} is missing: reinstall guidekit, or rebuild it with "
            f"`python -m {trainer} {path.stem}`"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    return tensors, meta
