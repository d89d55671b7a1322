"""The site for plain PyTorch modules: the ``scaled_dot_product_attention`` calls a hooked
module makes (intercepted by :class:`~guidekit.attention.hooks.SdpaMode`) computed per row,
for perturbations (:func:`perturbed_sdpa`, Flux's image queries included) and for modifiers
(:func:`modified_sdpa`)."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from guidekit.attention.hooks import SdpaCall
from guidekit.attention.ops import AttentionPerturbation
from guidekit.attention.route import LayerCall, LayerOps, Route, assemble
from guidekit.errors import GuidanceValueError


@attrs.define(eq=False)
class Frame:
    """One call of a hooked plain module: its layer, its rows' route (a
    :class:`~guidekit.attention.route.Route` or :class:`~guidekit.attention.route.LayerCall`)
    and the SDPA calls it made."""

    path: str
    route: Any
    calls: int = 0
    #: Flux: the image tokens follow this many text tokens (None: not joint)
    text: int | None = None


def _open(owner: Any, func: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Frame, SdpaCall]:
    frame = owner._frames[-1]
    frame.calls += 1
    return frame, SdpaCall(func, args, kwargs, frame.path, frame.route.rows)


def perturbed_sdpa(engine: Any, func: Any, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """One SDPA call of a perturbation's layer, its perturbed rows computed by their op."""
    frame, call = _open(engine, func, args, kwargs)
    route: Route = frame.route
    bound, query, key, value = call.bound, call.query, call.key, call.value
    mask, row_mask = call.mask, call.row_mask

    def perturbed(op: AttentionPerturbation, a: int, b: int) -> torch.Tensor:
        if op.self_only and query.shape[-2] != key.shape[-2]:
            raise GuidanceValueError(
                f"layer {frame.path!r}: {op!r} needs engine-attention, but the call has "
                f"{query.shape[-2]} queries and {key.shape[-2]} keys"
            )
        m = mask[a:b] if row_mask else mask
        if getattr(op, "rewrites_query", False):  # SEG: the same call, its own queries
            sub = dict(bound, key=key[a:b], value=value[a:b])
            rewrite = op.rewrite_query  # type: ignore[attr-defined]
            q, t = query[a:b], frame.text
            if t is None:
                sub["query"] = rewrite(q, **engine.size_kwargs(op))
            else:  # Flux: the text queries (first) stay, the image queries are rewritten
                image_q = rewrite(q[..., t:, :], **engine.size_kwargs(op))
                sub["query"] = torch.cat([q[..., :t, :], image_q], dim=-2)
            if row_mask:
                sub["attn_mask"] = m
            return func(**sub)  # type: ignore[no-any-return]
        extra = engine.scope_kwargs(op, frame.path, route, a)
        if extra:
            if bound.get("is_causal") or bound.get("dropout_p"):
                raise GuidanceValueError(
                    f"layer {frame.path!r}: {op!r} needs plain attention; this call uses "
                    f"is_causal or dropout"
                )
            extra["scale"] = bound.get("scale")
        if frame.text is not None:
            # Flux: text queries first, attended as usual; the image queries perturbed
            t, n = frame.text, query.shape[-2]
            sub = dict(bound, query=query[a:b, ..., :t, :], key=key[a:b], value=value[a:b])
            if row_mask:
                sub["attn_mask"] = m[..., :t, :] if m.ndim >= 2 else m
            text_out = func(**sub)
            if extra and "scale" not in extra:
                extra["scale"] = bound.get("scale")
            image_mask = m[..., t:, :] if isinstance(m, torch.Tensor) and m.ndim >= 2 else m
            image_out = op.attend(query[a:b, ..., t:, :], key[a:b], value[a:b],
                                  mask=image_mask, image=(t, n), **extra)
            return torch.cat([text_out, image_out.to(text_out.dtype)], dim=-2)
        return op.attend(query[a:b], key[a:b], value[a:b], mask=m, **extra)

    out = assemble(route.segments, call.plain, perturbed)
    assert isinstance(out, torch.Tensor)  # SDPA returns one tensor, never joint streams
    return out


def modified_sdpa(hooks: Any, func: Any, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """One SDPA call of a modifier's layer, PLADIS / GAG / NAG on the rows they apply to.

    Flux (``frame.text`` set: text tokens first): the image queries are modified, the text
    queries attend as usual; NAG's negative keys and values are the negative rows' text
    tokens joined with the row's own image tokens.
    """
    frame, sdpa = _open(hooks, func, args, kwargs)
    call: LayerCall = frame.route
    bound, query, key, value = sdpa.bound, sdpa.query, sdpa.key, sdpa.value
    mask, row_mask = sdpa.mask, sdpa.row_mask
    t = frame.text

    def modified(ops: LayerOps, a: int, b: int) -> torch.Tensor:
        core, nag = ops.core, ops.nag
        if bound.get("is_causal") or bound.get("dropout_p"):
            raise GuidanceValueError(
                f"layer {frame.path!r}: the attention modifiers need plain attention; this "
                f"call uses is_causal or dropout"
            )
        scale = bound.get("scale")
        m = mask[a:b] if row_mask else mask
        q = query[a:b]
        if t is not None:  # Flux: only the image queries (after the text) are modified
            q = q[..., t:, :]
            if isinstance(m, torch.Tensor) and m.ndim >= 2:
                m = m[..., t:, :]

        def attend(k: torch.Tensor, v: torch.Tensor, mk: Any) -> torch.Tensor:
            if core is not None:
                return core.attend(q, k, v, mask=mk, logit_scale=scale)  # type: ignore[no-any-return]
            extra = {"scale": scale} if scale is not None else {}
            if bound.get("enable_gqa"):
                extra["enable_gqa"] = True
            return func(q, k, v, attn_mask=mk, **extra)  # type: ignore[no-any-return]

        out = attend(key[a:b], value[a:b], m)
        if nag is not None:
            index = hooks.negative_rows(call, nag, frame.path, a, b, key.device)
            nk, nv = key.index_select(0, index), value.index_select(0, index)
            neg_mask = m
            if t is not None:  # the negative prompt's text tokens, the row's own image
                nk = torch.cat([nk[..., :t, :], key[a:b, ..., t:, :]], dim=-2)
                nv = torch.cat([nv[..., :t, :], value[a:b, ..., t:, :]], dim=-2)
            elif row_mask:
                neg_mask = mask.index_select(0, index)
            dims = (-3, -1) if query.ndim >= 4 else (-1,)
            out = nag.combine(out, attend(nk, nv, neg_mask), dims=dims)
        if t is None:
            return out
        sub = dict(bound, query=query[a:b, ..., :t, :], key=key[a:b], value=value[a:b])
        if row_mask:
            sub["attn_mask"] = mask[a:b][..., :t, :] if mask.ndim >= 2 else mask[a:b]
        text_out = func(**sub)
        return torch.cat([text_out, out.to(text_out.dtype)], dim=-2)

    return assemble(call.segments, sdpa.plain, modified)  # type: ignore[no-any-return]
