"""``sample(bundled, expr, labels)``: Euler sampling of a bundled model under guidance.

The sampler is the plain Euler method on the model's own schedule (``bundled.sigmas``):
``x <- x + (sigma_next - sigma) d`` with ``d`` the guided prediction, which is the ODE's
derivative in both conventions (``eps`` in the VE view, the velocity for flow). guidekit
computes ``d``: one batched model call per forward group per step (``2 B`` rows for CFG),
the weak model of Autoguidance as its own call, perturbed-attention branches inside the
main call through the attention engine. CADS anneals the class EMBEDDING of each branch (the
label embedders are hooked for the run, as the diffusers adapter does for DiT), since a
class label is an integer.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch

import guidekit
import guidekit.attention
from guidekit.branch import MAIN
from guidekit.combinators.cads_embedding import ClassEmbeddingCADS
from guidekit.combinators.cads_embedding import adapt as cads_plans
from guidekit.models.labels import named_labels
from guidekit.plan import CallRecord, Plan, RowLayout
from guidekit.pools import pool_names


@attrs.frozen(eq=False)
class SampleResult:
    """Samples ``images`` [N, 1, 8, 8] in [-1, 1], every model call made, wall seconds."""

    images: torch.Tensor
    calls: list[CallRecord]
    seconds: float
    labels: torch.Tensor | None = None
    plan: Plan | None = None


def _labels(labels: Any, bundled: Any) -> torch.Tensor:
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if y.numel() == 0:
        raise ValueError("labels is empty: pass one class index (0..9) per sample")
    if bool(((y < 0) | (y > bundled.null_class)).any()):
        raise ValueError(
            f"labels must be class indices 0..{bundled.classes - 1} (or the null class "
            f"{bundled.null_class} for unconditional samples), got {y.tolist()[:10]}"
        )
    return y


def initial_state(
    bundled: Any, labels: Sequence[int] | torch.Tensor, steps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(labels, sigmas, x)`` of a run: the checked labels on the model's device, the
    schedule, and the initial state from ``torch.Generator().manual_seed(seed)`` noise."""
    y = _labels(labels, bundled).to(bundled.device)
    sigmas = bundled.sigmas(steps)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((y.shape[0], *bundled.shape), generator=gen).to(bundled.device)
    return y, sigmas, bundled.convention.initial(noise, float(sigmas[0]))


def needs_engine(plan: Plan) -> bool:
    """True when the plan acts inside the main model's forward: perturbed branches, moving
    averages (EMAG) or attention modifiers (PLADIS, GAG, NAG)."""
    return (
        any(b.perturbation is not None and b.model == MAIN for b in plan.branches)
        or any(model == MAIN for _, model in plan.stateful)
        or bool(plan.attention)
    )


@torch.no_grad()
def sample(
    bundled: Any,
    expr: Any,
    labels: Sequence[int] | torch.Tensor,
    *,
    steps: int = 20,
    seed: int = 0,
    weak: Any = None,
    progress: bool = False,
    max_rows: int | str | None = None,
    conds: Mapping[str, Any] | None = None,
) -> SampleResult:
    """Sample one digit per label with guidance ``expr`` (an expression, text, or a Plan).

    Args:
        bundled: a :class:`~guidekit.models.Bundled` (``load("eps")``).
        expr: ``CFG(3)``, ``"CFG(3) + PAG(2)"``, ``Cond()`` for no guidance, or a Plan
            compiled by ``bundled.compile``.
        labels: class indices [N] (0..9; 10 is the null class).
        steps: Euler steps on ``bundled.sigmas(steps)``.
        seed: seeds the initial noise and the plan's state; the same seed gives identical
            samples.
        weak: the Bundled used for ``models={"weak": ...}`` (Autoguidance).
        progress: print one line per step to stderr.
        max_rows: the plan's row budget (``guidekit.compile``'s ``max_rows``).
        conds: labels of the other conditionings the expression reads, by name: one class
            index or one per sample (``conds={"neg": 3}`` for ``CFG(3, negative="neg")``;
            ``"uncond"`` replaces the null class); see :mod:`guidekit.models.labels`.
    """
    plan = expr if isinstance(expr, Plan) else bundled.compile(expr, max_rows=max_rows)
    if (plan.prediction, plan.noise.kind) != (bundled.prediction, bundled.noise):
        raise ValueError(
            f"the plan was compiled for prediction={plan.prediction!r}, noise="
            f"{plan.noise.kind!r}, but {bundled.name!r} predicts {bundled.prediction!r} with "
            f"noise {bundled.noise!r}: compile it with bundled.compile(expr)"
        )
    y, sigmas, x = initial_state(bundled, labels, steps, seed)
    models = {"weak": weak.model_fn} if weak is not None else None
    cond = {"class_labels": y}
    named = {"uncond": {"class_labels": torch.full_like(y, bundled.null_class)},
             **named_labels(conds, y, bundled.classes, bundled.null_class)}
    uncond = named.pop("uncond")
    # ICG's pools (guidekit.pools): every real label, never the null class
    real = torch.arange(bundled.classes, device=y.device, dtype=y.dtype)
    pools = {name: {"class_labels": real} for name in pool_names(plan.left)}
    # CADS leaves the integer labels alone and anneals their embedding inside the forward
    _, step_plan, embed_plan = cads_plans(plan, class_labels=True)
    cads = None
    if embed_plan is not None:
        modules = {MAIN: bundled.transformer}
        if weak is not None:
            modules["weak"] = weak.transformer
        cads = ClassEmbeddingCADS(embed_plan, {m: modules[m] for m in embed_plan.models})
    at: list[Any] = []  # (state, x, sigma) of the step being run, for CADS
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        engine = None
        if cads is not None:  # hooked first: SLG's skipped blocks then run on all rows
            stack.callback(cads.remove)
            cads.install()
        if needs_engine(step_plan):
            engine = stack.enter_context(guidekit.attention.install(bundled.transformer, step_plan))

        @contextlib.contextmanager
        def around(layout: RowLayout) -> Iterator[None]:
            with contextlib.ExitStack() as inner:
                if engine is not None:
                    inner.enter_context(engine(layout))
                if cads is not None:
                    inner.enter_context(cads.call(layout, at[0]))
                yield

        guided = guidekit.guide(
            step_plan, bundled.model_fn, cond=cond, uncond=uncond, models=models,
            sigmas=sigmas, seed=seed, conds={**named, **pools},
            around_call=around if engine is not None or cads is not None else None,
        )
        values = sigmas.tolist()
        for i in range(steps):
            s, s_next = values[i], values[i + 1]
            at[:] = [(guided.state, x, s)]
            d = guided(x, s)
            x = x + (s_next - s) * d
            if progress:
                print(f"  step {i + 1}/{steps}  sigma {s:.4g}  calls {len(guided.calls)}",
                      file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    return SampleResult(
        images=x.clamp(-1, 1).cpu(), calls=list(guided.calls), seconds=seconds,
        labels=y.cpu(), plan=plan,
    )
