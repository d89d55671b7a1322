"""Plumbing shared by the sampler adapters: one run's state around a compiled plan.

The adapters (:mod:`guidekit.adapters.kdiffusion`, :mod:`guidekit.adapters.flow`) only
translate a library's calling convention and prediction space; everything else -- which
branches run, the batched calls, the combine, post-processors and their state -- is
``Plan.step``. This module holds what they share: turning the ``guidance`` argument into a
plan, merging conditionings given at construction with those a sampler passes per call, and
keeping the run's :class:`~guidekit.State` (with the roll-back that adaptive solvers need),
and the inspection members every adapter object has (:class:`SamplerAdapter`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

import guidekit
from guidekit.branch import COND, MAIN, UNCOND
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.plan import CallRecord, Plan
from guidekit.runner import check_conditionings, check_models
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


def _close(a: float, b: float) -> bool:
    # the tolerance guidekit.state uses to recognise a noise level of the schedule
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)


def level_of(sigma: Any) -> float:
    """The noise level of a call as a float (the first entry of a ``[B]`` tensor)."""
    if isinstance(sigma, torch.Tensor):
        values = sigma.detach().flatten().tolist()
        if not values:
            raise GuidanceValueError("sigma is an empty tensor")
        if any(v != values[0] for v in values):
            raise GuidanceValueError(
                f"the noise level / time holds different values {values[:4]}...: guidekit "
                f"needs one level per call (every sample at the same step)"
            )
        return float(values[0])
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        return float(sigma)
    raise GuidanceTypeError(f"sigma must be a number or a tensor, got {sigma!r}")


class SamplerRun:
    """One sampling run's state, conditionings and call log around ``plan.step``.

    ``conds`` are the conditionings given at construction (name -> dict of tensors, or a
    bare tensor meaning ``{cond_key: tensor}``); a sampler's per-call extra arguments named
    like a conditioning replace them for that call. ``sigmas`` is the sampler's schedule
    (see :mod:`guidekit.state`). ``around_call`` (from :func:`guidekit.attention.install`) is
    handed to ``plan.step``, so attention-space terms (PAG, ...) run through the adapters.

    Without a schedule every evaluation at a new, lower noise level is a step, and an
    evaluation at a level *above* the current one is taken as the solver retreating (an
    adaptive solver rejected a trial step): the steps evaluated below that level are undone,
    i.e. the state returns to what it was before the first of them, and the call is a new
    step from there. A level above the run's first level still raises (a new run needs
    ``reset()``). With a schedule guidekit's own rules apply unchanged.
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
    ) -> None:
        self.plan = plan
        self.around_call = around_call
        self.models = dict(models)
        self.cond_key = cond_key
        self.adapter = adapter
        check_models(plan, self.models, where=f"{adapter}: ")
        self.conds = {n: self._as_dict(n, v) for n, v in conds.items() if v is not None}
        self._sigmas = sigmas
        self._seed = seed
        self.calls: list[CallRecord] = []
        self.reset()

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

    # -- state ----------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, sigmas: Any = ...) -> None:
        """Start a new run: fresh state, an empty call log and a fresh row splitter."""
        if seed is not None:
            self._seed = seed
        if sigmas is not ...:
            self._sigmas = sigmas
        self.state: State = self.plan.init(self._seed, self._sigmas)
        self.splitter = self.plan.splitter()
        self.calls = []
        # (level, state before the call that started that step), for roll-back
        self._history: list[tuple[float, State]] = []

    @property
    def steps(self) -> int:
        """Steps of this run so far (see the class docstring for what a step is)."""
        return self.state.steps

    def _roll_back(self, s: float) -> None:
        state = self.state
        if state.schedule is not None or state.level_sigma is None:
            return
        if s <= state.level_sigma or _close(s, state.level_sigma):
            return
        for k, (level, before) in enumerate(self._history):
            if level < s or _close(level, s):
                if k == 0 and not _close(level, s):
                    return  # above the run's first level: a new run; plan.step says so
                self.state = before
                del self._history[k:]
                return

    def __call__(
        self, x: torch.Tensor, sigma: Any, extras: Mapping[str, Any], output: str
    ) -> torch.Tensor:
        """One guided prediction at ``(x, sigma)`` in ``output`` space."""
        conds = self.conditionings(extras)
        s = level_of(sigma)
        self._roll_back(s)
        before = self.state
        y, self.state = self.plan.step(
            before, x, sigma, conds, self.models,
            splitter=self.splitter, on_call=self.calls.append, output=output,
            around_call=self.around_call,
        )
        if self.state.level > before.level:
            self._history.append((s, before))
        return y



class SamplerAdapter:
    """What the sampler adapters' objects share: a :class:`SamplerRun` and its inspection.

    A subclass translates its models (``_translate``) and calls :meth:`_start_run` from its
    constructor; ``plan``, ``around_call``, ``calls``, ``steps``, ``state`` and ``reset``
    then read or reset that run.
    """

    run: SamplerRun

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
    ) -> None:
        """Translate the main and other models and start the run around ``plan``."""
        all_models = {MAIN: model, **(models or {})}
        translated = {name: self._translate(m) for name, m in all_models.items()}
        self.run = SamplerRun(
            plan, translated, conds, sigmas=sigmas, seed=seed, cond_key=cond_key,
            adapter=adapter, around_call=around_call,
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
