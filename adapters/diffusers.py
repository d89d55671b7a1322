"""diffusers adapter: guidekit expressions in unmodified diffusers pipelines.

Classic pipelines (``DiTPipeline``, ``PixArtAlphaPipeline``, ``StableDiffusion3Pipeline``,
``FluxPipeline``, ``StableDiffusionPipeline`` and others with the same loop)::

    from guidekit import CFG, APG
    from guidekit.adapters.diffusers import guided

    with guided(pipe, CFG(5) | APG(eta=0)) as run:
        image = pipe(prompt, guidance_scale=5).images[0]   # the expression's scale, or none

For the duration of the ``with`` block the denoiser's ``forward`` is replaced (an instance
attribute; the class and every other module are untouched, and the attribute is removed on
exit, also on errors and KeyboardInterrupt). The pipeline's own CFG batch becomes guidekit's:
its rows are split into the ``cond`` and ``uncond`` conditionings, the pipeline's timestep is
mapped to guidekit's noise level through the pipeline's scheduler, the compiled plan runs
(one model call per forward group per step), and the guided prediction is returned in *every*
half of the batch. The pipeline then computes ``u + g (c - u)`` with ``u = c = guided``, which
is exactly ``guided``: the expression alone guides. A scale passed in the call must be the
expression's (``guidance_scale``; Flux: ``true_cfg_scale``, with a negative prompt), and
``> 1`` for the pipeline to prepare the unconditional rows; ``guidance_rescale=phi`` is
honoured as ``expr | Rescale(phi)``; any other guidance argument of the call is refused by
name (see ``_diffusers_arguments``). With the scale at 1 only expressions that need no
unconditional branch run.

Attention-space terms (``CFG(5) + PAG(3)``) need no set-up: for the block, guidekit's attention
engine is installed on the denoiser, and the perturbed rows ride in the same call as the
conditional and unconditional ones. ``CADS`` anneals the token embeddings of text pipelines
(pooled ones untouched) and DiT's class-label embedding (see ``_diffusers_cads``).

Named conditionings (``CFG(7, negative="neg")``, ``Cond("style")``) take their prompts from
``guided(pipe, expr, prompts={"neg": "blurry"})``: encoded once per pipeline call by the
pipeline's own ``encode_prompt`` (DiT: class labels), their rows in the same batched call,
ControlNet residuals included (see ``_diffusers_prompts`` and ``_diffusers_controlnet``).

Modular pipelines take a ``guider=`` component: :class:`GuidekitGuidance` (imported lazily
from this module; it subclasses diffusers' ``BaseGuidance``).

Importing this module does not import diffusers; using it does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from guidekit import Noise, compile, parse
from guidekit.branch import MAIN
from guidekit.compiled import call_slot, is_compiled
from guidekit.compiled import swap as _swap
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.expr import Expr
from guidekit.plan import Plan
from guidekit.runner import check_model_values, check_models
from guidekit.spaces import as_noise, check_prediction

from ._diffusers_arguments import wrap_call
from ._diffusers_cads import ClassEmbeddingCADS, label_embedders
from ._diffusers_cads import adapt as cads_plans
from ._diffusers_controlnet import ControlNetRows
from ._diffusers_layout import Layout, as_layout, denoiser_of, layout_for
from ._diffusers_pools import default_pools, plan_pools
from ._diffusers_prompts import NamedPrompts, check_prompts
from ._diffusers_rows import NOT_ROW_ARGS, SHARED_ROW_ARGS
from ._diffusers_run import GuidedForward, GuidedPipeline
from ._diffusers_schedule import conventions

if TYPE_CHECKING:
    from ._diffusers_guider import GuidekitGuidance

__all__ = [
    "NOT_ROW_ARGS", "SHARED_ROW_ARGS", "GuidedPipeline", "GuidekitGuidance", "Layout", "guided",
    "layout_for",
]


@contextlib.contextmanager
def guided(
    pipe: Any,
    expr: Expr | Plan | str,
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
    prompts: Mapping[str, Any] | None = None,
) -> Iterator[GuidedPipeline]:
    """Guide an unmodified diffusers pipeline with ``expr`` inside the ``with`` block.

    Args:
        pipe: a classic diffusers pipeline with a ``transformer`` or ``unet``.
        expr: a guidance expression or its text (compiled for the pipeline's scheduler), or
            a compiled :class:`~guidekit.Plan` (used as is: its conventions must match the
            scheduler's).
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
        prompts: the named conditionings the expression reads (``Cond("style")``,
            ``CFG(7, negative="neg")``), e.g. ``{"neg": "blurry", "style": "a painting"}``:
            each is encoded once per pipeline call by the pipeline's own ``encode_prompt``
            (with the call's arguments), one string for every sample or a list with one per
            prompt of the call. Class-label pipelines (DiT) take class labels (ints or label
            names). The pipeline's ``prompt`` stays ``cond``, its ``negative_prompt`` ``uncond``.
            ICG's pool is a list of ``P`` candidates, ``{"icg": ["a cat", "a dog", ...]}``,
            one drawn per sample per step (DiT: class labels, by default every real label).

    Yields:
        A :class:`GuidedPipeline` with the plan and a record of the model calls.

    CADS anneals the token embeddings (``encoder_hidden_states``) of text pipelines and the
    class-label embedding of DiT-style transformers (see :mod:`._diffusers_cads`).
    """
    _check_keywords(expr, models, seed, prediction, sigma_fn, denoiser, around_call)
    module = denoiser if denoiser is not None else denoiser_of(pipe)
    if isinstance(module.__dict__.get(call_slot(module)), GuidedForward):
        raise GuidanceValueError("this denoiser is already inside guided(...); nesting is not supported")
    layout = as_layout(layout, pipe)
    if max_rows is None and not isinstance(expr, Plan) and is_compiled(module):
        # a compiled denoiser: a timing trial of a second split would recompile it
        max_rows = "one call"
    plan = _plan(pipe, parse(expr) if isinstance(expr, str) else expr, prediction, noise, max_rows,
                 checked=sigma_fn is None)
    models = dict(models or {})
    check_models(plan, [MAIN, *models], example="other_transformer")
    modules: dict[str, Any] = {MAIN: module, **models}
    check_model_values(plan, modules, where="guided(pipe): ", example="other_transformer")
    # Everything that can refuse (CADS's and the engines' checks) runs before anything changes.
    embedders = label_embedders(module)
    class_labels = bool(embedders)
    classes = getattr(embedders[0][1], "num_classes", None) if embedders else None
    named = _prompts(pipe, plan, prompts, class_labels, classes)
    plan, step_plan, embed_plan = cads_plans(plan, class_labels=class_labels)
    cads = None
    if embed_plan is not None:
        cads = ClassEmbeddingCADS(embed_plan, {m: modules[m] for m in embed_plan.models})
    engines = _engines(step_plan, modules) if around_call is None else {}

    def replan(e: Expr) -> tuple[Plan, Plan]:
        # a pipeline call's own extras (guidance_rescale) with the block's conventions
        again = compile(e, prediction=plan.prediction, noise=plan.noise, max_rows=plan.max_rows)
        return cads_plans(again, class_labels=class_labels)[:2]

    run = GuidedPipeline(
        pipe, plan, denoiser=module, layout=layout, models=models, seed=seed,
        sigma_fn=sigma_fn, around_call=around_call, step_plan=step_plan, engines=engines,
        cads=cads, replan=replan, prompts=named,
    )
    with contextlib.ExitStack() as undo:
        for name, engine in engines.items():
            run._engine_calls[name] = undo.enter_context(engine)
        if cads is not None:
            undo.callback(cads.remove)
            cads.install()
        undo.callback(_swap(module, call_slot(module), GuidedForward(run)))
        if callable(getattr(pipe, "prepare_latents", None)):
            undo.callback(_swap(pipe, "prepare_latents", run._prepare_latents(pipe.prepare_latents)))
        if (layout.order == "sequential" or named is not None) and callable(
            getattr(pipe, "encode_prompt", None)
        ):
            undo.callback(_swap(pipe, "encode_prompt", run._encode_prompt(pipe.encode_prompt)))
        net = getattr(pipe, "controlnet", None)
        if named is not None and not named.labels and isinstance(net, torch.nn.Module):
            run.controlnet = ControlNetRows(net, named, lambda: run._batch)
            undo.callback(_swap(net, call_slot(net), run.controlnet))
        if callable(pipe):  # pipe(...) then goes through the call hook
            undo.callback(wrap_call(pipe, run.pipeline_call))
        yield run


def _prompts(
    pipe: Any, plan: Plan, prompts: Any, class_labels: bool, classes: int | None
) -> NamedPrompts | None:
    """``prompts=`` checked against the plan's named conditionings and the pipeline."""
    encodes = callable(getattr(pipe, "encode_prompt", None))
    labels = class_labels and not encodes
    classes = classes if labels else None
    given = check_prompts(prompts, plan, labels=labels, defaults=default_pools(plan, classes))
    pools = plan_pools(plan)
    if pools and isinstance(getattr(pipe, "controlnet", None), torch.nn.Module):
        # its residuals depend on the drawn condition, which the ControlNet call precedes
        raise GuidanceValueError(
            f"{plan.expr!r} draws {pools[0]!r} from a pool, and {type(pipe).__name__} "
            f"computes ControlNet residuals per condition before guidekit draws: ICG's pools "
            f"are not supported with a ControlNet; use the pipeline without one"
        )
    if not given:
        return None
    if not encodes and not labels:
        raise GuidanceValueError(
            f"guided(prompts=...): {type(pipe).__name__} has neither an encode_prompt nor "
            f"class labels, so guidekit cannot build the named conditionings "
            f"{', '.join(map(repr, given))}; use guidekit.guide(..., conds=...) with your own "
            f"embeddings"
        )
    return NamedPrompts(pipe, given, labels=labels, pools=pools, classes=classes)


def _check_keywords(
    expr: Any, models: Any, seed: Any, prediction: Any, sigma_fn: Any, denoiser: Any,
    around_call: Any,
) -> None:
    """Refuse a keyword of :func:`guided` of the wrong kind, naming it and what it takes."""
    if not isinstance(expr, (Expr, Plan, str)):
        raise GuidanceTypeError(
            f"guided(pipe, expr): expr must be a guidance expression (CFG(4) + PAG(2)), its "
            f"text or a compiled Plan, got {type(expr).__name__}"
        )
    if models is not None and (
        not isinstance(models, Mapping)
        or not all(isinstance(k, str) and callable(v) for k, v in models.items())
    ):
        raise GuidanceTypeError(
            f"guided(models=...) must map model names to callables (modules), e.g. "
            f"models={{'weak': small_transformer}}, got {models!r:.80}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GuidanceTypeError(f"guided(seed=...) must be an int, got {seed!r:.40}")
    if prediction is not None:
        check_prediction(prediction, "guided(prediction=...)")
    for name, value in (("sigma_fn", sigma_fn), ("around_call", around_call)):
        if value is not None and not callable(value):
            raise GuidanceTypeError(
                f"guided({name}=...) must be callable or None, got {type(value).__name__}"
            )
    if denoiser is not None and not isinstance(denoiser, torch.nn.Module):
        raise GuidanceTypeError(
            f"guided(denoiser=...) must be the torch.nn.Module to wrap (default: the pipeline's "
            f"transformer or unet), got {type(denoiser).__name__}"
        )


def _plan(
    pipe: Any, expr: Any, prediction: str | None, noise: Any, max_rows: Any,
    *, checked: bool,
) -> Plan:
    """``expr`` compiled with the scheduler's conventions (or the ones given), or a given Plan
    checked against them (``checked``: no ``sigma_fn`` names the mapping instead)."""
    pred, noi = conventions(pipe.scheduler)
    if isinstance(noise, str) and noise == noi.kind:
        noise = noi  # keeps the scheduler's alphas_cumprod (CADS maps sigma to time with it)
    pred = prediction or pred
    noi = noi if noise is None else as_noise(noise)
    if not isinstance(expr, Plan):
        return compile(expr, prediction=pred, noise=noi, max_rows=max_rows)
    if max_rows is not None:
        raise GuidanceValueError(
            f"guided(max_rows={max_rows!r}) is a compile option, but expr is a compiled Plan "
            f"(max_rows={expr.max_rows!r}): compile it with max_rows=..., or pass the expression"
        )
    if checked and (expr.prediction, expr.noise.kind) != (pred, noi.kind):
        raise GuidanceValueError(
            f"the plan was compiled for prediction={expr.prediction!r}, noise="
            f"{expr.noise.kind!r}, but {type(pipe.scheduler).__name__} drives a model with "
            f"prediction={pred!r}, noise={noi.kind!r}: compile it with those, or pass the "
            f"expression"
        )
    return expr


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


def __getattr__(name: str) -> Any:
    # The guider subclasses diffusers' BaseGuidance, so it is built on first access only.
    if name == "GuidekitGuidance":
        from ._diffusers_guider import GuidekitGuidance

        return GuidekitGuidance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
