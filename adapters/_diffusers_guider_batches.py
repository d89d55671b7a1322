"""The guider's batches: what each model call of a modular loop step gets, and what it gave.

``prepare_inputs`` receives each model input as ``(cond_value, uncond_value)`` (or one value
for both). The guider reads guidekit's conditionings from them, and makes one batch per
branch the plan runs at this step, or, with ``batched=True``, one per forward group with the
branches' rows concatenated. After the loop has run them, :func:`predictions` gives each
branch its rows of the batches' ``noise_pred``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from guidekit import GuidanceValueError
from guidekit.branch import COND, MAIN, UNCOND, Branch
from guidekit.plan import ForwardGroup

from ._diffusers_guider_rows import concat_values

LATENT_KEYS = ("hidden_states", "latents", "sample", "x")

#: one batch's model and the branches whose rows it holds, in order
Unit = tuple[str, tuple[Branch, ...]]
Getter = Callable[[str, int], Any]


def identifier(branch: Branch) -> str:
    """The batch's ``__guidance_identifier__``: diffusers' own names where they exist."""
    if branch.model == MAIN and branch.perturbation is None and branch.cond in (COND, UNCOND):
        return f"pred_{branch.cond}"
    return f"pred_{branch.label}"


def pick(value: Any, index: int) -> Any:
    """The value of conditioning ``index`` (0 cond, 1 uncond) of one guider input."""
    if isinstance(value, tuple):
        return value[index] if index < len(value) else None
    return value


def read_conds(
    text: str, groups: Sequence[ForwardGroup], get: Getter, keys: Sequence[str], skip: str | None
) -> dict[str, dict[str, Any]]:
    """guidekit's conditionings (``cond`` / ``uncond``: each input's value) the step needs."""
    needed = {b.cond for g in groups for b in g.branches}
    extra = needed - {COND, UNCOND}
    if extra:
        raise GuidanceValueError(
            f"{text} uses conditioning(s) {sorted(extra)}; a diffusers guider receives only "
            f"(cond, uncond) pairs"
        )
    conds = {
        name: {k: get(k, index) for k in keys if k != skip}
        for name, index in ((COND, 0), (UNCOND, 1)) if name in needed
    }
    if UNCOND in conds and all(v is None for v in conds[UNCOND].values()):
        raise GuidanceValueError(
            f"{text} needs the unconditional inputs, but the pipeline passed none (give it a "
            f"negative prompt or negative embeddings)"
        )
    return conds


def units(groups: Sequence[ForwardGroup], batched: bool) -> list[Unit]:
    """The batches of a step: one per branch, or one per forward group when ``batched``."""
    if batched:
        return [(g.model, g.branches) for g in groups]
    return [(g.model, (b,)) for g in groups for b in g.branches]


def make_batches(
    step_units: Sequence[Unit], keys: Sequence[str], latent_key: str | None,
    x: torch.Tensor | None, conds: Mapping[str, Mapping[str, Any]], identifier_key: str,
) -> list[Any]:
    """One diffusers ``BlockState`` per unit: its branches' inputs, rows concatenated."""
    from diffusers.modular_pipelines.modular_pipeline import BlockState

    batches = []
    for model, branches in step_units:
        fields: dict[str, Any] = {}
        for key in keys:
            if key == latent_key:
                value = x
                if value is not None and len(branches) > 1:
                    value = torch.cat([value] * len(branches))
            else:
                value = concat_values(key, [conds[b.cond][key] for b in branches])
            fields[key] = value
        ident = identifier(branches[0]) if len(branches) == 1 else f"pred_{model}"
        fields[identifier_key] = ident
        batches.append(BlockState(**fields))
    return batches


def batch_tensors(conds: Mapping[str, Mapping[str, Any]], batch: int) -> dict[str, dict[str, Any]]:
    """Each conditioning's tensors with a leading batch axis of ``batch`` (what CADS anneals)."""
    return {
        c: {
            k: v for k, v in d.items()
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch
        }
        for c, d in conds.items()
    }


def batch_size(conds: Mapping[str, Mapping[str, Any]], x: torch.Tensor | None) -> int:
    """The loop's batch ``B``: the leading size of the first conditioning tensor (or ``x``)."""
    for d in conds.values():
        for v in d.values():
            if isinstance(v, torch.Tensor) and v.ndim >= 1:
                return int(v.shape[0])
    if x is not None:
        return int(x.shape[0])
    raise GuidanceValueError("cannot tell the batch size: the guider got no tensors")


def predictions(step_units: Sequence[Unit], data: Sequence[Any]) -> dict[Branch, torch.Tensor]:
    """Each branch's prediction: its rows of the ``noise_pred`` of the batch that held it."""
    if len(data) != len(step_units):
        raise GuidanceValueError(
            f"the guider prepared {len(step_units)} batches but got {len(data)} back"
        )
    preds: dict[Branch, torch.Tensor] = {}
    for (_model, branches), batch in zip(step_units, data):
        pred = getattr(batch, "noise_pred", None)
        if not isinstance(pred, torch.Tensor):
            raise GuidanceValueError("every guider batch needs its noise_pred set")
        parts = (pred,) if len(branches) == 1 else pred.chunk(len(branches))
        preds.update(zip(branches, parts))
    return preds
