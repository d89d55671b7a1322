"""Guided velocity fields for flow-matching ODE solvers: Meta's ``flow_matching`` and torchdiffeq.

Two time conventions meet here (both rectified flow, straight paths):

* guidekit's (diffusers' ``FlowMatchEulerDiscreteScheduler``): ``x = sigma n + (1 - sigma) x0``,
  ``sigma`` runs 1 (noise) -> 0 (data), the model predicts ``v = n - x0`` and a step is
  ``x + (sigma_next - sigma) v``;
* ``flow_matching``'s (https://github.com/facebookresearch/flow_matching): time ``t`` runs
  0 (noise) -> 1 (data), ``x_t = t x1 + (1 - t) x0`` with ``x0`` the noise and ``x1`` the
  data, and the velocity is ``u = x1 - x0 = dx/dt``.

So ``sigma = 1 - t`` and ``u = -v``. :class:`FlowGuided` runs guidekit in its own convention
(``compile(..., prediction="flow", noise="flow")``): every noise level guidekit sees -- the
bounds of ``.between(lo, hi)``, the schedule, CADS's time (which for flow *is* ``sigma``) --
is ``sigma = 1 - t``. It imports ``flow_matching`` only in :meth:`FlowGuided.model_wrapper`.

The wrapped model may speak either convention (``model_time=``):

* ``"t"`` (default): ``model(x=x, t=t, **cond) -> u``, as a ``flow_matching`` ``ModelWrapper``
  is called; it receives the solver's own ``t`` object (a 0-d tensor from ``ODESolver``);
* ``"sigma"``: ``model(x, sigma_rows, **cond) -> v`` (diffusers style, ``sigma_rows`` a
  ``[rows]`` tensor; scale it to the model's own timestep inside, e.g. ``1000 * sigma``).

Entry points: ``guided(x, t, **extras) -> u`` (``ODESolver``'s ``velocity_model`` contract;
:meth:`FlowGuided.model_wrapper` wraps it in a real ``ModelWrapper``),
``guided.velocity(x, sigma, **extras) -> v`` (hand-written Euler loops), and
:meth:`FlowGuided.odeint_func` for ``torchdiffeq.odeint`` in either time.

Steps: give the solver's grid (``time_grid=`` in ``t`` or ``sigmas=``) so that multi-stage
methods (midpoint, heun3, rk4) advance state once per grid step; leave both out for adaptive
methods (dopri5, ...): every evaluation at a new, lower ``sigma`` (later ``t``) is then a
step, and a rejected trial step's evaluations are undone when the solver retreats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

import torch

from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.finite import check_policy

from ._frames import calling_frame
from ._renoise import renoised, renoiser
from ._sampling import ModelFn, SamplerAdapter, as_plan, level_of

_TIMES = ("t", "sigma")
_wrapper_class: type | None = None


def sigmas_from_time_grid(time_grid: Sequence[float] | torch.Tensor) -> list[float]:
    """``flow_matching`` time points -> guidekit noise levels, ``sigma = 1 - t``; refuses,
    as ``time_grid``, a point outside ``[0, 1]`` or a grid that runs backwards."""
    if isinstance(time_grid, torch.Tensor):
        values = time_grid.detach().flatten().tolist()
    elif isinstance(time_grid, (str, bytes)):
        values = None
    else:
        try:
            values = [float(t) for t in time_grid]
        except (TypeError, ValueError):
            values = None
    if values is None:
        raise GuidanceTypeError(
            f"FlowGuided(time_grid=...) must be the solver's time points (a 1-d tensor or a "
            f"sequence of numbers in [0, 1]), got {time_grid!r}"
        )
    for i, t in enumerate(values):
        if not 0.0 <= float(t) <= 1.0:  # (NaN fails this too)
            raise GuidanceValueError(
                f"FlowGuided(time_grid=...): time_grid[{i}] = {float(t):g} lies outside [0, 1], "
                f"flow time from noise (t = 0) to data (t = 1); pass the solver's grid in t, "
                f"e.g. torch.linspace(0, 1, steps + 1)"
            )
        if i and float(t) < float(values[i - 1]):
            raise GuidanceValueError(
                f"FlowGuided(time_grid=...): time_grid[{i - 1}] = {float(values[i - 1]):g} > "
                f"time_grid[{i}] = {float(t):g}: sampling integrates from noise (t = 0) to data "
                f"(t = 1), so the grid must increase; a backward integration (likelihood) "
                f"cannot be guided"
            )
    # the same float arithmetic as FlowGuided.__call__, so grid points match exactly
    return [1.0 - float(t) for t in values]


def solver_grid(depth: int = 48) -> list[float] | None:
    """The step points of the torchdiffeq fixed-grid solver (euler, midpoint, rk4, ...) whose
    step is calling the model now, or ``None`` when no such solver is on the stack.

    ``ODESolver.sample(..., step_size=h)`` steps on its own grid of ``h`` and only reports
    at the given ``time_grid``; the adapter never sees ``h``. Read from the solver's
    ``integrate`` frame (its ``time_grid`` local) once per run, it lets FlowGuided refuse a
    schedule the solver does not step on instead of advancing state on half the steps.
    """
    def is_solver(frame: FrameType) -> bool:
        if frame.f_code.co_name != "integrate":
            return False
        local = frame.f_locals
        return "time_grid" in local and hasattr(local.get("self"), "grid_constructor")

    frame = calling_frame(is_solver, depth)
    if frame is None:
        return None
    grid = frame.f_locals["time_grid"]
    return [float(v) for v in (grid.detach().flatten().tolist()
                               if isinstance(grid, torch.Tensor) else grid)]


class FlowGuided(SamplerAdapter):
    """A guided velocity field for flow-matching solvers (see the module docstring).

    Args:
        guidance: an expression, guidance text, or a plan compiled with
            ``prediction="flow", noise="flow"``.
        model: the main velocity model, in the ``model_time`` convention.
        model_time: ``"t"`` (``flow_matching``: ``model(x=x, t=t, **cond) -> u``) or
            ``"sigma"`` (diffusers: ``model(x, sigma_rows, **cond) -> v``).
        cond, uncond, conds: conditionings (dicts of the model's keyword tensors, batch
            first, or one tensor passed as ``cond_key``); ``conds`` names the others an
            expression reads (``conds={"neg": ...}`` for ``CFG(7, negative="neg")``);
            per-call extras of the same names (``ODESolver.sample(..., cond=...)``) replace
            them.
        models: other models by name (``{"weak": ...}``), in the same convention.
        time_grid: the solver's step points in flow time ``t``; or
        sigmas: the same as noise levels ``sigma = 1 - t``.
        seed: seeds CADS's noise.
        max_rows: row budget passed to :func:`guidekit.compile`.
        cond_key: the keyword a bare conditioning tensor is passed as.
        around_call: the attention engine's hook, for plans with attention-space terms
            (PAG, ...): ``with guidekit.attention.install(net, plan) as around_call:``;
            compile the plan yourself then (the engine needs it) and pass it as ``guidance``.
        nonfinite: ``"raise"`` (default) stops at the first NaN/inf in a model output or the
            guided output with a :class:`~guidekit.errors.NonFiniteError` naming the step,
            sigma, branch and terms; ``"warn"`` warns once per run and goes on.
        tokens: :class:`guidekit.Tokens` -- how conditionings of different token lengths
            share one call (padded under the model's mask, or repeated); by default they
            run as separate calls.
        solver: for ``CFGpp`` (CFG++), the solver you call: ``"euler"`` (``ODESolver``
            ``method="euler"`` on ``time_grid``, or a hand-written Euler loop on ``sigmas``),
            whose step the adapter's velocity makes a CFG++ step (``adapters/_renoise.py``);
            CFGpp needs the grid too. Other solvers are refused for CFGpp.
    """

    def __init__(
        self,
        guidance: Any,
        model: Callable[..., torch.Tensor],
        *,
        model_time: str = "t",
        cond: Any = None,
        uncond: Any = None,
        conds: Mapping[str, Any] | None = None,
        models: Mapping[str, Callable[..., torch.Tensor]] | None = None,
        time_grid: Sequence[float] | torch.Tensor | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        seed: int = 0,
        max_rows: int | str | None = None,
        cond_key: str = "cond",
        around_call: Any = None,
        nonfinite: str = "raise",
        tokens: Any = None,
        solver: str | None = None,
    ) -> None:
        if model_time not in _TIMES:
            raise GuidanceValueError(
                f"FlowGuided(model_time={model_time!r}): use 't' for a flow_matching model "
                f"(t: 0 = noise -> 1 = data, returns u = data - noise) or 'sigma' for a "
                f"diffusers-style model (sigma: 1 = noise -> 0, returns v = noise - data)"
            )
        if time_grid is not None and sigmas is not None:
            raise GuidanceValueError(
                "FlowGuided: give the solver's grid once, as time_grid= (flow time t) or "
                "sigmas= (sigma = 1 - t)"
            )
        if time_grid is not None:
            sigmas = sigmas_from_time_grid(time_grid)
        self.model_time = model_time
        plan = as_plan(
            guidance, prediction="flow", noise="flow", max_rows=max_rows, adapter="FlowGuided"
        )
        self._main = model
        self._t: Any = None  # the solver's t of the current call, handed to "t" models as is
        self._level: float | None = None  # the current call's sigma before clamping
        self._grid_checked = -1  # the run whose solver grid was compared with the schedule
        self._start_run(
            plan, model, models, {"cond": cond, "uncond": uncond, **(conds or {})},
            sigmas=sigmas, seed=seed, cond_key=cond_key, adapter="FlowGuided",
            around_call=around_call, nonfinite=check_policy(nonfinite, "FlowGuided"),
            tokens=tokens,
        )
        self._renoise = renoiser(
            plan, solver, sigmas, "FlowGuided", names=("euler",), arg="solver"
        )

    # -- translation ------------------------------------------------------------------------
    def _translate(self, model: Callable[..., torch.Tensor]) -> ModelFn:
        if not callable(model):
            raise GuidanceTypeError(
                f"FlowGuided: models must be callables, got {type(model).__name__}"
            )
        if self.model_time == "sigma":

            def native(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
                if self._level is not None:  # the solver's own level, even outside [0, 1]
                    sigma = torch.full_like(sigma, self._level)
                return model(x, sigma, **cond)

            return native

        def velocity(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
            t = self._t
            if t is None:  # called through velocity(): the time of the unclamped level
                t = 1 - (sigma if self._level is None else torch.full_like(sigma, self._level))
            elif isinstance(t, torch.Tensor) and t.ndim > 0:
                t = t.flatten()[:1].expand(x.shape[0])  # one value per row
            return -model(x=x, t=t, **cond)

        return velocity

    def _check_grid(self, time: str) -> None:
        """Once per run: refuse a schedule that the calling fixed-grid solver does not step on."""
        schedule = self.run.state.schedule
        if schedule is None or self._grid_checked == self.run.runs:
            return
        self._grid_checked = self.run.runs
        grid = solver_grid()
        if grid is None:
            return
        if all(v <= 0 for v in grid) and any(v < 0 for v in grid):
            grid = [-v for v in grid]  # torchdiffeq integrates a decreasing time as -time
        levels = [1.0 - v for v in grid] if time == "t" else grid
        ours = sorted(schedule)
        if len(levels) == len(ours) and all(
            abs(a - b) <= 1e-6 for a, b in zip(sorted(levels), ours)
        ):
            return
        steps = len(levels) - 1
        raise GuidanceValueError(
            f"FlowGuided: the solver steps on {len(levels)} points ({steps} steps) but the "
            f"adapter was given a schedule of {len(ours)} points ({len(ours) - 1} steps), so "
            f"guidance state (APG momentum, CADS, gates) would advance on the wrong steps: "
            f"give the adapter the solver's own step points ({'time_grid' if time == 't' else 'sigmas'}"
            f"=torch.linspace({grid[0]:g}, {grid[-1]:g}, {len(grid)})), or leave step_size out "
            f"of ODESolver.sample so that it steps on the time_grid"
        )

    def _guided(
        self, x: torch.Tensor, sigma: float, extras: Mapping[str, Any], time: str
    ) -> torch.Tensor:
        self._check_grid(time)
        # Adaptive solvers (torchdiffeq's dopri5) step past the end of the interval and
        # interpolate back, evaluating at t slightly > 1 (sigma < 0). guidekit's levels live in
        # [0, 1]; gates, CADS and the state see the clamped level, the model its own time.
        self._level = sigma
        level = min(max(sigma, 0.0), 1.0)
        try:
            return renoised(
                self._renoise, lambda keep: self.run(x, level, extras, "flow", keep),
                x, level, "flow",
            )
        finally:
            self._level = None

    # -- entry points -------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, t: Any, **extras: Any) -> torch.Tensor:
        """``flow_matching``'s contract: the guided ``u = dx/dt`` at flow time ``t``."""
        sigma = 1.0 - level_of(t)
        self._t = t
        try:
            v = self._guided(x, sigma, extras, "t")
        finally:
            self._t = None
        return -v

    def velocity(self, x: torch.Tensor, sigma: Any, **extras: Any) -> torch.Tensor:
        """guidekit's / diffusers' contract: the guided ``v = n - x0`` at noise level ``sigma``."""
        return self._guided(x, level_of(sigma), extras, "sigma")

    def odeint_func(
        self, time: str = "t", **extras: Any
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``f(time, x) -> dx/dtime`` for ``torchdiffeq.odeint``.

        ``time="t"``: integrate flow time from 0 to 1 (``f = u``); ``time="sigma"``:
        integrate ``sigma`` from 1 to 0 (``f = v``). ``extras`` (conditionings) are passed
        on every call, since ``odeint`` passes only ``(time, x)``.
        """
        if time == "t":
            return lambda t, x: self(x, t, **extras)
        if time == "sigma":
            return lambda sigma, x: self.velocity(x, sigma, **extras)
        raise GuidanceValueError(
            f"odeint_func(time={time!r}): use 't' (0 = noise -> 1) or 'sigma' (1 = noise -> 0)"
        )

    def model_wrapper(self) -> Any:
        """This velocity as a ``flow_matching.utils.ModelWrapper`` (an ``nn.Module``).

        Its ``model`` is the main model when that is a module (so ``.to()``/``.eval()``
        reach it); ``forward(x, t, **extras)`` is :meth:`__call__`.
        """
        return _model_wrapper_class()(self)

    # -- inspection (plan, around_call, calls, steps, state: SamplerAdapter) -------------------
    def reset(self, seed: int | None = None, sigmas: Any = ..., time_grid: Any = None) -> None:
        """Start a new run (fresh state, empty ``calls``); optionally a new seed/grid.

        ``calls`` and the plan speak guidekit's levels: ``sigma = 1 - t``.
        """
        if time_grid is not None:
            sigmas = sigmas_from_time_grid(time_grid)
        super().reset(seed, sigmas)

    def __repr__(self) -> str:
        return f"<FlowGuided {self.plan.expr!r}, model time {self.model_time!r}>"


def _model_wrapper_class() -> type:
    """The ``ModelWrapper`` subclass, defined on first use so flow_matching stays optional."""
    global _wrapper_class
    if _wrapper_class is None:
        from flow_matching.utils import ModelWrapper

        class GuidedModelWrapper(ModelWrapper):
            """A ``flow_matching`` velocity model that runs a guidekit plan."""

            def __init__(self, guided: FlowGuided) -> None:
                main = guided._main
                super().__init__(main if isinstance(main, torch.nn.Module) else None)
                self.guided = guided

            def forward(self, x: torch.Tensor, t: torch.Tensor, **extras: Any) -> torch.Tensor:
                return self.guided(x, t, **extras)

        _wrapper_class = GuidedModelWrapper
    return _wrapper_class


__all__ = ["FlowGuided", "sigmas_from_time_grid"]
