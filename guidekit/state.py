"""Explicit run state and how a sampler *step* is recognised.

State (APG momentum, CADS step index, later EMAG averages) lives in a :class:`State` value
created by ``plan.init`` and returned anew by every ``plan.step``: two runs never share it.

A sampler may call the model several times per step (Heun, DPM-2, the SDE samplers).
guidekit advances state once per **noise level of the schedule**:

* a call at a new level (one below the last level) starts a step: its state comes from the
  previous step and its result is committed;
* a call at the level of the current step (Heun's next step evaluates again at the level
  its corrector used) recomputes from the previous step's state and replaces the commit:
  the last evaluation at a level wins;
* when the schedule ``sigmas`` is given to ``plan.init``, a call at a level that is not in
  it (the midpoints of DPM-2, DPM++ 2S, DPM++ SDE, or Euler's churned sigma) reads the state
  as committed by the current step (after it, not before) and commits nothing.

With a schedule, a call that cannot belong to the run the state follows raises instead of
silently reusing old state: a schedule level that skips levels of the schedule, or a level
off the schedule below the next level (a sampler running another schedule after
``reset()`` without its ``sigmas``, or a new run that starts below the last one's level).
Without a schedule every new noise level is a step. A level above the current one means a
new run was started on old state, which raises: call ``plan.init`` (or ``Guided.reset``).

**Names.** Each component that keeps state (APG's momentum, EMAG's averages) is one typed
value under a stable, readable name (:func:`component_names`): its kind (``"APG"``,
``"EMAG"``), and ``"#2"``, ``"#3"`` for further components of the same kind, in plan order.
Adding a component of another kind renames nothing. ``State.named()`` maps names to values.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from guidekit.checks import check_sigmas
from guidekit.errors import GuidanceTypeError, GuidanceValueError


class CallKind(enum.Enum):
    NEW = "new step"
    REPEAT = "same step again"
    MIDPOINT = "between steps"


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)


def level_of(sigma: Any, what: str = "sigma") -> float:
    """A call's one noise level: a number, or the common value of a tensor's entries."""
    if isinstance(sigma, torch.Tensor):
        values = sigma.detach().flatten().tolist()
        if not values:
            raise GuidanceValueError(f"{what} is an empty tensor")
        if any(v != values[0] for v in values):
            raise GuidanceValueError(
                f"{what} holds different values {values[:4]}... (different noise levels in one "
                f"call): guidekit needs one noise level per call (every sample at the same "
                f"step); call once per level"
            )
        return float(values[0])
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        return float(sigma)
    raise GuidanceTypeError(f"{what} must be a number or a tensor, got {sigma!r}")


def _kind(component: Any) -> str:
    """The readable kind of a stateful component: its ``state_name``, else its term name."""
    name = getattr(component, "state_name", None) or getattr(type(component), "_name", None)
    return str(name or type(component).__name__)


def keeps_state(component: Any) -> bool:
    """Whether ``component`` keeps run state (its ``init_state()`` is not ``None``)."""
    init = getattr(component, "init_state", None)
    return init is not None and init() is not None


def component_names(components: Sequence[Any]) -> tuple[str, ...]:
    """Stable names for ``components`` in plan order: the kind, then ``#2``, ``#3``... for
    further components of the same kind (``("APG", "EMAG", "EMAG#2")``)."""
    seen: dict[str, int] = {}
    names = []
    for c in components:
        kind = _kind(c)
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}#{seen[kind]}")
    return tuple(names)


def named_parts(parts: Sequence[Any]) -> list[tuple[str | None, Any]]:
    """Each of ``parts`` with its state name (:func:`component_names` over the parts that
    keep state; ``None`` for the others), in order."""
    keep = [keeps_state(p) for p in parts]
    names = iter(component_names([p for p, k in zip(parts, keep) if k]))
    return [(next(names) if k else None, p) for p, k in zip(parts, keep)]


@attrs.frozen(eq=False)
class State:
    """One run's state: the step index and each stateful component's value, by name.

    ``components`` are the stateful parts' names (:func:`component_names`) in plan order;
    ``before`` holds their values at the start of the current step, ``current`` after it
    (tuples in the order of ``components``; :meth:`named` gives them by name).
    """

    seed: int
    schedule: tuple[float, ...] | None
    components: tuple[str, ...]
    before: tuple[Any, ...]
    current: tuple[Any, ...]
    level: int = -1
    level_sigma: float | None = None

    @property
    def steps(self) -> int:
        """Steps started so far."""
        return self.level + 1

    def named(self) -> dict[str, Any]:
        """Each component's current state by name (``{"APG": APGState(...), "EMAG": ...}``)."""
        return dict(zip(self.components, self.current))

    def classify(self, sigma: float) -> CallKind:
        if self.level_sigma is not None and _close(sigma, self.level_sigma):
            return CallKind.REPEAT
        if self.schedule is not None and not any(_close(sigma, s) for s in self.schedule):
            if self.level_sigma is None:
                raise GuidanceValueError(
                    f"the first call's noise level sigma={sigma:g} is not in the schedule given "
                    f"to plan.init(sigmas=...): the sampler runs another schedule; pass the "
                    f"sigmas it samples with (reset(sigmas=...) on a guided model)"
                )
            self._check_next(sigma)
            return CallKind.MIDPOINT
        if self.level_sigma is not None and sigma > self.level_sigma:
            raise GuidanceValueError(
                f"the noise level rose from sigma={self.level_sigma:g} to {sigma:g}: that starts a "
                f"new sampling run, which needs fresh state. Call plan.init(...) again (or "
                f"reset() on the guided model) before each run"
            )
        self._check_next(sigma)
        return CallKind.NEW

    def _check_next(self, sigma: float) -> None:
        """A call below the current step must not pass a level of the schedule: the run's
        next step is the schedule's next level (midpoints lie above it)."""
        if self.schedule is None or self.level_sigma is None or sigma >= self.level_sigma:
            return
        passed = [
            s for s in self.schedule
            if sigma < s < self.level_sigma and not _close(s, sigma)
            and not _close(s, self.level_sigma)
        ]
        if passed:
            raise GuidanceValueError(
                f"a call at sigma={sigma:g} follows the step at sigma={self.level_sigma:g}, "
                f"passing the schedule's level{'s' if len(passed) > 1 else ''} "
                f"{', '.join(f'{s:g}' for s in passed[:3])}: this is not the run of the "
                f"schedule the state follows ({len(self.schedule)} levels given as sigmas). A "
                f"new run, or another schedule, needs fresh state: call plan.init(seed, sigmas) "
                f"(reset(sigmas=...) on a guided model) with the sampler's own sigmas"
            )

    def inputs(self, kind: CallKind) -> dict[str, Any]:
        """Component states a call of ``kind`` computes from, by name."""
        values = self.before if kind is CallKind.REPEAT else self.current
        return dict(zip(self.components, values))

    def level_for(self, kind: CallKind) -> int:
        return self.level + 1 if kind is CallKind.NEW else max(self.level, 0)

    def after(self, kind: CallKind, sigma: float, results: Mapping[str, Any]) -> State:
        """The state once a call of ``kind`` at ``sigma`` produced ``results`` (by name)."""
        if kind is CallKind.MIDPOINT:
            return self
        try:
            values = tuple([results[n] for n in self.components])
        except KeyError:
            missing = [n for n in self.components if n not in results]
            raise GuidanceValueError(
                f"no next state for the component(s) {', '.join(missing)}"
            ) from None
        # the constructor itself: attrs.evolve reads every field's definition at each call,
        # and this runs once per model call
        if kind is CallKind.NEW:
            return State(self.seed, self.schedule, self.components, self.current, values,
                         self.level + 1, sigma)
        return State(self.seed, self.schedule, self.components, self.before, values,
                     self.level, self.level_sigma)


def check_order(schedule: tuple[float, ...]) -> tuple[float, ...]:
    """``schedule`` if its levels never rise; else an error naming the first rise (a
    sampler steps from high noise to low, and state follows it step by step)."""
    for i in range(len(schedule) - 1):
        if schedule[i + 1] > schedule[i]:
            raise GuidanceValueError(
                f"sigmas[{i}] = {schedule[i]:g} < sigmas[{i + 1}] = {schedule[i + 1]:g}: a "
                f"schedule runs from high noise to low, as the sampler steps; pass the "
                f"sampler's sigmas in its own order (a reversed schedule: flip it)"
            )
    return schedule


def new_state(
    seed: int, components: Sequence[tuple[str, Any]], sigmas: Sequence[float] | None
) -> State:
    """Fresh state for ``components`` (``(name, component)`` pairs, see :func:`component_names`)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GuidanceValueError(f"seed must be an int, got {seed!r}")
    schedule = None
    if sigmas is not None:
        schedule = check_order(check_sigmas(sigmas, "sigmas"))
    names = tuple(n for n, _ in components)
    if len(set(names)) != len(names):
        raise GuidanceValueError(f"state component names must be unique, got {names}")
    values = tuple(c.init_state() for _, c in components)
    return State(seed=seed, schedule=schedule, components=names, before=values, current=values)


@attrs.define(eq=False)
class ForwardState:
    """What the model calls of one step see of the run state, and what they observe.

    ``Plan.step`` makes one per step and hands it to ``around_call`` through each call's
    :class:`~guidekit.plan.RowLayout`. ``inputs`` maps each stateful perturbation to its
    state as the step starts (chosen by the rules above: a repeated level recomputes from
    the previous step's state, a midpoint reads the current one); it is read, never
    written. Whatever observes the forward (the attention engine) hands the step's
    observations back in ``memos`` (EMAG: this step's maps of the conditional rows; SAG: the
    map its second call needs); after the forward ``Plan.step`` computes each component's
    next state from its input and its observations -- a pure function, the component's
    ``commit`` -- and commits it under the component's name. Nothing here outlives the
    step, so runs never share it.
    """

    batch: int
    level: int
    inputs: dict[Any, Any]
    memos: dict[Any, Any] = attrs.field(factory=dict)
    #: the step's conditionings as the model sees them (after input modifiers), by name
    conds: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    #: each gated or scheduled attention modifier as it acts this step (resolved to numbers;
    #: ``None``: off this step), see :func:`guidekit.schedules.steps.modifier_at`
    modifiers: dict[Any, Any] = attrs.field(factory=dict)
    #: the run's seed (TPG's token permutations are drawn from it and ``level``)
    seed: int = 0
    #: whether to make :attr:`key` (``Plan.step`` asks only for a plan that reads it)
    keyed: bool = True
    #: ``[seed mod 2**63, level]`` as an int64 tensor, made here, outside the model call:
    #: randomness drawn inside a compiled forward reads it as a graph input (a Python int
    #: there would be a compile-time constant, recompiled at every step). ``None`` when not
    #: ``keyed``: a tensor made per step is an operator no other plan needs
    key: torch.Tensor | None = attrs.field(init=False)

    @key.default
    def _key(self) -> torch.Tensor | None:
        if not self.keyed:
            return None
        return torch.tensor([self.seed % 2**63, self.level], dtype=torch.int64)

    def memo(self, owner: Any, factory: Any) -> Any:
        """The step's scratch value of ``owner``, made by ``factory()`` on first use."""
        value = self.memos.get(owner)
        if value is None:
            value = self.memos[owner] = factory()
        return value
