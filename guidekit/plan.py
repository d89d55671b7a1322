"""A compiled guidance plan: forward groups, row layout, per-step programs and the combine.

Row layout (fixed and documented): forward groups in the order ``main`` first, then other
models by first appearance in the expression. Within a group, the branches that run at a
step are laid out unperturbed first -- ``cond``, then ``uncond``, then other conditionings --
then perturbed ones, each class in order of first appearance; every branch is a block of
``B`` rows (the sampler's batch), so a group runs ``active_branches x B`` rows. Branches
whose INPUT is made from the step's first outputs (SAG's degraded input) form a second,
dependent group per model, run after all first groups (``ForwardGroup.stage == 1``).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import attrs
import torch

from guidekit.branch import COND, Branch
from guidekit.checks import check_sigmas, snap
from guidekit.context import StepContext
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.explain import describe, explain
from guidekit.expr import Entry, Expr
from guidekit.fixed import fixed_program
from guidekit.forward import ModelFn, group_key, run_groups
from guidekit.padding import Tokens
from guidekit.pools import draw_pools, pool_names
from guidekit.processor import AttentionModifier
from guidekit.program import Program, build_program
from guidekit.renoise import check_keep, sampler_term
from guidekit.requires import check_engine, check_native
from guidekit.rows import CallRecord, ForwardGroup, RowLayout, concat_conds, slice_conds
from guidekit.schedule import resolve
from guidekit.schedules.steps import check_progress, level_at, modifier_at
from guidekit.spaces import Noise, check_prediction
from guidekit.split import Splitter, calls_for, make_splitter, per_run, planned_chunk
from guidekit.state import ForwardState, State, level_of, named_parts, new_state

# the row layout, programs and text live in rows.py, program.py and explain.py; code imports
# them from here as before
__all__ = [
    "CallRecord", "ForwardGroup", "ModelFn", "Plan", "Program", "RowLayout", "concat_conds",
    "slice_conds",
]


#: dtypes whose weights hold a scale as the scalar multiply does (no half precision)
_EXACT_WEIGHTS = (torch.float32, torch.float64)


@attrs.define(eq=False)
class Plan:
    """The result of :func:`guidekit.compile`. Immutable apart from an internal cache.

    Use it functionally (``state = plan.init(); y, state = plan.step(state, ...)``) or through
    :func:`guidekit.guide`, which owns the state of one run.
    """

    expr: Expr
    left: Expr
    post: tuple[Any, ...]
    modifiers: tuple[Any, ...]
    prediction: str
    noise: Noise
    max_rows: Any
    entries: tuple[Entry, ...]
    groups: tuple[ForwardGroup, ...]
    breakpoints: tuple[float, ...]
    _programs: dict[int, Program] = attrs.field(factory=dict, repr=False)
    _policy: Any = attrs.field(default=None, repr=False)
    #: (program, no around_call, no native) that passed check_engine (programs hash by id)
    _checked: set[tuple[Program, bool, bool]] = attrs.field(factory=set, init=False, repr=False)
    #: guidekit/parallel.py: the ranks that share each call's rows (None: this process)
    parallel: Any = None
    #: guidekit/fixed.py: every step runs every branch (one shape per run)
    fixed_shapes: bool = False
    #: guidekit/padding.py: how each group's token lengths last shared a call, by group title
    shared: dict[str, str] = attrs.field(factory=dict, repr=False)
    #: guidekit/schedules/steps.py: ``(part, schedule)`` of every scheduled scale (empty: none)
    scheduled: tuple[Any, ...] = ()
    #: attention modifiers gated or scheduled by noise level (resolved per step)
    dynamic: tuple[Any, ...] = ()

    # -- structure ------------------------------------------------------------------------------
    @functools.cached_property  # per plan: its structure is fixed at compile
    def branches(self) -> tuple[Branch, ...]:
        """Every distinct branch the plan may run, in layout order."""
        return tuple(b for g in self.groups for b in g.branches)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(g.model for g in self.groups)

    @functools.cached_property  # per plan: its structure is fixed at compile
    def conditionings(self) -> tuple[str, ...]:
        """Every conditioning the plan reads: its branches', then attention modifiers'
        negatives (NAG reads ``uncond`` even where no branch runs it)."""
        names = [b.cond for b in self.branches]
        names += [m.negative for m in self.attention if m.negative is not None]
        return tuple(dict.fromkeys(names))

    @functools.cached_property  # per plan (read at every step by check_engine)
    def attention(self) -> tuple[Any, ...]:
        """Attention modifiers (PLADIS, GAG, NAG): applied inside the forward by the
        attention engine (:func:`guidekit.attention.install`), in pipe order."""
        # imported here: combinators import terms, whose attention terms import this module
        return tuple(m for m in self.modifiers if isinstance(m, AttentionModifier))

    @functools.cached_property  # per plan: its structure is fixed at compile
    def keyed(self) -> bool:
        """Whether a perturbation reads the step's random key inside the forward (TPG's
        permutations, ``ForwardState.key``): only then is the key tensor made per step."""
        return any(getattr(b.perturbation, "needs_state", False) for b in self.branches)

    @functools.cached_property  # a walk of the expression, not one per step
    def _resamples(self) -> bool:  # a CFG++ term: the caller must take ``keep``
        return sampler_term(self.expr) is not None

    @functools.cached_property  # per plan: its structure is fixed at compile
    def stateful(self) -> tuple[tuple[Any, str], ...]:
        """``(perturbation, model)`` for each perturbation whose state is built inside the
        forward (EMAG's averages), in layout order."""
        seen: dict[Any, str] = {}
        for b in self.branches:
            p = b.perturbation
            if p is not None and getattr(p, "stateful", False):
                seen.setdefault(p, b.model)
        return tuple(seen.items())

    @property
    def components(self) -> tuple[tuple[str, Any], ...]:
        """``(name, part)`` for each part that keeps run state (post-processors, modifiers,
        perturbations whose state is built inside the forward), by its stable name
        (:func:`guidekit.state.component_names`: ``"APG"``, ``"EMAG"``, ``"EMAG#2"``)."""
        return tuple((n, p) for n, p in self._named_parts() if n is not None)

    def _named_parts(self) -> list[tuple[str | None, Any]]:
        """Every post-processor, modifier and stateful perturbation with its state name
        (``None``: it keeps no state), in that order."""
        return list(self._parts)

    @functools.cached_property
    def _parts(self) -> tuple[tuple[str | None, Any], ...]:
        return tuple(named_parts((*self.post, *self.modifiers, *(p for p, _ in self.stateful))))

    def perturbation_inputs(self, inputs: Mapping[str, Any]) -> dict[Any, Any]:
        """Each stateful perturbation's input state, from the step's inputs by name (a
        perturbation that keeps no state, SAG, gets ``None``)."""
        if not self._state_names:
            return {}
        return {p: (inputs.get(n) if n is not None else None) for p, n in self._state_names.items()}

    @functools.cached_property  # read at every step
    def _post_names(self) -> tuple[str | None, ...]:
        return tuple(n for n, _ in self._parts[: len(self.post)])

    @functools.cached_property  # read at every step
    def _pools(self) -> tuple[str, ...]:
        return pool_names(self.left)

    @functools.cached_property  # read at every step
    def _state_names(self) -> dict[Any, str | None]:
        """Each stateful perturbation's state name (``None``: it keeps none, SAG), in order."""
        return {p: n for n, p in self._parts[len(self.post) + len(self.modifiers):]}

    def region(self, sigma: float) -> int:
        return self._region(snap(sigma, self.breakpoints))  # float32 sigmas: the float64 steps

    def _region(self, sigma: float) -> int:
        if sigma <= 0:
            return -1  # gates are (lo, hi] with lo >= 0: sigma 0 is its own region
        return bisect.bisect_left(self.breakpoints, sigma)

    def program(self, sigma: float, sigmas: tuple[float, ...] | None = None) -> Program:
        """The program for noise level ``sigma`` (cached per interval between breakpoints;
        with scheduled scales per noise level of the run whose schedule is ``sigmas``)."""
        sigma = snap(sigma, self.breakpoints)
        key: Any = (sigma, sigmas) if self.scheduled else self._region(sigma)
        prog = self._programs.get(key)
        if prog is None:
            prog = build_program(self, sigma, sigmas)
            if self.fixed_shapes:
                prog = fixed_program(prog, self.groups)
            if len(self._programs) > 4096:  # one per noise level of each scheduled run
                self._programs.clear()
                self._checked.clear()
            self._programs[key] = prog
        return prog

    def regions(self) -> list[tuple[float, float, Program]]:
        """``(lo, hi, program)`` for each interval ``lo < sigma <= hi``, noisiest first."""
        bounds = [0.0, *self.breakpoints, float("inf")]
        out = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            rep = hi if hi != float("inf") else lo * 2 + 1.0
            out.append((lo, hi, self.program(rep)))
        return out[::-1]

    # -- counting -------------------------------------------------------------------------------
    def rows(self, sigma: float, batch: int = 1, sigmas: Sequence[float] | None = None) -> int:
        """Model rows per step at ``sigma`` for a sampler batch of ``batch`` (scheduled
        scales read at ``sigma`` on the run's schedule ``sigmas``)."""
        prog = self.program(sigma, None if sigmas is None else tuple(float(s) for s in sigmas))
        return sum(len(g.branches) for g in prog.groups) * batch

    def nfe(self, sigma: float, batch: int = 1, sigmas: Sequence[float] | None = None) -> int:
        """Model calls per step at ``sigma``: under a fixed policy, or the auto split's
        decisions so far (one call where it has not decided)."""
        return sum(
            calls_for(r, planned_chunk(self.policy, group_key(g), r, batch))
            for g in self.program(
                sigma, None if sigmas is None else tuple(float(s) for s in sigmas)
            ).groups
            for r in [len(g.branches) * batch]
        )

    # -- running --------------------------------------------------------------------------------
    def init(self, seed: int = 0, sigmas: Sequence[float] | torch.Tensor | None = None) -> State:
        """Fresh state for one sampling run. ``sigmas`` (the sampler's schedule) lets the
        plan tell a sampler's extra in-step calls from new steps (see :mod:`guidekit.state`)."""
        if isinstance(sigmas, torch.Tensor):
            sigmas = sigmas.detach().flatten().tolist()
        return new_state(seed, self.components, sigmas)

    @property
    def policy(self) -> Any:
        """The plan's split policy (:mod:`guidekit.split`); an :class:`~guidekit.AutoSplit`
        holds the decisions taken so far, per forward group, active branches and batch."""
        if self._policy is None:
            self._policy = make_splitter(self.max_rows)
        return self._policy

    def splitter(self) -> Splitter:
        """The splitter for one run: the plan's policy, sharing its decisions."""
        return per_run(self.policy)  # type: ignore[no-any-return]

    def step(
        self,
        state: State,
        x: torch.Tensor,
        sigma: Any,
        conds: Mapping[str, Mapping[str, Any]],
        models: Mapping[str, ModelFn],
        *,
        splitter: Splitter | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
        output: str | None = None,
        around_call: Callable[[RowLayout], ContextManager[Any]] | None = None,
        native: Mapping[Branch, torch.Tensor] | None = None,
        tokens: Sequence[Tokens] = (),
        keep: dict[Branch, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, State]:
        """One guided prediction at ``(x, sigma)``; returns it and the next state.

        ``models[name](x_rows, sigma_rows, **cond_rows)`` is called once per forward group
        (more only under a row budget) with ``active_branches x B`` rows: ``x`` repeated,
        ``sigma`` as a ``[rows]`` tensor and each conditioning's tensors concatenated along
        the batch axis in layout order. ``around_call(layout)``, if given, is a context
        manager entered around each model call with that call's :class:`RowLayout`.

        ``native`` lets a caller that ran the branches itself (a guider inside someone else's
        denoising loop) pass their outputs, keyed by branch, in the model's own space; no
        model is called then and ``models`` may be empty. ``tokens`` says how conditionings
        of different token lengths may share a call (:mod:`guidekit.padding`).

        ``keep``, if given, receives the step's branch outputs (model space); a plan with a
        sampler-step term (CFG++, :mod:`guidekit.renoise`) runs only for a caller that
        passes it, since that caller must re-noise with the term's branch.
        """
        if keep is None and self._resamples:
            check_keep(self.expr, keep)  # refuses: the caller cannot re-noise (CFG++)
        if not isinstance(x, torch.Tensor) or x.ndim < 1:
            raise GuidanceTypeError(f"x must be a tensor with a batch axis, got {type(x).__name__}")
        s = self._sigma(sigma, x)
        kind = state.classify(s)
        level = state.level_for(kind)
        inputs = state.inputs(kind)
        where = None
        if self.scheduled or self.dynamic:
            check_progress(self.scheduled, state.schedule)
            where = level_at(s, state.schedule)
        prog = self.program(s, state.schedule)
        stateful = self.stateful
        checked = (prog, around_call is None, native is None)
        if checked not in self._checked:  # a property of the program and the call's kind
            check_engine(self, prog, around_call, native)
            self._checked.add(checked)
        ctx = StepContext(
            x=x, sigma=s, level=level, seed=state.seed, prediction=self.prediction,
            noise=self.noise, coefs=prog.coef_map, native={}, where=where,
        )
        whole: list[torch.Tensor] = []  # the call's output, for a one-kernel combine
        if native is not None:
            check_native(self, prog, native, s)
            ctx.native = dict(native)
        forward_state = ForwardState(
            batch=x.shape[0], level=level, inputs=self.perturbation_inputs(inputs),
            seed=state.seed, keyed=self.keyed,
        )
        if where is not None and self.dynamic:  # gated / scheduled attention modifiers
            forward_state.modifiers = {m: modifier_at(m, where) for m in self.dynamic}
        if native is None:
            if self.modifiers or self._pools:
                conds = self._modified(conds, ctx)
            forward_state.conds = conds  # NAG reads its negative conditioning from here
            if self.parallel is not None:  # the ranks share each call's rows (parallel.py)
                models, around_call = self.parallel.wrap(self, models, around_call)
            ctx.native = run_groups(
                prog, x, s, conds, models, splitter if splitter is not None else self.splitter(),
                prediction=self.prediction, noise=self.noise, on_call=on_call, level=level,
                around_call=around_call, forward_state=forward_state, tokens=tokens,
                shared=self.shared, whole=whole,
            )
        y = self._combine(prog, ctx, whole)
        if keep is not None:
            keep.update(ctx.native)
        results = dict(inputs)
        for p, model in stateful:
            memo = forward_state.memos.get(p)
            if memo is None:
                source = Branch(model=model, cond=getattr(p, "source", COND))
                if source in prog.branches:
                    raise GuidanceValueError(
                        f"{p!r} observed nothing during this step although the rows of "
                        f"{source.label} ran: the around_call given does not belong to an "
                        f"attention engine installed for this plan"
                    )
            name = self._state_names[p]
            if name is not None:  # the step's observations -> the next state, by name
                results[name] = p.commit(inputs[name], memo)
        space = self.prediction
        # With no noise left (b(sigma) = 0, flow at sigma = 0) every branch's x0 is x itself
        # and x0 cannot be turned back into noise or a velocity: a processor working in
        # another space acts there as its limit as b -> 0, in the model's own space (APG's
        # is a projection onto x; see Processor.at_noiseless). Its state carries over.
        for name, proc in zip(self._post_names, self.post):
            if where is not None:
                proc = resolve(proc, where)
            target = ctx.space_of(proc.space)
            if target != self.prediction and ctx.coefficients()[1] == 0.0:
                # (y is in the model's space here: only x0-space processors come this way)
                y, _ = proc.at_noiseless(y, ctx, inputs.get(name) if name is not None else None)
                continue
            y = ctx.convert(y, space, target)
            space = target
            y, after = proc.apply(y, ctx, inputs.get(name) if name is not None else None)
            if name is not None:
                results[name] = after
        out_space = self.prediction if output is None else check_prediction(output, "output")
        y = ctx.convert(y, space, out_space)
        return y, state.after(kind, s, results)

    def modify(
        self, state: State, x: torch.Tensor, sigma: Any, conds: Mapping[str, Mapping[str, Any]]
    ) -> Mapping[str, Mapping[str, Any]]:
        """The conditionings as the model sees them at ``(x, sigma)``: after the plan's input
        modifiers (CADS), for the step that ``state`` says this call belongs to."""
        s = self._sigma(sigma, x)
        kind = state.classify(s)
        ctx = StepContext(
            x=x, sigma=s, level=state.level_for(kind), seed=state.seed,
            prediction=self.prediction, noise=self.noise,
            coefs=self.program(s, state.schedule).coef_map, native={},
        )
        return self._modified(conds, ctx)

    def _modified(
        self, conds: Mapping[str, Mapping[str, Any]], ctx: StepContext
    ) -> Mapping[str, Mapping[str, Any]]:
        # pooled conditionings (ICG) draw this step's rows first: modifiers see B rows
        if self._pools:
            conds = draw_pools(conds, self._pools, ctx.x.shape[0], ctx.seed, ctx.level)
        for mod in self.modifiers:
            conds = mod.modify(conds, ctx)
        return conds

    def _sigma(self, sigma: Any, x: torch.Tensor) -> float:
        batch = x.shape[0]
        if isinstance(sigma, torch.Tensor):
            if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, batch)):
                raise GuidanceValueError(
                    f"sigma has shape {list(sigma.shape)}; it must be a number, a 0-d tensor or a "
                    f"[B] tensor with B = x.shape[0] = {batch}"
                )
        s = level_of(sigma)
        if not (s >= 0.0 and math.isfinite(s)):  # what check_sigmas refuses, and says why
            check_sigmas((s,), "sigma")
        self.noise.check_sigma(s)
        return s

    def _combine(
        self, prog: Program, ctx: StepContext, whole: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor:
        """The program's linear combination of this step's atoms (in the model's space).

        Where the combine is one weight per row block of the step's only call (``whole``:
        that call's output), it is one matrix product of the weights and the rows: one
        kernel where a multiply and an add per branch are several; two weights that sum to
        one are one ``lerp``. Float32 / float64 only: a half-precision weight would round
        the scales."""
        weights = prog.row_weights
        full = whole[0] if len(whole) == 1 else None
        if weights is not None and full is not None and full.dtype in _EXACT_WEIGHTS:
            k = len(weights)
            if k == 2 and abs(weights[0] + weights[1] - 1.0) < 1e-9:
                # a + b = 1: a r0 + b r1 = r1 + a (r0 - r1), one kernel (CFG: u + w' (c - u))
                b0, b1 = prog.groups[0].branches
                return torch.lerp(ctx.native[b1], ctx.native[b0], weights[0])
            if k > 2 and full.is_contiguous():
                out = torch.mm(prog.weights(full), full.view(k, -1))
                return out.view(full.shape[0] // k, *full.shape[1:])
        y: torch.Tensor | None = None
        for atom, coef in prog.coefs:
            if isinstance(atom, Branch):
                v = ctx.native[atom]
            else:
                values = {b: ctx.value(b, atom.space) for b in atom.atom_branches()}
                v = ctx.convert(atom.evaluate(values, ctx), atom.space, "native")
            if y is None:
                y = v * coef if coef != 1.0 else v.clone()
            else:
                y = y.add(v, alpha=coef)
        assert y is not None  # a prediction always has a nonzero coefficient
        return y

    # -- text: guidekit/explain.py -----------------------------------------------------------
    def __str__(self) -> str:
        return describe(self)

    def __repr__(self) -> str:
        return f"<Plan {self.expr!r}: {len(self.branches)} branches in {len(self.groups)} group(s)>"

    def explain(self, sigmas: Sequence[float] | torch.Tensor, batch: int = 1) -> str:
        """Per step (consecutive equal steps merged): branches, rows, calls, NFE, combine."""
        return explain(self, sigmas, batch)

