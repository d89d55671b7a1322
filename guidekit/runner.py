"""The custom-sampler API: a guided model callable ``(x, sigma) -> prediction`` for one run."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from guidekit.branch import COND, MAIN, UNCOND
from guidekit.checks import check_first_level
from guidekit.compiled import original_module
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.finite import NonFinite, terms_using
from guidekit.padding import Tokens, as_tokens
from guidekit.plan import ModelFn, Plan
from guidekit.renoise import renoised, renoiser
from guidekit.run import Run, level_of


def check_models(
    plan: Plan, models: Iterable[str], *, where: str = "", example: str = "weak_model"
) -> None:
    """Raise unless every model the plan calls is among ``models`` (names).

    ``where`` prefixes the message (an adapter's name); ``example`` is the value shown in
    the suggested ``models={...}``.
    """
    given = set(models)
    missing = [m for m in plan.models if m not in given]
    if missing:
        users = [b.label for b in plan.branches if b.model in missing]
        raise GuidanceValueError(
            f"{where}{plan.expr!r} needs model(s) {', '.join(map(repr, missing))} (for "
            f"{', '.join(users)}): pass models={{{missing[0]!r}: {example}}}"
        )


def _network(model: Any) -> tuple[Any, str]:
    """The network a model callable runs and through which method: ``torch.compile``
    wrappers removed, a module's bound ``forward`` / ``__call__`` read as the module."""
    model = original_module(model)
    owner = getattr(model, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        name = getattr(model, "__name__", "")
        return original_module(owner), "__call__" if name in ("forward", "__call__") else name
    return model, "__call__"


def _same_model(a: Any, b: Any) -> bool:
    """``a`` and ``b`` run one network the same way (the same object, under compile wrappers,
    or as its bound forward)."""
    (na, ma), (nb, mb) = _network(a), _network(b)
    return na is nb and ma == mb


def check_model_values(
    plan: Plan, models: Mapping[str, Any], *, where: str = "", example: str = "weak_model"
) -> None:
    """Raise unless every model in ``models`` (name -> model, ``main`` the main one) is a
    callable and no other model is the main model itself.

    Autoguidance against the main model adds ``w (c - c) = 0``: nothing, silently.
    """
    main = models.get(MAIN)
    for name, model in models.items():
        if not callable(model):
            raise GuidanceTypeError(
                f"{where}models[{name!r}] is a {type(model).__name__}, not a model: pass the "
                f"network itself, a callable model(x, sigma, **cond), e.g. "
                f"models={{{name!r}: {example}}}"
            )
        if name != MAIN and main is not None and _same_model(model, main):
            users = [b for b in plan.branches if b.model == name]
            terms = list(dict.fromkeys(t for b in users for t in terms_using(plan.expr, b)))
            raise GuidanceValueError(
                f"{where}models[{name!r}] is the main model itself, so "
                f"{', '.join(terms) or repr(plan.expr)} would compare the model with itself "
                f"and add nothing: pass a weaker model (a smaller or less-trained network, an "
                f"earlier checkpoint) as models={{{name!r}: {example}}}"
            )


def check_conditionings(
    plan: Plan, conds: Iterable[str], *, where: str = "",
    how: str = "={...} (a dict of tensors, batch first)",
) -> None:
    """Raise unless every conditioning the plan reads is among ``conds`` (names).

    The message suggests passing the first missing one as ``<name><how>``.
    """
    given = set(conds)
    absent = [c for c in plan.conditionings if c not in given]
    if absent:
        raise GuidanceValueError(
            f"{where}{plan.expr!r} needs the conditioning(s) {', '.join(map(repr, absent))}: "
            f"pass {absent[0]}{how}"
        )


class Guided(Run):
    """A :class:`~guidekit.run.Run` bound to its models and conditionings: call it like a
    denoiser.

    ``guided(x, sigma)`` runs every forward group of the active branches (one model call
    each, unless a row budget splits it), combines the rows and returns the guided
    prediction in ``output`` space (default: the model's own). ``calls`` records every model
    call; ``reset()`` starts a new run with fresh state (state, splitter and step
    recognition are the :class:`~guidekit.run.Run`'s).
    """

    def __init__(
        self,
        plan: Plan,
        model: ModelFn,
        *,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any] | None = None,
        conds: Mapping[str, Mapping[str, Any]] | None = None,
        models: Mapping[str, ModelFn] | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        seed: int = 0,
        output: str | None = None,
        around_call: Any = None,
        nonfinite: NonFinite = "raise",
        tokens: Tokens | Sequence[Tokens] | None = None,
        sampler: str | None = None,
        eta: float | None = None,
    ) -> None:
        # CFG++ needs the sampler's step: the loop names it (sampler="euler"); None without it
        self._renoise = renoiser(plan, sampler, sigmas, "guide()", eta=eta)
        self.models: dict[str, ModelFn] = {MAIN: model, **(models or {})}
        named: dict[str, Mapping[str, Any]] = {COND: cond}
        if uncond is not None:
            named[UNCOND] = uncond
        named.update(conds or {})
        for name, value in named.items():
            if not isinstance(value, Mapping):
                arg = name if name in (COND, UNCOND) else f"conds[{name!r}]"
                raise GuidanceTypeError(
                    f"guide({arg}=...) is a {type(value).__name__}; a conditioning is a dict "
                    f"of the model's keyword tensors, batch first, e.g. {arg}={{'y': labels}} "
                    f"for model(x, sigma, y=labels)"
                )
        self.conds = named
        self.output = output
        check_model_values(plan, self.models)
        check_models(plan, self.models)
        check_conditionings(plan, named)
        super().__init__(
            plan, sigmas=sigmas, seed=seed, around_call=around_call, nonfinite=nonfinite,
            tokens=as_tokens(tokens, "guide(tokens"),
        )

    def reset(self, seed: int | None = None, sigmas: Any = ...) -> None:
        super().reset(seed, sigmas)
        renoise = getattr(self, "_renoise", None)  # set before Run.__init__ resets
        if renoise is not None:  # CFG++: a new run (and schedule)
            renoise.reset(sigmas)

    def __call__(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        if self.state.level_sigma is None and self.state.schedule is not None:
            check_first_level(level_of(sigma), self.state.schedule, "guide")
        if self._renoise is None:
            return self.step(x, sigma, self.conds, self.models, output=self.output)
        return renoised(
            self._renoise,
            lambda keep: self.step(x, sigma, self.conds, self.models, output=self.output, keep=keep),
            x, level_of(sigma), self.output or self.plan.prediction,
        )


def guide(
    plan: Plan,
    model: ModelFn | Callable[..., torch.Tensor],
    *,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Guided:
    """Wrap ``model(x, sigma, **cond) -> prediction`` for a hand-written sampler loop.

    ``cond`` and ``uncond`` are dicts of tensors (batch first) passed to the model as keyword
    arguments; ``models`` names extra models (``{"weak": ...}`` for Autoguidance); ``sigmas``
    is the sampler's schedule (optional, see :mod:`guidekit.state`); ``seed`` seeds CADS and TPG;
    ``nonfinite="warn"`` only warns (once per run) where a NaN or inf in a model output or
    the guided output would raise :class:`~guidekit.errors.NonFiniteError`. ``conds`` names
    other conditionings (``{"neg": {...}}`` for ``CFG(7, negative="neg")``); ``tokens``
    (:class:`~guidekit.padding.Tokens`) says how ones of different token lengths share a
    call: padded under the model's attention mask, repeated where that is exact, or, by
    default, as separate calls (``calls[i].tokens`` and ``print(plan)`` say which).

    ``sampler`` is for ``CFGpp`` (CFG++, which re-noises inside the step): the step your
    loop takes with the returned prediction -- ``"euler"`` (``x + (sigma_next - sigma) d``
    in the plan's noise convention), or k-diffusion's ``"euler_ancestral"`` / ``"dpmpp_2m"``
    (VE) -- with ``sigmas`` the schedule; the prediction returned then makes that step the
    CFG++ step (:mod:`guidekit.renoise`). ``"euler_ancestral"`` needs the ``eta`` your
    loop's ancestral step uses, explicitly (no default). Without ``sampler`` CFGpp is refused.
    """
    return Guided(plan, model, cond=cond, uncond=uncond, **kwargs)
