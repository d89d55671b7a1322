"""PAG (arXiv 2403.17377) through the plan and the attention engine, against oracles.

Oracle: ``u + w (c - u) + s (c - p)`` with ``c``, ``u`` and ``p`` each from a SEPARATE model
call, ``p`` computed by the test's own identity-attention processor (``_tiny.value_only``),
while guidekit computes all three in ONE call of ``3 x B`` rows with its own engine.
Also against diffusers' own legacy PAG processors and its guider's layer-skip hook.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import guidekit
from guidekit import CFG, PAG, Cond, GuidanceTypeError, GuidanceValueError, parse
from guidekit.attention import IdentityAttention, install
from guidekit.branch import Branch

from ._tiny import (
    BATCH,
    SelfAttention,
    dit_fn,
    pixart_fn,
    processors,
    tiny_dit,
    tiny_pixart,
    tiny_plain,
    tiny_unet,
    unet_fn,
    value_only,
)

SIGMAS = (5.0, 2.0, 0.5, 0.0)
TOL = 1e-5


# -- the term ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, stored",
    [(None, None), (7, (7,)), ([7, 8, 9], (7, 8, 9)), (range(2, 5), (2, 3, 4)), ((-1,), (-1,)),
     ("mid_block", ("mid_block",)), (("a.b", 3), ("a.b", 3))],
)
def test_layers_normalise_and_round_trip(layers: Any, stored: Any) -> None:
    term = PAG(2.5, layers=layers)
    assert term.layers == stored
    assert term.negative() == Branch("main", "cond", IdentityAttention(stored))
    for expr in (term, CFG(3) + term, Cond() + term):
        assert parse(repr(expr)) == expr
        assert repr(parse(repr(expr))) == repr(expr)


def test_repr_prints_tuples() -> None:
    assert repr(PAG(3, layers=(7, 8, 9))) == "PAG(3, layers=(7, 8, 9))"
    assert repr(PAG(3, layers=7)) == "PAG(3, layers=(7,))"
    assert repr(PAG(3)) == "PAG(3)"
    assert parse("PAG(3, layers=[7, 8, 9])") == PAG(3, layers=(7, 8, 9))
    assert PAG(2, layers=[0, 1]) == PAG(2, layers=range(2)) == PAG(2.0, layers=(0, 1))
    assert PAG(2, layers=np.int64(3)) == PAG(2, layers=3)
    assert type(PAG(2, layers=[np.int64(3)]).layers[0]) is int


@pytest.mark.parametrize(
    "layers, error",
    [(1.5, GuidanceTypeError), ((True,), GuidanceTypeError), ((), GuidanceValueError),
     ((1, 1), GuidanceValueError), (("",), GuidanceTypeError), ({1: 2}, GuidanceTypeError)],
)
def test_bad_layer_values_raise(layers: Any, error: type) -> None:
    with pytest.raises(error, match="PAG"):
        PAG(2, layers=layers)


def test_plan_layout_dedups_equal_perturbations() -> None:
    plan = guidekit.compile(CFG(3) + PAG(2, layers=1) + PAG(1, layers=(1,)))
    p1 = Branch("main", "cond", IdentityAttention((1,)))
    assert plan.branches == (Branch("main", "cond"), Branch("main", "uncond"), p1)
    plan2 = guidekit.compile(PAG(1, layers=0) + CFG(3) + PAG(2, layers=1))
    assert [b.perturbation for b in plan2.branches] == [
        None, None, IdentityAttention((0,)), IdentityAttention((1,)),
    ]


# -- oracles on real models ----------------------------------------------------------------------


def guided_run(
    plan: guidekit.Plan,
    module: torch.nn.Module,
    fn: Callable[..., torch.Tensor],
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    reference: Callable[[torch.Tensor, float], torch.Tensor],
    **install_kw: Any,
) -> tuple[float, guidekit.Guided]:
    """Euler over SIGMAS with the guided model; at every step compare with ``reference``
    at the same ``x``. Returns the largest difference and the guided model."""
    torch.manual_seed(1)
    x = SIGMAS[0] * torch.randn(BATCH, 4, 8, 8)
    worst = 0.0
    with torch.no_grad(), install(module, plan, **install_kw) as around:
        guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
        for s, s_next in zip(SIGMAS[:-1], SIGMAS[1:]):
            y = guided(x, s)
            ref = reference(x, s)
            worst = max(worst, (y - ref).abs().max().item())
            x = x + (s_next - s) * y
    return worst, guided


def pag_reference(
    module: torch.nn.Module,
    fn: Callable[..., torch.Tensor],
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None,
    w: float,
    s: float,
    paths: tuple[str, ...],
    gaps: list[float],
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """``u + w (c - u) + s (c - p)`` (``c + s (c - p)`` without ``uncond``), three calls."""

    def ref(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((x.shape[0],), sigma)
        c = fn(x, sig, **cond)
        with value_only(module, paths):
            p = fn(x, sig, **cond)
        gaps.append((c - p).abs().max().item())
        if uncond is None:
            return c + s * (c - p)
        u = fn(x, sig, **uncond)
        return u + w * (c - u) + s * (c - p)

    return ref


def labels() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return {"class_labels": torch.tensor([3, 7])}, {"class_labels": torch.tensor([0, 0])}


def texts(width: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return (
        {"text": torch.randn(BATCH, 5, width, generator=g)},
        {"text": torch.randn(BATCH, 5, width, generator=g) * 0.1},
    )


def check_one_call(guided: guidekit.Guided, branches: int) -> None:
    """One model call per step, of ``branches x B`` rows."""
    assert len(guided.calls) == len(SIGMAS) - 1
    assert all(c.rows == branches * BATCH for c in guided.calls)
    assert all(len(c.branches) == branches for c in guided.calls)


@pytest.mark.parametrize(
    "layers, paths",
    [((1,), ("transformer_blocks.1.attn1",)),
     ([0, 2], ("transformer_blocks.0.attn1", "transformer_blocks.2.attn1")),
     (None, ("transformer_blocks.2.attn1",)),  # default: the last block
     ("transformer_blocks.0.attn1", ("transformer_blocks.0.attn1",))],
)
def test_cfg_plus_pag_on_dit(layers: Any, paths: tuple[str, ...]) -> None:
    model = tiny_dit()
    fn = dit_fn(model)
    cond, uncond = labels()
    gaps: list[float] = []
    plan = guidekit.compile(CFG(2.5) + PAG(1.5, layers=layers))
    ref = pag_reference(model, fn, cond, uncond, 2.5, 1.5, paths, gaps)
    worst, guided = guided_run(plan, model, fn, cond, uncond, ref)
    check_one_call(guided, 3)
    assert min(gaps) > 0.05, "the perturbation must change the prediction for the test to bite"
    assert worst < TOL


def test_pag_only_really_perturbs_on_dit() -> None:
    """Defect 1 of diffusers' guiders: PAG at CFG scale 1 ran an unperturbed extra pass."""
    model = tiny_dit()
    fn = dit_fn(model)
    cond, _ = labels()
    gaps: list[float] = []
    plan = guidekit.compile(Cond() + PAG(2))
    ref = pag_reference(model, fn, cond, None, 1.0, 2.0, ("transformer_blocks.2.attn1",), gaps)
    worst, guided = guided_run(plan, model, fn, cond, {"class_labels": cond["class_labels"]}, ref)
    check_one_call(guided, 2)
    assert min(gaps) > 0.05
    assert worst < TOL


def test_cfg_plus_pag_on_pixart_self_attention_only() -> None:
    model = tiny_pixart()
    fn = pixart_fn(model)
    cond, uncond = texts(32)
    before = processors(model)
    seen: dict[str, Any] = {}

    def spy(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        seen.update(processors(model))
        return fn(x, sigma, text)

    gaps: list[float] = []
    paths = ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")
    plan = guidekit.compile(CFG(3) + PAG(2, layers=range(2)))
    ref = pag_reference(model, fn, cond, uncond, 3.0, 2.0, paths, gaps)
    worst, guided = guided_run(plan, model, spy, cond, uncond, ref)
    check_one_call(guided, 3)
    assert min(gaps) > 0.05
    assert worst < TOL
    # cross-attention (attn2) keeps its processor object during the run; attn1 is wrapped
    for name, proc in seen.items():
        assert (proc is before[name]) == name.endswith("attn2"), name


def test_cfg_plus_pag_on_unet_self_attention_only() -> None:
    model = tiny_unet()
    fn = unet_fn(model)
    cond, uncond = texts(32)
    before = processors(model)
    seen: dict[str, Any] = {}

    def spy(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        seen.update(processors(model))
        return fn(x, sigma, text)

    gaps: list[float] = []
    mid = ("mid_block.attentions.0.transformer_blocks.0.attn1",)
    up = ("up_blocks.1.attentions.0.transformer_blocks.0.attn1",
          "up_blocks.1.attentions.1.transformer_blocks.0.attn1")
    for layers, paths in ((None, mid), ("up_blocks.1", up), ([0, 3], (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1", *mid))):
        seen.clear()
        plan = guidekit.compile(CFG(4) + PAG(3, layers=layers))
        ref = pag_reference(model, fn, cond, uncond, 4.0, 3.0, paths, gaps)
        worst, guided = guided_run(plan, model, spy, cond, uncond, ref)
        check_one_call(guided, 3)
        assert worst < TOL, layers
        changed = {n for n in seen if seen[n] is not before[n]}
        assert changed == set(paths), layers
    assert min(gaps) > 1e-3


@pytest.mark.parametrize("by", ["class", "path"])
def test_cfg_plus_pag_on_plain_module(by: str) -> None:
    model = tiny_plain()
    cond, uncond = {"y": torch.tensor([3, 7])}, {"y": torch.tensor([10, 10])}
    gaps: list[float] = []
    paths = ("blocks.0.attn", "blocks.2.attn")
    if by == "class":
        plan = guidekit.compile(CFG(2) + PAG(1.5, layers=[0, -1]))
        kw: dict[str, Any] = {"attention_class": SelfAttention}
    else:
        plan = guidekit.compile(CFG(2) + PAG(1.5, layers=paths))
        kw = {}
    ref = pag_reference(model, model, cond, uncond, 2.0, 1.5, paths, gaps)
    worst, guided = guided_run(plan, model, model, cond, uncond, ref, **kw)
    check_one_call(guided, 3)
    assert min(gaps) > 0.05
    assert worst < TOL
    assert all("forward" not in m.__dict__ for m in model.modules())


# -- diffusers' own PAG --------------------------------------------------------------------------


def test_matches_diffusers_legacy_pag_processors_on_dit() -> None:
    """``PAGCFGIdentitySelfAttnProcessor2_0`` wants rows ``[u, c, p]`` and
    ``PAGIdentitySelfAttnProcessor2_0`` rows ``[c, p]`` in every hooked layer; both agree
    with guidekit's ``[c, u, p]`` layout for a DiT (no q/k norm, self-attention, no mask)."""
    from diffusers.models.attention_processor import (
        PAGCFGIdentitySelfAttnProcessor2_0,
        PAGIdentitySelfAttnProcessor2_0,
    )

    model = tiny_dit()
    fn = dit_fn(model)
    cond, uncond = labels()
    c_lab, u_lab = cond["class_labels"], uncond["class_labels"]
    w, s, layers = 3.0, 2.0, (0, 2)
    x = 2.0 * torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sig = torch.full((3 * BATCH,), 2.0)

    def legacy(proc: Any, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        saved = {i: model.transformer_blocks[i].attn1.get_processor() for i in layers}
        try:
            for i in layers:
                model.transformer_blocks[i].attn1.set_processor(proc)
            out = fn(x.repeat(k, 1, 1, 1), sig[: k * BATCH], rows)
        finally:
            for i, p in saved.items():
                model.transformer_blocks[i].attn1.set_processor(p)
        return out.chunk(k)

    with torch.no_grad():
        u, c, p = legacy(PAGCFGIdentitySelfAttnProcessor2_0(), torch.cat([u_lab, c_lab, c_lab]), 3)
        theirs_cfg = u + w * (c - u) + s * (c - p)
        c2, p2 = legacy(PAGIdentitySelfAttnProcessor2_0(), torch.cat([c_lab, c_lab]), 2)
        theirs_pag = c2 + s * (c2 - p2)
        for expr, theirs in ((CFG(w) + PAG(s, layers=layers), theirs_cfg),
                             (Cond() + PAG(s, layers=layers), theirs_pag)):
            plan = guidekit.compile(expr)
            with install(model, plan) as around:
                ours = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)(x, 2.0)
            assert (c - p).abs().max() > 0.05
            assert (ours - theirs).abs().max() < TOL, expr


def test_matches_diffusers_guider_layer_skip_hook_on_dit() -> None:
    """The guiders' PAG hook (``skip_attention_scores``: sdpa returns V) on one block."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    model = tiny_dit()
    hooked = copy.deepcopy(model)
    apply_layer_skip(hooked, LayerSkipConfig(
        indices=[1], fqn="transformer_blocks", skip_attention=False,
        skip_attention_scores=True, skip_ff=False,
    ))
    cond, uncond = labels()
    x = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    sig = torch.full((BATCH,), 1.0)
    with torch.no_grad():
        c = dit_fn(model)(x, sig, **cond)
        u = dit_fn(model)(x, sig, **uncond)
        p = dit_fn(hooked)(x, sig, **cond)
        theirs = u + 3.0 * (c - u) + 2.0 * (c - p)
        plan = guidekit.compile(CFG(3) + PAG(2, layers=1))
        with install(model, plan) as around:
            guided = guidekit.guide(plan, dit_fn(model), cond=cond, uncond=uncond,
                                    around_call=around)
            ours = guided(x, 1.0)
    assert (c - p).abs().max() > 0.05
    assert (ours - theirs).abs().max() < TOL
