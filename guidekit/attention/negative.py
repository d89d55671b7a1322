"""NAG's negative prompt where the model call holds none of its rows: why, and its mask.

NAG (https://arxiv.org/abs/2505.21179) attends each positive row a second time, to the
negative prompt's context ``Z- = softmax(q k_neg^T / sqrt(d) + bias_neg) v_neg``. When the
call has no row of the negative conditioning (``Cond() | NAG(s)``, the few-step setting
NAG is made for), :mod:`~guidekit.attention.modifiers` projects the conditioning's context
itself; this module gives that context its cross-attention mask.

diffusers' PixArt and ``UNet2DConditionModel`` turn ``encoder_attention_mask`` ``[B, L]``
(1: keep, 0: padding) into an additive bias before their blocks::

    bias = (1 - mask) * -10000.0, with a query axis: [B, 1, L]

so the negative's bias is rebuilt the same way, from the negative conditioning's own
``encoder_attention_mask``. It is used only where the layer's own mask is of that form (every
value 0 or -10000); any other mask is refused by name rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from guidekit.errors import GuidanceValueError

#: diffusers' name of the caption mask, and the bias its padding gets
MASK_KEY = "encoder_attention_mask"
MASKED = -10000.0


def missing_negative(plan: Any, nag: Any) -> str:
    """Why a call lacks NAG's negative rows, and what the user can change."""
    branches = [b for b in plan.branches if b.cond == nag.negative]
    if not branches:
        return (
            f"no branch of {plan.expr!r} runs {nag.negative!r}; put one on NAG's left, e.g. "
            f"CFG(w) | {nag!r}, or name a conditioning a branch runs with "
            f"NAG(..., negative='...')"
        )
    if plan.max_rows is not None:
        return (
            f"the row budget max_rows={plan.max_rows!r} put the {nag.negative!r} rows in "
            f"another call; compile with max_rows=None (one call per step) or a budget that "
            f"holds the whole forward group"
        )
    return (
        f"the branch that runs {nag.negative!r} is gated off at this step (.between(...)), "
        f"while NAG acts at every step; leave that branch ungated"
    )


def negative_bias(negative: Mapping[str, Any], layer_mask: torch.Tensor, sample: int,
                  nag: Any, path: str) -> torch.Tensor:
    """The additive mask of the negative conditioning's ``sample``, shaped like one row of
    the layer's ``layer_mask`` ``[rows, 1, L]``; ``GuidanceValueError`` where the layer's mask
    is not diffusers' additive form or the conditioning has no matching caption mask."""
    # checked in eager mode only: a data-dependent branch would break a compiled graph
    if not torch.compiler.is_compiling() and not (
            (layer_mask == 0) | (layer_mask == MASKED)).all():
        raise GuidanceValueError(
            f"layer {path!r}: {nag!r} found no row of the conditioning {nag.negative!r} in this "
            f"model call, and the layer's cross-attention mask is not diffusers' additive "
            f"(1 - mask) * -10000 form, so guidekit cannot build the negative prompt's: put "
            f"{nag.negative!r} rows in the call, e.g. CFG(w) | {nag!r}"
        )
    value = negative.get(MASK_KEY)
    length = layer_mask.shape[-1]
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[1] != length:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise GuidanceValueError(
            f"layer {path!r}: {nag!r} needs the mask of its negative prompt: the conditioning "
            f"{nag.negative!r} must carry {MASK_KEY!r} [batch, {length}] (1: keep, 0: padding) "
            f"as the positive one does, got {shape}"
        )
    row = value[sample if value.shape[0] > 1 else 0]
    bias = (1 - row.to(layer_mask.dtype)) * MASKED
    return bias.reshape(layer_mask.shape[1:]).to(layer_mask.device)
