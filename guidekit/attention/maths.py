"""The attention maths guidekit re-implements on diffusers ``Attention`` modules, for the rows
a perturbation or a modifier changes (the other rows go through the module's own processor).

Every function follows ``AttnProcessor2_0``'s structure with the module's own layers: spatial
norm, 4-D input flattened to tokens, group norm (:func:`open_input`), the projections and
q/k norms, the attention core the caller chooses, the merged heads through ``to_out``, the
residual connection and ``rescale_output_factor`` (:func:`close_output`). Joint attention
(SD3's ``JointAttnProcessor2_0``) adds the text stream's projections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from guidekit.attention.ops import AttentionPerturbation

Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def open_input(
    attn: Any, hidden_states: torch.Tensor, temb: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Size | None]:
    """Spatial norm, 4-D input flattened to tokens, group norm: the tokens and the image
    shape to restore (``None`` for token input)."""
    h = hidden_states
    if attn.spatial_norm is not None:
        h = attn.spatial_norm(h, temb)
    image_shape = None
    if h.ndim == 4:
        image_shape = h.shape
        b, ch, height, width = h.shape
        h = h.view(b, ch, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    return h, image_shape


def split_heads(attn: Any, t: torch.Tensor) -> torch.Tensor:
    """``[rows, tokens, heads * d] -> [rows, heads, tokens, d]``."""
    return t.view(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)


def merge_heads(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, heads, tokens, d] -> [rows, tokens, heads * d]`` in ``dtype``."""
    return t.transpose(1, 2).reshape(t.shape[0], -1, t.shape[1] * t.shape[-1]).to(dtype)


def close_output(
    attn: Any, out: torch.Tensor, residual: torch.Tensor, image_shape: torch.Size | None
) -> torch.Tensor:
    """Merged heads through ``to_out`` and dropout, back to 4-D, the residual, the rescale."""
    out = attn.to_out[1](attn.to_out[0](out))
    if image_shape is not None:
        out = out.transpose(-1, -2).reshape(image_shape)
    if attn.residual_connection:
        out = out + residual
    factor = attn.rescale_output_factor
    # x / 1.0 is x exactly: the division (an operator per layer and call) only where it scales
    return out if factor == 1.0 else out / factor  # type: ignore[no-any-return]


def _op_kwargs(attn: Any, op: AttentionPerturbation, attend_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    extra = dict(attend_kwargs or {})
    if getattr(op, "stateful", False):
        extra.setdefault("scale", attn.scale)
    return extra


def _queries_keys(
    attn: Any, h: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The heads' queries and keys of tokens ``h`` (q / k norms applied) and the
    processor's attention mask for them."""
    b, n, _ = h.shape
    query, key = split_heads(attn, attn.to_q(h)), split_heads(attn, attn.to_k(h))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    mask = None
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, n, b)
        mask = mask.view(b, attn.heads, -1, mask.shape[-1])
    return query, key, mask


def perturbed_self_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    op: AttentionPerturbation,
    *,
    attention_mask: torch.Tensor | None = None,
    temb: torch.Tensor | None = None,
    attend_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Self-attention of a diffusers ``Attention`` module with ``op`` as the attention core
    (queries and keys only computed when ``op.needs_qk``)."""
    h, image_shape = open_input(attn, hidden_states, temb)
    value = split_heads(attn, attn.to_v(h))
    query = key = mask = None
    if op.needs_qk:
        query, key, mask = _queries_keys(attn, h, attention_mask)
    out = op.attend(query, key, value, mask=mask, **_op_kwargs(attn, op, attend_kwargs))
    return close_output(attn, merge_heads(out, value.dtype), hidden_states, image_shape)


def watched_self_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    op: Any,
    *,
    attention_mask: torch.Tensor | None = None,
    temb: torch.Tensor | None = None,
    attend_kwargs: dict[str, Any] | None = None,
) -> None:
    """Show ``op`` (one that only watches, EMAG's ``Observe``) the queries and keys of these
    rows of a diffusers ``Attention`` module; their output is the layer's own."""
    h, _ = open_input(attn, hidden_states, temb)
    query, key, mask = _queries_keys(attn, h, attention_mask)
    op.watch(query, key, mask=mask, **_op_kwargs(attn, op, attend_kwargs))


def perturbed_joint_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    op: AttentionPerturbation,
    *,
    attend_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Joint text-image attention (SD3's ``JointAttnProcessor2_0`` structure) with ``op``
    applied to the IMAGE queries only.

    Queries, keys and values of both streams are projected with the module's own layers
    (q/k norms and the added text projections included) and joined image first, text
    second. The image queries go through ``op`` over the joint keys (``image=(0, n)`` tells
    it where the image keys are); the text queries attend over the joint keys unchanged,
    so the text stream is never perturbed by accident. Returns ``(image, text)`` outputs as
    the processor does (``image`` alone without text).
    """
    n = hidden_states.shape[1]
    query, key, value, text_query = joint_qkv(attn, hidden_states, encoder_hidden_states)
    image = op.attend(query, key, value, mask=None, image=(0, n),
                      **_op_kwargs(attn, op, attend_kwargs))
    return joint_outputs(attn, image, text_query, key, value, query.dtype)


def joint_qkv(
    attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SD3 joint attention's image queries, joint keys and values (image first), and the
    text queries (``None`` without text)."""
    query, key, value = (split_heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if encoder_hidden_states is None:
        return query, key, value, None
    tq, tk, tv = text_qkv(attn, encoder_hidden_states)
    return query, torch.cat([key, tk], dim=2), torch.cat([value, tv], dim=2), tq


def text_qkv(
    attn: Any, encoder_hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text stream's queries, keys and values of SD3 joint attention (added projections
    and their norms), in head layout."""
    tq, tk, tv = (
        split_heads(attn, f(encoder_hidden_states))
        for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    )
    if getattr(attn, "norm_added_q", None) is not None:
        tq = attn.norm_added_q(tq)
    if getattr(attn, "norm_added_k", None) is not None:
        tk = attn.norm_added_k(tk)
    return tq, tk, tv


def joint_outputs(
    attn: Any,
    image: torch.Tensor,
    text_query: torch.Tensor | None,
    key: torch.Tensor,
    value: torch.Tensor,
    dtype: torch.dtype,
) -> Any:
    """The image stream's output projection, and the text stream attended over the joint
    keys as usual (``(image, text)``, or ``image`` alone without text)."""
    image = attn.to_out[1](attn.to_out[0](merge_heads(image, dtype)))
    if text_query is None:
        return image
    text = merge_heads(F.scaled_dot_product_attention(text_query, key, value), dtype)
    if not attn.context_pre_only:
        text = attn.to_add_out(text)
    return image, text


def modified_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    context: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    temb: torch.Tensor | None = None,
    core: Any = None,
    nag: Any = None,
    negative_context: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A diffusers ``Attention`` call with ``core`` as the attention and ``nag`` on top.

    ``norm_cross`` applies to the context, the mask is made as ``prepare_attention_mask``
    makes it, the attention is ``core.attend`` or ``scaled_dot_product_attention`` at its
    default scale ``1 / sqrt(d)`` (as that processor), and NAG acts on the merged heads.
    """
    h, image_shape = open_input(attn, hidden_states, temb)
    b = h.shape[0]
    query = split_heads(attn, attn.to_q(h))
    if attn.norm_q is not None:
        query = attn.norm_q(query)

    def attend(ctx: torch.Tensor | None, m: torch.Tensor | None) -> torch.Tensor:
        if ctx is None:
            ctx = h
        elif attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        key, value = split_heads(attn, attn.to_k(ctx)), split_heads(attn, attn.to_v(ctx))
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if m is not None:
            m = attn.prepare_attention_mask(m, key.shape[-2], b)
            m = m.view(b, attn.heads, -1, m.shape[-1])
        if core is not None:
            return core.attend(query, key, value, mask=m)  # type: ignore[no-any-return]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=m)

    out = attend(context, mask)
    if nag is not None:
        out = nag.combine(out, attend(negative_context, negative_mask), dims=(-3, -1))
    return close_output(attn, merge_heads(out, query.dtype), hidden_states, image_shape)


def modified_joint_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    *,
    core: Any = None,
    nag: Any = None,
    negative_text: torch.Tensor | None = None,
) -> Any:
    """SD3 joint attention with ``core`` (PLADIS / GAG) and ``nag`` on the IMAGE queries.

    The image queries attend over the joint keys (image, then text) through ``core`` (or
    plain SDPA); NAG's ``Z-`` is the same image queries over the image keys and values of
    the same rows joined with the text keys and values of ``negative_text`` (the negative
    rows' text stream at this layer). The text queries attend as usual. Returns what the
    processor returns (``(image, text)``, or ``image`` alone without text).
    """
    n = hidden_states.shape[1]
    query, key, value, text_query = joint_qkv(attn, hidden_states, encoder_hidden_states)

    def attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if core is not None:
            return core.attend(query, k, v)  # type: ignore[no-any-return]
        return F.scaled_dot_product_attention(query, k, v)

    image = attend(key, value)
    if nag is not None:
        assert negative_text is not None  # the site refuses NAG without negative rows
        _, nk, nv = text_qkv(attn, negative_text)
        negative = attend(torch.cat([key[..., :n, :], nk], dim=2),
                          torch.cat([value[..., :n, :], nv], dim=2))
        image = nag.combine(image, negative, dims=(-3, -1))
    return joint_outputs(attn, image, text_query, key, value, query.dtype)
