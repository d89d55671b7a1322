"""SLG / PAG on the UNCONDITIONAL rows (ComfyUI's ``SkipLayerGuidanceDiTSimple``):
``CFG(w) + SLG(w - 1, cond="uncond")`` is ``u' + w (c - u')`` in TWO row blocks.

Oracle: ``c`` and ``u'`` from SEPARATE model calls, ``u'`` the unconditional pass with the
blocks taken out by hand (``_slg_reference.py``) or the identity attention processors of
``_tiny.py``; outside the window ``.between(lo, hi)`` the step is plain CFG.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, PAG, SLG, GuidanceTypeError, parse
from guidekit.attention import install
from guidekit.branch import UNCOND, Branch

from ._joint_models import sd3_conds, sd3_fn, tiny_sd3
from ._slg_reference import LABELS, TOL, identity_blocks, latent, removed
from ._tiny import BATCH, tiny_dit, tiny_unet, unet_fn, value_only
from ._tiny import dit_fn as _dit_fn

SIGMAS = (0.9, 0.7, 0.5, 0.3, 0.0)

Fn = Callable[..., torch.Tensor]


def test_expression_reads_and_parses_back() -> None:
    e = SLG.on_uncond(5, layers=(7, 8, 9), between=(0.2, 0.9))
    assert repr(e) == "CFG(5) + SLG(4, layers=(7, 8, 9), cond='uncond').between(0.2, 0.9)"
    assert e == CFG(5) + SLG(4, layers=(7, 8, 9), cond="uncond").between(0.2, 0.9)
    for expr in (e, PAG.on_uncond(3, layers=-1), CFG(2) + PAG(1, cond="uncond")):
        assert parse(repr(expr)) == expr
    assert repr(SLG(2)) == "SLG(2)" and repr(PAG(2)) == "PAG(2)"  # the default stays hidden
    term = SLG(2, layers=1, cond="uncond")
    assert term.positive() == Branch(cond=UNCOND)
    assert term.negative() == Branch(cond=UNCOND, perturbation=term.perturbation)
    with pytest.raises(GuidanceTypeError, match=r"SLG\(cond=...\)"):
        SLG(2, cond="")


def test_the_plan_runs_two_row_blocks_inside_and_outside_the_window() -> None:
    plan = guidekit.compile(SLG.on_uncond(4, layers=1, between=(0.4, 0.8)))
    for sigma, perturbed in ((0.9, False), (0.7, True), (0.5, True), (0.3, False)):
        (group,) = plan.program(sigma).groups
        assert [b.cond for b in group.branches] == ["cond", "uncond"]
        assert (group.branches[1].perturbation is not None) is perturbed
        assert plan.rows(sigma, BATCH) == 2 * BATCH and plan.nfe(sigma, BATCH) == 1


def run_and_compare(
    expr: Any, module: torch.nn.Module, fn: Fn, cond: dict[str, Any], uncond: dict[str, Any],
    perturbed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], w: float,
    window: tuple[float, float] | None, x: torch.Tensor,
) -> tuple[float, float]:
    """Euler over ``SIGMAS``; every step against ``u' + w (c - u')`` (``u`` outside the
    window), each prediction from its own model call. Returns the worst error and the
    smallest ``|u - u'|`` inside the window."""
    plan = guidekit.compile(expr)
    worst, gap = 0.0, float("inf")
    with torch.no_grad(), install(module, plan) as around:
        guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
        for sg, s_next in zip(SIGMAS[:-1], SIGMAS[1:]):
            y = guided(x, sg)
            sig = torch.full((x.shape[0],), sg, dtype=x.dtype)
            c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
            inside = window is None or window[0] < sg <= window[1]
            n = perturbed(x, sig) if inside else u
            if inside:
                gap = min(gap, (u - n).abs().max().item())
            worst = max(worst, (y - (n + w * (c - n))).abs().max().item())
            x = x + (s_next - sg) * y
    assert len(guided.calls) == len(SIGMAS) - 1
    assert all(c.rows == 2 * BATCH and len(c.branches) == 2 for c in guided.calls)
    return worst, gap


@pytest.mark.parametrize("window", [None, (0.4, 0.8)], ids=["always", "window"])
def test_slg_on_dit_uncond_equals_the_uncond_pass_without_the_blocks(
    window: tuple[float, float] | None,
) -> None:
    model = tiny_dit().double()
    fn = _dit_fn(model)
    cond, uncond = LABELS
    paths = ("transformer_blocks.1",)

    def u_skip(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        with identity_blocks(model, paths):
            return fn(x, sig, **uncond)

    expr = SLG.on_uncond(3, layers=1, between=window)
    worst, gap = run_and_compare(expr, model, fn, cond, uncond, u_skip, 3, window, latent(4, 8, 8))
    assert gap > 1e-3, "skipping must change the prediction for the test to bite"
    assert worst < TOL


def test_slg_on_sd3_uncond_equals_the_uncond_pass_without_the_blocks() -> None:
    model = tiny_sd3(3)
    fn = sd3_fn(model)
    cond, uncond = sd3_conds()

    def u_skip(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        with removed(model, ("transformer_blocks.1",)):
            return fn(x, sig, **uncond)

    expr = CFG(4) + SLG(3, layers=[1], cond="uncond")
    worst, gap = run_and_compare(expr, model, fn, cond, uncond, u_skip, 4, None, latent(4, 8, 8))
    assert gap > 1e-4
    assert worst < TOL


def test_pag_on_unet_uncond_equals_the_uncond_pass_with_identity_attention() -> None:
    model = tiny_unet().double()
    fn = unet_fn(model)
    g = torch.Generator().manual_seed(4)
    cond, uncond = ({"text": torch.randn(BATCH, 5, 32, generator=g, dtype=torch.float64)}
                    for _ in range(2))
    path = "mid_block.attentions.0.transformer_blocks.0.attn1"

    def u_pag(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        with value_only(model, (path,)):
            return fn(x, sig, **uncond)

    window = (0.2, 0.6)
    expr = PAG.on_uncond(5, layers=path, between=window)
    worst, gap = run_and_compare(expr, model, fn, cond, uncond, u_pag, 5, window, latent(4, 8, 8))
    assert gap > 1e-4
    assert worst < TOL
