"""diffusers adapter: guidekit expressions in unmodified diffusers pipelines.

Classic pipelines (``DiTPipeline``, ``PixArtAlphaPipeline``, ``StableDiffusion3Pipeline``,
``FluxPipeline``, ``StableDiffusionPipeline`` and others with the same loop)::

    from guidekit import CFG, APG
    from guidekit.adapters.diffusers import guided

    with guided(pipe, CFG(5) | APG(eta=0)) as run:
        image = pipe(prompt, guidance_scale=5).images[0]   # guidance_scale > 1: see below

For the duration of the ``with`` block the denoiser's ``forward`` is replaced (an instance
attribute; the class and every other module are untouched, and the attribute is removed on
exit, also on errors and KeyboardInterrupt). The pipeline's own CFG batch becomes guidekit's:
its rows are split into the ``cond`` and ``uncond`` conditionings, the pipeline's timestep is
mapped to guidekit's noise level through the pipeline's scheduler, the compiled plan runs
(one model call per forward group per step), and the guided prediction is returned in *every*
half of the batch. The pipeline then computes ``u + g (c - u)`` with ``u = c = guided``, which
is exactly ``guided``: its own guidance scale no longer matters, but it must be **> 1** (Flux:
``true_cfg_scale > 1`` and a negative prompt) for the pipeline to prepare the unconditional
rows. With the scale at 1 only expressions that need no unconditional branch run.

Attention-space terms (``CFG(5) + PAG(3)``) need no set-up: for the block, guidekit's attention
engine is installed on the denoiser, and the perturbed rows ride in the same call as the
conditional and unconditional ones. ``CADS`` anneals the token embeddings of text pipelines
(pooled ones untouched) and DiT's class-label embedding (see ``_diffusers_cads``).

Modular pipelines take a ``guider=`` component: :class:`GuidekitGuidance` (imported lazily
from this module; it subclasses diffusers' ``BaseGuidance``).

Importing this module does not import diffusers; using it does.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import torch

from guidekit import GuidanceValueError, Noise, compile
from guidekit.branch import COND, MAIN, UNCOND
from guidekit.compiled import call_slot, current_call, forward_class
from guidekit.compiled import swap as _swap
from guidekit.expr import Expr
from guidekit.plan import CallRecord, Plan, RowLayout
from guidekit.runner import check_models

from ._diffusers_cads import ClassEmbeddingCADS, label_embedders
from ._diffusers_cads import adapt as cads_plans
from ._diffusers_rows import NOT_ROW_ARGS, SHARED_ROW_ARGS, fill, first_difference, take_apart
from ._diffusers_schedule import conventions, schedule_of, sigma_for

if TYPE_CHECKING:
    from ._diffusers_guider import GuidekitGuidance

__all__ = [
    "NOT_ROW_ARGS", "SHARED_ROW_ARGS", "GuidedPipeline", "GuidekitGuidance", "Layout", "guided",
    "layout_for",
]

DIT_NULL_CLASS = 1000  # the label DiTPipeline hard-codes for its unconditional rows


@attrs.frozen
class Layout:
    """How a pipeline batches its CFG rows for the denoiser.

    ``order``: ``"uncond_first"`` (one call, rows ``[uncond, cond]``: SD, SDXL, SD3, PixArt),
    ``"cond_first"`` (one call, ``[cond, null]``: DiT) or ``"sequential"`` (two calls per step
    with ``B`` rows each, conditional first: Flux's ``true_cfg_scale``).
    ``timestep_scale`` multiplies the timestep the denoiser receives into scheduler units
    (Flux passes ``t / 1000``).
    """

    order: str = attrs.field(
        validator=attrs.validators.in_(("uncond_first", "cond_first", "sequential"))
    )
    timestep_scale: float = 1.0
    null_class: int | None = None


def layout_for(pipe: Any) -> Layout:
    """The :class:`Layout` of a classic diffusers pipeline, by its class."""
    names = [c.__name__ for c in type(pipe).__mro__]
    if "DiTPipeline" in names:
        return Layout("cond_first", null_class=DIT_NULL_CLASS)
    own = names[0]
    if "FluxPipeline" in names or (own.startswith("Flux") and not own.startswith("Flux2")):
        scale = float(pipe.scheduler.config.get("num_train_timesteps", 1000))
        return Layout("sequential", timestep_scale=scale)
    return Layout("uncond_first")


def _denoiser_of(pipe: Any) -> torch.nn.Module:
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise GuidanceValueError(
        f"{type(pipe).__name__} has no transformer or unet component: pass denoiser=..."
    )


def _sample_of(out: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser's output (tensor, tuple or ``...Output``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise GuidanceValueError(
        f"the denoiser returned {type(out).__name__}; expected a tensor, a tuple whose first "
        f"item is the prediction, or an output object with .sample"
    )


def _like(proto: Any, sample: torch.Tensor) -> Any:
    """``sample`` in the structure of the original output ``proto`` (what the pipeline reads)."""
    if isinstance(proto, torch.Tensor):
        return sample
    if isinstance(proto, tuple):
        return (sample, *proto[1:])
    if isinstance(proto, list):
        return [sample, *proto[1:]]
    if isinstance(proto, Mapping):  # diffusers' BaseOutput is an ordered dict of its fields
        fields = {k: (sample if k == "sample" else v) for k, v in proto.items()}
        return type(proto)(**fields)
    raise GuidanceValueError(f"cannot rebuild a denoiser output of type {type(proto).__name__}")


def _tile(v: torch.Tensor, k: int) -> torch.Tensor:
    return v if k == 1 else v.repeat(k, *([1] * (v.ndim - 1)))


@attrs.define(eq=False)
class _Call:
    """One denoiser call, normalised: keyword arguments by name and the rows they hold."""

    x_name: str
    x: torch.Tensor
    arguments: dict[str, Any]

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def timestep(self) -> float:
        t = self.arguments.get("timestep")
        if t is None:
            raise GuidanceValueError("the denoiser was called without a timestep")
        values = torch.as_tensor(t).detach().flatten().double().cpu()
        if values.numel() == 0 or not bool((values == values[0]).all()):
            raise GuidanceValueError(
                "the denoiser got different timesteps in one call; guidekit needs one noise "
                "level per call"
            )
        return float(values[0])


@attrs.define(eq=False)
class _Split:
    """A call's rows split into guidekit's inputs: ``x`` (B rows), conditionings, the rest."""

    x: torch.Tensor
    conds: dict[str, dict[str, torch.Tensor]]
    shared: dict[str, torch.Tensor]
    template: dict[str, Any]  # the arguments, per-row tensors as Leaf placeholders


class GuidedPipeline:
    """The run object of :func:`guided`: the plan, and what happened inside the block.

    ``calls`` lists every model call guidekit made (model, rows, branches, sigma, step) across
    all pipeline runs of the block; ``runs`` counts the pipeline runs; ``steps`` is the number
    of steps of the current run. ``plan`` is the plan as run (CADS's keys made explicit);
    ``engines`` the attention engines installed for the block, by model name.
    """

    def __init__(
        self,
        pipe: Any,
        plan: Plan,
        *,
        denoiser: torch.nn.Module,
        layout: Layout,
        models: Mapping[str, Callable[..., Any]],
        seed: int,
        sigma_fn: Callable[[float], float] | None,
        around_call: Any,
        step_plan: Plan | None = None,
        engines: Mapping[str, Any] | None = None,
        cads: ClassEmbeddingCADS | None = None,
    ) -> None:
        self.pipe = pipe
        self.plan = plan
        # what Plan.step runs: the plan less the CADS that a label-embedding hook applies
        self._step_plan = plan if step_plan is None else step_plan
        self.engines: dict[str, Any] = dict(engines or {})
        self._engine_calls: dict[str, Callable[[RowLayout], Any]] = {}
        self._cads = cads
        self._at: tuple[Any, torch.Tensor, float] | None = None  # (state, x, sigma) of the step
        self.denoiser = denoiser
        self.layout = layout
        self.models = dict(models)
        self.seed = seed
        self.sigma_fn = sigma_fn
        self.around_call = around_call
        self.calls: list[CallRecord] = []
        self.runs = 0
        # the compiled callable when the denoiser is compiled (see guidekit.compiled)
        self._orig: Callable[..., Any] = current_call(denoiser)
        # Arguments are named by the class's forward: an instance-level forward (an
        # offloading hook, say) may take just *args, **kwargs.
        params = list(inspect.signature(forward_class(denoiser).forward).parameters.values())
        self._signature = inspect.Signature(params[1:])
        self._state: Any = None
        self._splitter: Any = None
        self._last_sigma: float | None = None
        self._new_run = True
        self._batch: int | None = None  # the pipeline's sample batch, from prepare_latents
        self._encodes = 0  # encode_prompt calls before this run's latents (Flux: 2 = CFG on)
        self._sequential_cfg: bool | None = None
        self._pending: tuple[_Call, torch.Tensor] | None = None

    @property
    def steps(self) -> int:
        return 0 if self._state is None else int(self._state.steps)

    # -- hooks installed on the pipeline -----------------------------------------------------------
    def _prepare_latents(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def prepare_latents(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            lat = out[0] if isinstance(out, (tuple, list)) else out
            self._batch = int(lat.shape[0]) if isinstance(lat, torch.Tensor) else None
            self._sequential_cfg = self._encodes >= 2
            self._encodes = 0
            self._new_run = True
            self._pending = None
            return out

        return prepare_latents

    def _encode_prompt(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            self._encodes += 1
            return orig(*args, **kwargs)

        return encode_prompt

    # -- the denoiser's replacement forward ---------------------------------------------------------
    def _normalise(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        bound = self._signature.bind(*args, **kwargs)
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise GuidanceValueError("the denoiser got extra positional arguments")
            else:
                arguments[name] = value
        x_name = next(iter(self._signature.parameters))
        x = arguments.get(x_name)
        if not isinstance(x, torch.Tensor):
            raise GuidanceValueError(f"the denoiser's first argument {x_name!r} is not a tensor")
        return _Call(x_name, x, arguments)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Stands in for ``denoiser.forward`` inside the ``with`` block."""
        call = self._normalise(args, kwargs)
        if call.arguments.get("skip_layers") is not None:
            raise GuidanceValueError(
                "the pipeline asked for a skip-layer pass (skip_guidance_layers=...); inside "
                "guided(...) write that guidance in the expression instead"
            )
        if self.layout.order == "sequential":
            return self._forward_sequential(call)
        return self._forward_batched(call)

    def _cfg_batched(self, call: _Call) -> bool:
        n = call.rows
        if self._batch is not None:
            if n == 2 * self._batch:
                return True
            if n == self._batch:
                return False
            raise GuidanceValueError(
                f"the denoiser got {n} rows for a batch of {self._batch} samples; expected "
                f"{self._batch} (no CFG) or {2 * self._batch} (the CFG batch)"
            )
        if n % 2:
            return False
        if self.layout.null_class is not None:
            labels = call.arguments.get("class_labels")
            return isinstance(labels, torch.Tensor) and bool(
                (labels[n // 2 :] == self.layout.null_class).all()
            )
        # no prepare_latents seen (a custom pipeline): a CFG batch repeats the latents
        return torch.equal(call.x[: n // 2], call.x[n // 2 :])

    def _split(self, call: _Call, blocks: dict[str, slice]) -> _Split:
        """Split ``call``'s rows into conditionings (``blocks`` names their row ranges)."""
        first = next(iter(blocks.values()))
        batch = int(call.x[first].shape[0])
        parts = take_apart(call.arguments, call.x_name, call.rows, batch)
        conds = {name: {p: v[rows] for p, v in parts.rows.items()} for name, rows in blocks.items()}
        shared = {p: v[first] for p, v in parts.shared.items()}
        return _Split(call.x[first], conds, shared, parts.template)

    def _forward_batched(self, call: _Call) -> Any:
        n = call.rows
        if self._cfg_batched(call):
            b = n // 2
            lo, hi = slice(0, b), slice(b, n)
            if not torch.equal(call.x[lo], call.x[hi]):
                raise GuidanceValueError(
                    "the two halves of the pipeline's CFG batch carry different latents; "
                    "guided(...) expects the batch [x, x] that classic pipelines build"
                )
            if self.layout.order == "cond_first":
                split = self._split(call, {COND: lo, UNCOND: hi})
            else:
                split = self._split(call, {UNCOND: lo, COND: hi})
        else:
            b = n
            split = self._split(call, {COND: slice(0, n)})
        sample, proto, extra = self._guide(call, split, b)
        return _like(proto, self._assemble(sample, extra, n // b))

    def _forward_sequential(self, call: _Call) -> Any:
        if self._pending is None and not self._sequential_cfg:
            split = self._split(call, {COND: slice(0, call.rows)})
            sample, proto, extra = self._guide(call, split, call.rows)
            return _like(proto, self._assemble(sample, extra, 1))
        if self._pending is None:
            # The conditional call: its result needs the unconditional rows of the next call.
            # Return a placeholder now and fill it in place when that call arrives.
            placeholder = torch.empty_like(call.x)
            self._pending = (call, placeholder)
            if call.arguments.get("return_dict") is False:
                return (placeholder,)
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=placeholder)
        cond_call, placeholder = self._pending
        self._pending = None
        if cond_call.timestep() != call.timestep() or not torch.equal(cond_call.x, call.x):
            raise GuidanceValueError(
                "expected the pipeline's unconditional call at the same step as its conditional "
                "one (same latents and timestep)"
            )
        b = call.rows
        cond_split = self._split(cond_call, {COND: slice(0, b)})
        uncond_split = self._split(call, {UNCOND: slice(0, b)})
        name = first_difference(cond_split.template, uncond_split.template)
        if name is not None:
            raise GuidanceValueError(
                f"the conditional and unconditional calls differ at {name!r}, which is not "
                f"per-row; pad both prompts to the same length so their rows share a batch"
            )
        cond_split.conds[UNCOND] = uncond_split.conds[UNCOND]
        sample, proto, extra = self._guide(cond_call, cond_split, b)
        out = self._assemble(sample, extra, 1)
        placeholder.copy_(out)
        return _like(proto, out)

    def _assemble(self, sample: torch.Tensor, extra: torch.Tensor | None, blocks: int) -> torch.Tensor:
        out = sample if extra is None else torch.cat([sample, extra], dim=1)
        return _tile(out, blocks)

    def _sigma(self, call: _Call) -> tuple[float, bool]:
        t = call.timestep() * self.layout.timestep_scale
        if self.sigma_fn is not None:
            return float(self.sigma_fn(t)), False
        return sigma_for(self.pipe.scheduler, t)

    def _start_run(self, exact: bool) -> None:
        schedule = schedule_of(self.pipe.scheduler) if exact and self.sigma_fn is None else None
        self._state = self._step_plan.init(self.seed, schedule)
        self._splitter = self._step_plan.splitter()
        self._new_run = False
        self.runs += 1

    def _guide(
        self, call: _Call, split: _Split, batch: int
    ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        sigma, exact = self._sigma(call)
        rose = self._last_sigma is not None and sigma > self._last_sigma * (1 + 1e-6) + 1e-12
        if self._state is None or self._new_run or rose:
            self._start_run(exact)
        self._last_sigma = sigma
        program = self._step_plan.program(sigma)
        missing = sorted({b.cond for b in program.branches} - split.conds.keys())
        if missing:
            raise GuidanceValueError(
                f"{self.plan.expr!r} needs the {' and '.join(missing)} conditioning at sigma="
                f"{sigma:g}, but the pipeline sent only conditional rows: call it with "
                f"guidance_scale > 1 (Flux: true_cfg_scale > 1 and a negative prompt) so it "
                f"prepares the unconditional batch"
            )
        c = int(split.x.shape[1]) if split.x.ndim > 1 else 0
        found: dict[str, Any] = {"proto": None, "extra": []}

        def make(fn: Callable[..., Any], main: bool) -> Callable[..., torch.Tensor]:
            def model(x_rows: torch.Tensor, sigma_rows: torch.Tensor, **cond_rows: Any) -> torch.Tensor:
                k = x_rows.shape[0] // batch
                values = {name: _tile(v, k) for name, v in split.shared.items()}
                kwargs = fill(split.template, {**values, **cond_rows})
                kwargs[call.x_name] = x_rows
                out = fn(**kwargs)
                if found["proto"] is None:
                    found["proto"] = out
                pred = _sample_of(out)
                if pred.shape != x_rows.shape and pred.ndim == x_rows.ndim and pred.shape[1] == 2 * c:
                    # learned sigma (DiT, PixArt): guide the first C channels; the variance
                    # channels come from the first branch of the main model's call
                    if main:
                        found["extra"].append(pred[:, c:])
                    pred = pred[:, :c]
                return pred

            return model

        fns = {MAIN: make(self._orig, True)}
        for name, m in self.models.items():
            fns[name] = make(m, False)
        self._at = (self._state, split.x, sigma)
        try:
            sample, self._state = self._step_plan.step(
                self._state, split.x, sigma, split.conds, fns,
                splitter=self._splitter, on_call=self.calls.append,
                around_call=self._around if self._needs_around() else None,
            )
        finally:
            self._at = None
        extra = None
        if found["extra"]:
            extra = torch.cat(found["extra"])[:batch]
        return sample, found["proto"], extra

    # -- around each model call: attention engines, CADS on class embeddings, the user's hook -----
    def _needs_around(self) -> bool:
        return bool(self.around_call is not None or self._engine_calls or self._cads is not None)

    @contextlib.contextmanager
    def _around(self, layout: RowLayout) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.around_call is not None:
                stack.enter_context(self.around_call(layout))
            engine_call = self._engine_calls.get(layout.model)
            if engine_call is not None:
                stack.enter_context(engine_call(layout))
            if self._cads is not None and self._at is not None:
                stack.enter_context(self._cads.call(layout, self._at))
            yield


@contextlib.contextmanager
def guided(
    pipe: Any,
    expr: Expr | Plan,
    *,
    models: Mapping[str, Callable[..., Any]] | None = None,
    seed: int = 0,
    layout: Layout | str | None = None,
    prediction: str | None = None,
    noise: str | Noise | None = None,
    max_rows: int | str | None = None,
    sigma_fn: Callable[[float], float] | None = None,
    denoiser: torch.nn.Module | None = None,
    around_call: Any = None,
) -> Iterator[GuidedPipeline]:
    """Guide an unmodified diffusers pipeline with ``expr`` inside the ``with`` block.

    Args:
        pipe: a classic diffusers pipeline with a ``transformer`` or ``unet``.
        expr: a guidance expression (compiled for the pipeline's scheduler) or a compiled
            :class:`~guidekit.Plan` (used as is: its conventions must match the scheduler's).
        models: extra models by name, e.g. ``{"weak": small_transformer}`` for Autoguidance;
            called with the same arguments as the denoiser.
        seed: seeds CADS; every pipeline run in the block starts from fresh state.
        layout: how the pipeline batches CFG (default: from the pipeline's class, see
            :func:`layout_for`); a :class:`Layout` or its ``order`` string.
        prediction, noise: override the conventions read from ``pipe.scheduler``.
        max_rows: the plan's row budget (see :func:`guidekit.compile`).
        sigma_fn: maps the timestep (scheduler units) to sigma, overriding the scheduler.
        denoiser: the module to wrap (default ``pipe.transformer`` or ``pipe.unet``).
        around_call: entered around every model call with its row layout (see
            ``Plan.step``). Leave it out for attention-space terms (PAG, SEG, SLG, EMAG,
            PLADIS, ...): the attention engine is then installed on the denoiser (and on
            other models with perturbed branches) for the block; given, it replaces that
            engine (install your own with :func:`guidekit.attention.install`).

    Yields:
        A :class:`GuidedPipeline` with the plan and a record of the model calls.

    CADS anneals the token embeddings (``encoder_hidden_states``) of text pipelines and the
    class-label embedding of DiT-style transformers (see :mod:`._diffusers_cads`).
    """
    module = denoiser if denoiser is not None else _denoiser_of(pipe)
    if isinstance(module.__dict__.get(call_slot(module)), _GuidedForward):
        raise GuidanceValueError("this denoiser is already inside guided(...); nesting is not supported")
    if isinstance(layout, str):
        layout = Layout(layout)
    if layout is None:
        layout = layout_for(pipe)
    pred, noi = conventions(pipe.scheduler)
    if isinstance(noise, str) and noise == noi.kind:
        noise = noi  # keeps the scheduler's alphas_cumprod (CADS maps sigma to time with it)
    pred = prediction or pred
    noi = Noise(noise) if isinstance(noise, str) else (noise or noi)
    if isinstance(expr, Plan):
        plan = expr
        if sigma_fn is None and (plan.prediction, plan.noise.kind) != (pred, noi.kind):
            raise GuidanceValueError(
                f"the plan was compiled for prediction={plan.prediction!r}, noise="
                f"{plan.noise.kind!r}, but {type(pipe.scheduler).__name__} drives a model with "
                f"prediction={pred!r}, noise={noi.kind!r}: compile it with those, or pass the "
                f"expression"
            )
    else:
        plan = compile(expr, prediction=pred, noise=noi, max_rows=max_rows)
    models = dict(models or {})
    check_models(plan, [MAIN, *models], example="other_transformer")
    modules: dict[str, Any] = {MAIN: module, **models}
    # Everything that can refuse (CADS's and the engines' checks) runs before anything changes.
    plan, step_plan, embed_plan = cads_plans(plan, class_labels=bool(label_embedders(module)))
    cads = None
    if embed_plan is not None:
        cads = ClassEmbeddingCADS(embed_plan, {m: modules[m] for m in embed_plan.models})
    engines = _engines(step_plan, modules) if around_call is None else {}
    run = GuidedPipeline(
        pipe, plan, denoiser=module, layout=layout, models=models, seed=seed,
        sigma_fn=sigma_fn, around_call=around_call, step_plan=step_plan, engines=engines,
        cads=cads,
    )
    with contextlib.ExitStack() as undo:
        for name, engine in engines.items():
            run._engine_calls[name] = undo.enter_context(engine)
        if cads is not None:
            undo.callback(cads.remove)
            cads.install()
        undo.callback(_swap(module, call_slot(module), _GuidedForward(run)))
        if callable(getattr(pipe, "prepare_latents", None)):
            undo.callback(_swap(pipe, "prepare_latents", run._prepare_latents(pipe.prepare_latents)))
        if layout.order == "sequential" and callable(getattr(pipe, "encode_prompt", None)):
            undo.callback(_swap(pipe, "encode_prompt", run._encode_prompt(pipe.encode_prompt)))
        yield run


def _engines(plan: Plan, modules: Mapping[str, Any]) -> dict[str, Any]:
    """An attention engine per model whose forward the plan changes (PAG's perturbed branch,
    PLADIS, ...), built (layers resolved and checked) but not installed yet."""
    names = {b.model for b in plan.branches if b.perturbation is not None}
    if plan.attention:
        names.add(MAIN)
    if not names:
        return {}
    from guidekit.attention import install

    engines = {}
    for name in sorted(names, key=lambda n: (n != MAIN, n)):
        target = modules.get(name)
        if not isinstance(target, torch.nn.Module):
            raise GuidanceValueError(
                f"{plan.expr!r} changes the attention inside model {name!r}, which needs the "
                f"module itself (got {type(target).__name__}): pass the transformer in models=, "
                f"or install the engine yourself and pass around_call="
            )
        engines[name] = install(target, plan, model_name=name)
    return engines


class _GuidedForward:
    """The callable installed as ``denoiser.forward`` (a marker type against nesting)."""

    def __init__(self, run: GuidedPipeline) -> None:
        self.run = run

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run.forward(*args, **kwargs)


def __getattr__(name: str) -> Any:
    # The guider subclasses diffusers' BaseGuidance, so it is built on first access only.
    if name == "GuidekitGuidance":
        from ._diffusers_guider import GuidekitGuidance

        return GuidekitGuidance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
