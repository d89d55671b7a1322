"""SEG (arXiv 2408.00760) through the plan and the attention engine, against oracles.

Oracle: ``u + w (c - u) + s (c - g)`` with ``c``, ``u`` and ``g`` each from a SEPARATE model
call; ``g`` is computed by the NumPy processors of ``_seg_reference.py``. guidekit computes
all three in ONE call of ``3 x B`` rows. PixArt, a UNet, plain SDPA, token inputs, few-step
schedules, SEG with PAG, and restoration. Float64 models, 1e-9 / 1e-5.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, PAG, SEG, Cond, GuidanceValueError
from guidekit.attention import install

from ._seg_reference import (
    SIGMAS,
    TOL,
    H,
    W,
    check_calls,
    from_np,
    np_seg_attention,
    run_and_compare,
    seg_processors,
    seg_reference,
    texts,
    to_np,
)
from ._tiny import (
    BATCH,
    ENDINGS,
    SelfAttention,
    dit_fn,
    ended_as,
    leave,
    pixart_fn,
    processors,
    tiny_dit,
    tiny_pixart,
    tiny_plain,
    tiny_unet,
    unet_fn,
    value_only,
)

# -- oracles on real models ----------------------------------------------------------------------


PIXART = {"transformer_blocks.0.attn1": (4, 6), "transformer_blocks.1.attn1": (4, 6)}


@pytest.mark.parametrize("blur", [0.5, 1.0, 3.0, math.inf])
def test_cfg_plus_seg_on_pixart_with_a_non_square_latent(blur: float) -> None:
    """PixArt at 8 x 12 (tokens on a 4 x 6 grid); sigma 3 clips the 19-tap kernel to 5 and
    7 taps, as the paper's code does."""
    model = tiny_pixart().double()
    fn = pixart_fn(model)
    cond, uncond = texts(32)
    gaps: list[float] = []
    plan = guidekit.compile(CFG(2.5) + SEG(2, blur_sigma=blur, layers=[0, 1]))
    ref = seg_reference(model, fn, cond, uncond, 2.5, 2.0, PIXART, blur, gaps)
    worst, guided = run_and_compare(plan, model, fn, cond, uncond, ref)
    check_calls(guided, len(SIGMAS) - 1, 3)
    assert min(gaps) > 1e-3, "the blur must change the prediction for the test to bite"
    assert worst < TOL


def test_seg_only_really_perturbs_and_default_layer_is_the_last_block() -> None:
    """Defect 2 of diffusers' guiders: SEG never hooked anything. ``Cond() + SEG(s)``."""
    model = tiny_pixart().double()
    fn = pixart_fn(model)
    cond, _ = texts(32)
    gaps: list[float] = []
    plan = guidekit.compile(Cond() + SEG(3, blur_sigma=2))
    ref = seg_reference(model, fn, cond, None, 1.0, 3.0,
                        {"transformer_blocks.1.attn1": (4, 6)}, 2.0, gaps)
    worst, guided = run_and_compare(plan, model, fn, cond, None, ref)
    check_calls(guided, len(SIGMAS) - 1, 2)
    assert min(gaps) > 1e-3
    assert worst < TOL


UNET_MID = {"mid_block.attentions.0.transformer_blocks.0.attn1": (4, 6)}
UNET_UP = {"up_blocks.1.attentions.0.transformer_blocks.0.attn1": (8, 12),
           "up_blocks.1.attentions.1.transformer_blocks.0.attn1": (8, 12)}


@pytest.mark.parametrize("layers, grids", [(None, UNET_MID), ("up_blocks.1", UNET_UP),
                                           ([0, 3], {**UNET_MID, "down_blocks.0.attentions.0."
                                                     "transformer_blocks.0.attn1": (8, 12)})])
def test_seg_on_a_unet_at_two_resolutions(layers: Any, grids: dict[str, tuple[int, int]]) -> None:
    """The UNet's default is the middle block (the SEG authors' SDXL choice); its layers
    work at 8 x 12 and 4 x 6 in the same model, each grid derived from its token count."""
    model = tiny_unet().double()
    fn = unet_fn(model)
    cond, uncond = texts(32)
    gaps: list[float] = []
    plan = guidekit.compile(CFG(3) + SEG(2, blur_sigma=1, layers=layers))
    ref = seg_reference(model, fn, cond, uncond, 3.0, 2.0, grids, 1.0, gaps)
    worst, guided = run_and_compare(plan, model, fn, cond, uncond, ref)
    check_calls(guided, len(SIGMAS) - 1, 3)
    assert min(gaps) > 1e-6
    assert worst < TOL


def test_seg_on_a_plain_module_through_sdpa() -> None:
    """The plain-module protocol: the SDPA call of the hooked module gets blurred queries."""
    model = tiny_plain().double()
    cond, uncond = {"y": torch.tensor([3, 7])}, {"y": torch.tensor([10, 10])}
    paths = ("blocks.0.attn", "blocks.2.attn")

    @contextlib.contextmanager
    def reference_forward() -> Iterator[None]:
        # the engine's own forward wrappers are instance attributes too: keep and put back
        saved = {p: model.get_submodule(p).__dict__.get("forward") for p in paths}
        for p in paths:
            m = model.get_submodule(p)

            def forward(h: torch.Tensor, m: SelfAttention = m) -> torch.Tensor:
                q, k, v = (to_np(t, m.heads) for t in m.qkv(h).chunk(3, dim=-1))
                return m.proj(from_np(np_seg_attention(q, k, v, (8, 8), 1.5), h))

            m.forward = forward  # type: ignore[method-assign]
        try:
            yield
        finally:
            for p, fwd in saved.items():
                del model.get_submodule(p).forward
                if fwd is not None:
                    model.get_submodule(p).forward = fwd  # type: ignore[method-assign]

    def ref(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        c, u = model(x, sig, **cond), model(x, sig, **uncond)
        with reference_forward():
            g = model(x, sig, **cond)
        assert (c - g).abs().max() > 1e-3
        return u + 2 * (c - u) + 1.5 * (c - g)

    plan = guidekit.compile(CFG(2) + SEG(1.5, blur_sigma=1.5, layers=[0, -1]))
    worst, guided = run_and_compare(plan, model, model, cond, uncond, ref, shape=(BATCH, 4, 8, 8),
                                    attention_class=SelfAttention)
    check_calls(guided, len(SIGMAS) - 1, 3)
    assert worst < TOL
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not model._forward_pre_hooks


class TokenModel(torch.nn.Module):
    """The tiny plain model fed TOKENS ``[B, 64, 4]``: its input says nothing of a grid."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_plain().double()

    def forward(self, tokens: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        x = tokens.transpose(1, 2).reshape(b, 4, 8, 8)
        return self.inner(x, sigma, y).flatten(2).transpose(1, 2)


def test_unknown_grid_raises_and_an_explicit_grid_works() -> None:
    model = TokenModel()
    cond = {"y": torch.tensor([3, 7])}
    tokens = torch.randn(BATCH, 64, 4, dtype=torch.float64)
    plan = guidekit.compile(Cond() + SEG(2, blur_sigma=1, layers="inner.blocks.1.attn"))
    with pytest.raises(GuidanceValueError, match=r"install\(\.\.\., grid=\(H, W\)\)"):
        with torch.no_grad(), install(model, plan) as around:
            guidekit.guide(plan, model, cond=cond, around_call=around)(tokens, 1.0)
    with torch.no_grad(), install(model, plan, grid=(8, 8)) as around:
        y = guidekit.guide(plan, model, cond=cond, around_call=around)(tokens, 1.0)
        # the same as the image-latent model, whose grid guidekit reads from its input
    inner_plan = guidekit.compile(Cond() + SEG(2, blur_sigma=1, layers="blocks.1.attn"))
    x = tokens.transpose(1, 2).reshape(BATCH, 4, 8, 8)
    with torch.no_grad(), install(model.inner, inner_plan) as around:
        y2 = guidekit.guide(inner_plan, model.inner, cond=cond, around_call=around)(x, 1.0)
    assert (y - y2.flatten(2).transpose(1, 2)).abs().max() < TOL
    # the infinite blur needs no grid
    inf_plan = guidekit.compile(Cond() + SEG(2, layers="inner.blocks.1.attn"))
    with torch.no_grad(), install(model, inf_plan) as around:
        assert torch.isfinite(guidekit.guide(inf_plan, model, cond=cond, around_call=around)(
            tokens, 1.0)).all()
    with pytest.raises(GuidanceValueError, match="grid must be"):
        install(model, plan, grid=(8, 0))


# -- few-step schedules: SEG and PAG -------------------------------------------------------------


@pytest.mark.parametrize("sigmas", [(3.0, 0.0), (3.0, 0.8, 0.0), (4.0, 1.5, 0.6, 0.2, 0.0)])
@pytest.mark.parametrize("term", ["SEG", "PAG"])
def test_few_step_schedules(term: str, sigmas: tuple[float, ...]) -> None:
    """1-4 step schedules (distilled samplers): one call of 3 x B rows per step, finite
    outputs, equal to the separate-pass oracle at every step."""
    model = tiny_pixart().double()
    fn = pixart_fn(model)
    cond, uncond = texts(32)
    gaps: list[float] = []
    if term == "SEG":
        plan = guidekit.compile(CFG(2) + SEG(3, blur_sigma=1, layers=-1))
        ref = seg_reference(model, fn, cond, uncond, 2.0, 3.0,
                            {"transformer_blocks.1.attn1": (4, 6)}, 1.0, gaps)
    else:
        plan = guidekit.compile(CFG(2) + PAG(3, layers=-1))

        def ref(x: torch.Tensor, sigma: float) -> torch.Tensor:
            sig = torch.full((x.shape[0],), sigma, dtype=torch.float64)
            c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
            with value_only(model, ("transformer_blocks.1.attn1",)):
                p = fn(x, sig, **cond)
            gaps.append((c - p).abs().max().item())
            return u + 2 * (c - u) + 3 * (c - p)

    worst, guided = run_and_compare(plan, model, fn, cond, uncond, ref, sigmas=sigmas)
    check_calls(guided, len(sigmas) - 1, 3)
    assert [c.step for c in guided.calls] == list(range(len(sigmas) - 1))
    assert min(gaps) > 1e-4
    assert worst < TOL


def test_seg_composes_with_pag_in_one_call_on_dit() -> None:
    """``CFG + PAG + SEG`` on a (square) DiT: 4 x B rows in one call, each perturbation on
    its own rows, the others through the fused processor."""
    model = tiny_dit().double()
    fn = dit_fn(model)
    cond, uncond = {"class_labels": torch.tensor([3, 7])}, {"class_labels": torch.tensor([0, 0])}
    x = 2.0 * torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64)
    sig = torch.full((BATCH,), 2.0, dtype=torch.float64)
    before = processors(model)
    with torch.no_grad():
        c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
        with value_only(model, ("transformer_blocks.0.attn1",)):
            p = fn(x, sig, **cond)
        with seg_processors(model, {"transformer_blocks.2.attn1": (4, 4)}, 0.7):
            g = fn(x, sig, **cond)
        ref = u + 3 * (c - u) + 1.5 * (c - p) + 2 * (c - g)
        plan = guidekit.compile(CFG(3) + PAG(1.5, layers=0) + SEG(2, blur_sigma=0.7))
        with install(model, plan) as around:
            guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
            y = guided(x, 2.0)
    assert [c.rows for c in guided.calls] == [4 * BATCH]
    assert min((c - p).abs().max(), (c - g).abs().max()) > 1e-3
    assert (y - ref).abs().max() < TOL
    after = processors(model)
    assert all(after[k] is v for k, v in before.items())


# -- restoration -------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_exit_restores_processors_and_the_input_hook(ending: str) -> None:
    model = tiny_pixart().double()
    fn = pixart_fn(model)
    cond, uncond = texts(32)
    x = torch.randn(BATCH, 4, H, W, dtype=torch.float64)
    sig = torch.full((BATCH,), 1.0, dtype=torch.float64)
    before = processors(model)
    with torch.no_grad():
        out_before = fn(x, sig, **cond)
    plan = guidekit.compile(CFG(3) + SEG(2, blur_sigma=1, layers=[0, 1]))
    with ended_as(ending):
        with torch.no_grad(), install(model, plan) as around:
            assert len(model._forward_pre_hooks) == 1  # the engine reads the input's size
            y = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)(x, 1.0)
            assert (y - out_before).abs().max() > 1e-3
            leave(ending)
    assert not model._forward_pre_hooks
    after = processors(model)
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(fn(x, sig, **cond), out_before)


def test_infinite_blur_adds_no_input_hook() -> None:
    model = tiny_pixart()
    with install(model, guidekit.compile(CFG(3) + SEG(2))):
        assert not model._forward_pre_hooks
