"""Hypothesis strategies and a plain reference evaluator for guidekit's law tests.

Three parts:

* **Values.** One strategy per registered class (:func:`strategy_for`), DERIVED from its attrs
  fields: a field draws from the class's ``field_examples`` when it names the field, else from
  its validator's range (:data:`BY_VALIDATOR`), else keeps its default; values the term's own
  validators reject are discarded. Recursive expression strategies are built from them:
  :func:`directions`, :func:`predictions`, :func:`piped`. They reuse drawn subtrees
  (``d + d``, ``p + (d - d)``) so that deduplication is exercised.
* **Worlds.** :class:`World` fixes the batch, prediction space, noise convention, seed and
  a decreasing list of noise levels. From it, deterministic float64 branch outputs
  (:func:`branch_output`) and fake models (:class:`FakeModel`) that answer every row with
  the output of the branch the row belongs to. Rows carry an integer ``tag`` (0 = cond,
  1 = uncond) and ``idx`` (sample index) in the conditioning, checked against the plan's
  documented row layout, which also places perturbed branches (PAG).
* **Reference.** :func:`reference` computes an expression's value directly from the tree,
  with each term's formula from the papers (``methods.md``) written here independently
  and without ``Plan.step``, so "batched evaluation equals evaluating each branch
  separately" compares two different computations.

A new linear or direction term needs nothing here: its strategy comes from its fields and
the reference reads its ``coefficients()`` (its formula is checked by its own oracle test,
see docs/contributing.md). A nonlinear term or a post-processor needs a reference formula
(:data:`TERM_REFERENCE` / :func:`_apply`); a law test names what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs
import torch
from hypothesis import reject
from hypothesis import strategies as st

import guidekit
from guidekit import (
    APGProjection,
    AutoguidanceTerm,
    CADSAnnealing,
    CFGRescale,
    CFGTerm,
    CFGZeroStarTerm,
    CondTerm,
    Gated,
    GuidanceError,
    GuidanceTypeError,
    Piped,
    Scaled,
    Sum,
    TCFGTerm,
    UncondTerm,
    fields,
)
from guidekit.branch import COND, MAIN, UNCOND, Branch
from guidekit.expr import Expr
from guidekit.fields import Range
from guidekit.registry import kind, processor_classes, term_classes
from guidekit.terms.base import DirectionTerm, LinearTerm

# -- numbers ------------------------------------------------------------------------------------


def numbers(lo: float, hi: float, places: int = 2) -> st.SearchStrategy[float]:
    """Finite floats in ``[lo, hi]`` rounded to ``places`` decimals, so text round-trips."""
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(
        lambda v: min(max(round(v, places), lo), hi)
    )


SCALES = numbers(-3, 8)
#: Noise levels at which laws evaluate plans, noisiest first (VE / k-diffusion sigmas).
VE_SIGMAS = (20.0, 7.0, 2.5, 1.0, 0.5, 0.3, 0.05)
#: Flow-matching sigmas lie in [0, 1].
FLOW_SIGMAS = (0.95, 0.7, 0.5, 0.3, 0.05)
#: Gate bounds: mostly the evaluation levels themselves, so ``lo < sigma <= hi`` is
#: exercised exactly at its edges, plus a few levels in between.
GATE_POINTS = (0.0, 0.05, 0.3, 0.5, 0.75, 1.0, 2.5, 4.0, 7.0, 20.0)
#: Every level a rows law looks at, noisiest first: each gate point and one level inside
#: every interval between them, so every region of a plan is visited.
ROW_SIGMAS = (50.0, 20.0, 10.0, 7.0, 5.0, 4.0, 3.0, 2.5, 1.5, 1.0, 0.9, 0.75, 0.6, 0.5, 0.4,
              0.3, 0.1, 0.05, 0.01)
#: the models the test worlds answer for besides ``main`` (Autoguidance's weak models)
AUTOGUIDANCE_MODELS = ("weak", "small")

# -- one strategy per registered class, derived from its fields ----------------------------------

#: a field without ``field_examples`` draws from its validator's range
BY_VALIDATOR: dict[Any, st.SearchStrategy[Any]] = {
    fields.finite: SCALES,
    fields.unit_interval: numbers(0, 1),
    fields.nonnegative: numbers(0, 8),
    fields.positive_or_none: st.none() | numbers(0.5, 20, 1),
    fields.count: st.integers(0, 2),
}


def _examples(spec: Any) -> st.SearchStrategy[Any]:
    if isinstance(spec, Range):
        return numbers(spec.lo, spec.hi)
    if not any(isinstance(v, Range) for v in spec):
        return st.sampled_from(spec)
    return st.one_of([_examples(v) if isinstance(v, Range) else st.just(v) for v in spec])


def field_strategy(cls: type, field: attrs.Attribute) -> st.SearchStrategy[Any]:
    """The values one field of a registered class draws (see the module docstring)."""
    declared = getattr(cls, "field_examples", {})
    if field.name in declared:
        return _examples(declared[field.name])
    if field.validator in BY_VALIDATOR:
        return BY_VALIDATOR[field.validator]
    if field.default is not attrs.NOTHING:
        return st.just(field.default)
    raise KeyError(
        f"{cls.__name__}.{field.name} has no default, no field_examples and a validator the "
        f"tests do not know: declare field_examples = {{{field.name!r}: (...)}} on the class"
    )


@functools.cache
def strategy_for(cls: type) -> st.SearchStrategy[Any]:
    """The strategy for one registered class; a clear error for a field it cannot draw."""
    drawn = {
        getattr(f, "alias", f.name): field_strategy(cls, f) for f in attrs.fields(cls) if f.init
    }

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        kwargs = {name: draw(strategy) for name, strategy in drawn.items()}
        try:
            return cls(**kwargs)
        except GuidanceError:  # a combination the term refuses (CADS's tau1 >= tau2)
            reject()

    return build()


def _classes(*kinds: str) -> list[type]:
    return [c for c in term_classes() if kind(c) in kinds]


def terms(*kinds: str) -> st.SearchStrategy[Any]:
    """Any registered term of the given kinds (all kinds when none is given)."""
    classes = _classes(*kinds) if kinds else list(term_classes())
    return st.one_of([strategy_for(c) for c in classes])


def processors() -> st.SearchStrategy[Any]:
    """Any registered post-processor or input modifier."""
    return st.one_of([strategy_for(c) for c in processor_classes()])


@st.composite
def gate_bounds(draw: st.DrawFn) -> tuple[float, float]:
    """``(lo, hi)`` with ``0 <= lo < hi`` (``hi`` may be ``inf``)."""
    lo = draw(st.sampled_from(GATE_POINTS))
    hi = draw(st.sampled_from([h for h in (*GATE_POINTS, math.inf) if h > lo]))
    return lo, hi


# -- recursive expressions ------------------------------------------------------------------------


def prediction_atoms(linear: bool = False) -> st.SearchStrategy[Expr]:
    """Registered prediction terms; ``linear`` leaves out nonlinear ones (CFG-Zero*, TCFG)."""
    return terms("prediction") if linear else terms("prediction", "nonlinear")


def _gate(pair: tuple[Expr, tuple[float, float]]) -> Expr:
    expr, (lo, hi) = pair
    return expr.between(lo, hi)


def directions(linear: bool = False, max_leaves: int = 5) -> st.SearchStrategy[Expr]:
    """Directions (weight 0): registered direction terms and prediction differences,
    combined by ``+``, ``-``, scaling, negation and gates, with duplicated subtrees."""
    atoms = prediction_atoms(linear)
    leaves = st.one_of(
        terms("direction"),
        st.tuples(atoms, atoms).map(lambda ab: ab[0] - ab[1]),
    )

    def extend(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
        pairs = st.tuples(children, children)
        return st.one_of(
            pairs.map(lambda ab: ab[0] + ab[1]),
            pairs.map(lambda ab: ab[0] - ab[1]),
            st.tuples(SCALES, children).map(lambda kd: kd[0] * kd[1]),
            children.map(lambda d: -d),
            st.tuples(children, gate_bounds()).map(_gate),
            # the same subtree twice: equal branches must stay one row block
            children.map(lambda d: d + d),
            pairs.map(lambda ab: ab[0] + (ab[1] - ab[1])),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


def predictions(linear: bool = False, max_leaves: int = 4) -> st.SearchStrategy[Expr]:
    """Predictions (weight 1): a prediction term plus directions, ``p - q + r``, gated
    predictions and duplicated subtrees (``p + d + d``, ``p + (d - d)``)."""
    dirs = directions(linear, max_leaves=3)

    def extend(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
        with_dir = st.tuples(children, dirs)
        return st.one_of(
            with_dir.map(lambda pd: pd[0] + pd[1]),
            with_dir.map(lambda pd: pd[1] + pd[0]),
            with_dir.map(lambda pd: pd[0] + pd[1] + pd[1]),
            with_dir.map(lambda pd: pd[0] + (pd[1] - pd[1])),
            st.tuples(children, children, children).map(lambda t: t[0] - t[1] + t[2]),
            st.tuples(children, gate_bounds()).map(_gate),
        )

    return st.recursive(prediction_atoms(linear), extend, max_leaves=max_leaves)


def has_uncond(expr: Expr) -> bool:
    """Whether ``expr``'s linear form names the main model's unconditional branch."""
    return Branch(MAIN, UNCOND) in [e.atom for e in expr.entries()]


def apg_lefts() -> st.SearchStrategy[Expr]:
    """Linear predictions with an unconditional branch: what ``| APG(...)`` accepts."""
    return predictions(linear=True).filter(has_uncond)


def attach(left: Expr, procs: Iterable[Any]) -> Expr:
    """``left | p1 | p2 ...``, leaving out processors that reject ``left`` (APG on a
    nonlinear or unconditional-free prediction)."""
    expr = left
    for proc in procs:
        try:
            expr = expr | proc
        except GuidanceTypeError:
            continue
    return expr


@st.composite
def piped(draw: st.DrawFn, min_steps: int = 0, max_steps: int = 3) -> Expr:
    """``prediction | processors`` (possibly with no processor left when ``min_steps=0``)."""
    if min_steps:
        left = draw(apg_lefts())
    else:
        left = draw(st.one_of(predictions(), apg_lefts()))
    procs = draw(st.lists(processors(), min_size=min_steps, max_size=max_steps))
    expr = attach(left, procs)
    if min_steps and not isinstance(expr, Piped):
        # apg_lefts() accepts every processor, so this only guards future processors
        expr = left | CFGRescale(0.5)
    return expr


def expressions() -> st.SearchStrategy[Expr]:
    """Anything a user may write on the left of ``compile``: predictions, piped or not
    (weighted towards pipes, whose processors are the least likely to be drawn)."""
    return st.one_of(predictions(), piped(), piped(min_steps=1))


def classes_in(expr: Any) -> set[type]:
    """Every term and processor class used in ``expr``."""
    found: set[type] = set()
    stack = [expr]
    while stack:
        node = stack.pop()
        found.add(type(node))
        if isinstance(node, Piped):
            found.update(type(s) for s in node.steps)
        if isinstance(node, Expr):
            stack.extend(node.children())
    return found


# -- worlds: batch, spaces, noise levels and branch outputs --------------------------------------

#: (prediction space, noise convention) pairs whose conversions the reference knows.
SPACES = (("x0", "ve"), ("eps", "ve"), ("v", "ve"), ("flow", "flow"))
TAGS = {COND: 0, UNCOND: 1}
TAG_NAMES = {v: k for k, v in TAGS.items()}
SHAPE = (3, 4, 4)


@attrs.frozen
class World:
    """Everything besides the expression that a plan needs to run: deterministic in ``seed``."""

    batch: int
    seed: int
    prediction: str
    noise: str
    sigmas: tuple[float, ...]


@st.composite
def worlds(draw: st.DrawFn, max_steps: int = 3) -> World:
    """A batch of 1-3, a prediction space, and 1-``max_steps`` decreasing noise levels.

    Sigma 0 is left to the gate laws' row checks: samplers do not call the model there, and
    eps, v and flow predictions carry no information about x0 at sigma 0.
    """
    prediction, noise = draw(st.sampled_from(SPACES))
    grid = FLOW_SIGMAS if noise == "flow" else VE_SIGMAS
    sigmas = draw(st.lists(st.sampled_from(grid), min_size=1, max_size=max_steps, unique=True))
    return World(
        batch=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
        prediction=prediction,
        noise=noise,
        sigmas=tuple(sorted(sigmas, reverse=True)),
    )


def _generator(world: World, *parts: Any) -> torch.Generator:
    # crc32 of the text, not hash(): the same world gives the same tensors in every process
    text = "/".join(str(p) for p in (world.seed, *parts))
    return torch.Generator().manual_seed(zlib.crc32(text.encode()))


def _normal(world: World, *parts: Any, shape: Sequence[int] | None = None) -> torch.Tensor:
    size = (world.batch, *(SHAPE if shape is None else shape))
    return torch.randn(size, generator=_generator(world, *parts), dtype=torch.float64)


def branch_output(world: World, branch: Branch, step: int) -> torch.Tensor:
    """The model output of ``branch`` at step ``step``: float64, ``[B, 3, 4, 4]``.

    Every branch is a shared base plus its own smaller part, as real conditional and
    unconditional predictions are close; this also keeps TCFG's top singular direction
    well separated, so the reference and the library agree to 1e-9.
    """
    base = _normal(world, "base", step)
    return base + 0.5 * _normal(world, branch.model, branch.cond, branch.perturbation, step)


def sample_x(world: World, step: int) -> torch.Tensor:
    """The sampler state ``x`` at step ``step``."""
    return 2.0 * _normal(world, "x", step)


def conditionings(world: World) -> dict[str, dict[str, torch.Tensor]]:
    """``cond`` / ``uncond`` dicts: integer ``tag`` and ``idx`` name a row's branch and
    sample; ``emb`` is a float embedding for CADS to anneal (the fake models ignore it)."""
    b = world.batch
    return {
        name: {
            "tag": torch.full((b,), tag, dtype=torch.long),
            "idx": torch.arange(b),
            "emb": _normal(world, "emb", name, shape=(4,)),
        }
        for name, tag in TAGS.items()
    }


class FakeModel:
    """A model that answers each row with the output of the branch it belongs to.

    ``expected`` is the documented row layout of this model's forward group at this step:
    one block of ``B`` rows per active branch, in ``plan.program(sigma)`` order; calls (one,
    or several under a row budget) consume it in order. Every row's ``tag`` (cond or
    uncond), ``idx`` (sample), ``x`` and ``sigma`` are checked against it, so a wrong layout
    or split fails here rather than as a small numeric mismatch. The layout is what tells a
    perturbed branch (``c`` with PAG's identity attention, say) from ``c``: their inputs are
    the same, as they are for a real model, whose attention engine reads the same layout.
    """

    def __init__(
        self,
        name: str,
        world: World,
        step: int,
        expected: Sequence[Branch],
        probe: LayoutProbe | None = None,
        modifiers: tuple[Any, ...] = (),
    ) -> None:
        self.name = name
        self.world = world
        self.step = step
        self.modifiers = modifiers
        self.sigma = world.sigmas[step]
        self.x = sample_x(world, step)
        self.expected = [(br, b) for br in expected for b in range(world.batch)]
        self.probe = probe
        self.rows_seen = 0

    def __call__(
        self,
        x_rows: torch.Tensor,
        sigma_rows: torch.Tensor,
        *,
        tag: torch.Tensor,
        idx: torch.Tensor,
        emb: torch.Tensor,
    ) -> torch.Tensor:
        n = x_rows.shape[0]
        assert sigma_rows.shape == (n,) and tag.shape == (n,) and idx.shape == (n,), (
            f"model {self.name!r}: rows disagree: x {list(x_rows.shape)}, sigma "
            f"{list(sigma_rows.shape)}, tag {list(tag.shape)}, idx {list(idx.shape)}"
        )
        assert emb.shape[0] == n
        assert torch.all(sigma_rows == self.sigma), f"sigma rows {sigma_rows} != {self.sigma}"
        assert self.rows_seen + n <= len(self.expected), (
            f"model {self.name!r} got {self.rows_seen + n} rows, the layout has "
            f"{len(self.expected)}"
        )
        told = self._told(n)
        outs = []
        for r in range(n):
            branch, b = self.expected[self.rows_seen + r]
            if told is not None:
                assert told[r] == branch, (
                    f"model {self.name!r} row {self.rows_seen + r}: around_call's layout says "
                    f"{told[r]!r}, the plan's program says {branch!r}"
                )
            assert (TAG_NAMES[int(tag[r])], int(idx[r])) == (branch.cond, b), (
                f"model {self.name!r} row {self.rows_seen + r}: conditioning "
                f"{TAG_NAMES[int(tag[r])]!r} sample {int(idx[r])}, layout says {branch!r} "
                f"sample {b}"
            )
            if getattr(branch.perturbation, "dependent", False):
                # SAG's degraded input, rebuilt from x0 and eps of u: x up to round-off
                assert torch.allclose(x_rows[r], self.x[b], rtol=1e-6, atol=1e-6), (
                    f"row {r}: SAG's input is not sample {b}'s x"
                )
            else:
                assert torch.equal(x_rows[r], self.x[b]), f"row {r} does not carry sample {b}'s x"
            outs.append(branch_output(self.world, modified(branch, self.modifiers), self.step)[b])
        self.rows_seen += n
        return torch.stack(outs)

    def _told(self, n: int) -> list[Branch] | None:
        """Each row's branch per the RowLayout that ``around_call`` received, if any."""
        layout = None if self.probe is None else self.probe.current
        if layout is None:
            return None
        assert (layout.model, layout.rows) == (self.name, n), (
            f"around_call announced {layout.rows} rows of {layout.model!r}, the call has {n} "
            f"rows of {self.name!r}"
        )
        told: list[Branch | None] = [None] * n
        for branch, start, stop in layout.blocks:
            for r in range(start, stop):
                assert told[r] is None, f"row {r} is in two blocks of {layout}"
                told[r] = branch
        assert None not in told, f"a row is in no block of {layout}"
        return told  # type: ignore[return-value]

    def check_done(self) -> None:
        """Every row of the layout was asked for."""
        assert self.rows_seen == len(self.expected), (
            f"model {self.name!r} ran {self.rows_seen} of {len(self.expected)} rows"
        )


class LayoutProbe:
    """An ``around_call`` for ``Plan.step``: holds the :class:`~guidekit.plan.RowLayout` of
    the model call in progress, as an attention engine would, for :class:`FakeModel`."""

    def __init__(self) -> None:
        self.current: Any = None
        self.calls = 0

    @contextlib.contextmanager
    def __call__(self, layout: Any) -> Iterator[None]:
        assert self.current is None, "around_call entered twice"
        self.current = layout
        self.calls += 1
        # what an attention engine does for EMAG: watch the conditional rows every step
        # (averages are checked on real models in tests/attention/test_emag.py)
        if layout.state is not None:
            from guidekit.attention.ema import StepMemo

            for p in layout.state.inputs:
                if getattr(p, "dependent", False):
                    # SAG: a map in which no token stands out, so nothing is blurred and the
                    # degraded input is x itself (up to round-off); checked by FakeModel
                    from guidekit.attention.sag import SAGMemo

                    memo = SAGMemo("probe", torch.zeros(
                        layout.batch, math.prod(SHAPE[1:]), dtype=torch.float64
                    ), layout.batch)
                    layout.state.memo(p, lambda memo=memo: memo)
                else:
                    layout.state.memo(p, StepMemo)
        try:
            yield
        finally:
            self.current = None


def fake_models(
    plan: guidekit.Plan, world: World, step: int, probe: LayoutProbe | None = None
) -> dict[str, FakeModel]:
    """One :class:`FakeModel` per model name the test worlds use, each expecting its forward
    group's layout at this step (none for a model that does not run)."""
    groups: dict[str, tuple[Branch, ...]] = {}
    for g in plan.program(world.sigmas[step]).groups:  # a model's dependent call comes later
        groups[g.model] = groups.get(g.model, ()) + g.branches
    names = dict.fromkeys((MAIN, "weak", *AUTOGUIDANCE_MODELS, *groups))
    return {
        n: FakeModel(n, world, step, groups.get(n, ()), probe, plan.attention) for n in names
    }


def modified(branch: Branch, modifiers: Sequence[Any]) -> Branch:
    """``branch`` as a plan's attention modifiers leave it; the fake worlds give a changed
    branch outputs of its own. The rule (docs/semantics.md, written here independently):
    the engine sits on the main model; PLADIS and GAG change every row of its calls, NAG
    the rows whose conditioning is ``cond`` (perturbed ones included)."""
    mine = tuple(
        m for m in modifiers
        if branch.model == MAIN and (type(m)._name != "NAG" or branch.cond == COND)
    )
    if not mine:
        return branch
    return Branch(branch.model, branch.cond, (branch.perturbation, mine))


@attrs.frozen
class Run:
    """The outputs of a plan over a world's noise levels, and every model call made."""

    outputs: tuple[torch.Tensor, ...]
    calls: tuple[tuple[guidekit.CallRecord, ...], ...]
    plan: guidekit.Plan


def run_plan(expr: Expr, world: World, max_rows: int | None = None) -> Run:
    """Compile ``expr`` for ``world`` and step it once per noise level (one fresh run)."""
    plan = guidekit.compile(
        expr, prediction=world.prediction, noise=world.noise, max_rows=max_rows
    )
    state = plan.init(seed=world.seed)
    conds = conditionings(world)
    # Perturbed branches (PAG) and attention modifiers need an around_call, as with a real
    # attention engine; plans without them run through the plain path that most users take.
    inside = plan.attention or any(b.perturbation is not None for b in plan.branches)
    probe = LayoutProbe() if inside else None
    outputs, calls = [], []
    for step, sigma in enumerate(world.sigmas):
        records: list[guidekit.CallRecord] = []
        models = fake_models(plan, world, step, probe)
        y, state = plan.step(
            state, sample_x(world, step), sigma, conds, models, on_call=records.append,
            around_call=probe,
        )
        for model in models.values():
            model.check_done()
        if probe is not None:
            assert probe.calls == sum(len(r) for r in (*calls, records)), "a call without layout"
        outputs.append(y)
        calls.append(tuple(records))
    return Run(tuple(outputs), tuple(calls), plan)


# -- the reference evaluator ---------------------------------------------------------------------


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.ndim))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(_dims(a), keepdim=True)


def _ab(noise: str, sigma: float) -> tuple[float, float]:
    """``x = a x0 + b n`` for the noise convention (the library's ``Noise`` docstring)."""
    if noise == "ve":
        return 1.0, sigma
    if noise == "flow":
        return 1.0 - sigma, sigma
    raise ValueError(noise)


def to_x0(pred: torch.Tensor, space: str, x: torch.Tensor, noise: str, sigma: float) -> torch.Tensor:
    """x0 from a prediction; VE: eps as k-diffusion, v as its ``VDenoiser`` (sigma_data 1);
    flow: diffusers' ``x0 = x - sigma v``."""
    if space == "x0":
        return pred
    if space == "eps":
        a, b = _ab(noise, sigma)
        return (x - b * pred) / a
    if space == "v" and noise == "ve":
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / math.sqrt(sigma**2 + 1.0)
        return c_skip * x + c_out * pred
    if space == "flow" and noise == "flow":
        return x - sigma * pred
    raise ValueError((space, noise))


def from_x0(x0: torch.Tensor, space: str, x: torch.Tensor, noise: str, sigma: float) -> torch.Tensor:
    """The inverse of :func:`to_x0` (solve its affine map for the prediction)."""
    if space == "x0":
        return x0
    if space == "eps":
        a, b = _ab(noise, sigma)
        return (x - a * x0) / b
    if space == "v" and noise == "ve":
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / math.sqrt(sigma**2 + 1.0)
        return (x0 - c_skip * x) / c_out
    if space == "flow" and noise == "flow":
        return (x - x0) / sigma
    raise ValueError((space, noise))


@attrs.define
class Env:
    """One step of the reference: the world, the step, and the branch outputs (native)."""

    world: World
    step: int
    sigma: float
    x: torch.Tensor
    #: set when an APG coefficient is a rounding residue next to 0 or 1, where the library's
    #: exact ``== 0`` tests and this reference may legitimately disagree
    ambiguous: bool = False
    #: the expression's attention modifiers, in pipe order (see :func:`modified`)
    modifiers: tuple[Any, ...] = ()

    def value(self, branch: Branch) -> torch.Tensor:
        return branch_output(self.world, modified(branch, self.modifiers), self.step)

    def to_x0(self, y: torch.Tensor) -> torch.Tensor:
        return to_x0(y, self.world.prediction, self.x, self.world.noise, self.sigma)

    def from_x0(self, y: torch.Tensor) -> torch.Tensor:
        return from_x0(y, self.world.prediction, self.x, self.world.noise, self.sigma)


def _c(model: str = MAIN) -> Branch:
    return Branch(model, COND)


def _u(model: str = MAIN) -> Branch:
    return Branch(model, UNCOND)


def _cfg_zero_star(t: CFGZeroStarTerm, env: Env) -> torch.Tensor:
    """CFG-Zero* (arXiv 2503.18886): ``a = <c,u> / ||u||^2``; ``a u + w (c - a u)``; zero
    for the first ``k`` steps. The 1e-8 in the norm follows the official code."""
    c, u = env.value(_c()), env.value(_u())
    if env.step < t.zero_init_steps:
        return torch.zeros_like(c)
    a = _dot(c, u) / (_dot(u, u) + 1e-8)
    return a * u + t.scale * (c - a * u)


def _tcfg(t: TCFGTerm, env: Env) -> torch.Tensor:
    """TCFG (arXiv 2503.18137): project ``u`` on the top right singular vector of the
    per-sample 2 x D matrix ``M = [c; u]``; ``u' + w (c - u')``.

    Computed from the eigenvectors of the 2 x 2 Gram matrix ``M M^T`` (not an SVD): the top
    right singular vector is ``M^T e / ||M^T e||`` for the top eigenvector ``e``.
    """
    c, u = env.value(_c()), env.value(_u())
    out = []
    for cb, ub in zip(c, u):
        m = torch.stack([cb.flatten(), ub.flatten()])  # [2, D]
        _, vecs = torch.linalg.eigh(m @ m.T)  # ascending eigenvalues
        v = m.T @ vecs[:, -1]
        v = v / v.norm()
        u_proj = (ub.flatten() @ v) * v
        out.append((u_proj + t.scale * (cb.flatten() - u_proj)).reshape(cb.shape))
    return torch.stack(out)


def _direction(t: Any, env: Env) -> torch.Tensor:
    """PAG / SEG / SLG (methods.md): ``s (c - n)``, ``n`` the term's negative branch."""
    return t.scale * (env.value(t.positive()) - env.value(t.negative()))


#: term class -> its value from branch outputs (formulas from methods.md).
TERM_REFERENCE: dict[type, Callable[[Any, Env], torch.Tensor]] = {
    CondTerm: lambda t, env: env.value(_c(t.model)),
    UncondTerm: lambda t, env: env.value(_u(t.model)),
    CFGTerm: lambda t, env: env.value(_u()) + t.scale * (env.value(_c()) - env.value(_u())),
    AutoguidanceTerm: lambda t, env: t.scale * (env.value(_c()) - env.value(_c(t.model))),
    CFGZeroStarTerm: _cfg_zero_star,
    TCFGTerm: _tcfg,
}

#: term class -> its linear form as (atom, coefficient) pairs; a nonlinear term is its own
#: atom with coefficient 1.
TERM_COEFFICIENTS: dict[type, Callable[[Any], list[tuple[Any, float]]]] = {
    CondTerm: lambda t: [(_c(t.model), 1.0)],
    UncondTerm: lambda t: [(_u(t.model), 1.0)],
    CFGTerm: lambda t: [(_c(), t.scale), (_u(), 1.0 - t.scale)],
    AutoguidanceTerm: lambda t: [(_c(), t.scale), (_c(t.model), -t.scale)],
    CFGZeroStarTerm: lambda t: [(t, 1.0)],
    TCFGTerm: lambda t: [(t, 1.0)],
}



def _linear(t: Any) -> list[tuple[Any, float]]:
    """Any other linear term's own ``coefficients()`` (its oracle test checks them)."""
    return list(t.coefficients().items())


def _from_coefficients(t: Any, env: Env) -> torch.Tensor:
    pairs = _linear(t)
    total = pairs[0][1] * env.value(pairs[0][0])
    for branch, coef in pairs[1:]:
        total = total + coef * env.value(branch)
    return total


def term_reference(node: Any) -> Callable[[Any, Env], torch.Tensor]:
    """The reference value of a term: its formula here, or from its coefficients."""
    if type(node) in TERM_REFERENCE:
        return TERM_REFERENCE[type(node)]
    if isinstance(node, DirectionTerm):
        return _direction
    if isinstance(node, LinearTerm):
        return _from_coefficients
    raise KeyError(
        f"tests/strategies.py has no reference formula for the nonlinear term "
        f"{type(node).__name__}: add one to TERM_REFERENCE and atom_branches()"
    )


def term_coefficients(node: Any) -> list[tuple[Any, float]]:
    """A term's linear form as (atom, coefficient) pairs."""
    if type(node) in TERM_COEFFICIENTS:
        return TERM_COEFFICIENTS[type(node)](node)
    if isinstance(node, DirectionTerm):  # PAG, SEG, SLG, SAG, EMAG: s (positive - negative)
        return [(node.positive(), node.scale), (node.negative(), -node.scale)]
    if isinstance(node, LinearTerm):
        return _linear(node)
    return [(node, 1.0)]  # a nonlinear term is its own atom


def active(gate: Gated, sigma: float) -> bool:
    """The guidance-interval rule: a gate is on for ``lo < sigma <= hi``."""
    return gate.lo < sigma <= gate.hi


def reference_value(expr: Expr, env: Env) -> torch.Tensor:
    """The value of an (unpiped) expression at ``env``'s step, straight from the tree."""
    if isinstance(expr, Sum):
        total = reference_value(expr.terms[0], env)
        for term in expr.terms[1:]:
            total = total + reference_value(term, env)
        return total
    if isinstance(expr, Scaled):
        return expr.factor * reference_value(expr.expr, env)
    if isinstance(expr, Gated):
        if active(expr, env.sigma):
            return reference_value(expr.expr, env)
        # outside: a direction is zero, a prediction falls back to plain c (arXiv 2404.07724)
        c = env.value(_c())
        return c if expr.expr.weight == 1 else torch.zeros_like(c)
    return term_reference(expr)(expr, env)


def contributions(expr: Expr, sigma: float) -> dict[Any, list[float]]:
    """Each atom's coefficient contributions at ``sigma``, in tree order (before summing)."""
    out: dict[Any, list[float]] = {}

    def walk(node: Expr, factor: float) -> None:
        if isinstance(node, Piped):
            walk(node.expr, factor)
        elif isinstance(node, Sum):
            for term in node.terms:
                walk(term, factor)
        elif isinstance(node, Scaled):
            walk(node.expr, factor * node.factor)
        elif isinstance(node, Gated):
            if active(node, sigma):
                walk(node.expr, factor)
            elif node.expr.weight == 1:
                out.setdefault(_c(), []).append(factor)
        else:
            for atom, coef in term_coefficients(node):
                out.setdefault(atom, []).append(factor * coef)

    walk(expr, 1.0)
    return out


def coefficients(expr: Expr, sigma: float) -> dict[Any, float]:
    """Each atom's total coefficient at ``sigma`` (zeros kept)."""
    return {a: math.fsum(cs) for a, cs in contributions(expr, sigma).items()}


def atom_branches(atom: Any) -> tuple[Branch, ...]:
    """The branches an atom reads: itself, or both main branches for a nonlinear term."""
    if isinstance(atom, Branch):
        return (atom,)
    if isinstance(atom, (CFGZeroStarTerm, TCFGTerm)):
        return (_c(), _u())
    raise KeyError(f"tests/strategies.py does not know which branches {atom!r} reads")


def needed_branches(expr: Expr, sigma: float, tol: float = 0.0) -> set[Branch]:
    """Branches whose atoms have a coefficient above ``tol`` in size at ``sigma``, plus
    those a post-processor reads (CFG rescale reads ``c`` when ``phi != 0``).

    ``tol=0`` with :func:`structural_branches` brackets what a plan may run when rounding
    leaves a tiny residue where the exact coefficient is zero.
    """
    found: set[Branch] = set()
    for atom, coef in coefficients(expr, sigma).items():
        if abs(coef) > tol:
            found.update(atom_branches(atom))
    found.update(_processor_reads(expr))
    return found


def structural_branches(expr: Expr, sigma: float) -> set[Branch]:
    """Branches of every atom with a nonzero contribution at ``sigma``, cancelled or not."""
    found: set[Branch] = set()
    for atom, cs in contributions(expr, sigma).items():
        if any(c != 0 for c in cs):
            found.update(atom_branches(atom))
    found.update(_processor_reads(expr))
    return found


def _processor_reads(expr: Expr) -> set[Branch]:
    if not isinstance(expr, Piped):
        return set()
    return {_c() for s in expr.steps if isinstance(s, CFGRescale) and s.phi != 0}


# -- post-processors -----------------------------------------------------------------------------

AMBIGUOUS = 1e-9


def _apg(
    proc: APGProjection, y: torch.Tensor, left: Expr, env: Env, momentum: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """APG, arXiv 2410.02416 Algorithm 1, in x0 space, on the left side read in CFG form
    ``y = u + w (X - u)`` (``w = 1 - alpha_u``, ``alpha_u`` the coefficient of ``u``)."""
    parts = contributions(left, env.sigma).get(_u(), [])
    alpha_u = math.fsum(parts)
    w = 1.0 - alpha_u
    if abs(alpha_u) < AMBIGUOUS and (alpha_u != 0 or sum(p != 0 for p in parts) > 1):
        # u's terms cancel up to rounding: whether the library sees exactly 0 (APG off, its
        # momentum kept) or a residue (momentum updated) depends on summation order
        env.ambiguous = True
    if alpha_u == 0 or abs(w) < AMBIGUOUS:
        # no CFG update at this level (w = 0 means y has no guidance to project, also when
        # rounding leaves w at 1e-16): APG leaves y and its momentum alone
        return y, momentum
    y0 = env.to_x0(y)
    u0 = env.to_x0(env.value(_u()))
    cond_like = (y0 - alpha_u * u0) / w
    diff = cond_like - u0  # step 1: D = c - u
    if proc.momentum != 0:  # step 2: m <- D + beta m
        diff = diff if momentum is None else diff + proc.momentum * momentum
        momentum = diff
    if proc.norm_threshold is not None:  # step 3
        norm = diff.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        diff = diff * torch.minimum(torch.ones_like(norm), proc.norm_threshold / norm)
    par = _dot(diff, cond_like) / _dot(cond_like, cond_like) * cond_like  # step 4
    perp = diff - par
    out = cond_like + (w - 1.0) * (perp + proc.eta * par)  # step 5
    return env.from_x0(out), momentum


def _rescale(proc: CFGRescale, y: torch.Tensor, env: Env) -> torch.Tensor:
    """CFG rescale, arXiv 2305.08891 (3.4): ``phi y std(c)/std(y) + (1 - phi) y``."""
    if proc.phi == 0:
        return y
    c = env.value(_c())
    std_c = c.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    std_y = y.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    # a constant sample (CFG-Zero*'s zero-init steps output 0) has no spread to rescale:
    # it is left as it is rather than divided by zero
    ratio = torch.where(std_y > 0, std_c / std_y, torch.ones_like(std_y))
    return proc.phi * y * ratio + (1.0 - proc.phi) * y


def _apply(
    proc: Any, y: torch.Tensor, left: Expr, env: Env, state: Any
) -> tuple[torch.Tensor, Any]:
    if isinstance(proc, APGProjection):
        return _apg(proc, y, left, env, state)
    if isinstance(proc, CFGRescale):
        return _rescale(proc, y, env), state
    if isinstance(proc, CADSAnnealing):
        # CADS changes only `emb`, which the fake models ignore: no effect on the outputs
        return y, state
    if kind(type(proc)) == "attention":
        return y, state  # their effect is in the branch outputs (Env.value)
    raise KeyError(
        f"tests/strategies.py has no reference for the post-processor {type(proc).__name__}"
    )


#: the processors :func:`_apply` knows, and every attention modifier (their effect is in the
#: branch outputs, see :func:`modified`)
PROCESSOR_REFERENCE = (APGProjection, CFGRescale, CADSAnnealing)


def has_reference(cls: type) -> bool:
    """Whether :func:`reference` can evaluate the processor class ``cls``."""
    return cls in PROCESSOR_REFERENCE or kind(cls) == "attention"


@attrs.frozen
class Reference:
    """The reference's outputs per noise level; ``ambiguous`` as in :class:`Env`."""

    outputs: tuple[torch.Tensor, ...]
    ambiguous: bool


def reference(expr: Expr, world: World) -> Reference:
    """Evaluate ``expr`` (piped or not) over ``world``'s noise levels, one fresh run."""
    left, steps = (expr.expr, expr.steps) if isinstance(expr, Piped) else (expr, ())
    states: list[Any] = [None] * len(steps)
    outputs = []
    ambiguous = False
    for step, sigma in enumerate(world.sigmas):
        mods = tuple(s for s in steps if kind(type(s)) == "attention")
        env = Env(world, step, sigma, sample_x(world, step), modifiers=mods)
        y = reference_value(left, env)
        for i, proc in enumerate(steps):
            y, states[i] = _apply(proc, y, left, env, states[i])
        outputs.append(y)
        ambiguous = ambiguous or env.ambiguous
    return Reference(tuple(outputs), ambiguous)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str = "", equal_nan: bool = False
) -> None:
    """float64 agreement to 1e-9, relative to the size of the values.

    ``equal_nan`` lets two library results agree on NaN in the same places (a law relating
    two expressions holds even where both are undefined); the reference never makes NaN.
    """
    assert actual.dtype == torch.float64, f"{what}: dtype {actual.dtype}, expected float64"
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)}"
    if equal_nan:
        nan = expected.isnan()
        assert torch.equal(actual.isnan(), nan), f"{what}: NaN in different places"
        actual, expected = actual[~nan], expected[~nan]
    assert not expected.isnan().any(), f"{what}: NaN expected"
    assert not actual.isnan().any(), f"{what}: NaN in the result"
    if expected.numel() == 0:
        return
    scale = max(1.0, float(expected.abs().max()))
    err = float((actual - expected).abs().max())
    assert err <= 1e-9 * scale, f"{what}: max abs error {err:.3g} (values up to {scale:.3g})"
