"""The reference evaluator's post-processors, a whole run over a world, and the check.

:func:`reference` evaluates an expression (piped or not) over a world's noise levels with
the term formulas of :mod:`strategies.reference` and the processor formulas here.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from guidekit import (
    APGProjection,
    CADSAnnealing,
    CFGRescale,
    Piped,
)
from guidekit.combinators import DynamicThreshold
from guidekit.expr import Expr
from guidekit.registry import kind

from .reference import Env, cond_of, contributions, dot, reference_value, uncond_of
from .worlds import World, sample_x

# -- post-processors -----------------------------------------------------------------------------

AMBIGUOUS = 1e-9


def _apg(
    proc: APGProjection, y: torch.Tensor, left: Expr, env: Env, momentum: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """APG, arXiv 2410.02416 Algorithm 1, in x0 space, on the left side read in CFG form
    ``y = u + w (X - u)`` (``w = 1 - alpha_u``, ``alpha_u`` the coefficient of ``u``)."""
    parts = contributions(left, env.sigma).get(uncond_of(), [])
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
    u0 = env.to_x0(env.value(uncond_of()))
    cond_like = (y0 - alpha_u * u0) / w
    diff = cond_like - u0  # step 1: D = c - u
    if proc.momentum != 0:  # step 2: m <- D + beta m
        diff = diff if momentum is None else diff + proc.momentum * momentum
        momentum = diff
    if proc.norm_threshold is not None:  # step 3
        norm = diff.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        diff = diff * torch.minimum(torch.ones_like(norm), proc.norm_threshold / norm)
    par = dot(diff, cond_like) / dot(cond_like, cond_like) * cond_like  # step 4
    perp = diff - par
    out = cond_like + (w - 1.0) * (perp + proc.eta * par)  # step 5
    return env.from_x0(out), momentum


def _rescale(proc: CFGRescale, y: torch.Tensor, env: Env) -> torch.Tensor:
    """CFG rescale, arXiv 2305.08891 (3.4): ``phi y std(c)/std(y) + (1 - phi) y``."""
    if proc.phi == 0:
        return y
    c = env.value(cond_of())
    std_c = c.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    std_y = y.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    # a constant sample (CFG-Zero*'s zero-init steps output 0) has no spread to rescale:
    # it is left as it is rather than divided by zero
    ratio = torch.where(std_y > 0, std_c / std_y, torch.ones_like(std_y))
    return proc.phi * y * ratio + (1.0 - proc.phi) * y


def _threshold(proc: DynamicThreshold, y: torch.Tensor, env: Env) -> torch.Tensor:
    """Imagen's dynamic thresholding (arXiv 2205.11487) on x0: per sample
    ``s = max(quantile_p |x0|, 1)`` (capped at ``max_value``), ``clip(x0, -s, s) / s``."""
    x0 = env.to_x0(y)
    s = torch.quantile(x0.abs().flatten(1), proc.percentile, dim=1).clamp(min=1.0)
    if proc.max_value is not None:
        s = s.clamp(max=proc.max_value)
    s = s.view(-1, 1, 1, 1)
    return env.from_x0(x0.clamp(-s, s) / s)


def _apply(
    proc: Any, y: torch.Tensor, left: Expr, env: Env, state: Any
) -> tuple[torch.Tensor, Any]:
    if isinstance(proc, APGProjection):
        return _apg(proc, y, left, env, state)
    if isinstance(proc, CFGRescale):
        return _rescale(proc, y, env), state
    if isinstance(proc, DynamicThreshold):
        return _threshold(proc, y, env), state
    if isinstance(proc, CADSAnnealing):
        # CADS changes only `emb`, which the fake models ignore: no effect on the outputs
        return y, state
    if kind(type(proc)) == "attention":
        return y, state  # their effect is in the branch outputs (Env.value)
    raise KeyError(
        f"tests/strategies/evaluate.py has no reference for the post-processor {type(proc).__name__}"
    )


#: the processors :func:`_apply` knows, and every attention modifier (their effect is in the
#: branch outputs, see :func:`modified`)
PROCESSOR_REFERENCE = (APGProjection, CFGRescale, CADSAnnealing, DynamicThreshold)


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
