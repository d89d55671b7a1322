"""Worlds: batch, spaces, noise levels, deterministic branch outputs and fake models.

:class:`World` fixes the batch, prediction space, noise convention, seed and a decreasing
list of noise levels. From it, float64 branch outputs (:func:`branch_output`) and fake
models (:class:`FakeModel`) that answer every row with the output of the branch the row
belongs to, checked against the plan's documented row layout; :func:`run_plan` runs a plan
over a world.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch
from hypothesis import strategies as st

import guidekit
from guidekit.branch import COND, MAIN, UNCOND, Branch
from guidekit.expr import Expr

from .values import AUTOGUIDANCE_MODELS, FLOW_SIGMAS, VE_SIGMAS

# -- worlds: batch, spaces, noise levels and branch outputs --------------------------------------

#: (prediction space, noise convention) pairs whose conversions the reference knows.
SPACES = (("x0", "ve"), ("eps", "ve"), ("v", "ve"), ("flow", "flow"))
#: every conditioning name the strategies draw (terms' ``field_examples``), with its tag
TAGS = {COND: 0, UNCOND: 1, "style": 2, "neg": 3, "icg": 4}
#: conditionings given as pools (ICG, guidekit/pools.py): P candidates, one drawn per sample
POOLS = {"icg": 5}
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
    """Every conditioning by name: integer ``tag`` and ``idx`` name a row's branch and
    sample (a pool's ``idx`` its candidate); ``emb`` is a float embedding for CADS to anneal
    (the fake models ignore it). A pool (:data:`POOLS`) has P rows instead of B."""
    sizes = {name: POOLS.get(name, world.batch) for name in TAGS}
    return {
        name: {
            "tag": torch.full((sizes[name],), tag, dtype=torch.long),
            "idx": torch.arange(sizes[name]),
            "emb": _normal(world, "emb", name, shape=(4,)) if name not in POOLS else torch.randn(
                sizes[name], 4, generator=_generator(world, "emb", name), dtype=torch.float64
            ),
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
            # a pool's row holds the candidate drawn for sample b, not b itself
            sample = b if branch.cond not in POOLS else int(idx[r])
            assert (TAG_NAMES[int(tag[r])], int(idx[r])) == (branch.cond, sample), (
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
