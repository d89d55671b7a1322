"""One pass over all rows of a hooked self-attention layer whose processor is diffusers'
stock ``AttnProcessor2_0``: the projections and the output layer run ONCE for the call's
rows, and only the attention core is chosen per segment (the layer's own fused attention,
or a perturbation's ``attend``).

Cutting the rows into segments and sending each through its own projections costs every
segment a full set of small kernel launches (norms, q/k/v, ``to_out``); at a few rows per
call that launch overhead, not the maths, is what the engine added to a step. For the
stock processor the per-row maths is the same either way (each row's projections, core
and output are computed from that row alone), so the engine takes this path whenever it
can and the segment path (:func:`guidekit.attention.route.assemble`) otherwise: a custom
processor, cross-attention, a mask, joint attention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from guidekit.attention.maths import close_output, merge_heads, open_input, split_heads
from guidekit.attention.ops import AttentionPerturbation
from guidekit.attention.route import watched_as_plain, watches_only


def is_stock_processor(original: Any) -> bool:
    """Whether ``original`` is exactly diffusers' ``AttnProcessor2_0`` (read once at install:
    a subclass or any other processor may compute something else)."""
    cls = type(original)
    return cls.__name__ == "AttnProcessor2_0" and cls.__module__.startswith("diffusers.")


def fused_self_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    segments: Sequence[tuple[int, int, Any]],
    op_kwargs: Callable[[AttentionPerturbation, int], dict[str, Any]],
    temb: torch.Tensor | None = None,
) -> torch.Tensor:
    """``AttnProcessor2_0``'s self-attention (no mask, no text) over all rows, with each
    segment's attention core its ``op`` (``None``: the fused core the processor uses).

    ``op_kwargs(op, start)`` gives the extra ``attend`` arguments of the op on the segment
    starting at row ``start`` (the softmax scale of stateful ops included).
    """
    h, image_shape = open_input(attn, hidden_states, temb)
    query = split_heads(attn, attn.to_q(h))
    key = split_heads(attn, attn.to_k(h))
    value = split_heads(attn, attn.to_v(h))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    cores_of: Sequence[tuple[int, int, Any]] = segments
    watched = [(a, b, op) for a, b, op in segments if watches_only(op)]
    if watched:
        # rows an op only watches (EMAG's observed conditional rows) keep the layer's own
        # attention, with the other plain rows: the op sees their queries and keys (before
        # any perturbed rows of the layer read what it recorded)
        for a, b, op in watched:
            op.watch(query[a:b], key[a:b], mask=None, **op_kwargs(op, a))
        cores_of = watched_as_plain(segments)
    # one split per tensor (one operator) rather than a slice per segment and tensor
    qs: Sequence[torch.Tensor]
    ks: Sequence[torch.Tensor]
    vs: Sequence[torch.Tensor]
    if len(cores_of) == 1:  # every row plain (an observed layer EMAG did not select)
        qs, ks, vs = (query,), (key,), (value,)
    else:
        sizes = [b - a for a, b, _ in cores_of]
        qs, ks, vs = (query.split_with_sizes(sizes), key.split_with_sizes(sizes),
                      value.split_with_sizes(sizes))
    cores = []
    for (a, _, op), q, k, v in zip(cores_of, qs, ks, vs):
        if op is None:
            cores.append(F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False))
        elif op.needs_qk:
            cores.append(op.attend(q, k, v, mask=None, **op_kwargs(op, a)))
        else:
            cores.append(op.attend(None, None, v, mask=None, **op_kwargs(op, a)))
    if len(cores) == 1:
        merged = merge_heads(cores[0], query.dtype)
    else:
        # joined in token-major order ([rows, tokens, heads, d]): the fused cores are laid out
        # so already (their transpose is free), and the heads then merge as a view where a
        # join in head-major order would need one more copy
        merged = torch.cat([c.transpose(1, 2) for c in cores]).flatten(2).to(query.dtype)
    return close_output(attn, merged, hidden_states, image_shape)
