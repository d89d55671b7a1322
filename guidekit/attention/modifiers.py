"""Applying attention modifiers (PLADIS, GAG, NAG) inside the forward of a hooked model.

The attention engine (:mod:`guidekit.attention.engine`) builds one :class:`ModifierHooks`
for the plan's attention modifiers (``plan.attention``) and installs, restores and
activates it together with its own hooks, so ``guidekit.attention.install(model, plan)``
covers both. Everything here is about the modifiers' layers; perturbations never share a
layer with them (refused when the engine is built).

**Layers.** A modifier's ``layers`` address the model's *cross-attention* list (by index,
module path, or a container path): ``transformer_blocks.{i}.attn2`` for PixArt, every
cross-attention ``attn2`` of a ``UNet2DConditionModel`` in ``named_modules()`` order. The
default (``layers=None``) is every listed cross-attention layer, as PLADIS ("all
cross-attention modules") and NAG's official code (every ``attn2``) do. A plain module is
addressed as for perturbations (``attention_class=`` or module paths; with a class the
default is every listed module). Class-conditional models with no cross-attention (DiT)
and joint text-image attention other than SD3's and Flux's raise when the engine is built.

**Joint text-image attention** (``SD3Transformer2DModel``: ``transformer_blocks.{i}.attn``;
``FluxTransformer2DModel``: the double- then single-stream blocks' ``attn``; default: all of
them): the IMAGE queries are modified, over the joint keys (image and text); the text
queries attend as usual. NAG's ``Z-`` is the same image queries over the row's own image
keys and values joined with the text keys and values of the negative conditioning's row
in the same call at that layer (its text stream has gone through the same blocks), so it
needs those rows there (``CFG(w) | NAG(s)``). NAG's code carries the negative text stream
as extra rows beside the positive image stream instead; guidekit reuses CFG's rows (no extra
rows), a documented difference.

**Rows.** In a hooked layer, during a guided call of the engine's model, each row gets:

* the attention core of the layer's PLADIS or GAG (at most one of them per layer), for
  EVERY row of the call (cond, uncond, perturbed branches alike), or the layer's own
  attention where the layer has no core;
* NAG (at most one per layer) on the rows of branches whose conditioning is ``cond``
  (perturbed ones included): ``Z+`` is the core's output for the row's own context,
  ``Z-`` the core's output for the same queries and the NEGATIVE context of the same sample.

Rows nothing applies to go through the layer's original processor in one call.

**NAG's negative context**, per positive row of sample ``b``:

1. If the call holds a row of the negative conditioning (``uncond`` by default; an
   unperturbed one preferred) for sample ``b`` (``CFG(w) | NAG(s)``), its context at this
   layer (and its cross-attention mask, if any) is used: exactly what the model itself
   computed from that conditioning, for any architecture.
2. Otherwise (``Cond() | NAG(s)``, a gated CFG outside its interval, a row budget that put
   ``u`` in another call) the negative conditioning's tensor ``key`` is taken from the
   step's conditionings (``ForwardState.conds``, after input modifiers such as CADS) and
   projected as the model does before its blocks: PixArt's ``caption_projection``; for a
   ``UNet2DConditionModel`` nothing (or its ``text_proj`` ``encoder_hid_proj``), with the
   conditioning's own caption mask made additive as those models do
   (:mod:`~guidekit.attention.negative`). Other models and plain modules are refused here,
   with a message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from guidekit.attention.flux import TextLength, check_native, is_flux_attention
from guidekit.attention.hooks import (
    LayerHook,
    intercepting_forward,
    restore_all,
)
from guidekit.attention.hooks import rows_of as _rows_of
from guidekit.attention.layers import (
    LayerTable,
    check_disjoint,
    context_projection,
    cross_attention_table,
    diffusers_attention_class,
    is_cross_attention,
    is_joint_attention,
    resolve_layers,
)
from guidekit.attention.negative import missing_negative, negative_bias
from guidekit.attention.processors import ModifierModuleProcessor, ModifierProcessor, processor_for
from guidekit.attention.route import LayerCall, LayerOps, add_block
from guidekit.attention.sdpa import Frame, modified_sdpa
from guidekit.errors import GuidanceValueError
from guidekit.rows import stateless


def _is_core(m: Any) -> bool:
    return hasattr(m, "attend")


def _is_nag(m: Any) -> bool:
    return hasattr(m, "combine")


class ModifierHooks:
    """The hooks of a plan's attention modifiers on one model (see the module docstring).

    Built (and every layer checked) before anything is changed; ``install()`` and
    ``restore()`` put the hooks in and take them out again; ``active(layout)`` holds the
    row layout of the model call in progress. ``layers`` maps each modifier to its paths.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Any,
        *,
        model_name: str,
        attention_class: type | tuple[type, ...] | None = None,
        taken: tuple[str, ...] = (),
        text_length: TextLength | None = None,
    ) -> None:
        self.model = model
        self.plan = plan
        # Flux: the call's text length tells its image tokens (the engine records it)
        self.text_length = text_length
        self.model_name = model_name
        self.modifiers: tuple[Any, ...] = tuple(getattr(plan, "attention", ()))
        self.layers: dict[Any, tuple[str, ...]] = {}
        self.ops: dict[str, LayerOps] = {}
        self.table: LayerTable | None = None
        self.context: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._hooks: list[LayerHook] = []
        self._layout: Any = None
        self._calls: dict[Any, dict[str, LayerCall]] = {}
        self._active: dict[str, LayerCall] | None = None
        self._negatives: dict[Any, torch.Tensor] = {}
        self._frames: list[Frame] = []
        if not self.modifiers:
            return
        self.table = table = cross_attention_table(model, attention_class=attention_class)
        for m in self.modifiers:
            if not table.paths and not table.free:
                raise GuidanceValueError(
                    f"{m!r}: {table.architecture} has no cross-attention layer (it is not "
                    f"conditioned through cross-attention, e.g. a class-conditional DiT); "
                    f"{type(m)._name} changes cross-attention, so there is nothing to change"
                )
            self.layers[m] = resolve_layers(model, table, m.layers, what=repr(m))
        paths = tuple(dict.fromkeys(p for ps in self.layers.values() for p in ps))
        check_disjoint(paths)
        for path in paths:
            users = [m for m, ps in self.layers.items() if path in ps]
            cores = [m for m in users if _is_core(m)]
            nags = [m for m in users if _is_nag(m)]
            if len(cores) > 1 or len(nags) > 1:
                two = cores if len(cores) > 1 else nags
                raise GuidanceValueError(
                    f"layer {path!r} gets both {two[0]!r} and {two[1]!r}: at most one of "
                    f"PLADIS / GAG and one NAG may act in a layer (they would replace each "
                    f"other's attention); give them disjoint layers=..."
                )
            for other in taken:
                if other == path or other.startswith(path + ".") or path.startswith(other + "."):
                    pert = "a perturbed branch's layer"
                    raise GuidanceValueError(
                        f"layer {path!r} of {users[0]!r} overlaps {other!r}, {pert}: an "
                        f"attention modifier and a perturbation cannot share a layer (the "
                        f"perturbation replaces the attention the modifier changes); choose "
                        f"other layers for one of them"
                    )
            self.ops[path] = LayerOps(cores[0] if cores else None, nags[0] if nags else None)
            self._hooks.append(self._plan_hook(path, bool(nags)))
        if any(_is_nag(m) for m in self.modifiers):
            self.context = context_projection(model)

    # -- set-up ------------------------------------------------------------------------------------
    def _plan_hook(self, path: str, nag: bool) -> LayerHook:
        module = self.model.get_submodule(path)
        if is_flux_attention(module):
            if self.text_length is None:
                raise GuidanceValueError(
                    f"layer {path!r} is Flux joint text-image attention; install the engine "
                    f"on the FluxTransformer2DModel itself (its text length is needed)"
                )
            check_native(path, module)
            return LayerHook.forward(path, module, flux=True)
        joint = is_joint_attention(module)
        if joint and not (hasattr(module, "add_q_proj") and hasattr(module, "to_q")):
            raise GuidanceValueError(
                f"layer {path!r} ({type(module).__name__}) is a joint text-image attention "
                f"the attention modifiers do not handle (they handle SD3's and Flux's)"
            )
        attention_cls = diffusers_attention_class()
        if attention_cls is not None and isinstance(module, attention_cls):
            if nag and not joint and not is_cross_attention(module):
                raise GuidanceValueError(
                    f"layer {path!r} is a self-attention layer; NAG needs cross-attention "
                    f"(the negative prompt replaces the context)"
                )
            return LayerHook.processor(path, module)
        if hasattr(module, "get_processor") and hasattr(module, "set_processor"):
            raise GuidanceValueError(
                f"layer {path!r} is a {type(module).__name__}, an attention class the "
                f"attention modifiers do not support yet"
            )
        return LayerHook.forward(path, module)

    def install(self) -> None:
        """Put every hook in (all or none: a failure takes back the ones already in)."""
        try:
            for hook in self._hooks:
                self._install(hook)
        except BaseException:
            self.restore()
            raise

    def _install(self, hook: LayerHook) -> None:
        if hook.kind == "processor":
            hook.install(lambda original: processor_for(
                self, hook.path, original, ModifierProcessor, ModifierModuleProcessor))
        else:
            hook.install(intercepting_forward(
                self, hook, lambda: self._open_frame(hook), "its attention modifiers would do nothing"
            ), self)

    def _open_frame(self, hook: LayerHook) -> Frame | None:
        """The frame of one call of a hooked plain module (``None``: not modified now)."""
        call = self.call_for(hook.path)
        if call is None:
            return None
        text = self.text_length.current(hook.path) if hook.flux and self.text_length else None
        return Frame(hook.path, call, text=text)

    def restore(self) -> None:
        """Take every installed hook out, restoring the exact objects found; then raise the
        first error, if any (every other hook is still restored)."""
        self._layout = self._active = None
        self._calls.clear()
        self._negatives.clear()
        self._frames.clear()
        errors = restore_all(self._hooks)
        if errors:
            raise errors[0]

    # -- per call ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self, layout: Any) -> Iterator[None]:
        """Hold ``layout`` while one model call runs (the engine's ``around_call`` enters it).

        The layers' row routes are looked up (or built) HERE, outside the model call, so a
        compiled model traces a plain dict lookup, not the routing (see docs/benchmarks.md)."""
        previous = self._layout, self._active, self._negatives
        self._layout = layout if self._hooks and layout.model == self.model_name else None
        self._active = None
        if self._layout is not None:
            # gated / scheduled modifiers as they act this step (ForwardState.modifiers)
            now = getattr(layout.state, "modifiers", None) or {}
            key = (layout, tuple(now.items())) if now else layout
            calls = self._calls.get(key)
            if calls is None:
                if len(self._calls) > 4096:  # a scheduled scale: one entry per noise level
                    self._calls.clear()
                calls = self._calls_for(layout, now)
                # kept under the layout without its step state (the step's observations)
                bare = stateless(layout)
                self._calls[(bare, tuple(now.items())) if now else bare] = calls
            self._active = calls
        self._negatives = {}
        try:
            yield
        finally:
            self._layout, self._active, self._negatives = previous

    def call_for(self, path: str) -> LayerCall | None:
        """How layer ``path`` treats the rows of the current call (``None``: leave it alone)."""
        active = self._active
        return None if active is None else active.get(path)

    def _calls_for(self, layout: Any, now: dict[Any, Any]) -> dict[str, LayerCall]:
        out: dict[str, LayerCall] = {}
        for path, ops in self.ops.items():
            if now:  # ``None``: the modifier is off at this step, the layer's own attention
                ops = LayerOps(now.get(ops.core, ops.core), now.get(ops.nag, ops.nag))
            segments: list[tuple[int, int, LayerOps | None]] = []
            for branch, start, stop in layout.blocks:
                nag = ops.nag if ops.nag is not None and ops.nag.applies_to(branch) else None
                add_block(segments, start, stop,
                          None if ops.core is None and nag is None else LayerOps(ops.core, nag))
            negatives: dict[int, int] = {}
            if ops.nag is not None:
                # unperturbed rows of the negative conditioning first, then any
                blocks = sorted(
                    (blk for blk in layout.blocks if blk[0].cond == ops.nag.negative),
                    key=lambda blk: blk[0].perturbation is not None,
                )
                for _, start, stop in blocks:
                    for row in range(start, stop):
                        negatives.setdefault(layout.sample(row), row)
            out[path] = LayerCall(
                layout.rows, tuple(segments), tuple(sorted(negatives.items())), layout
            )
        return out

    def negative_rows(
        self, call: LayerCall, nag: Any, path: str, a: int, b: int, device: torch.device
    ) -> torch.Tensor:
        """The call's rows of NAG's negative conditioning for the rows ``a..b`` (joint
        attention and plain modules: the negative keys and values come from those rows)."""
        rows = [call.negative_row(r) for r in range(a, b)]
        if any(r is None for r in rows):
            raise GuidanceValueError(
                f"layer {path!r}: {nag!r} needs rows of the conditioning {nag.negative!r} in "
                f"the same model call here (their keys and values at this layer are the "
                f"negative prompt's), and this call has none: {missing_negative(self.plan, nag)}"
            )
        return torch.tensor(rows, device=device)

    def negative_context(
        self,
        call: LayerCall,
        nag: Any,
        path: str,
        a: int,
        b: int,
        context: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """NAG's negative context (and mask) for the call's rows ``a..b`` of a diffusers
        layer: rows of the negative conditioning in this call, else the projected
        conditioning (see the module docstring)."""
        rows = call.rows
        row_mask = _rows_of(mask, rows)
        contexts, masks = [], []
        for r in range(a, b):
            n = call.negative_row(r)
            if n is not None:
                contexts.append(context[n])
                if row_mask:
                    assert mask is not None
                    masks.append(mask[n])
                continue
            projected = self._projected_negative(call, nag, path)
            sample = call.layout.sample(r)
            contexts.append(projected[sample].to(context.dtype))
            if row_mask:
                assert mask is not None
                masks.append(negative_bias(self._negative_conds(nag), mask, sample, nag, path))
        neg = torch.stack(contexts)
        neg_mask = torch.stack(masks) if row_mask else mask
        return neg, neg_mask

    def _negative_conds(self, nag: Any) -> dict[str, Any]:
        """The step's tensors of NAG's negative conditioning."""
        # the current layout's state: a cached LayerCall may hold an earlier step's layout
        state = getattr(self._layout, "state", None)
        conds = getattr(state, "conds", None) or {}
        negative = conds.get(nag.negative)
        if negative is None:
            raise GuidanceValueError(
                f"{nag!r} needs the conditioning {nag.negative!r} (its negative prompt), but "
                f"the step has only {', '.join(map(repr, conds)) or 'none'}: pass "
                f"{nag.negative}={{...}} to guide() or in plan.step's conds"
            )
        return negative  # type: ignore[no-any-return]

    def _projected_negative(self, call: LayerCall, nag: Any, path: str) -> torch.Tensor:
        cached = self._negatives.get(nag)
        if cached is not None:
            return cached
        arch = type(self.model).__name__
        if self.context is None:
            raise GuidanceValueError(
                f"layer {path!r}: {nag!r} found no row of the conditioning {nag.negative!r} "
                f"in this model call, and guidekit does not know how {arch} turns a "
                f"conditioning into its cross-attention context (it knows PixArt and "
                f"UNet2DConditionModel): {missing_negative(self.plan, nag)}"
            )
        negative = self._negative_conds(nag)
        key = nag.key
        if key is None:
            found = [
                k for k, v in negative.items()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim == 3
            ]
            if len(found) != 1:
                raise GuidanceValueError(
                    f"{nag!r}: cannot tell which tensor of the conditioning {nag.negative!r} is "
                    f"the text context ({len(found)} floating 3-D tensors: "
                    f"{', '.join(found) or 'none'}); name it with NAG(..., key='...')"
                )
            key = found[0]
        value = negative.get(key)
        if not isinstance(value, torch.Tensor):
            raise GuidanceValueError(
                f"{nag!r}: the conditioning {nag.negative!r} has no tensor {key!r} "
                f"(keys: {', '.join(negative) or 'none'})"
            )
        projected = self.context(value)
        self._negatives[nag] = projected
        return projected

    def _sdpa(self, func: Any, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        return modified_sdpa(self, func, args, kwargs)

    # -- text ------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """Each modifier and the layers it changes."""
        return "\n".join(f"  {m!r}: {', '.join(ps)}" for m, ps in self.layers.items())
