"""The run object of ``guided(pipe, expr)``: the denoiser's stand-in forward around a Run.

:class:`GuidedPipeline` translates a classic pipeline's calling convention -- its CFG batch
(one call ``[uncond, cond]`` or ``[cond, null]``, or Flux's two calls per step), its timestep,
its output structure -- into guidekit's ``(x, sigma, conds, models)`` and back. Everything
about run state (fresh state per pipeline run, step recognition, the call log) belongs to a
:class:`guidekit.run.Run`: each pipeline call starts a run with the scheduler's schedule,
and a noise level that rises inside one call starts another (``on_rise="restart"``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from guidekit.branch import COND, MAIN, UNCOND
from guidekit.compiled import current_call, forward_class
from guidekit.errors import GuidanceValueError, NonFiniteError
from guidekit.expr import Expr
from guidekit.plan import CallRecord, Plan, RowLayout
from guidekit.run import Run
from guidekit.state import State

from ._diffusers_arguments import (
    call_value,
    check_scale,
    refuse_missing_rows,
    refuse_unowned,
    rescaled,
    scale_argument,
)
from ._diffusers_cads import ClassEmbeddingCADS
from ._diffusers_call import (
    DenoiserCall,
    Split,
    like,
    read_call,
    refuse_other_callers,
    sample_of,
    split_rows,
    tile,
)
from ._diffusers_channels import check_shared, latent_channels, strip_channels, with_channels
from ._diffusers_controlnet import ControlNetRows
from ._diffusers_layout import Layout
from ._diffusers_pools import example, plan_pools
from ._diffusers_prompts import NamedPrompts, named_conds
from ._diffusers_rows import broadcast_rows, fill, first_difference
from ._diffusers_schedule import schedule_of, sigma_for, timestep_schedule
from ._renoise import Renoiser, renoised, scheduler_renoiser


class GuidedPipeline:
    """The run object of :func:`guided`: the plan, and what happened inside the block.

    ``calls`` lists every model call guidekit made (model, rows, branches, sigma, step) across
    all pipeline runs of the block; ``runs`` counts the pipeline runs; ``steps`` is the number
    of steps of the current run. ``plan`` is the plan as run (CADS's keys made explicit, and
    the last pipeline call's ``guidance_rescale`` as ``| Rescale(phi)``); ``engines`` the
    attention engines installed for the block, by model name.
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
        replan: Callable[[Expr], tuple[Plan, Plan]],
        prompts: NamedPrompts | None = None,
    ) -> None:
        self.pipe = pipe
        self.plan = plan
        # what Run steps: the plan less the CADS that a label-embedding hook applies
        step_plan = plan if step_plan is None else step_plan
        self._block_plans = (plan, step_plan)  # the block's, before a call's own extras
        self._step_plan = step_plan  # for the current pipeline call
        # compiles an expression with the block's conventions: (shown, step) plans
        self._replan = replan
        self.engines: dict[str, Any] = dict(engines or {})
        self._engine_calls: dict[str, Callable[[RowLayout], Any]] = {}
        self._cads = cads
        self.prompts = prompts  # the named prompts (guided(prompts=...)), encoded per call
        self.controlnet: ControlNetRows | None = None  # their ControlNet rows, where one runs
        self._at: tuple[torch.Tensor, float] | None = None  # (x, sigma) of the step
        self.denoiser = denoiser
        self._scale: str | None = "guidance_scale"  # the call's CFG scale (None: it has none)
        self.layout = layout
        self.models = dict(models)
        self.seed = seed
        self.sigma_fn = sigma_fn
        self.around_call = around_call
        self._run: Run | None = None  # made at the first call (it needs the schedule)
        self._renoise: Renoiser | None = None  # CFG++ stepping, per pipeline run
        self._eta = 0.0  # the pipeline call's eta (DDIM)
        # the compiled callable when the denoiser is compiled (see guidekit.compiled)
        self._orig: Callable[..., Any] = current_call(denoiser)
        # Arguments are named by the class's forward: an instance-level forward (an
        # offloading hook, say) may take just *args, **kwargs.
        params = list(inspect.signature(forward_class(denoiser).forward).parameters.values())
        self._signature = inspect.Signature(params[1:])
        self._channels = latent_channels(denoiser)  # (in, out) where conditioning is concatenated
        self._new_run = True
        self._batch: int | None = None  # the pipeline's sample batch, from prepare_latents
        self._encodes = 0  # encode_prompt calls before this run's latents (Flux: 2 = CFG on)
        self._sequential_cfg: bool | None = None
        self._pending: tuple[DenoiserCall, torch.Tensor] | None = None

    # -- what the run owner knows -----------------------------------------------------------------
    @property
    def calls(self) -> list[CallRecord]:
        return [] if self._run is None else self._run.calls

    @property
    def runs(self) -> int:
        return 0 if self._run is None else self._run.runs

    @property
    def steps(self) -> int:
        return 0 if self._run is None else self._run.steps

    @property
    def state(self) -> State | None:
        """The current run's state (``None`` before the first denoiser call)."""
        return None if self._run is None else self._run.state

    def _run_for(self, exact: bool) -> Run:
        """The run of this call: a new one at the first call of a pipeline run."""
        if self._run is not None and not self._new_run:
            return self._run
        schedule = schedule_of(self.pipe.scheduler) if exact and self.sigma_fn is None else None
        if schedule is None and self._step_plan.scheduled and self.sigma_fn is None:
            schedule = timestep_schedule(self.pipe.scheduler)  # r needs the run's levels
        if self._run is None:
            self._run = Run(self._step_plan, sigmas=schedule, seed=self.seed, on_rise="restart")
        else:
            self._run.start(schedule, plan=self._step_plan)
        self._new_run = False
        return self._run

    # -- hooks installed on the pipeline -----------------------------------------------------------
    @contextlib.contextmanager
    def pipeline_call(
        self, passed: Mapping[str, Any], parameters: Mapping[str, inspect.Parameter]
    ) -> Iterator[None]:
        """Around one ``pipe(...)`` call: its guidance arguments honoured or refused, a new run."""
        shown, step = self._block_plans
        scale = self._scale = scale_argument(parameters, self.denoiser)
        if scale is not None and scale in passed:
            check_scale(shown, scale, passed[scale])
        refuse_unowned(passed, parameters)
        # a default rescale (LTX-2's 0.7) rescales as much as a passed one
        phi = call_value("guidance_rescale", passed, parameters)
        if phi is not None:
            expr = rescaled(shown, phi, passed="guidance_rescale" in passed)
            if expr is not None:
                shown, step = self._replan(expr)
        self.plan, self._step_plan = shown, step
        self._new_run, self._encodes, self._pending = True, 0, None
        self._eta = float(passed.get("eta") or 0.0)  # DDIM's; CFG++ needs 0
        if self.prompts is None:
            yield
            return
        self.prompts.start_call()
        try:
            yield
        finally:
            self.prompts.end_call()

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
            out = orig(*args, **kwargs)
            if self.prompts is not None:
                self.prompts.after_encode(orig, args, kwargs, out)
            return out

        return encode_prompt

    # -- the denoiser's replacement forward ---------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Stands in for ``denoiser.forward`` inside the ``with`` block."""
        refuse_other_callers(self.pipe, self.denoiser, self.plan.expr)
        call = strip_channels(self._channels, read_call(self._signature, args, kwargs))
        if self.layout.order == "sequential":
            return self._forward_sequential(call)
        return self._forward_batched(call)

    def _cfg_batched(self, call: DenoiserCall) -> bool:
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

    def _forward_batched(self, call: DenoiserCall) -> Any:
        n = call.rows
        if self._cfg_batched(call):
            lo, hi = slice(0, n // 2), slice(n // 2, n)
            if not torch.equal(call.x[lo], call.x[hi]):
                if not bool(torch.isfinite(call.x).all()):  # NaN != NaN: say what it is
                    raise NonFiniteError(
                        f"the latents the pipeline passes to its denoiser hold NaN or inf "
                        f"(model call {len(self.calls) + 1}, at timestep {call.timestep:g}): an earlier "
                        f"step or the pipeline produced them, not this model call"
                    )
                raise GuidanceValueError(
                    "the two halves of the pipeline's CFG batch carry different latents; "
                    "guided(...) expects the batch [x, x] that classic pipelines build"
                )
            check_shared(call, lo, hi)
            first, second = (COND, UNCOND) if self.layout.order == "cond_first" else (UNCOND, COND)
            split = split_rows(call, {first: lo, second: hi})
        else:
            split = split_rows(call, {COND: slice(0, n)})
        return self._guide(call, split, n // split.batch)

    def _forward_sequential(self, call: DenoiserCall) -> Any:
        if self._pending is None and not self._sequential_cfg:
            return self._guide(call, split_rows(call, {COND: slice(0, call.rows)}), 1)
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
        if cond_call.timestep != call.timestep or not torch.equal(cond_call.x, call.x):
            raise GuidanceValueError(
                "expected the pipeline's unconditional call at the same step as its conditional "
                "one (same latents and timestep)"
            )
        check_shared(cond_call, slice(None), slice(None), call)
        b = call.rows
        call.arguments, cond_call.arguments = broadcast_rows(call.arguments, cond_call.arguments, b)
        cond_split = split_rows(cond_call, {COND: slice(0, b)})
        uncond_split = split_rows(call, {UNCOND: slice(0, b)})
        name = first_difference(cond_split.template, uncond_split.template)
        if name is not None:
            raise GuidanceValueError(
                f"the conditional and unconditional calls differ at {name!r}, which is not "
                f"per-row; pad both prompts to the same length so their rows share a batch"
            )
        cond_split.conds[UNCOND] = uncond_split.conds[UNCOND]
        out = self._guide(cond_call, cond_split, 1)
        placeholder.copy_(out if isinstance(out, torch.Tensor) else sample_of(out))
        return out

    def _sigma(self, call: DenoiserCall) -> tuple[float, bool]:
        t = call.timestep * self.layout.timestep_scale
        if self.sigma_fn is not None:
            return float(self.sigma_fn(t)), False
        return sigma_for(self.pipe.scheduler, t)

    def _guide(self, call: DenoiserCall, split: Split, blocks: int) -> Any:
        """The guided prediction for ``split``, in ``call``'s output structure, ``blocks``
        times along the batch (every half of the pipeline's CFG batch gets it)."""
        sigma, exact = self._sigma(call)
        fresh = self._new_run or self._run is None
        run = self._run_for(exact)
        if fresh:  # CFG++: each pipeline run's scheduler (adapters/_renoise.py)
            self._renoise = scheduler_renoiser(
                run.plan, self.pipe.scheduler, "guided(pipe, ...)", eta=self._eta
            )
        needed = {b.cond for b in run.plan.program(sigma, run.state.schedule).branches}
        named = sorted(needed & named_conds(run.plan))
        if named and self.prompts is not None:
            lookup = None
            if self.controlnet is not None:
                self.controlnet.check(call.rows)
                lookup = self.controlnet.lookup
            split.conds.update(self.prompts.conds(
                split.conds[COND], named, lookup, split.conds.get(UNCOND)
            ))
        missing = sorted(needed - split.conds.keys())
        unnamed = [n for n in missing if n != UNCOND]
        if unnamed:
            pooled = unnamed[0] in plan_pools(run.plan)
            labels = self.prompts is not None and self.prompts.labels
            how = (
                f"ICG's pool of real conditions, guided(pipe, expr, {example(unnamed[0], labels)})"
                if pooled else f"guided(pipe, expr, prompts={{{unnamed[0]!r}: ...}})"
            )
            raise GuidanceValueError(
                f"{self.plan.expr!r} needs the {' and '.join(repr(n) for n in unnamed)} "
                f"conditioning at sigma={sigma:g}, which the pipeline does not encode: pass it "
                f"as {how}"
            )
        if missing:
            refuse_missing_rows(self.plan.expr, missing, sigma, self._scale)
        batch = split.batch
        c = int(split.x.shape[1]) if split.x.ndim > 1 else 0
        found: dict[str, Any] = {"proto": None, "extra": []}

        def make(fn: Callable[..., Any], main: bool) -> Callable[..., torch.Tensor]:
            def model(x_rows: torch.Tensor, sigma_rows: torch.Tensor, **cond_rows: Any) -> torch.Tensor:
                k = x_rows.shape[0] // batch
                values = {name: tile(v, k) for name, v in split.shared.items()}
                kwargs = fill(split.template, {**values, **cond_rows})
                kwargs[call.x_name] = with_channels(call, x_rows, batch)
                out = fn(**kwargs)
                if found["proto"] is None:
                    found["proto"] = out
                pred = sample_of(out)
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
        self._at = (split.x, sigma)
        around = self._around if self._needs_around() else None
        try:
            sample = renoised(
                self._renoise,
                lambda keep: run.step(
                    split.x, sigma, split.conds, fns, level=sigma, around_call=around, keep=keep
                ),
                split.x, sigma, run.plan.prediction,
            )
        finally:
            self._at = None
        if found["extra"]:
            sample = torch.cat([sample, torch.cat(found["extra"])[:batch]], dim=1)
        return like(found["proto"], tile(sample, blocks))

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
            if self._cads is not None and self._at is not None and self._run is not None:
                # the run's state as this step starts (a restart has already happened)
                stack.enter_context(self._cads.call(layout, (self._run.state, *self._at)))
            yield


class GuidedForward:
    """The callable installed as ``denoiser.forward`` (a marker type against nesting)."""

    def __init__(self, run: GuidedPipeline) -> None:
        self.run = run

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run.forward(*args, **kwargs)
