"""SLG's machinery: skip whole blocks, or their attention, for the rows of one branch.

Skip-layer guidance (the SD3.5 recipe; spatiotemporal skip guidance, STG,
https://arxiv.org/abs/2411.18664): the negative ``k`` is the conditional pass with some
blocks of the model skipped. Two kinds (``skip=``):

* ``"block"``: each chosen block returns its inputs unchanged for the ``k`` rows, as if it
  were removed from the model. A block that returns one tensor returns its
  ``hidden_states`` (the first parameter when none is named so); a two-stream block (SD3's
  ``JointTransformerBlock``, Flux's ``FluxTransformerBlock`` and
  ``FluxSingleTransformerBlock``, Qwen-Image's block) returns
  ``(encoder_hidden_states, hidden_states)`` exactly as they came in, so the text stream of
  the ``k`` rows also passes the block untouched (as SD3's own ``skip_layers`` does), and
  no joint-attention support is needed.
* ``"attention"``: the self-attention modules inside each chosen block (diffusers
  ``Attention`` / ``AttentionModuleMixin`` modules that are not cross-attention, or the
  ``attention_class`` of a plain module) output zeros for the ``k`` rows, so the block's
  residual connection carries its input past the attention (both streams of a joint
  attention). In Flux's single-stream blocks the MLP branch still runs.

Only the ``k`` rows are affected: every other row of the same model call goes through the
block as usual. For ``"block"`` the block runs on the other rows only (tensors whose first
axis is the call's rows are sliced, other arguments are passed as they are), unless a
hooked attention layer lies inside it (PAG, SEG, ... on the same block, or an
``"attention"`` skip) or a module someone registered a forward hook on (a hook may rewrite its
output per row, as the bundled models' CADS does to the label embedding): then the block runs on all rows and the ``k`` rows are replaced
afterwards, so the inner hooks see the whole call. ``"attention"`` always runs the
attention on all rows and zeroes the ``k`` rows.

A third kind, TPG's token shuffle (:mod:`guidekit.terms.tpg`), is handled here too: a
perturbation with ``skip == "shuffle"`` permutes the tokens (axis 1) of each chosen block's
``hidden_states`` for its rows, with the permutation its ``permutation(state, path, tokens,
device)`` draws for the step (from the step's ForwardState), and the block runs on all
rows.

The block list (what ``layers`` indexes) and SLG's perturbation value are in
:mod:`guidekit.attention.block_list`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

from guidekit.attention.block_list import (
    DIFFUSERS_LISTS,
    NOT_ROWS,
    PLAIN_LISTS,
    SD35_LAYERS,
    SKIP_KINDS,
    TWO_STREAM,
    BlockSkip,
    _attention_classes,
    _names,
    _skip_kind,
    block_table,
)
from guidekit.attention.hooks import LayerHook
from guidekit.attention.layers import LayerTable, check_disjoint, is_cross_attention, resolve_layers
from guidekit.attention.ops import AttentionPerturbation, fmt_layers
from guidekit.errors import GuidanceTypeError, GuidanceValueError

__all__ = [  # the block list's names stay importable from here
    "DIFFUSERS_LISTS", "NOT_ROWS", "PLAIN_LISTS", "SD35_LAYERS", "SKIP_KINDS", "TWO_STREAM",
    "BlockSkip", "BlockSkipper", "_skip_kind", "block_table",
]


# -- row helpers -------------------------------------------------------------------------------

Ranges = tuple[tuple[int, int], ...]


def _take(t: torch.Tensor, ranges: Ranges) -> torch.Tensor:
    if len(ranges) == 1:
        return t[ranges[0][0] : ranges[0][1]]
    return torch.cat([t[a:b] for a, b in ranges])


def _is_rows(name: str, value: Any, rows: int) -> bool:
    return (
        isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows
        and not any(s in name for s in NOT_ROWS)
    )


def _split(route: Any, kind: str) -> tuple[tuple[int, int, bool], ...]:
    """The route's rows as ``(start, stop, skipped)`` runs, ``skipped`` for ``kind`` rows."""
    runs: list[tuple[int, int, bool]] = []
    for a, b, op in route.segments:
        hit = isinstance(op, BlockSkip) and op.skip == kind
        if runs and runs[-1][2] == hit and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b, hit)
        else:
            runs.append((a, b, hit))
    return tuple(runs)


def _merge(
    out: torch.Tensor | None, source: torch.Tensor | None, runs: tuple[tuple[int, int, bool], ...],
    compact: bool, what: str,
) -> torch.Tensor | None:
    """Rows in order: kept rows from ``out`` (all rows, or only the kept ones when
    ``compact``), skipped rows from ``source`` (the block's input)."""
    if out is None:
        return None
    if source is None:
        raise GuidanceValueError(f"{what}: the skipped rows have no input to pass on")
    pieces = []
    offset = 0
    for a, b, skipped in runs:
        if skipped:
            pieces.append(source[a:b])
        elif compact:
            pieces.append(out[offset : offset + b - a])
            offset += b - a
        else:
            pieces.append(out[a:b])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _shuffled(
    hs: torch.Tensor, shuffles: tuple[tuple[int, int, Any], ...], path: str, state: Any,
    what: str,
) -> torch.Tensor:
    """``hs`` with the tokens (axis 1) of each ``shuffles`` row range permuted."""
    if state is None:
        raise GuidanceValueError(
            f"{what}: TPG draws its token order from the run's seed and step, but this call's "
            f"RowLayout carries no state: call the model through Plan.step or guidekit.guide"
        )
    if hs.ndim < 3:
        raise GuidanceValueError(
            f"{what} received hidden_states {tuple(hs.shape)}; TPG shuffles tokens on axis 1 "
            f"of [rows, tokens, channels]: name blocks whose input is a token sequence"
        )
    pieces, last = [], 0
    for a, b, op in shuffles:
        perm = op.permutation(state, path, hs.shape[1], hs.device)
        pieces += [hs[last:a], hs[a:b][:, perm]]
        last = b
    pieces.append(hs[last:])
    return torch.cat(pieces)


def _zero(out: Any, runs: tuple[tuple[int, int, bool], ...], rows: int, what: str) -> Any:
    if out is None:
        return None
    if isinstance(out, (tuple, list)):
        return type(out)(_zero(o, runs, rows, what) for o in out)
    if not isinstance(out, torch.Tensor):
        raise GuidanceTypeError(f"{what} returned {type(out).__name__}; expected tensors")
    if out.ndim == 0 or out.shape[0] != rows:
        raise GuidanceValueError(
            f"{what} returned {tuple(out.shape)} for a model call of {rows} rows: the model "
            f"changes the batch before this layer, so guidekit cannot tell which rows to skip"
        )
    pieces = [torch.zeros_like(out[a:b]) if skipped else out[a:b] for a, b, skipped in runs]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# -- the hooks ---------------------------------------------------------------------------------


class BlockSkipper:
    """Resolves SLG's blocks and hooks them while the attention engine is installed.

    ``route(path)`` is the engine's current route for a block path (``None`` outside a
    guided call); its segments name the :class:`BlockSkip` of each row block. Errors
    (unknown blocks, a block without self-attention for ``skip="attention"``) are raised
    here, before anything is hooked.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        perturbations: Iterable[BlockSkip],
        route: Callable[[str], Any],
        *,
        attention_class: type | tuple[type, ...] | None = None,
        state: Callable[[], Any] = lambda: None,
    ) -> None:
        self.model = model
        self.route = route
        self.state = state
        self.perturbations = tuple(perturbations)
        self.layers: dict[AttentionPerturbation, tuple[str, ...]] = {}
        self.table: LayerTable | None = None
        if not self.perturbations:
            self.paths: tuple[str, ...] = ()
            self.kinds: dict[str, set[str]] = {}
            self.attention: dict[str, tuple[str, ...]] = {}
            self._hooks: list[LayerHook] = []
            return
        self.table = block_table(model)
        for p in self.perturbations:
            where = getattr(p, "where", None) or (
                f"SLG(layers={fmt_layers(p.layers)}, skip={p.skip!r})")
            own = getattr(p, "default_blocks", True)  # TPG has none on any model
            if p.layers is None and not (own and self.table.default):
                why = (f"{self.table.architecture} has no default blocks to skip; name them, "
                       f"e.g. layers=(7, 8, 9) (the SD3.5 Medium recipe)") if own else (
                       "it has no default blocks; name them, e.g. layers=(0, 1)")
                raise GuidanceValueError(f"{where}: {why}; valid blocks: {self.table.describe()}")
            self.layers[p] = resolve_layers(model, self.table, p.layers, what=where)
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        self.paths = tuple(sorted({q for ps in self.layers.values() for q in ps}, key=order.__getitem__))
        check_disjoint(self.paths)
        self.kinds = {
            path: {p.skip for p in self.perturbations if path in self.layers[p]}
            for path in self.paths
        }
        classes = _attention_classes(attention_class)
        self.attention = {}
        for path in self.paths:
            if "attention" not in self.kinds[path]:
                continue
            block = model.get_submodule(path)
            found = tuple(
                f"{path}.{n}" for n, m in block.named_modules()
                if n and classes and isinstance(m, classes) and not is_cross_attention(m)
            )
            # a module nested in another listed one is reached through it: keep the outer
            found = tuple(f for f in found if not any(f.startswith(g + ".") for g in found))
            if not found:
                hint = "" if attention_class else " (a plain module: pass attention_class=...)"
                raise GuidanceValueError(
                    f"SLG(skip='attention'): block {path!r} has no self-attention module{hint}"
                )
            for f in found:
                if getattr(model.get_submodule(f), "residual_connection", False):
                    raise GuidanceValueError(
                        f"SLG(skip='attention'): {f!r} adds its residual inside the attention "
                        f"module, so zeroing its output would drop the input too; use "
                        f"skip='block'"
                    )
            self.attention[path] = found
        self._hooks = []

    # -- install / restore -----------------------------------------------------------------------
    def install(self, hooked: tuple[str, ...] = ()) -> None:
        """Hook the blocks; ``hooked`` are the attention paths the engine hooks (a block
        holding one runs on all rows). Atomic: on error nothing stays hooked."""
        inner = set(hooked) | {a for ps in self.attention.values() for a in ps}
        # a module inside a block whose output someone's forward hook rewrites per row (CADS's
        # label-embedding hook) must see the whole call too, as the engine's own layers do
        inner |= {name for name, m in self.model.named_modules() if name and m._forward_hooks}
        hooks: list[tuple[LayerHook, Callable[[Any], Callable[..., Any]]]] = []
        for path in self.paths:
            module = self.model.get_submodule(path)
            if self.kinds[path] & {"block", "shuffle"}:
                full = any(h.startswith(path + ".") for h in inner)
                hooks.append((LayerHook.forward(path, module),
                              self._block_forward(path, module, full)))
            for attn_path in self.attention.get(path, ()):
                hooks.append((LayerHook.forward(attn_path, self.model.get_submodule(attn_path)),
                              self._attention_forward(path, attn_path)))
        done: list[LayerHook] = []
        try:
            for hook, make in hooks:
                hook.install(make, self)
                done.append(hook)
        except BaseException:
            for hook in reversed(done):
                hook.restore()
            raise
        self._hooks = done

    def restore(self) -> None:
        errors: list[BaseException] = []
        for hook in reversed(self._hooks):
            try:
                hook.restore()
            except Exception as err:  # restore every other hook before reporting
                errors.append(err)
        self._hooks = []
        if errors:
            raise errors[0]

    # -- the wrappers ----------------------------------------------------------------------------
    def _block_forward(
        self, path: str, module: torch.nn.Module, full: bool
    ) -> Callable[[Any], Callable[..., Any]]:
        two_stream = any(n in TWO_STREAM for n in _names(module))

        def make(original: Any) -> Callable[..., Any]:
            sig = inspect.signature(original)
            if all(q.kind in (q.VAR_POSITIONAL, q.VAR_KEYWORD) for q in sig.parameters.values()):
                # a generic wrapper someone installed: read the class's own signature
                sig = inspect.signature(type(module).forward.__get__(module))
            params = sig.parameters
            positional = [n for n, q in params.items() if q.kind in (
                q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
            hs_name = "hidden_states" if "hidden_states" in params else (
                positional[0] if positional else None)
            if hs_name is None:
                raise GuidanceTypeError(
                    f"block {path!r} ({type(module).__name__}) takes no hidden states "
                    f"argument, so SLG cannot pass its input on"
                )
            what = f"block {path!r} ({type(module).__name__})"

            def forward(*args: Any, **kwargs: Any) -> Any:
                route = self.route(path)
                if route is None:
                    return original(*args, **kwargs)
                runs = _split(route, "block")
                shuffles = tuple(
                    seg for seg in route.segments if getattr(seg[2], "skip", None) == "shuffle"
                )
                if not shuffles and not any(skipped for _, _, skipped in runs):
                    return original(*args, **kwargs)
                rows = route.rows
                bound = sig.bind(*args, **kwargs)
                hs = bound.arguments.get(hs_name)
                if not isinstance(hs, torch.Tensor) or hs.shape[0] != rows:
                    got = tuple(hs.shape) if isinstance(hs, torch.Tensor) else type(hs).__name__
                    raise GuidanceValueError(
                        f"{what} received {hs_name} {got} in a model call of {rows} rows: the "
                        f"model changes the batch before this block, so guidekit cannot tell "
                        f"which rows to skip"
                    )
                if shuffles:
                    hs = _shuffled(hs, shuffles, path, self.state(), what)
                    bound.arguments[hs_name] = hs
                    if not any(skipped for _, _, skipped in runs):
                        return original(*bound.args, **bound.kwargs)
                ehs = bound.arguments.get("encoder_hidden_states")
                keep = tuple((a, b) for a, b, skipped in runs if not skipped)
                if full:
                    out = original(*bound.args, **bound.kwargs)
                elif keep:
                    _slice_arguments(sig, bound, rows, keep)
                    out = original(*bound.args, **bound.kwargs)
                else:  # every row skipped: the block is not run at all
                    return (ehs, hs) if two_stream else hs
                compact = not full
                if two_stream:
                    if not (isinstance(out, (tuple, list)) and len(out) == 2):
                        raise GuidanceTypeError(
                            f"{what} returned {type(out).__name__}; a two-stream block returns "
                            f"(encoder_hidden_states, hidden_states)"
                        )
                    return (_merge(out[0], ehs, runs, compact, what),
                            _merge(out[1], hs, runs, compact, what))
                if not isinstance(out, torch.Tensor):
                    raise GuidanceTypeError(
                        f"{what} returned {type(out).__name__}; SLG skips blocks that return "
                        f"their hidden states (one tensor) or two-stream blocks "
                        f"({', '.join(TWO_STREAM)}): name such blocks instead"
                    )
                return _merge(out, hs, runs, compact, what)

            return forward

        return make

    def _attention_forward(self, block: str, path: str) -> Callable[[Any], Callable[..., Any]]:
        def make(original: Any) -> Callable[..., Any]:
            what = f"attention {path!r}"

            def forward(*args: Any, **kwargs: Any) -> Any:
                out = original(*args, **kwargs)
                route = self.route(block)
                runs = _split(route, "attention") if route is not None else ()
                if not any(skipped for _, _, skipped in runs):
                    return out
                return _zero(out, runs, route.rows, what)

            return forward

        return make

    def describe(self) -> str:
        return "\n".join(f"  {p!r}: {', '.join(ps)}" for p, ps in self.layers.items())


def _slice_arguments(
    sig: inspect.Signature, bound: inspect.BoundArguments, rows: int, ranges: Ranges
) -> None:
    """Cut every row tensor of ``bound`` (first axis = the call's rows) to ``ranges``."""

    def cut(name: str, value: Any) -> Any:
        return _take(value, ranges) if _is_rows(name, value, rows) else value

    for name, value in list(bound.arguments.items()):
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            bound.arguments[name] = {k: cut(k, v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            bound.arguments[name] = tuple(cut(name, v) for v in value)
        else:
            bound.arguments[name] = cut(name, value)
