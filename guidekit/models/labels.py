"""Class labels per conditioning name for the bundled models: ``conds={"neg": 3}``.

A bundled model is conditioned on a digit label, so each named conditioning an expression
reads (``CFG(3, negative="neg")``'s ``neg``, ``Cond("style")``) is one label for every
sample or one label per sample; ``uncond`` defaults to the null class and may be replaced
the same way. ``cond`` is the ``labels`` argument itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from guidekit.branch import COND
from guidekit.errors import GuidanceTypeError, GuidanceValueError


def named_labels(
    conds: Mapping[str, Any] | None, y: torch.Tensor, classes: int, null_class: int
) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: {"class_labels": [N] long}}`` for each named label, checked against ``y``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in (conds or {}).items():
        if name == COND:
            raise GuidanceValueError(
                "conds={'cond': ...}: the conditional label is the labels argument itself; "
                "name the others (conds={'neg': 3} for CFG(3, negative='neg'))"
            )
        if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor, list, tuple,
                                                             range)):
            raise GuidanceTypeError(
                f"conds[{name!r}] is a {type(value).__name__}: give a class index (0..{classes - 1}"
                f", or {null_class} for none) or one per sample, e.g. conds={{{name!r}: 3}}"
            )
        label = torch.as_tensor(value, dtype=torch.long).flatten()
        if label.numel() == 1:
            label = label.expand(y.shape[0])
        if label.shape != y.shape:
            raise GuidanceValueError(
                f"conds[{name!r}] has {label.numel()} labels for {y.shape[0]} samples: give "
                f"one label for all, or one per sample"
            )
        if bool(((label < 0) | (label > null_class)).any()):
            raise GuidanceValueError(
                f"conds[{name!r}] must hold class indices 0..{classes - 1} (or the null class "
                f"{null_class}), got {label.tolist()[:10]}"
            )
        out[name] = {"class_labels": label.to(y.device).contiguous()}
    return out
