"""The guidance algebra's laws as checks of one drawn example each, and their helpers.

``tests/laws/test_laws.py`` pairs each check with a strategy (:class:`Law`) and runs it with
hypothesis. Numeric laws compare float64 outputs to 1e-9; row laws compare what the plan runs
(``plan.rows``, the active branches) at many noise levels.

Row counts depend on which coefficients are exactly zero, and rounding can leave a residue
of 1e-17 where the exact coefficient cancels (``CFG(1.1) + 0.1 * (Uncond() - Cond())``
keeps ``u`` at -8e-17). Where two plans' coefficients are summed in different orders, the
row laws therefore check that each plan runs between the branches that certainly matter and
the branches that appear at all (:func:`branches_at`), and compare the two plans exactly
whenever no coefficient is near such a cancellation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import assume, currently_in_test_context
from hypothesis import strategies as st
from strategies import (
    ROW_SIGMAS,
    World,
    assert_close,
    attach,
    needed_branches,
    reference,
    run_plan,
    structural_branches,
)

import guidekit
from guidekit import APG, CFG, Cond, Pipeline, Rescale, Uncond
from guidekit.expr import Expr

BATCHES = st.integers(1, 3)
#: Row laws about gates also look at sigma = 0, the end of sampling: a gate ``(0, hi]`` is off
#: there by the documented rule ``lo < sigma <= hi``.
GATE_SIGMAS = (*ROW_SIGMAS, 0.0)


@attrs.frozen(repr=False)
class Law:
    """One law: a name, a zero-argument strategy builder, a check of one drawn example, and
    hand-picked examples (edge cases hypothesis rarely draws) checked on every run."""

    name: str
    build: Callable[[], st.SearchStrategy[Any]]
    check: Callable[[Any], None]
    examples: tuple[Any, ...] = ()

    def __repr__(self) -> str:
        return f"Law({self.name!r})"  # short, for hypothesis's failure reports

    @property
    def strategy(self) -> st.SearchStrategy[Any]:
        # built once per law: hypothesis draws from the same strategy object every example
        if self.name not in _BUILT:
            _BUILT[self.name] = self.build()
        return _BUILT[self.name]


_BUILT: dict[str, st.SearchStrategy[Any]] = {}


# -- helpers ----------------------------------------------------------------------------------


def compile_for(expr: Expr, world: World | None = None, max_rows: int | None = None) -> Any:
    """``compile`` for ``world``'s spaces (x0 when only rows matter)."""
    if world is None:
        return guidekit.compile(expr, prediction="x0")
    return guidekit.compile(
        expr, prediction=world.prediction, noise=world.noise, max_rows=max_rows
    )


def same_numbers(exprs: list[Expr], world: World, law: str) -> None:
    """Every expression gives the first one's outputs at every noise level of ``world``."""
    first = run_plan(exprs[0], world)
    for other in exprs[1:]:
        run = run_plan(other, world)
        for sigma, a, b in zip(world.sigmas, first.outputs, run.outputs):
            assert_close(
                b, a, f"{law}: {other!r} vs {exprs[0]!r} at sigma={sigma}", equal_nan=True
            )


def branches_at(plan: Any, expr: Expr, sigma: float, batch: int) -> tuple[set[Any], bool]:
    """The plan's active branches at ``sigma``, checked against the tree; and whether the
    tree is free of near-cancellations there (then the set is exactly determined).

    Every branch with a coefficient clearly away from zero must run, no branch the tree does
    not name at this level may run, each distinct branch is one block of ``batch`` rows, and
    one call per forward group is the NFE.
    """
    prog = plan.program(sigma)
    got = set(prog.branches)
    assert len(got) == len(prog.branches), f"{expr!r}: a branch runs twice at sigma={sigma}"
    certain = needed_branches(expr, sigma, tol=1e-9)
    possible = structural_branches(expr, sigma)
    assert certain <= got, f"{expr!r} at sigma={sigma}: needed {certain - got} not run"
    assert got <= possible, f"{expr!r} at sigma={sigma}: runs {got - possible}, never named"
    assert plan.rows(sigma, batch) == len(got) * batch
    assert plan.nfe(sigma, batch) == len(prog.groups)
    return got, certain == possible


def same_rows(pairs: list[tuple[Expr, Any]], batch: int, sigmas: tuple[float, ...]) -> None:
    """Each (expr, plan) runs sound rows; plans agree wherever none is near a cancellation."""
    for sigma in sigmas:
        seen = [branches_at(plan, expr, sigma, batch) for expr, plan in pairs]
        if all(exact for _, exact in seen):
            first = seen[0][0]
            for (expr, _), (got, _) in zip(pairs[1:], seen[1:]):
                assert got == first, f"{expr!r} vs {pairs[0][0]!r} at sigma={sigma}"


def require(condition: bool, why: str) -> None:
    """``assume`` under hypothesis; a hand-picked example must meet the condition outright."""
    if currently_in_test_context():
        assume(condition)
    else:
        assert condition, f"hand-picked example: {why}"


def layout(plan: Any) -> str:
    """Everything about a plan's layout and programs, as text."""
    regions = [
        (lo, hi, [(repr(a), c) for a, c in prog.coefs], [(g.model, [b.label for b in g.branches])
         for g in prog.groups], prog.formula)
        for lo, hi, prog in plan.regions()
    ]
    groups = [(g.model, [b.label for b in g.branches]) for g in plan.groups]
    return json.dumps([str(plan), groups, list(plan.breakpoints), regions])


def intersect(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float] | None:
    """The intersection of two gate intervals ``(lo, hi]``, ``None`` when empty."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


# -- the laws -----------------------------------------------------------------------------------


def check_add_associative(ex: tuple[Expr, Expr, Expr, Expr, World]) -> None:
    p, d1, d2, d3, world = ex
    same_numbers(
        [
            (p + d1) + d2,
            p + (d1 + d2),
            (d1 + p) + d2,
            d1 + (p + d2),
            p + ((d1 + d2) + d3) - d3,
            p + (d1 + (d2 + d3)) - d3,
        ],
        world,
        "+ associative",
    )


def check_add_commutative(ex: tuple[Expr, Expr, Expr, Expr, World]) -> None:
    p, q, d1, d2, world = ex
    same_numbers([p + d1, d1 + p], world, "+ commutative")
    same_numbers([p + (d1 + d2), p + (d2 + d1)], world, "+ commutative")
    same_numbers([q + (p - q) + d1, (p - q) + d1 + q, d1 + q + (p - q)], world,
                 "+ commutative")


def check_zero_direction(ex: tuple[Expr, Expr, int, World]) -> None:
    p, d, batch, world = ex
    zero = 0 * d
    same_numbers([p, p + zero, zero + p, p + (d - d), p + zero.between(0.5, 7)], world,
                 "0 * d is the identity")
    plain = compile_for(p)
    added = compile_for(p + zero)
    for sigma in ROW_SIGMAS:
        # p's coefficients plus exact zeros, summed in p's order: the same rows, exactly
        assert added.rows(sigma, batch) == plain.rows(sigma, batch), f"sigma={sigma}"
        assert set(added.program(sigma).branches) == set(plain.program(sigma).branches)
    assert set(added.branches) == set(plain.branches)
    same_rows([(p, compile_for(p)), (zero + p, compile_for(zero + p))], batch, ROW_SIGMAS)


def check_scalar_distributes(ex: tuple[Expr, float, float, Expr, Expr, World]) -> None:
    p, k1, k2, d1, d2, world = ex
    same_numbers([p + k1 * (d1 + d2), p + (k1 * d1 + k1 * d2)], world, "k (a + b) = k a + k b")
    same_numbers([p + (k1 + k2) * d1, p + k1 * d1 + k2 * d1], world, "(j + k) d = j d + k d")
    same_numbers([p + k1 * (k2 * d1), p + (k1 * k2) * d1], world, "j (k d) = (j k) d")


def check_cfg_endpoints(ex: tuple[Expr, int, World]) -> None:
    d, batch, world = ex
    same_numbers([CFG(1), Cond()], world, "CFG(1) = Cond()")
    same_numbers([CFG(0), Uncond()], world, "CFG(0) = Uncond()")
    same_numbers([CFG(1) + d, Cond() + d], world, "CFG(1) + d = Cond() + d")
    same_numbers([CFG(0) + d, Uncond() + d], world, "CFG(0) + d = Uncond() + d")
    for scale, only in ((1, "c"), (0, "u")):
        plan = compile_for(CFG(scale), world)
        run = run_plan(CFG(scale), world)
        for sigma, calls in zip(world.sigmas, run.calls):
            assert plan.rows(sigma, batch) == batch, f"CFG({scale}) runs more than one block"
            assert [(c.rows, c.branches) for c in calls] == [(world.batch, (only,))]
    for scale, term in ((1, Cond()), (0, Uncond())):
        a, b = CFG(scale) + d, term + d
        same_rows([(a, compile_for(a)), (b, compile_for(b))], batch, ROW_SIGMAS)


def check_duplicates(ex: tuple[Expr, Expr, int]) -> None:
    p, d, batch = ex
    twice, doubled, once = p + d + d, p + 2 * d, p + d
    plans = [(e, compile_for(e)) for e in (twice, doubled, once)]
    allowed = set(p.branches()) | set(d.branches())
    assert set(plans[0][1].branches) <= allowed, f"{twice!r} runs a branch it does not name"
    same_rows(plans, batch, ROW_SIGMAS)
    # the literal form for a direction: e + e needs no more rows than e
    e_twice, e_once = Cond() + (d + d), Cond() + d
    same_rows([(e_twice, compile_for(e_twice)), (e_once, compile_for(e_once))], batch,
              ROW_SIGMAS)


def check_rows_are_needed_branches(ex: tuple[Expr, int]) -> None:
    expr, batch = ex
    plan = compile_for(expr)
    union: set[Any] = set()
    for sigma in ROW_SIGMAS:
        got, _ = branches_at(plan, expr, sigma, batch)
        union |= got
    # the layout holds the branches that run, and nothing else (sigma 0, where a gate
    # (0, hi] is off, may need a fallback branch of its own)
    assert union <= set(plan.branches), f"{expr!r}: a running branch is not in the layout"
    extra = set(plan.branches) - union
    assert extra <= structural_branches(expr, 0.0), f"{expr!r}: the layout holds {extra}"
    assert len(plan.branches) == len(set(plan.branches))


def check_pipe_associative(ex: tuple[Expr, Any, Any, Any, World]) -> None:
    left, a, b, c, world = ex
    one, two = (left | a) | b, left | (a | b)
    assert one == two and str(one) == str(two), f"{one!r} != {two!r}"
    assert (a | b) | c == a | (b | c), "pipelines compose associatively"
    assert isinstance(a | b, Pipeline)
    three = [(left | a) | b | c, left | (a | b | c), left | (a | (b | c)), ((left | a) | b) | c]
    assert all(t == three[0] for t in three)
    same_numbers([one, two], world, "pipe associative")
    same_numbers(three, world, "pipe associative")


def check_identity_pipes(ex: tuple[Expr, World]) -> None:
    expr, world = ex
    identities = [
        attach(expr, [APG(eta=1)]),
        attach(expr, [Rescale(0)]),
        attach(expr, [Rescale(0), APG(eta=1), Rescale(0)]),
    ]
    ambiguous = any(reference(e, world).ambiguous for e in identities)
    require(not ambiguous, "APG coefficient ambiguous")
    same_numbers([expr, *identities], world, "identity pipe")


def check_parse_roundtrip(ex: tuple[Expr, Expr, Any, Any]) -> None:
    # imported here: guidekit.parse is being written alongside these laws
    parse = _parse()
    for value in (*ex, ex[2] | ex[3]):
        text = str(value)
        back = parse(text)
        assert back == value, f"parse({text!r}) gave {back!r}"
        assert str(back) == text


def _parse() -> Callable[[str], Any]:
    import importlib

    found = getattr(guidekit, "parse", None)
    if found is None or not callable(found):
        found = importlib.import_module("guidekit.parse")
    return getattr(found, "parse", found)  # type: ignore[no-any-return]


def check_compile_deterministic(ex: tuple[Expr, World]) -> None:
    expr, world = ex
    plan = compile_for(expr, world)
    first = layout(plan)
    assert layout(compile_for(expr, world)) == first
    assert layout(compile_for(_rebuild(expr), world)) == first, "an equal copy compiles alike"
    check_documented_layout(plan)


def check_documented_layout(plan: Any) -> None:
    """plan.py's row layout: the main model's group first; within a group unperturbed
    branches first (cond, then uncond), then perturbed ones; a step's groups keep that order.
    Dependent branches (SAG) form a second group per model, after every first group."""
    stages = [g.stage for g in plan.groups]
    assert stages == sorted(stages), f"a dependent group runs before a first one: {stages}"
    assert all(
        getattr(b.perturbation, "dependent", False) == bool(g.stage)
        for g in plan.groups for b in g.branches
    ), "a dependent branch outside the second call (or the reverse)"
    keyed = [(g.model, g.stage) for g in plan.groups]
    assert len(set(keyed)) == len(keyed), f"a model has two forward groups: {keyed}"
    models = [g.model for g in plan.groups if g.stage == 0]
    if "main" in models:
        assert models[0] == "main", f"main is not the first forward group: {models}"
    rank = {"cond": 0, "uncond": 1}
    for group in plan.groups:
        keys = [(b.perturbation is not None, rank.get(b.cond, 2)) for b in group.branches]
        assert keys == sorted(keys), f"{group.model}: layout {group.labels} is out of order"
    for _, _, prog in plan.regions():
        order = [(g.model, g.stage) for g in prog.groups]
        assert order == [k for k in keyed if k in order]
        for g in prog.groups:
            full = next(
                f for f in plan.groups if (f.model, f.stage) == (g.model, g.stage)
            ).branches
            assert list(g.branches) == [b for b in full if b in g.branches], (
                f"a step's {g.model} rows are not in the plan's layout order"
            )


def _rebuild(expr: Any) -> Any:
    """A structurally equal copy with fresh objects (no shared identities or caches)."""
    if isinstance(expr, guidekit.Piped):
        return guidekit.Piped(_rebuild(expr.expr), tuple(attrs.evolve(s) for s in expr.steps))
    if isinstance(expr, guidekit.Sum):
        return guidekit.Sum(tuple(_rebuild(t) for t in expr.terms))
    if isinstance(expr, guidekit.Scaled):
        return guidekit.Scaled(expr.factor, _rebuild(expr.expr))
    if isinstance(expr, guidekit.Gated):
        return guidekit.Gated(_rebuild(expr.expr), expr.lo, expr.hi)
    return attrs.evolve(expr)


def check_batched_equals_reference(ex: tuple[Expr, World, int | None]) -> None:
    expr, world, max_rows = ex
    ref = reference(expr, world)
    require(not ref.ambiguous, "APG coefficient ambiguous")
    run = run_plan(expr, world, max_rows=max_rows)
    for sigma, got, want, calls in zip(world.sigmas, run.outputs, ref.outputs, run.calls):
        assert_close(got, want, f"{expr!r} (max_rows={max_rows}) at sigma={sigma}")
        rows = run.plan.rows(sigma, world.batch)
        assert sum(c.rows for c in calls) == rows, f"rows at sigma={sigma}"
        if max_rows is not None:
            assert all(c.rows <= max_rows for c in calls)
            assert len(calls) == run.plan.nfe(sigma, world.batch)
        else:
            assert len(calls) == len(run.plan.program(sigma).groups), "one call per group"


Bounds = tuple[float, float]


def check_nested_gates(ex: tuple[Expr, Expr, Bounds, Bounds, int, World]) -> None:
    p, d, inner, outer, batch, world = ex
    both = intersect(inner, outer)
    nested_d = p + d.between(*inner).between(*outer)
    nested_p = p.between(*inner).between(*outer)
    single_d = p + d.between(*both) if both else p
    single_p = p.between(*both) if both else Cond()
    same_numbers([nested_d, single_d], world, "nested gates intersect (direction)")
    same_numbers([nested_p, single_p], world, "nested gates intersect (prediction)")
    same_rows([(nested_d, compile_for(nested_d)), (single_d, compile_for(single_d))], batch,
              GATE_SIGMAS)
    same_rows([(nested_p, compile_for(nested_p)), (single_p, compile_for(single_p))], batch,
              GATE_SIGMAS)


def check_gate_outside_adds_nothing(ex: tuple[Expr, Expr, Bounds, int]) -> None:
    p, d, (lo, hi), batch = ex
    gated = p + d.between(lo, hi)
    # noisiest first, as a sampler goes, then the reverse: the answer must not depend on order
    for order in (GATE_SIGMAS, GATE_SIGMAS[::-1]):
        plan, plain = compile_for(gated), compile_for(p)
        for sigma in order:
            if lo < sigma <= hi:
                branches_at(plan, gated, sigma, batch)
                continue
            # d's entries are inactive, p's are summed as in p alone: exactly p's rows
            assert plan.rows(sigma, batch) == plain.rows(sigma, batch), (
                f"{gated!r} at sigma={sigma}, outside ({lo}, {hi}]: "
                f"{plan.program(sigma).branches} vs {plain.program(sigma).branches}"
            )
            assert set(plan.program(sigma).branches) == set(plain.program(sigma).branches)
