"""Attention with an explicit softmax: the post-softmax map, applied to values, or fused.

EMAG reads and replaces whole attention maps, so the rows it watches or perturbs are
computed here rather than by the fused kernel. The arithmetic runs in the query's dtype,
at least float32: a float64 model keeps float64 maps (and matches a float64 separate pass
to round-off), half-precision models get float32 softmaxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guidekit.errors import GuidanceValueError

_COMPUTE: dict[torch.dtype, torch.dtype] = {}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype explicit attention maths runs in for inputs of ``dtype``: at least float32."""
    out = _COMPUTE.get(dtype)
    if out is None:  # torch.promote_types dispatches an operator: once per dtype
        out = _COMPUTE[dtype] = torch.promote_types(dtype, torch.float32)
    return out


def share_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Key / value heads repeated to ``heads`` query heads (grouped-query attention)."""
    if t.ndim < 4 or t.shape[-3] == heads:
        return t
    if heads % t.shape[-3]:
        raise GuidanceValueError(f"{heads} query heads cannot share {t.shape[-3]} key/value heads")
    return t.repeat_interleave(heads // t.shape[-3], dim=-3)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``; for equal batch shapes as one ``bmm`` on 3-D views, what ``torch.matmul``
    computes, without its broadcasting ``expand`` operators (each is a dispatch)."""
    if a.ndim < 3 or a.shape[:-2] != b.shape[:-2]:
        return torch.matmul(a, b)
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*a.shape[:-2], *out.shape[-2:])


_ZERO: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _scores(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """``q k^T scale``: for equal batch shapes one ``baddbmm`` that scales as it multiplies
    (its ignored ``beta = 0`` input a zero kept per dtype and device), otherwise a product
    and a multiply."""
    if query.ndim < 3 or query.shape[:-2] != key.shape[:-2]:
        return _matmul(query, key.transpose(-1, -2)) * scale
    zero = _ZERO.get((query.dtype, query.device))
    if zero is None:
        zero = _ZERO[(query.dtype, query.device)] = query.new_zeros(())
    out = torch.baddbmm(
        zero, query.reshape(-1, *query.shape[-2:]),
        key.reshape(-1, *key.shape[-2:]).transpose(-1, -2), beta=0.0, alpha=scale,
    )
    return out.view(*query.shape[:-2], *out.shape[-2:])


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The post-softmax map ``softmax(q k^T scale + mask)``, ``[..., Q, K]``, in
    :func:`compute_dtype` of the query.

    A boolean mask keeps the ``True`` positions (as ``scaled_dot_product_attention``); a
    float mask is added to the logits. Fewer key heads than query heads are shared.
    """
    key = share_heads(key, query.shape[-3]) if query.ndim >= 3 and key.ndim >= 3 else key
    s = query.shape[-1] ** -0.5 if scale is None else scale
    dtype = compute_dtype(query.dtype)
    logits = _scores(query.to(dtype), key.to(dtype), s)
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(dtype)
    return logits.softmax(dim=-1)


def apply_probs(probs: torch.Tensor, value: torch.Tensor, heads: int | None) -> torch.Tensor:
    """``probs @ value`` in the value's dtype (value heads shared as in grouped queries)."""
    if heads is not None:
        value = share_heads(value, heads)
    return _matmul(probs.to(value.dtype), value)


def fused(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
    scale: float | None, mask: torch.Tensor | None,
) -> torch.Tensor:
    """The model's usual fused attention of these rows."""
    if query.ndim >= 4 and key.shape[-3] != query.shape[-3]:
        key, value = share_heads(key, query.shape[-3]), share_heads(value, query.shape[-3])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
