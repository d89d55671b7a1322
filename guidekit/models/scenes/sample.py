"""``sample_scenes(model, expr, captions)``: Euler sampling of a scenes model under guidance.

The plain Euler method on the model's schedule, ``x <- x + (sigma_next - sigma) d`` with
``d`` the guided velocity (rectified flow). guidekit computes ``d``: one batched model call
per forward group per step (``2 B`` rows for CFG); attention-space terms (PAG, SEG, EMAG,
NAG, PLADIS, GAG) act inside that call through the attention engine. Conditionings are
captions: ``""`` is the unconditional row, ``conds={"neg": [...]}`` names other captions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

import guidekit
import guidekit.attention
from guidekit.combinators.cads import CADSAnnealing
from guidekit.models.sampling import needs_engine
from guidekit.plan import CallRecord, Plan


@attrs.frozen(eq=False)
class SceneSamples:
    """Samples ``images`` [N, 3, 32, 32] (in [-1, 1] unless unclamped), every model call
    made, wall seconds, the plan and the initial ``noise`` they were solved from."""

    images: torch.Tensor
    calls: list[CallRecord]
    seconds: float
    plan: Plan
    noise: torch.Tensor


def _per_sample(name: str, captions: str | Sequence[str], n: int) -> list[str]:
    rows = [captions] * n if isinstance(captions, str) else list(captions)
    if len(rows) != n:
        raise ValueError(f"conds[{name!r}]: give one caption or {n} (one per sample), "
                         f"got {len(rows)}")
    return rows


@torch.no_grad()
def sample_scenes(
    model: Any,
    expr: Any,
    captions: Sequence[str],
    *,
    steps: int = 20,
    seed: int = 0,
    conds: Mapping[str, str | Sequence[str]] | None = None,
    clamp: bool = True,
    weak: Any = None,
) -> SceneSamples:
    """One scene per caption with guidance ``expr`` (an expression, text, or a Plan compiled
    by ``model.compile``); ``seed`` seeds the initial noise and the plan's state, and
    ``conds`` gives named captions (one, or one per sample; ``"uncond"`` replaces ``""``).
    ``clamp=False`` returns the ODE's end point as it is (the reflow pairs); ``weak`` is the
    SceneModel that Autoguidance's ``weak`` rows run on (its own encoder reads the caption:
    :meth:`~.model.SceneModel.weak_fn`)."""
    captions = list(captions)
    if not captions:
        raise ValueError("sample_scenes: give at least one caption")
    plan = expr if isinstance(expr, Plan) else model.compile(expr)
    if (plan.prediction, plan.noise.kind) != (model.prediction, model.convention.noise):
        raise ValueError(
            f"sample_scenes: the plan was compiled for prediction={plan.prediction!r}, noise="
            f"{plan.noise.kind!r}, but the scenes model predicts {model.prediction!r} with "
            f"noise {model.convention.noise!r}: compile it with model.compile(expr)"
        )
    models = None
    if weak is not None:
        if (any(g.model == "weak" for g in plan.groups)
                and any(isinstance(m, CADSAnnealing) for m in plan.modifiers)):
            # CADS anneals the main encoder's hidden states, which the weak model never reads
            raise guidekit.GuidanceValueError(
                "sample_scenes: CADS with Autoguidance's weak scenes model would anneal only "
                "the main model's caption (the weak model encodes the caption itself): run "
                "them separately")
        models = {"weak": weak.weak_fn}
    n = len(captions)
    named = {k: model.conditions(_per_sample(k, v, n)) for k, v in (conds or {}).items()}
    uncond = named.pop("uncond", None) or model.conditions([""] * n)
    sigmas = model.sigmas(steps)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *model.shape), generator=gen).to(model.device)
    x = model.convention.initial(noise, float(sigmas[0]))
    start = time.perf_counter()
    engine = (guidekit.attention.install(model.transformer, plan) if needs_engine(plan)
              else None)
    with engine if engine is not None else contextlib.nullcontext() as around:
        guided = guidekit.guide(plan, model.model_fn, cond=model.conditions(captions),
                                uncond=uncond, conds=named, sigmas=sigmas, seed=seed,
                                models=models, around_call=around)
        values = sigmas.tolist()
        for i in range(steps):
            x = x + (values[i + 1] - values[i]) * guided(x, values[i])
    return SceneSamples((x.clamp(-1, 1) if clamp else x).cpu(), list(guided.calls),
                        time.perf_counter() - start, plan, noise.cpu())

