"""The one owner of a sampling run's state: :class:`Run`.

Every way of sampling with guidekit -- :func:`guidekit.guide`, the k-diffusion and flow
adapters -- holds one :class:`Run` around its compiled :class:`~guidekit.Plan`. The run owns:

* the :class:`~guidekit.State` (APG momentum, CADS's step, EMAG's averages) and its reset
  (``reset(seed, sigmas)``: fresh state, an empty call log; ``start(sigmas)``: fresh state,
  the call log kept, ``runs`` counted -- for callers that see many runs, such as a pipeline
  called repeatedly inside one ``with`` block);
* the row splitter (one per run: ``max_rows="auto"``'s timing table);
* the call log (``calls``: one :class:`~guidekit.plan.CallRecord` per model call);
* step recognition. How a call's noise level relates to the step is the state's rule
  (:mod:`guidekit.state`: a new lower level is a step, the same level again recomputes it
  -- Heun, a level off the schedule reads it -- DPM-2's midpoints, Euler's churn); what a
  level *above* the current step means is the caller's, ``on_rise``:

  - ``"raise"``: a new run on old state, an error (call ``reset()``);
  - ``"retreat"``: without a schedule, an adaptive solver that rejected a trial step and
    evaluates again at its start: the steps evaluated below that level are undone (the
    state returns to what it was before the first of them); a level above the run's first
    one still raises;
  - ``"restart"``: a new run starts by itself (``start()`` with the run's ``sigmas``), as a
    pipeline that is simply called again does.

Nothing here knows a library: an adapter translates its calling convention and calls
:meth:`Run.step` with guidekit's ``(x, sigma, conds, models)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from guidekit.branch import Branch
from guidekit.checks import check_cond_tensors, check_sigmas
from guidekit.errors import GuidanceValueError, NonFiniteError
from guidekit.finite import NonFinite, StepWatch, check_policy
from guidekit.padding import Tokens, as_tokens
from guidekit.plan import CallRecord, ModelFn, Plan
from guidekit.state import CallKind, ForwardState, State
from guidekit.state import level_of as state_level_of

OnRise = Literal["raise", "retreat", "restart"]
_ON_RISE = ("raise", "retreat", "restart")


def close(a: float, b: float) -> bool:
    """The tolerance :mod:`guidekit.state` uses to recognise a noise level of the schedule."""
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)


def level_of(sigma: Any) -> float:
    """The noise level of a call as a float (the first entry of a ``[B]`` tensor)."""
    return state_level_of(sigma, what="the noise level / time")


class Run:
    """One sampling run around ``plan``: state, splitter, call log and step recognition.

    ``sigmas`` is the sampler's schedule (see :mod:`guidekit.state`; ``None``: every new
    lower level is a step), ``seed`` seeds CADS and TPG, ``around_call`` (from
    :func:`guidekit.attention.install`) is handed to every ``plan.step``, ``on_rise`` says
    what a level above the current step means (see the module docstring), ``nonfinite``
    what a NaN or inf in a model output or the guided output does (:mod:`guidekit.finite`:
    ``"raise"`` a :class:`~guidekit.errors.NonFiniteError` naming the step, sigma, branch and
    terms; ``"warn"`` once per run), ``tokens`` how conditionings of different token
    lengths share a call (:class:`~guidekit.padding.Tokens`: padded under the model's mask,
    repeated, or, undeclared, separate calls).
    """

    def __init__(
        self,
        plan: Plan,
        *,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        seed: int = 0,
        around_call: Any = None,
        on_rise: OnRise = "raise",
        nonfinite: NonFinite = "raise",
        tokens: Tokens | Sequence[Tokens] | None = None,
    ) -> None:
        if on_rise not in _ON_RISE:
            raise GuidanceValueError(
                f"Run(on_rise={on_rise!r}): use one of {', '.join(map(repr, _ON_RISE))}"
            )
        self.plan = plan
        self.around_call = around_call
        self.tokens = as_tokens(tokens)
        self.on_rise: OnRise = on_rise
        self.nonfinite: NonFinite = check_policy(nonfinite, type(self).__name__)
        self.runs = 0
        self._sigmas = sigmas
        self._seed = seed
        self._calls: list[CallRecord] = []
        self.reset()

    @property
    def calls(self) -> list[CallRecord]:
        """Every model call of the run so far (:class:`~guidekit.rows.CallRecord`)."""
        return self._calls

    @calls.setter
    def calls(self, calls: list[CallRecord]) -> None:
        # the run's non-finite watch logs into the list the run holds now
        self._calls = calls
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.log = calls.append

    # -- starting runs --------------------------------------------------------------------------
    def start(self, sigmas: Any = ..., seed: int | None = None, plan: Plan | None = None) -> None:
        """Start a new run, keeping the call log: fresh state and a fresh row splitter.

        ``plan`` replaces the run's plan from this run on (a pipeline call that brings its
        own ``guidance_rescale``, say); the call log keeps the calls of earlier plans.
        """
        if plan is not None:
            self.plan = plan
        if seed is not None:
            self._seed = seed
        if sigmas is not ...:
            self._sigmas = sigmas
        if isinstance(self._sigmas, torch.Tensor) and self._sigmas.ndim != 1:
            check_sigmas(self._sigmas, "sigmas")  # refuses it: plan.init would flatten it
        self.state: State = self.plan.init(self._seed, self._sigmas)
        self.splitter = self.plan.splitter()
        self.last_sigma: float | None = None  # the level of the last call, midpoints included
        # (level, state before the call that started that step), for "retreat"
        self._history: list[tuple[float, State]] = []
        self._warned: set[str] = set()  # nonfinite="warn": one warning per kind and run
        self._watch = StepWatch(self.plan, self._warned, self._calls.append)
        self._levels: list[float] = []  # every level this run called, midpoints included
        self._seen: list[float] | None = None  # see reset(): the levels a kept schedule allows
        self.runs += 1

    def reset(self, seed: int | None = None, sigmas: Any = ...) -> None:
        """Start a new run with an empty call log (optionally a new seed / schedule).

        Without ``sigmas`` the run keeps its schedule. A sampler whose schedule changed
        cannot be told from one that evaluates between the levels (a 9-step schedule holds
        every level of a 5-step one on the same ramp, and its other levels look like DPM-2's
        midpoints), so such a run only accepts the off-schedule levels the previous run
        called: a new one is an error that asks for ``reset(sigmas=...)``.
        """
        kept = sigmas is ... and self._sigmas is not None and self.runs > 0
        seen = list(self._levels) if kept else None
        self.start(sigmas, seed)
        self.calls = []
        self._seen = seen

    @property
    def steps(self) -> int:
        """Steps of this run so far."""
        return self.state.steps

    @property
    def seed(self) -> int:
        """The seed of the current run (CADS's noise, TPG's token orders)."""
        return self._seed

    # -- step recognition -----------------------------------------------------------------------
    def rose(self, sigma: float) -> bool:
        """True when ``sigma`` lies above the last call's level (a new run or a retreat)."""
        last = self.last_sigma
        return last is not None and sigma > last * (1 + 1e-6) + 1e-12

    def _retreat(self, s: float) -> None:
        state = self.state
        if state.schedule is not None or state.level_sigma is None:
            return
        if s <= state.level_sigma or close(s, state.level_sigma):
            return
        for k, (level, before) in enumerate(self._history):
            if level < s or close(level, s):
                if k == 0 and not close(level, s):
                    return  # above the run's first level: a new run; plan.step says so
                self.state = before
                del self._history[k:]
                return

    def _check_kept(self, s: float) -> None:
        """After ``reset()`` without sigmas: a level between the kept schedule's levels that
        the previous run never called means the schedule changed (see :meth:`reset`)."""
        if self._seen is None or any(close(s, v) for v in self._seen):
            return
        if self.state.level_sigma is None or self.state.classify(s) is not CallKind.MIDPOINT:
            return
        raise GuidanceValueError(
            f"sigma={s:g} lies between the levels of the schedule this run kept from before "
            f"reset(), and the previous run never called it: if the sampler's schedule "
            f"changed (another number of steps), pass reset(sigmas=new_sigmas); if the "
            f"sampler evaluates between its levels, pass the same sigmas to reset(sigmas=...) "
            f"to confirm them"
        )

    def _recognise(self, s: float) -> None:
        if self.on_rise == "retreat":
            self._retreat(s)
        elif self.on_rise == "restart" and self.rose(s):
            self.start()

    def forward_state(self, batch: int, sigma: float) -> ForwardState:
        """The :class:`~guidekit.state.ForwardState` of a step at ``sigma`` (each stateful
        perturbation's input state, chosen as ``Plan.step`` chooses it), for callers whose
        model calls run before the step is combined (a modular pipeline's guider)."""
        kind = self.state.classify(sigma)
        return ForwardState(
            batch=batch, level=self.state.level_for(kind),
            inputs=self.plan.perturbation_inputs(self.state.inputs(kind)), seed=self.state.seed,
        )

    # -- one call -------------------------------------------------------------------------------
    def step(
        self,
        x: torch.Tensor,
        sigma: Any,
        conds: Mapping[str, Mapping[str, Any]],
        models: Mapping[str, ModelFn],
        *,
        output: str | None = None,
        around_call: Any = ...,
        level: float | None = None,
        native: Mapping[Branch, torch.Tensor] | None = None,
        keep: dict[Branch, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One guided prediction at ``(x, sigma)`` in ``output`` space; advances the state.

        ``level`` is ``sigma`` as a float when the caller already has it; ``around_call``
        overrides the run's for this call; ``native`` hands over branch outputs the caller
        computed itself (a guider inside someone else's loop, see ``Plan.step``); ``keep``
        receives the step's branch outputs (the CFG++ adapters re-noise with one).
        """
        # with on_rise="raise" plan.step reads and checks sigma itself, so errors stay its own
        s = level if level is not None or self.on_rise == "raise" else level_of(sigma)
        if s is not None:
            self._recognise(s)
        if self._seen is not None:
            self._check_kept(s if s is not None else level_of(sigma))
        check_cond_tensors(conds, self.plan.conditionings, x)
        before = self.state
        batch = x.shape[0] if isinstance(x, torch.Tensor) and x.ndim else 1
        watch = self._watch
        watch.begin(batch, before.schedule, self.nonfinite)
        try:
            y, after = self.plan.step(
                before, x, sigma, conds, watch.models(models),
                splitter=self.splitter, on_call=watch.on_call, output=output,
                around_call=self.around_call if around_call is ... else around_call,
                native=native, tokens=self.tokens, keep=keep,
            )
        except Exception as err:
            # the model outputs are checked with the guided output; where the step fails
            # before that, a NaN in them (often the cause) is reported first
            try:
                watch.settle()
            except NonFiniteError as bad:
                raise bad from err
            raise
        records = watch.records
        if s is None:  # the level plan.step read (each call record holds it)
            s = records[-1].sigma if records else level_of(sigma)
        step = records[-1].step if records else after.level
        if native is not None:
            watch.native(native, step, s)
        watch.output(y, step, s)
        self.state = after  # after the check: a refused step leaves the state as it was
        self.last_sigma = s
        self._levels.append(s)
        if self.on_rise == "retreat" and self.state.level > before.level:
            # only a retreat reads it; kept otherwise it would hold every step's state
            self._history.append((s, before))
        return y


__all__ = ["OnRise", "Run", "close", "level_of"]
