"""``compile(expr) -> Plan``: turn an expression into batched forwards plus a combine program."""

from __future__ import annotations

import math
from typing import Any

import attrs

from guidekit.branch import COND, MAIN, UNCOND, Branch
from guidekit.errors import GuidanceTypeError
from guidekit.expr import PRODUCT, Entry, Expr, atom_branches, class_instead_of_instance
from guidekit.fixed import check_fixed_shapes
from guidekit.linear import reads
from guidekit.parallel import as_parallel
from guidekit.plan import ForwardGroup, Plan
from guidekit.processor import AttentionModifier, InputModifier, Piped, Pipeline, Processor
from guidekit.renoise import sampler_term
from guidekit.schedule import Schedule, scheduled_fields
from guidekit.schedules.steps import is_dynamic, scheduled_parts
from guidekit.spaces import as_noise, check_prediction
from guidekit.split import AutoSplit, make_splitter

_COND_RANK = {COND: 0, UNCOND: 1}


def compile(
    expr: Any,
    *,
    prediction: str = "eps",
    noise: Any = "ve",
    max_rows: int | str | AutoSplit | None = None,
    parallel: Any = None,
    fixed_shapes: bool = False,
) -> Plan:
    """Compile a guidance expression for a model that predicts ``prediction``.

    Args:
        expr: a prediction, optionally piped (``CFG(7) + PAG(3) | APG(eta=0)``).
        prediction: the model's output space: ``"eps"``, ``"x0"``, ``"v"`` or ``"flow"``.
        noise: the sampler's noise convention, ``"ve"`` (k-diffusion), ``"vp"`` (DDPM) or
            ``"flow"`` (rectified flow), or a :class:`guidekit.Noise`.
        max_rows: the split policy (:mod:`guidekit.split`). ``None`` (or ``"auto"``), the
            default: one call per forward group, or one call per branch (or halves of
            it, down to one row) where that is measured faster, capped by free memory;
            ``"one call"`` (or ``"all"``) always one call; ``"branch"`` one call per
            branch; an int a row budget (the fewest calls of at most that many rows); an
            :class:`~guidekit.AutoSplit` its settings.
        parallel: a ``torch.distributed`` process group whose ranks share each call's
            branch blocks (see :mod:`guidekit.parallel`); ``None`` runs in this process.
        fixed_shapes: run every branch at every step, the inactive ones skipped in the
            combine, so the calls keep one shape (see :mod:`guidekit.fixed`).

    Returns:
        A :class:`~guidekit.plan.Plan`. ``print(plan)`` shows its groups and programs.
    """
    if isinstance(expr, type):
        raise GuidanceTypeError(class_instead_of_instance(expr))
    if isinstance(expr, (Processor, Pipeline)):
        raise GuidanceTypeError(
            f"compile({expr!r}): a post-processor needs a prediction on its left, "
            f"e.g. CFG(7) | {expr!r}"
        )
    if not isinstance(expr, Expr):
        raise GuidanceTypeError(
            f"compile() takes a guidance expression such as CFG(7) + PAG(3), got {expr!r}; "
            f"for text use guidekit.parse(...) first"
        )
    left, steps = (expr.expr, expr.steps) if isinstance(expr, Piped) else (expr, ())
    if left.weight != 1:
        raise GuidanceTypeError(
            f"compile({expr!r}): a plan computes a prediction, but {left!r} is a direction. "
            f"Add it to a prediction, e.g. CFG(7) + {left.fmt_at(PRODUCT)} or Cond() + "
            f"{left.fmt_at(PRODUCT)}"
        )
    sampler_term(left)  # CFG++: one term, as the prediction (refuses the rest by name)
    prediction = check_prediction(prediction)
    make_splitter(max_rows)  # validates
    shared = as_parallel(parallel, max_rows)
    fixed_shapes = check_fixed_shapes(fixed_shapes)
    if (shared is not None or fixed_shapes is True) and max_rows is None:
        # the ranks share fixed blocks (no rank times a split alone); fixed shapes keep one
        # call shape, which a timing trial of a second split would break
        max_rows = "one call"
    entries = _merge(left.entries())
    # input and attention modifiers act on the forward, before every post-processor
    forward_mods = (InputModifier, AttentionModifier)
    post = tuple(s for s in steps if not isinstance(s, forward_mods))
    modifiers = tuple(s for s in steps if isinstance(s, forward_mods))
    breakpoints = sorted(
        {b for e in entries for b in (e.lo, e.hi) if math.isfinite(b) and b > 0}
    )
    plan = Plan(
        expr=expr,
        left=left,
        post=post,
        modifiers=modifiers,
        prediction=prediction,
        noise=as_noise(noise),
        max_rows=max_rows,
        entries=entries,
        groups=_groups(entries, post),
        breakpoints=tuple(breakpoints),
        parallel=shared,
        scheduled=scheduled_parts(left, steps),
        dynamic=tuple(m for m in modifiers if isinstance(m, AttentionModifier) and is_dynamic(m)),
    )
    # Drop branches no interval ever runs (0 * d, cancelled terms): they need no model. A
    # scheduled coefficient may be nonzero at some level, so its branches stay.
    used = {b for _, _, prog in plan.regions() for b in prog.branches}
    used.update(plan.program(0.0).branches)
    used.update(
        b for e in entries if isinstance(e.coef, Schedule) and not e.coef.zero_on(e.lo, e.hi)
        for b in atom_branches(e.atom)
    )
    # a nonlinear term with a scheduled scale may read all its branches at some level even
    # where a zero scale reduces it at the levels looked at above (PerpNeg)
    used.update(
        b for e in entries
        if not isinstance(e.atom, Branch) and scheduled_fields(e.atom) and _may_run(e)
        for b in reads(e.atom)
    )
    groups = tuple(
        attrs.evolve(g, branches=tuple(b for b in g.branches if b in used)) for g in plan.groups
    )
    return attrs.evolve(
        plan, groups=tuple(g for g in groups if g.branches), programs={},
        fixed_shapes=fixed_shapes,
    )


def _may_run(e: Entry) -> bool:
    if isinstance(e.coef, Schedule):
        return not e.coef.zero_on(e.lo, e.hi)
    return e.coef != 0


def _merge(entries: tuple[Entry, ...]) -> tuple[Entry, ...]:
    """Sum the coefficients of equal (atom, interval) entries, keeping first-appearance order."""
    merged: dict[tuple[Any, float, float], float] = {}
    for e in entries:
        key = (e.atom, e.lo, e.hi)
        merged[key] = merged.get(key, 0.0) + e.coef
    return tuple(Entry(a, c, lo, hi) for (a, lo, hi), c in merged.items())


def _groups(entries: tuple[Entry, ...], post: tuple[Any, ...]) -> tuple[ForwardGroup, ...]:
    order: dict[Branch, int] = {}
    for e in entries:
        for b in atom_branches(e.atom):
            order.setdefault(b, len(order))
    for proc in post:
        for b in proc.branches():
            order.setdefault(b, len(order))
    models = [MAIN] if any(b.model == MAIN for b in order) else []
    models += [m for m in dict.fromkeys(b.model for b in order) if m != MAIN]

    def key(b: Branch) -> tuple[int, int, int]:
        return (b.perturbation is not None, _COND_RANK.get(b.cond, 2), order[b])

    def dependent(b: Branch) -> bool:
        return bool(getattr(b.perturbation, "dependent", False))

    # Branches whose input is made from this step's other outputs (SAG) form a second call
    # per model, after every first call.
    return tuple(
        ForwardGroup(m, tuple(sorted(
            (b for b in order if b.model == m and dependent(b) == bool(stage)), key=key
        )), stage)
        for stage in (0, 1)
        for m in models
        if any(b.model == m and dependent(b) == bool(stage) for b in order)
    )
