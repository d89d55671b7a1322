"""The site for diffusers ``Attention`` modules: the processors that take a hooked layer's
slot, for perturbations (:class:`RowAwareProcessor`) and for modifiers
(:class:`ModifierProcessor`).

Both hold the ORIGINAL processor (see :class:`~guidekit.attention.hooks.ProcessorWrapper`),
send the rows nothing changes through it in one call, and compute the other rows with the
maths of :mod:`guidekit.attention.maths`, dispatched by :func:`guidekit.attention.route.assemble`.
"""

from __future__ import annotations

from typing import Any

import torch

from guidekit.attention.fused import fused_self_attention, is_stock_processor
from guidekit.attention.hooks import ProcessorWrapper, check_rows, take
from guidekit.attention.hooks import row_slice as _row_slice
from guidekit.attention.hooks import row_slice as _slice
from guidekit.attention.hooks import rows_of as _rows_of
from guidekit.attention.hooks import slice_kwargs as _slice_kwargs
from guidekit.attention.layers import is_joint_attention
from guidekit.attention.maths import (
    _op_kwargs,
    modified_attention,
    modified_joint_attention,
    perturbed_joint_attention,
    perturbed_self_attention,
    watched_self_attention,
)
from guidekit.attention.ops import AttentionPerturbation
from guidekit.attention.route import LayerOps, assemble, watched_as_plain, watches_only
from guidekit.errors import GuidanceTypeError, GuidanceValueError

#: Keyword arguments of a diffusers attention call whose first axis is the call's rows.
ROW_KWARGS = ("encoder_hidden_states", "attention_mask", "temb")
#: A layer's output: one tensor, or (image stream, text stream) for joint attention
LayerOutput = torch.Tensor | tuple[torch.Tensor, ...]
_take = take


def processor_for(owner: Any, path: str, original: Any, plain: type, module: type) -> ProcessorWrapper:
    """``plain`` or, for an original processor that is an ``nn.Module``, ``module``."""
    cls = module if isinstance(original, torch.nn.Module) else plain
    return cls(owner, path, original)  # type: ignore[no-any-return]


def _layer_output(out: Any, path: str, joint: bool, who: str) -> LayerOutput:
    """The original processor's output on a row range: one tensor (a pair for joint
    attention); anything else is refused, naming the layer."""
    if joint and isinstance(out, tuple):
        return out
    if not isinstance(out, torch.Tensor):
        raise GuidanceTypeError(
            f"the processor of {path!r} returned {type(out).__name__}; {who} "
            f"attention that returns one tensor"
        )
    return out


class _Routed(ProcessorWrapper):
    """A processor that asks its ``owner`` (the engine's perturbation or modifier part) how
    this call's rows are routed; ``None``: the original processor, untouched."""

    owner: Any
    #: what the message of a changed batch says would be lost
    lost: str = ""

    def __init__(self, owner: Any, path: str, original: Any) -> None:
        super().__init__(path, original)
        self.owner = owner

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        route = self.routing()
        if route is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        if hidden_states.shape[0] != route.rows:
            check_rows(self.path, hidden_states.shape[0], route.rows, self.lost)  # refuses
        return self.dispatch(route, attn, hidden_states, args, kwargs)

    def routing(self) -> Any:
        raise NotImplementedError

    def dispatch(self, route: Any, attn: Any, hidden_states: torch.Tensor,
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError


class _RowAware(_Routed):
    """Shared body of the row-aware processor (plain object or ``nn.Module``)."""

    lost = "which rows are perturbed"

    def __init__(self, owner: Any, path: str, original: Any) -> None:
        super().__init__(owner, path, original)
        # read once: a per-call class-name walk would break torch.compile's graph here
        self.joint = is_joint_attention(owner.model.get_submodule(path))
        # the stock processor's rows can share one set of projections (guidekit.attention.fused)
        self.fusable = not self.joint and is_stock_processor(original)

    def routing(self) -> Any:
        return self.owner.route(self.path)

    def dispatch(self, route: Any, attn: Any, hidden_states: torch.Tensor,
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        rows = route.rows
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None and args:
            ehs = args[0]
        joint = self.joint
        if ehs is not None and not joint:
            raise GuidanceValueError(
                f"layer {self.path!r} was called with encoder_hidden_states (cross-attention); "
                f"the perturbations here are defined for self-attention only"
            )
        if self.fusable and not args and kwargs.get("attention_mask") is None:
            return fused_self_attention(
                attn, hidden_states, route.segments,
                lambda op, a: _op_kwargs(attn, op, self.owner.op_kwargs(op, self.path, route, a)),
                temb=kwargs.get("temb"),
            )

        def plain(ranges: tuple[tuple[int, int], ...]) -> LayerOutput:
            hs = take(hidden_states, ranges)
            kw = _slice_kwargs(kwargs, rows, ranges, ROW_KWARGS)
            a_args = tuple(take(t, ranges) if _rows_of(t, rows) else t for t in args)
            out = self.original(attn, hs, *a_args, **kw)
            return _layer_output(out, self.path, joint, "the engine handles")

        def perturbed(op: AttentionPerturbation, a: int, b: int) -> Any:
            if joint:
                return perturbed_joint_attention(
                    attn, hidden_states[a:b], None if ehs is None else ehs[a:b], op,
                    attend_kwargs=self.owner.op_kwargs(op, self.path, route, a),
                )
            return perturbed_self_attention(
                attn, hidden_states[a:b], op,
                attention_mask=_row_slice(kwargs.get("attention_mask"), rows, a, b),
                temb=_row_slice(kwargs.get("temb"), rows, a, b),
                attend_kwargs=self.owner.op_kwargs(op, self.path, route, a),
            )

        segments = route.segments
        if not joint and any(watches_only(op) for _, _, op in segments):
            # EMAG's observed rows: the op sees their queries and keys, and they go through
            # the layer's own processor with the other plain rows (as the fused path does)
            for a, b, op in segments:
                if watches_only(op):
                    watched_self_attention(
                        attn, hidden_states[a:b], op,
                        attention_mask=_row_slice(kwargs.get("attention_mask"), rows, a, b),
                        temb=_row_slice(kwargs.get("temb"), rows, a, b),
                        attend_kwargs=self.owner.op_kwargs(op, self.path, route, a),
                    )
            segments = tuple(watched_as_plain(segments))
        return assemble(segments, plain, perturbed)  # type: ignore[no-any-return]


class RowAwareProcessor(_RowAware):
    """Takes the place of a diffusers attention processor while the engine is installed."""

    def __repr__(self) -> str:
        return f"RowAwareProcessor({self.path!r}, original={self.original!r})"


class RowAwareModuleProcessor(_RowAware, torch.nn.Module):
    """The same, for an original processor that is an ``nn.Module`` (kept as a child, so
    its parameters still move with ``.to()``)."""

    __call__ = _RowAware.__call__


class _ModifierBody(_Routed):
    """Shared body of the modifier processor (plain object or ``nn.Module``)."""

    lost = "which rows to modify"

    def __init__(self, owner: Any, path: str, original: Any) -> None:
        super().__init__(owner, path, original)
        # read once, as the row-aware processor does (torch.compile)
        self.joint = is_joint_attention(owner.model.get_submodule(path))

    def routing(self) -> Any:
        return self.owner.call_for(self.path)

    def dispatch(self, call: Any, attn: Any, hidden_states: torch.Tensor,
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        rows = call.rows
        # AttnProcessor2_0's positional order after hidden_states
        kwargs = {**dict(zip(ROW_KWARGS, args)), **kwargs}
        context = kwargs.get("encoder_hidden_states")
        mask = kwargs.get("attention_mask")
        temb = kwargs.get("temb")

        joint = self.joint

        def plain(ranges: tuple[tuple[int, int], ...]) -> LayerOutput:
            kw = _slice_kwargs(kwargs, rows, ranges, ROW_KWARGS)
            out = self.original(attn, _take(hidden_states, ranges), **kw)
            return _layer_output(out, self.path, joint, "the attention modifiers handle")

        def modified(ops: LayerOps, a: int, b: int) -> LayerOutput:
            core, nag = ops.core, ops.nag
            if nag is not None and context is None:
                raise GuidanceValueError(
                    f"layer {self.path!r} is called without encoder_hidden_states: "
                    f"{nag!r} needs the text context the negative prompt replaces; choose "
                    f"cross-attention or joint text-image layers"
                )
            if joint:  # SD3: the image queries are modified, the text ones attend as usual
                negative = None if nag is None or context is None else context.index_select(
                    0, self.owner.negative_rows(call, nag, self.path, a, b, context.device))
                return modified_joint_attention(  # type: ignore[no-any-return]
                    attn, hidden_states[a:b], _slice(context, rows, a, b),
                    core=core, nag=nag, negative_text=negative,
                )
            neg_ctx = neg_mask = None
            if nag is not None:
                assert context is not None
                neg_ctx, neg_mask = self.owner.negative_context(
                    call, nag, self.path, a, b, context, mask
                )
            return modified_attention(
                attn, hidden_states[a:b], _slice(context, rows, a, b), _slice(mask, rows, a, b),
                temb=_slice(temb, rows, a, b),
                core=core, nag=nag, negative_context=neg_ctx, negative_mask=neg_mask,
            )

        return assemble(call.segments, plain, modified)  # type: ignore[no-any-return]


class ModifierProcessor(_ModifierBody):
    """Takes the place of a diffusers attention processor in a modifier's layer."""

    def __repr__(self) -> str:
        return f"ModifierProcessor({self.path!r}, original={self.original!r})"


class ModifierModuleProcessor(_ModifierBody, torch.nn.Module):
    """The same, for an original processor that is an ``nn.Module`` (kept as a child)."""

    __call__ = _ModifierBody.__call__
