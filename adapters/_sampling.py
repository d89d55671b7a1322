"""Plumbing shared by the sampler adapters: one run's state around a compiled plan.

The adapters (:mod:`guidekit.adapters.kdiffusion`, :mod:`guidekit.adapters.flow`) only
translate a library's calling convention and prediction space; everything else -- which
branches run, the batched calls, the combine, post-processors and their state -- is
``Plan.step``. This module holds what they share: turning the ``guidance`` argument into a
plan, merging conditionings given at construction with those a sampler passes per call
(:class:`SamplerRun`, a :class:`guidekit.run.Run` that owns the state, its reset and the
step recognition, with the roll-back that adaptive solvers need), and the inspection
members every adapter object has (:class:`SamplerAdapter`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

import guidekit
from guidekit.branch import COND, MAIN, UNCOND, Branch
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.finite import NonFinite
from guidekit.padding import as_tokens
from guidekit.plan import CallRecord, Plan
from guidekit.run import Run
from guidekit.run import level_of as level_of  # re-exported: the adapters read levels with it
from guidekit.runner import check_conditionings, check_model_values, check_models
from guidekit.state import State

ModelFn = Callable[..., torch.Tensor]


def as_plan(
    guidance: Any, *, prediction: str, noise: Any, max_rows: Any, adapter: str
) -> Plan:
    """A plan from an expression, guidance text or an already compiled :class:`Plan`.

    A given plan must have been compiled for the space and noise convention the adapter
    feeds it, because the adapter converts to and from exactly those.
    """
    if isinstance(guidance, Plan):
        kind = noise.kind if isinstance(noise, guidekit.Noise) else noise
        if guidance.prediction != prediction or guidance.noise.kind != kind:
            raise GuidanceValueError(
                f"{adapter}: the plan was compiled with prediction={guidance.prediction!r}, "
                f"noise={guidance.noise.kind!r} but this adapter feeds it "
                f"prediction={prediction!r}, noise={kind!r}: pass the expression instead "
                f"(the adapter compiles it) or compile(expr, prediction={prediction!r}, "
                f"noise={kind!r})"
            )
        if max_rows is not None:
            raise GuidanceValueError(
                f"{adapter}: max_rows is a compile option; the given plan already has "
                f"max_rows={guidance.max_rows!r}"
            )
        return guidance
    if isinstance(guidance, str):
        guidance = guidekit.parse(guidance)
    return guidekit.compile(guidance, prediction=prediction, noise=noise, max_rows=max_rows)


class SamplerRun(Run):
    """A :class:`~guidekit.run.Run` (``on_rise="retreat"``) with the sampler adapters'
    conditionings.

    ``conds`` are the conditionings given at construction (name -> dict of tensors, or a
    bare tensor meaning ``{cond_key: tensor}``: ``cond``, ``uncond`` and any other name an
    expression reads, ``CFG(7, negative="neg")``'s ``neg``); a sampler's per-call extra
    arguments named like a conditioning replace them for that call. ``tokens``
    (:class:`guidekit.Tokens`) says how ones of different token lengths share a call. ``sigmas`` is the sampler's schedule
    (see :mod:`guidekit.state`). ``around_call`` (from :func:`guidekit.attention.install`) is
    handed to ``plan.step``, so attention-space terms (PAG, ...) run through the adapters.

    Without a schedule every evaluation at a new, lower noise level is a step, and one at a
    level *above* the current one is an adaptive solver retreating (it rejected a trial
    step): the steps evaluated below that level are undone (see :mod:`guidekit.run`). With a
    schedule guidekit's own rules apply unchanged.
    """

    def __init__(
        self,
        plan: Plan,
        models: Mapping[str, ModelFn],
        conds: Mapping[str, Any],
        *,
        sigmas: Sequence[float] | torch.Tensor | None,
        seed: int,
        cond_key: str,
        adapter: str,
        around_call: Any = None,
        nonfinite: NonFinite = "raise",
        tokens: Any = None,
    ) -> None:
        self.models = dict(models)
        self.cond_key = cond_key
        self.adapter = adapter
        check_models(plan, self.models, where=f"{adapter}: ")
        self.conds = {n: self._as_dict(n, v) for n, v in conds.items() if v is not None}
        super().__init__(
            plan, sigmas=sigmas, seed=seed, around_call=around_call, on_rise="retreat",
            nonfinite=nonfinite, tokens=as_tokens(tokens, f"{adapter}(tokens"),
        )

    # -- conditionings ------------------------------------------------------------------------
    def _as_dict(self, name: str, value: Any) -> Mapping[str, Any]:
        if isinstance(value, torch.Tensor):
            return {self.cond_key: value}
        if isinstance(value, Mapping):
            return value
        raise GuidanceTypeError(
            f"{self.adapter}: conditioning {name!r} must be a dict of tensors (the model's "
            f"keyword arguments, batch first) or one tensor (passed as {self.cond_key}=...), "
            f"got {type(value).__name__}"
        )

    def conditionings(self, extras: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
        """Construction-time conditionings, replaced by the per-call ones of the same name."""
        named = dict(self.conds)
        allowed = set(self.plan.conditionings) | {COND, UNCOND} | set(named)
        for key, value in extras.items():
            if key not in allowed:
                raise GuidanceValueError(
                    f"{self.adapter}: extra argument {key!r} is not a conditioning of "
                    f"{self.plan.expr!r} ({', '.join(sorted(allowed))}). Per-call extras name "
                    f"conditionings, e.g. cond={{...}}, uncond={{...}}; guidance scales belong "
                    f"in the expression"
                )
            if value is not None:
                named[key] = self._as_dict(key, value)
        check_conditionings(
            self.plan, named, where=f"{self.adapter}: ",
            how="=... when building the adapter or in the sampler's extra arguments",
        )
        return named

    def __call__(
        self, x: torch.Tensor, sigma: Any, extras: Mapping[str, Any], output: str,
        keep: dict[Branch, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One guided prediction at ``(x, sigma)`` in ``output`` space (``keep``: see
        ``Plan.step``)."""
        conds = self.conditionings(extras)
        return self.step(x, sigma, conds, self.models, output=output, keep=keep)


class SamplerAdapter:
    """What the sampler adapters' objects share: a :class:`SamplerRun` and its inspection.

    A subclass translates its models (``_translate``) and calls :meth:`_start_run` from its
    constructor; ``plan``, ``around_call``, ``calls``, ``steps``, ``state`` and ``reset``
    then read or reset that run.
    """

    run: SamplerRun
    #: CFG++ stepping (adapters/_renoise.py) when the plan holds CFGpp
    _renoise: Any = None

    def _translate(self, model: Callable[..., torch.Tensor]) -> ModelFn:
        raise NotImplementedError

    def _start_run(
        self,
        plan: Plan,
        model: Callable[..., torch.Tensor],
        models: Mapping[str, Callable[..., torch.Tensor]] | None,
        conds: Mapping[str, Any],
        *,
        sigmas: Sequence[float] | torch.Tensor | None,
        seed: int,
        cond_key: str,
        adapter: str,
        around_call: Any,
        nonfinite: NonFinite = "raise",
        tokens: Any = None,
    ) -> None:
        """Translate the main and other models and start the run around ``plan``."""
        all_models = {MAIN: model, **(models or {})}
        check_model_values(plan, all_models, where=f"{adapter}: ")
        translated = {name: self._translate(m) for name, m in all_models.items()}
        self.run = SamplerRun(
            plan, translated, conds, sigmas=sigmas, seed=seed, cond_key=cond_key,
            adapter=adapter, around_call=around_call, nonfinite=nonfinite, tokens=tokens,
        )

    @property
    def plan(self) -> Plan:
        """The compiled plan (``print(obj.plan)`` shows its forward groups)."""
        return self.run.plan

    @property
    def around_call(self) -> Any:
        """The attention engine's hook handed to every ``plan.step`` (``None``: none)."""
        return self.run.around_call

    @around_call.setter
    def around_call(self, value: Any) -> None:
        self.run.around_call = value

    @property
    def calls(self) -> list[CallRecord]:
        """Every model call of this run: model, rows, branches, sigma, step."""
        return self.run.calls

    @property
    def steps(self) -> int:
        """Sampler (solver) steps seen in this run."""
        return self.run.steps

    @property
    def state(self) -> State:
        """The run's state (APG momentum, ...) after the last call."""
        return self.run.state

    def reset(self, seed: int | None = None, sigmas: Any = ...) -> None:
        """Start a new run (fresh state, empty ``calls``); optionally a new seed/schedule."""
        self.run.reset(seed, sigmas)
        if self._renoise is not None:
            self._renoise.reset(sigmas)
