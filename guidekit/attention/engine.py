"""The per-row attention engine: perturbed branches ride in the same batched forward.

``install(model, plan)`` is a context manager. On enter it hooks every attention layer that a
perturbed branch of ``plan`` targets and yields ``around_call``, the function to pass to
:func:`guidekit.guide` (or ``Plan.step``); on exit -- normal, exception or
``KeyboardInterrupt`` -- it puts back the exact objects it replaced::

    plan = guidekit.compile(CFG(3) + PAG(2, layers=-1))
    with guidekit.attention.install(transformer, plan) as around_call:
        guided = guidekit.guide(plan, model_fn, cond=..., uncond=..., around_call=around_call)
        ...  # sample

While one model call runs, ``around_call`` holds its :class:`~guidekit.plan.RowLayout`. A
hooked layer then sends the rows of the branches whose perturbation targets it through the
perturbed attention, and ALL other rows (cond, uncond, branches perturbed elsewhere) through
the layer's own attention, unchanged and in one call, then puts the rows back in order.
Outside a guided call (no layout) a hooked layer behaves exactly as before. A layer whose
processor is diffusers' stock ``AttnProcessor2_0`` runs its projections once over all rows
and only the attention core per row range (:mod:`guidekit.attention.fused`): the same
per-row maths, fewer kernel launches.

How a layer is hooked (per module kind) is :mod:`guidekit.attention.sites`.

Layers are resolved when the engine is built (before anything is hooked): unknown or
out-of-range layers, cross-attention layers, joint text-image attention and overlapping
layers raise :class:`~guidekit.errors.GuidanceValueError` and leave the model untouched. One
engine holds a layer at a time: entering a second engine on a layer another one holds raises
(nothing of the second is installed). Runs keep their state themselves (EMAG's averages are
in each run's :class:`~guidekit.State`), so one engine serves any number of runs; threads
that sample separate runs through one engine take its model calls in turn (a lock around
each call) and get what the same runs give one after the other.
``install(torch.compile(model), plan)`` hooks the compiled wrapper's ``_orig_mod``. A
``copy.deepcopy`` or ``torch.save`` of the model during a run holds the ORIGINAL processors
and forwards (the wrappers reduce to what they wrap), so the copy runs unhooked.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch

from guidekit.attention.blocks import BlockSkipper
from guidekit.attention.call import EngineCall
from guidekit.attention.ema import Observe, Scope
from guidekit.attention.flux import TextLength, is_flux
from guidekit.attention.hooks import (
    LayerHook,
    intercepting_forward,
    restore_all,
)
from guidekit.attention.layers import LayerTable, check_disjoint, layer_table, resolve_layers
from guidekit.attention.modifiers import ModifierHooks
from guidekit.attention.ops import AttentionPerturbation, perturbations_in
from guidekit.attention.processors import RowAwareModuleProcessor, RowAwareProcessor, processor_for
from guidekit.attention.route import Route, Segment, add_block
from guidekit.attention.sdpa import Frame, perturbed_sdpa
from guidekit.attention.seg import InputSize
from guidekit.attention.sites import layer_hook
from guidekit.branch import COND, MAIN
from guidekit.compiled import original_module
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.plan import Plan, RowLayout


class AttentionEngine:
    """Hooks the attention layers a plan's perturbed branches target (see module docstring).

    Use it as a context manager (``with install(model, plan) as around_call``). ``layers``
    maps each perturbation to the module paths it targets (resolved from the model);
    ``table`` is the model's named layer list.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan,
        *,
        model_name: str = MAIN,
        attention_class: type | tuple[type, ...] | None = None,
        grid: tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(plan, Plan):
            raise GuidanceTypeError(
                f"install(model, plan) takes a compiled plan (guidekit.compile(...)), got "
                f"{type(plan).__name__}"
            )
        model = original_module(model)
        self.model = model
        self.plan = plan
        self.model_name = model_name
        perts = perturbations_in(plan.branches)
        for p in perts:
            if not isinstance(p, AttentionPerturbation):
                raise GuidanceValueError(
                    f"the plan's perturbation {p!r} is not an attention perturbation; the "
                    f"attention engine cannot apply it (its rows would silently equal c)"
                )
        for b in plan.branches:
            if b.perturbation is not None and b.model != model_name:
                raise GuidanceValueError(
                    f"branch {b.label} perturbs model {b.model!r}, but this engine is installed "
                    f"on {model_name!r}"
                )
        # SLG skips blocks, TPG shuffles their tokens (guidekit.attention.blocks): resolved
        # against the BLOCK list
        skips = tuple(p for p in perts if getattr(p, "skips_blocks", False))
        self.skipper = BlockSkipper(model, skips, self.route, attention_class=attention_class,
                                    state=lambda: self._state)
        mine = tuple(
            p for p in perts if isinstance(p, AttentionPerturbation) and p not in skips
        )
        self.table: LayerTable | None = None
        self.layers: dict[AttentionPerturbation, tuple[str, ...]] = {}
        if mine:
            self.table = layer_table(model, attention_class=attention_class)
            for p in mine:
                spec = p.layers
                check = getattr(p, "check_model", None)  # EMAG's presets name themselves
                if check is not None and spec is not None and self.table.paths:
                    check(len(self.table.paths), self.table.architecture)
                default = getattr(p, "default_layers", None)
                if spec is None and default is not None and self.table.paths:
                    spec = default(self.table.paths, self.table.architecture)
                self.layers[p] = resolve_layers(model, self.table, spec, what=repr(p))
                if getattr(p, "single_layer", False) and len(self.layers[p]) != 1:
                    raise GuidanceValueError(
                        f"{p!r} reads ONE attention map; layers selects "
                        f"{len(self.layers[p])}: {', '.join(self.layers[p])}"
                    )
        paths = tuple(dict.fromkeys(p for ps in self.layers.values() for p in ps))
        check_disjoint(paths)
        self.layers.update(self.skipper.layers)
        # SEG's blur needs each layer's token grid: the model input's spatial size
        self.input_size = InputSize(model, grid)
        self._needs_size = any(getattr(p, "needs_grid", False) for p in mine)
        # Flux: which tokens are the image's is known from the model call's text length
        self.text_length = TextLength(model) if is_flux(model) else None
        self._hooks = [self._plan_hook(path) for path in paths]
        # the plan's attention modifiers (PLADIS, GAG, NAG): their own layers and hooks
        self.modifiers = ModifierHooks(
            model, plan, model_name=model_name, attention_class=attention_class, taken=paths,
            text_length=self.text_length,
        )
        self._targets: dict[str, frozenset[AttentionPerturbation]] = {
            path: frozenset(p for p, ps in self.layers.items() if path in ps)
            for path in (*paths, *self.skipper.paths)  # block paths get routes, not hooks
        }
        self._routes: dict[Any, dict[str, Route]] = {}
        self._active: dict[str, Route] | None = None
        self._state: Any = None
        # ops that keep state across steps (EMAG's averages, SAG's captured map): each has
        # selected(), observe() and a source conditioning
        self._stateful: tuple[Any, ...] = tuple(
            p for p in self.layers if getattr(p, "stateful", False)
        )
        self._frames: list[Frame] = []
        self._installed = False
        # the state of the call in progress (routes, layout state, frames, modifiers) is the
        # engine's: threads that share it take their model calls in turn
        self._lock = threading.RLock()

    # -- set-up ------------------------------------------------------------------------------------
    def _plan_hook(self, path: str) -> LayerHook:
        users = [p for p, ps in self.layers.items() if path in ps]
        return layer_hook(self.model, path, users, flux_text=self.text_length is not None)

    def _install(self, hook: LayerHook) -> None:
        if hook.kind == "processor":
            hook.install(lambda original: processor_for(
                self, hook.path, original, RowAwareProcessor, RowAwareModuleProcessor))
        else:
            hook.install(intercepting_forward(
                self, hook, lambda: self._open_frame(hook),
                "its perturbed rows would equal the unperturbed ones",
            ), self)

    def _open_frame(self, hook: LayerHook) -> Frame | None:
        """The frame of one call of a hooked plain module (``None``: not routed now)."""
        route = self.route(hook.path)
        if route is None:
            return None
        text = self.text_length.current(hook.path) if hook.flux and self.text_length else None
        return Frame(hook.path, route, text=text)

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> Callable[[RowLayout], contextlib.AbstractContextManager[None]]:
        if self._installed:
            raise GuidanceValueError("this attention engine is already installed")
        try:
            for hook in self._hooks:
                self._install(hook)
            self.modifiers.install()
            self.skipper.install(tuple(h.path for h in self._hooks))
            if self._needs_size:
                self.input_size.install()
            if self.text_length is not None:
                self.text_length.install()
        except BaseException:
            if self.text_length is not None:
                self.text_length.restore()
            self.input_size.restore()
            self.skipper.restore()
            self.modifiers.restore()  # takes out only the hooks it put in
            restore_all(self._hooks)
            raise
        self._installed = True
        return self.around_call

    def __exit__(self, *exc: Any) -> None:
        self._installed = False
        self._active = None
        self._state = None
        self._frames.clear()
        errors: list[BaseException] = []
        extras: tuple[Any, ...] = (self.input_size, self.skipper, self.modifiers)
        for extra in (*extras, *([self.text_length] if self.text_length is not None else [])):
            try:
                extra.restore()
            except Exception as err:
                errors.append(err)
        errors += restore_all(self._hooks)
        if errors:
            raise errors[0]

    # -- per call ----------------------------------------------------------------------------------
    def around_call(self, layout: RowLayout) -> contextlib.AbstractContextManager[None]:
        """Context manager entered around one model call (pass it as ``around_call``)."""
        if not self._installed:
            raise GuidanceValueError(
                "around_call used while the attention engine is not installed: call the model "
                "inside `with guidekit.attention.install(model, plan) as around_call:`"
            )
        return EngineCall(self, layout)

    def activate(self, layout: RowLayout) -> None:
        """Make ``layout``'s routes the active ones (called with the engine's lock held)."""
        selection = self._selection(layout) if self._stateful else ()
        # the layout's fields, not the layout: a key without its step state (which would keep
        # that step's observations, EMAG's maps, alive as long as the engine), and a tuple
        # whose hash is C-level (branches hash by identity, guidekit.branch)
        key = (layout.model, layout.rows, layout.blocks, layout.offset, layout.batch, selection)
        routes = self._routes.get(key)
        if routes is None:
            routes = self._routes[key] = self._routes_for(layout, dict(selection))
        self._active, self._state = routes, layout.state

    def active_routes(self) -> tuple[Any, Any]:
        """The active routes and step state (for :meth:`restore_routes`)."""
        return self._active, self._state

    def restore_routes(self, previous: tuple[Any, Any]) -> None:
        self._active, self._state = previous

    def _selection(self, layout: RowLayout) -> tuple[tuple[Any, str | None], ...]:
        """The layer each stateful perturbation acts in at this step (from its state)."""
        if not self._stateful:
            return ()
        fs = layout.state
        if fs is None:
            raise GuidanceValueError(
                "this plan keeps state inside the forward (EMAG), but the call's RowLayout "
                "carries no state: call the model through Plan.step or guidekit.guide"
            )
        selection = tuple(
            (p, p.selected(fs.inputs.get(p), self.layers[p])) for p in self._stateful
        )
        for p, path in selection:
            note = getattr(p, "note_selection", None)
            if note is not None:  # EMAG: the same on every rank (guidekit.parallel)
                note(fs, path)
        return selection

    def scope_kwargs(
        self, op: AttentionPerturbation, path: str, route: Route, start: int
    ) -> dict[str, Any]:
        """Extra ``attend`` arguments of a stateful op: where it runs, in which step."""
        if not getattr(op, "stateful", False):
            return {}
        return {"scope": Scope(path, self._state, route.sample(start))}

    def size_kwargs(self, op: AttentionPerturbation) -> dict[str, Any]:
        """``size``: the model input's spatial size, for ops that need a token grid (SEG)."""
        return {"size": self.input_size.size} if getattr(op, "needs_grid", False) else {}

    def op_kwargs(
        self, op: AttentionPerturbation, path: str, route: Route, start: int
    ) -> dict[str, Any]:
        """Every extra ``attend`` argument of ``op`` (:meth:`scope_kwargs`, :meth:`size_kwargs`)."""
        # the two of them inline: this runs for every perturbed segment of every call
        kwargs: dict[str, Any] = {}
        if getattr(op, "stateful", False):
            kwargs["scope"] = Scope(path, self._state, route.sample(start))
        if getattr(op, "needs_grid", False):
            kwargs["size"] = self.input_size.size
        return kwargs

    def _routes_for(
        self, layout: RowLayout, selected: dict[Any, str | None] | None = None
    ) -> dict[str, Route]:
        for branch, _, _ in layout.blocks:
            p = branch.perturbation
            if p is None:
                continue
            if layout.model != self.model_name or p not in self.layers:
                raise GuidanceValueError(
                    f"model call of {layout.model!r} has rows of {branch.label}, which this "
                    f"engine (installed for {self.plan.expr!r} on {self.model_name!r}) does "
                    f"not apply: install the engine with the plan you sample with"
                )
        selected = selected or {}
        routes: dict[str, Route] = {}
        for path, targets in self._targets.items():
            # stateful ops watch their source rows (EMAG: the conditional ones; SAG: the
            # unconditional ones) in every layer they target, at every step
            watchers = tuple(p for p in self._stateful if p in targets)
            segments: list[Segment] = []
            for branch, start, stop in layout.blocks:
                p = branch.perturbation
                op: AttentionPerturbation | None = p if p in targets else None
                if op is not None and not getattr(op, "perturbs", True):
                    op = None  # its rows differ by their input, not inside this layer
                if op is not None and op in selected and selected[op] != path:
                    op = None  # a candidate layer not selected at this step: left alone
                if p is None and layout.model == self.model_name:
                    mine = tuple(w for w in watchers if getattr(w, "source", COND) == branch.cond)
                    if mine:
                        op = Observe(mine)
                add_block(segments, start, stop, op)
            if any(op is not None for _, _, op in segments):
                routes[path] = Route(layout.rows, tuple(segments), layout.offset, layout.batch)
        return routes

    def route(self, path: str) -> Route | None:
        """The current call's route for layer ``path`` (``None``: leave the layer alone)."""
        active = self._active
        return None if active is None else active.get(path)

    def _sdpa(self, func: Any, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        return perturbed_sdpa(self, func, args, kwargs)

    # -- text ----------------------------------------------------------------------------------------
    def describe(self) -> str:
        """Each perturbation and attention modifier and the layers it targets."""
        lines = [f"attention engine on {type(self.model).__name__} ({self.model_name!r})"]
        for p, paths in self.layers.items():
            lines.append(f"  {p!r}: {', '.join(paths)}")
        if self.modifiers.layers:
            lines.append(self.modifiers.describe())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<AttentionEngine {len(self._hooks)} layer(s), installed={self._installed}>"


def install(
    model: torch.nn.Module,
    plan: Plan,
    *,
    model_name: str = MAIN,
    attention_class: type | tuple[type, ...] | None = None,
    grid: tuple[int, int] | None = None,
) -> AttentionEngine:
    """Prepare the attention hooks for ``plan`` on ``model``; use it with ``with``.

    Args:
        model: the network whose attention is perturbed (DiT / PixArt transformer, UNet, or a
            plain ``nn.Module``), not a wrapper function around it. A compiled model
            (``torch.compile(m)``) is hooked on its original module ``m`` (``_orig_mod``).
        plan: the compiled plan to sample with; its perturbed branches name the layers.
        model_name: the plan's name for this model (``"main"``).
        attention_class: for a plain module, the class (or classes) of its attention
            modules; the named layer list is every instance, in ``named_modules()`` order.
        grid: the spatial size ``(H, W)`` the attention layers' token grids are
            down-sampled from (SEG's blur); by default the engine reads it from the
            model's input at every call, which works when that is an image latent.

    Returns:
        An :class:`AttentionEngine`; entering it hooks the layers and gives ``around_call``.
        Layer errors are raised here, before anything is changed.
    """
    return AttentionEngine(
        original_module(model), plan, model_name=model_name,
        attention_class=attention_class, grid=grid,
    )
