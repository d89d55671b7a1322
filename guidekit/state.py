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

Without a schedule every new noise level is a step. A level above the current one means a
new run was started on old state, which raises: call ``plan.init`` (or ``Guided.reset``).
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


@attrs.frozen(eq=False)
class State:
    """One run's state: the step index and each stateful component's value.

    ``before`` holds the components' state at the start of the current step, ``current``
    after it. ``components`` lists the stateful parts' names in plan order.
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
        """Each component's current state by name, for inspection."""
        return dict(zip(self.components, self.current))

    def classify(self, sigma: float) -> CallKind:
        if self.level_sigma is not None and _close(sigma, self.level_sigma):
            return CallKind.REPEAT
        if self.schedule is not None and not any(_close(sigma, s) for s in self.schedule):
            if self.level_sigma is None:
                raise GuidanceValueError(
                    f"the first call's noise level sigma={sigma:g} is not in the schedule given "
                    f"to plan.init(sigmas=...): pass the sampler's own sigmas"
                )
            return CallKind.MIDPOINT
        if self.level_sigma is not None and sigma > self.level_sigma:
            raise GuidanceValueError(
                f"the noise level rose from sigma={self.level_sigma:g} to {sigma:g}: that starts a "
                f"new sampling run, which needs fresh state. Call plan.init(...) again (or "
                f"reset() on the guided model) before each run"
            )
        return CallKind.NEW

    def inputs(self, kind: CallKind) -> tuple[Any, ...]:
        """Component states a call of ``kind`` computes from."""
        if kind is CallKind.NEW:
            return self.current
        if kind is CallKind.REPEAT:
            return self.before
        return self.current

    def level_for(self, kind: CallKind) -> int:
        return self.level + 1 if kind is CallKind.NEW else max(self.level, 0)

    def after(self, kind: CallKind, sigma: float, results: tuple[Any, ...]) -> State:
        """The state once a call of ``kind`` at ``sigma`` produced ``results``."""
        if kind is CallKind.NEW:
            return attrs.evolve(
                self, before=self.current, current=results, level=self.level + 1,
                level_sigma=sigma,
            )
        if kind is CallKind.REPEAT:
            return attrs.evolve(self, current=results)
        return self


def new_state(
    seed: int, components: Sequence[tuple[str, Any]], sigmas: Sequence[float] | None
) -> State:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GuidanceValueError(f"seed must be an int, got {seed!r}")
    schedule = None
    if sigmas is not None:
        schedule = check_sigmas(sigmas, "sigmas")
    names = tuple(n for n, _ in components)
    values = tuple(c.init_state() for _, c in components)
    return State(seed=seed, schedule=schedule, components=names, before=values, current=values)


@attrs.define(eq=False)
class ForwardState:
    """State read and written INSIDE the model calls of one step (EMAG's moving averages).

    ``Plan.step`` makes one per step and hands it to ``around_call`` through each call's
    :class:`~guidekit.plan.RowLayout`. ``inputs`` maps each stateful perturbation to its
    state as the step starts (chosen by the rules above: a repeated level recomputes from
    the previous step's state, a midpoint reads the current one); whatever observes the
    forward (the attention engine) builds the step's result in ``memos``, and ``Plan.step``
    turns it into the next state with the perturbation's ``commit``. Nothing here outlives
    the step, so runs never share it.
    """

    batch: int
    level: int
    inputs: dict[Any, Any]
    memos: dict[Any, Any] = attrs.field(factory=dict)
    #: the step's conditionings as the model sees them (after input modifiers), by name
    conds: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    def memo(self, owner: Any, factory: Any) -> Any:
        """The step's scratch value of ``owner``, made by ``factory()`` on first use."""
        value = self.memos.get(owner)
        if value is None:
            value = self.memos[owner] = factory()
        return value
