"""A classic pipeline's guidance arguments under ``guided(...)``: honoured or refused by name.

Inside ``guided(pipe, expr)`` the expression alone decides the guidance: the pipeline's own
CFG combine sees the guided prediction in both halves of its batch and leaves it unchanged.
So an argument of the pipeline call that asks for guidance would be ignored; none is:

* the CFG scale (``guidance_scale``; ``true_cfg_scale`` where the pipeline has one, as Flux
  does, whose ``guidance_scale`` is then a model input): passed explicitly, it must equal the
  expression's CFG scale (the ``w`` of ``u + w (c - u)``, where the expression has ``u``), or
  be at most 1 for an expression without ``u``; it still tells the pipeline whether to
  prepare the unconditional rows;
* ``guidance_rescale=phi`` (> 0) is honoured as ``expr | Rescale(phi)`` for that call;
* every other guidance argument (``pag_scale``, ``skip_guidance_layers``, ``cfg_*``,
  ``image_guidance_scale``, ...) that is on is refused, naming it and the fix. An argument
  the adapter knows (:data:`KNOWN`) is judged by its value in the call, passed or the
  signature's default: ``StableDiffusionPAGPipeline``'s ``pag_scale`` defaults to 3, which is
  on, so leaving it out is refused too (equal to the default is not off). Any other
  guidance-looking argument is refused when passed with a value that is neither off nor its
  default (what its default does is not known here).

An argument counts as passed when the call names it; :func:`wrap_call` tells those from the
defaults by binding each call to the pipeline's ``__call__`` signature.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from guidekit.branch import UNCOND, Branch, uncond
from guidekit.combinators.rescale import CFGRescale
from guidekit.errors import GuidanceValueError
from guidekit.plan import Plan
from guidekit.renoise import sampler_term
from guidekit.terms.base import Term
from guidekit.terms.cfg import CFGTerm

#: Guidance-looking arguments that are model or ControlNet inputs, never guidance guidekit owns.
NOT_GUIDANCE = frozenset({
    "control_guidance_start", "control_guidance_end", "guidance_latents",
    "distilled_guidance_scale",
})
_GUIDANCE = re.compile(r"guidance|cfg|^pag_|^sld_|^sag_")
_HINTS = {
    "do_classifier_free_guidance": "write CFG(w) in the expression, or leave CFG out of it",
}


def scale_argument(parameters: Mapping[str, inspect.Parameter], denoiser: Any = None) -> str | None:
    """The name of the pipeline's CFG scale: ``true_cfg_scale`` where it has one (Flux's
    ``guidance_scale`` is the distilled-guidance input), else ``guidance_scale``; ``None``
    where ``guidance_scale`` only feeds the denoiser's guidance embedding and no CFG exists
    (LatentConsistencyModelPipeline: a ``time_cond_proj_dim`` UNet, no negative prompt)."""
    if "true_cfg_scale" in parameters:
        return "true_cfg_scale"
    config = getattr(denoiser, "config", None)
    embedded = getattr(config, "time_cond_proj_dim", None) is not None if config else False
    if embedded and not any(n.startswith("negative_prompt") for n in parameters):
        return None
    return "guidance_scale"


def refuse_missing_rows(expr: Any, missing: list[str], sigma: float, scale: str | None) -> None:
    """Refuse a step whose pipeline call prepared no unconditional rows the plan needs."""
    what = f"{expr!r} needs the {' and '.join(missing)} conditioning at sigma={sigma:g}"
    if scale is None:
        raise GuidanceValueError(
            f"{what}, but this pipeline has no unconditional rows: its guidance_scale feeds "
            f"the model's guidance embedding (a distilled model, no CFG). Guide it with terms "
            f"that need no unconditional branch, e.g. Cond() + PAG(2), and pass guidance_scale "
            f"as the pipeline's own"
        )
    raise GuidanceValueError(
        f"{what}, but the pipeline sent only conditional rows: call it with {scale} > 1 "
        f"(Flux: true_cfg_scale > 1 and a negative prompt) so it prepares the unconditional "
        f"batch"
    )


def cfg_scales(plan: Plan) -> set[float]:
    """The expression's CFG scales ``w``: ``1 -`` the unconditional rows' total coefficient
    by noise region (perturbed ones included: ``u' + w (c - u')``, SLG on ``u``), and the
    scale of each ``CFG`` term (``CFG(7) - 2 * (Cond("neg") - Uncond())`` guides with 7
    although ``u``'s coefficient is -4; ``CFG(7, negative="neg")`` has no ``u``)."""
    u = uncond()

    def unconditional(b: Any) -> bool:
        return isinstance(b, Branch) and attrs.evolve(b, perturbation=None) == u

    found = {
        1.0 - sum(c for b, c in p.coef_map.items() if unconditional(b))
        for _, _, p in plan.regions() if any(unconditional(b) for b in p.coef_map)
    }
    # a scheduled CFG's scale has no one value (plan.scheduled: check_scale lets v > 1 pass)
    return found | {w for w in cfg_term_scales(plan.expr) if isinstance(w, (int, float))}


#: the fields that hold a CFG-like guidance scale of a prediction term other than CFG's
#: ``scale`` (FDG's two band scales: diffusers' ``guidance_scales=[low, high]``)
_SCALE_FIELDS = ("scale", "low", "high")


def cfg_term_scales(node: Any) -> list[float]:
    """The guidance scales of the expression's CFG-like predictions: CFG, and every other
    prediction term guiding from a negative with a scale (PerpNeg, ICG, BetaCFG, CFG-Zero*,
    TCFG, FDG); not CFG++'s ``lam`` (its own range, [0, 1])."""
    if isinstance(node, CFGTerm):
        return [node.scale]
    if isinstance(node, Term) and getattr(type(node), "_kind", "") in ("prediction", "nonlinear"):
        if getattr(node, "weight", 0) == 1:
            return [getattr(node, f) for f in _SCALE_FIELDS if hasattr(node, f)]
    kids = node.children() if hasattr(node, "children") else ()
    return [w for kid in kids for w in cfg_term_scales(kid)]


@attrs.frozen
class Known:
    """A guidance argument the adapter knows: the fix to name, and the argument it needs on."""

    fix: str  # "{value}" is the call's value
    switch: str | None = None  # it acts only while this one is on (SD3's SLG scale)


#: The guidance arguments whose "off" the adapter knows (None, False, 0 or empty), judged by
#: the call's value, passed or the default: a default that is on (``pag_scale=3``, SAG's
#: ``sag_scale=0.75``, InstructPix2Pix's ``image_guidance_scale=1.5``) is refused by name.
KNOWN: dict[str, Known] = {
    "pag_scale": Known(
        "pass pag_scale=0 (guidekit's PAG(s) replaces it: write PAG(scale) in the expression, "
        "here PAG({value}))"
    ),
    "pag_adaptive_scale": Known(
        "pass pag_adaptive_scale=0 and write PAG(scale) in the expression (gate it with "
        ".between(...))", "pag_scale",
    ),
    "sag_scale": Known(
        "pass sag_scale=0 (guidekit's SAG(s) replaces it: write SAG(scale) in the expression, "
        "here SAG({value}))"
    ),
    "image_guidance_scale": Known(
        "run this pipeline outside guided(...): guidekit cannot lay out its three-way image "
        "guidance batch [text and image, image, none]"
    ),
    "skip_guidance_layers": Known(
        "pass skip_guidance_layers=None and write SLG(scale, layers=...) in the expression"
    ),
    **{
        name: Known(
            "pass skip_guidance_layers=None and write SLG(scale, layers=...) in the expression "
            "(gate it with .between(...))", "skip_guidance_layers",
        )
        for name in ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop")
    },
}


def _is_off(value: Any) -> bool:
    """Whether ``value`` turns a guidance argument off: None, False, 0 or empty."""
    if value is None or value is False or (isinstance(value, (list, tuple, str)) and not value):
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _off(value: Any, default: Any) -> bool:
    """An unknown argument's passed value: off, or its default (whose effect is not known)."""
    if _is_off(value):
        return True
    try:
        return bool(value == default)
    except Exception:  # tensors and the like: not comparable to a default, so not off
        return False


def call_value(name: str, passed: Mapping[str, Any], parameters: Mapping[str, inspect.Parameter]) -> Any:
    """The call's value of ``name``: passed, else the signature's default (``None``: neither)."""
    if name in passed:
        return passed[name]
    param = parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return param.default


def _number(name: str, value: Any) -> float:
    """``value`` as a float: any finite real scalar diffusers accepts (a Python or numpy
    number, a 0-d or one-element real tensor or array), never a bool or a complex."""
    v = _real_scalar(value)
    if v is None or not math.isfinite(v):
        raise GuidanceValueError(
            f"the pipeline call's {name}={value!r}: expected a finite real number (a Python "
            f"or numpy number, or a one-element real tensor)"
        )
    return v


def _real_scalar(value: Any) -> float | None:
    """The float of a real scalar, or None for anything else (bools count as flags)."""
    if isinstance(value, bool):  # numpy's and torch's bools are refused by their dtype
        return None
    if isinstance(value, (int, float)):
        return float(value)
    dtype = getattr(value, "dtype", None)
    size = getattr(value, "size", None)
    count = value.numel() if callable(getattr(value, "numel", None)) else size
    if dtype is None or count != 1:
        return None  # not an array-like scalar, or several values: no one scale
    kind = str(dtype)
    if "bool" in kind or "complex" in kind or not callable(getattr(value, "item", None)):
        return None
    item = value.item()
    return float(item) if isinstance(item, (int, float)) and not isinstance(item, bool) else None


def check_scale(plan: Plan, name: str, value: Any) -> None:
    """Refuse an explicit CFG scale ``name=value`` that ``plan`` does not guide with."""
    v = _number(name, value)
    scales = cfg_scales(plan)
    expr = plan.expr
    if not scales:
        if v <= 1:
            return
        lam = sampler_term(expr)
        if lam is not None:
            raise GuidanceValueError(
                f"the pipeline call's {name}={v:g} is a CFG scale, and {lam!r} guides by its "
                f"own lam (in [0, 1], not a CFG scale): leave {name} out (the pipeline's "
                f"default prepares the unconditional rows CFG++ re-noises with)"
            )
        raise GuidanceValueError(
            f"the pipeline call's {name}={v:g} asks for CFG, which {expr!r} does not contain, "
            f"and inside guided(...) the expression alone guides: write CFG({v:g}) in the "
            f"expression, or leave {name} out"
        )
    if plan.scheduled and v > 1:
        return  # a scale by noise level has no one value: > 1 only turns the u rows on
    if any(math.isclose(v, w, rel_tol=1e-9, abs_tol=1e-12) for w in scales):
        return
    if v <= 1 and not any(b.cond == UNCOND for _, _, p in plan.regions() for b in p.branches):
        return  # CFG(w, negative="neg"): no unconditional rows to prepare
    shown = ", ".join(f"{w:g}" for w in sorted(scales))
    if v <= 1:
        raise GuidanceValueError(
            f"the pipeline call's {name}={v:g} makes the pipeline skip the unconditional rows "
            f"that {expr!r} needs (its CFG scale is {shown}): call it with {name}="
            f"{min(scales):g} (a {name} > 1 makes it prepare them)"
        )
    raise GuidanceValueError(
        f"the pipeline call's {name}={v:g} is not the CFG scale of {expr!r} ({shown}), and "
        f"inside guided(...) the expression alone guides: write CFG({v:g}) in the expression, "
        f"or leave {name} out (or pass the expression's)"
    )


def rescaled(plan: Plan, phi: Any, *, passed: bool = True) -> Any:
    """The expression for a call with ``guidance_rescale=phi``: ``expr | Rescale(phi)``
    (``None``: ``plan`` already does exactly that, or ``phi`` is 0); ``passed=False``: ``phi``
    is the pipeline's default, which rescales as much as a passed one."""
    phi = _number("guidance_rescale", phi)
    if phi == 0:
        return None
    own = [p for p in plan.post if isinstance(p, CFGRescale)]
    if own:
        if len(own) == 1 and math.isclose(own[0].phi, phi):
            return None
        fix = "leave guidance_rescale out" if passed else f"pass guidance_rescale=0 (its default is {phi:g})"
        raise GuidanceValueError(
            f"the pipeline call's guidance_rescale={phi:g} would rescale {plan.expr!r} a "
            f"second time: {fix} (the expression already has {own[0]!r}) or drop Rescale "
            f"from the expression"
        )
    try:
        rescale = CFGRescale(phi)
    except (ValueError, TypeError) as err:
        raise GuidanceValueError(
            f"the pipeline call's guidance_rescale={phi:g}: guidekit honours it as "
            f"| Rescale(phi), which needs 0 <= phi <= 1 ({err})"
        ) from err
    return plan.expr | rescale


def refuse_unowned(passed: Mapping[str, Any], parameters: Mapping[str, inspect.Parameter]) -> None:
    """Refuse every other guidance argument that is on: a known one by its value in the call
    (passed or default), any other when passed with a value that is not off/default."""
    owned = {scale_argument(parameters), "guidance_rescale", "guidance_scale"}
    for name, known in KNOWN.items():
        if name not in parameters and name not in passed:
            continue
        value = call_value(name, passed, parameters)
        if _is_off(value) or (known.switch and _is_off(call_value(known.switch, passed, parameters))):
            continue
        said = (f"the pipeline call's {name}={value!r}" if name in passed else
                f"the pipeline call leaves {name} at its default {value!r}, and that")
        raise GuidanceValueError(
            f"{said} asks the pipeline for guidance of its own, which guided(...) would "
            f"ignore (the expression alone guides): {known.fix.format(value=value)}"
        )
    for name, value in passed.items():
        if name in owned or name in KNOWN or name in NOT_GUIDANCE or not _GUIDANCE.search(name):
            continue
        if name.startswith("guidance_keyframe"):
            continue  # conditioning frames of video pipelines, not a guidance scale
        param = parameters.get(name)
        default = param.default if param is not None else inspect.Parameter.empty
        if _off(value, default):
            continue
        hint = _HINTS.get(name, "write that guidance in the expression, or leave it out")
        raise GuidanceValueError(
            f"the pipeline call's {name}={value!r} asks the pipeline for guidance of its own, "
            f"which guided(...) would ignore (the expression alone guides): {hint}"
        )


def passed_arguments(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The arguments a call names (``None``: it does not bind; the pipeline will say why)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # [0] is the pipeline itself
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = value
    return out


def wrap_call(pipe: Any, hook: Callable[[dict[str, Any], Mapping[str, inspect.Parameter]], Any]) -> Callable[[], None]:
    """Route every ``pipe(...)`` call through the context manager ``hook(passed, parameters)``.

    ``pipe(...)`` looks ``__call__`` up on the class, so the pipeline is given a subclass of
    its own class (same name and module) whose ``__call__`` enters the hook around the
    original; the returned undo puts the original class back.
    """
    cls = type(pipe)
    original = cls.__call__
    signature = inspect.signature(original)
    parameters = dict(list(signature.parameters.items())[1:])

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        passed = passed_arguments(signature, (self, *args), kwargs)
        if passed is None:
            return original(self, *args, **kwargs)
        with hook(passed, parameters):
            return original(self, *args, **kwargs)

    namespace = {
        "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    guided_cls: type = type(cls.__name__, (cls,), namespace)
    object.__setattr__(pipe, "__class__", guided_cls)

    def undo() -> None:
        if type(pipe) is guided_cls:
            object.__setattr__(pipe, "__class__", cls)

    return undo
