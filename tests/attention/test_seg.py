"""SEG (arXiv 2408.00760) through the plan and the attention engine, against oracles.

Oracle: ``u + w (c - u) + s (c - g)`` with ``c``, ``u`` and ``g`` each from a SEPARATE model
call; ``g`` is computed by this file's own processors, which blur the queries with NumPy
(an explicit 2-D kernel, ``np.pad(mode="reflect")`` and a double loop over the kernel taps,
written from the SEG paper and methods.md, not from guidekit) and take an explicit softmax,
on each layer's token grid given BY THE TEST (guidekit derives it from the model input).
guidekit computes all three in ONE call of ``3 x B`` rows. Float64 models, 1e-9 / 1e-5.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

import guidekit
from guidekit import CFG, PAG, SEG, Cond, GuidanceTypeError, GuidanceValueError, parse
from guidekit.attention import install
from guidekit.attention.seg import (
    BlurredQueryAttention,
    blur_queries,
    gaussian_blur,
    kernel_size,
    token_grid,
)
from guidekit.branch import Branch

from ._joint_models import sd3_conds, sd3_fn, tiny_sd3
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

TOL = 1e-9
H, W = 8, 12  # a non-square latent
SIGMAS = (5.0, 2.0, 0.5, 0.0)


# -- an independent NumPy reference of SEG's query blur ------------------------------------------


def np_taps(k: int, sigma: float) -> np.ndarray:
    x = np.arange(k, dtype=np.float64) - (k - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def np_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Blur ``img [C, h, w]`` as the SEG paper's code does: kernel ``ceil(6 sigma) + 1``
    made odd, at most the axis length (plus one when even), reflect padding, 2-D kernel
    (outer product), explicit sum over the taps. ``sigma > 9999``: the mean."""
    if sigma > 9999:
        return np.broadcast_to(img.mean(axis=(1, 2), keepdims=True), img.shape).copy()
    c = math.ceil(6 * sigma)
    k = c if c % 2 == 1 else c + 1
    _, h, w = img.shape
    kh = min(k, h if h % 2 else h + 1)
    kw = min(k, w if w % 2 else w + 1)
    kernel = np.outer(np_taps(kh, sigma), np_taps(kw, sigma))
    padded = np.pad(img, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)), mode="reflect")
    out = np.zeros_like(img)
    for a in range(kh):
        for b in range(kw):
            out += kernel[a, b] * padded[:, a : a + h, b : b + w]
    return out


def np_seg_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, grid: tuple[int, int],
                     sigma: float) -> np.ndarray:
    """``[b, n, heads, d]`` queries blurred per (sample, head, channel) over ``grid``, then
    softmax attention over the keys (``[b, m, heads, d]``); returns ``[b, n, heads, d]``."""
    b, n, heads, d = q.shape
    h, w = grid
    assert h * w == n
    qb = np.empty_like(q)
    for i in range(b):
        img = q[i].transpose(1, 2, 0).reshape(heads * d, h, w)  # channel-major images
        qb[i] = np_blur(img, sigma).reshape(heads, d, n).transpose(2, 0, 1)
    logits = np.einsum("bnhd,bmhd->bhnm", qb, k) / math.sqrt(d)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhnm,bmhd->bnhd", p, v)


def to_np(t: torch.Tensor, heads: int) -> np.ndarray:
    b, n, c = t.shape
    return t.detach().double().numpy().reshape(b, n, heads, c // heads)


def from_np(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    b, n, heads, d = a.shape
    return torch.from_numpy(a.reshape(b, n, heads * d)).to(like.dtype)


class NumpySEGProcessor:
    """Self-attention of a diffusers ``Attention`` (no norms, 3-D input) with NumPy-blurred
    queries on the grid the test names."""

    def __init__(self, grid: tuple[int, int], sigma: float) -> None:
        self.grid, self.sigma = grid, sigma

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None) -> torch.Tensor:
        assert encoder_hidden_states is None and attn.norm_q is None
        h = attn.heads
        q, k, v = (to_np(f(hidden_states), h) for f in (attn.to_q, attn.to_k, attn.to_v))
        out = from_np(np_seg_attention(q, k, v, self.grid, self.sigma), hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def seg_processors(model: torch.nn.Module, grids: dict[str, tuple[int, int]],
                   sigma: float) -> Iterator[None]:
    saved = {p: model.get_submodule(p).get_processor() for p in grids}
    try:
        for p, g in grids.items():
            model.get_submodule(p).set_processor(NumpySEGProcessor(g, sigma))
        yield
    finally:
        for p, proc in saved.items():
            model.get_submodule(p).set_processor(proc)


# -- the term ------------------------------------------------------------------------------------


def test_term_normalises_and_round_trips() -> None:
    assert repr(SEG(3)) == "SEG(3)"  # infinite blur is the default
    assert SEG(3).blur_sigma == math.inf
    assert repr(SEG(3, blur_sigma=10, layers=[7, 8])) == "SEG(3, blur_sigma=10, layers=(7, 8))"
    assert SEG(2, blur_sigma=2) == SEG(2.0, blur_sigma=2.0)
    for expr in (SEG(3), CFG(3) + SEG(2, blur_sigma=0.5, layers=-1),
                 Cond() + SEG(1, blur_sigma=1e5, layers="mid_block"),
                 (CFG(2) + SEG(1, blur_sigma=4)).between(0.5, 3)):
        assert parse(repr(expr)) == expr
        assert repr(parse(repr(expr))) == repr(expr)
    assert parse("SEG(3, blur_sigma=inf)") == SEG(3)
    term = SEG(2, blur_sigma=4, layers=(1,))
    assert term.negative() == Branch("main", "cond", BlurredQueryAttention((1,), 4.0))
    assert SEG(1, blur_sigma=4).perturbation != SEG(1, blur_sigma=8).perturbation


@pytest.mark.parametrize(
    "kw, error, match",
    [({"blur_sigma": 0}, GuidanceValueError, "SEG\\(blur_sigma=...\\) must be a number > 0"),
     ({"blur_sigma": -1}, GuidanceValueError, "> 0"),
     ({"blur_sigma": float("nan")}, GuidanceValueError, "> 0"),
     ({"blur_sigma": True}, GuidanceValueError, "> 0"),
     ({"blur_sigma": "big"}, GuidanceValueError, "> 0"),
     ({"layers": 1.5}, GuidanceTypeError, "SEG\\(layers=...\\)"),
     ({"layers": ()}, GuidanceValueError, "SEG\\(layers=...\\)")],
)
def test_bad_values_name_the_term(kw: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SEG(2, **kw)


def test_kernel_sizes_follow_the_paper() -> None:
    # ceil(6 sigma) + 1, made odd
    assert [kernel_size(s) for s in (0.01, 0.3, 0.5, 1.0, 1.5, 2.0, 10.0)] == [
        1, 3, 3, 7, 9, 13, 61]


def test_token_grid_from_the_model_input() -> None:
    assert token_grid(96, (8, 12)) == (8, 12)
    assert token_grid(24, (8, 12)) == (4, 6)
    assert token_grid(6, (8, 12)) == (2, 3)
    assert token_grid(15, (9, 5)) == (5, 3)  # a stride-2 conv rounds odd sizes up
    with pytest.raises(GuidanceValueError, match=r"grid=\(H, W\)"):
        token_grid(7, (8, 12))


@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 5, 7), (1, 8, 8), (2, 2, 3), (1, 1, 5)])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0, 9999.0, 1e4, math.inf])
def test_blur_equals_the_numpy_reference(shape: tuple[int, ...], sigma: float) -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, *shape, dtype=torch.float64, generator=g)
    ref = np.stack([np_blur(i.numpy(), sigma) for i in img])
    if sigma > 9999:
        ours = img.mean(dim=(-2, -1), keepdim=True).expand_as(img)
    else:
        ours = gaussian_blur(img, sigma)
    assert np.abs(ours.numpy() - ref).max() < 1e-12
    # and through the query layout [rows, heads, tokens, dim]
    c, h, w = shape
    q = img.reshape(2, 1, c, h * w).transpose(-1, -2)  # one head, dim = channels
    out = blur_queries(q, sigma, (h, w))
    assert np.abs(out.transpose(-1, -2).reshape(2, c, h, w).numpy() - ref).max() < 1e-12


def test_blur_direction_matches_the_paper() -> None:
    """Defect 4 of diffusers' guider: larger sigma must mean MORE blur (queries closer to
    their mean), and above 9999 the queries ARE the mean."""
    # (kernels shorter than the grid: once clipped to it, the reflected kernel is no longer
    # Gaussian and the distance need not keep shrinking; the paper's code does the same)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 32 * 48, 4, dtype=torch.float64, generator=g)
    mean = q.mean(dim=-2, keepdim=True)
    dist = [float((blur_queries(q, s, (32, 48)) - mean).norm()) for s in (0.1, 0.5, 1, 2, 4)]
    assert dist[0] == pytest.approx(float((q - mean).norm()))  # a 1-tap kernel: unchanged
    assert all(a > b for a, b in zip(dist, dist[1:])), dist
    for s in (1e4, math.inf):
        assert torch.equal(blur_queries(q, s, None), mean.expand_as(q))
    assert not torch.equal(blur_queries(q, 9999, (32, 48)), mean.expand_as(q))  # still finite


# -- oracles on real models ----------------------------------------------------------------------


def run_and_compare(
    plan: guidekit.Plan, module: torch.nn.Module, fn: Callable[..., torch.Tensor],
    cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None,
    reference: Callable[[torch.Tensor, float], torch.Tensor], sigmas: tuple[float, ...] = SIGMAS,
    shape: tuple[int, ...] = (BATCH, 4, H, W), **install_kw: Any,
) -> tuple[float, guidekit.Guided]:
    """Euler over ``sigmas``; at every step compare with ``reference`` at the same ``x``."""
    torch.manual_seed(1)
    x = sigmas[0] * torch.randn(*shape, dtype=torch.float64)
    worst = 0.0
    with torch.no_grad(), install(module, plan, **install_kw) as around:
        guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond or cond, around_call=around)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            y = guided(x, s)
            assert torch.isfinite(y).all()
            ref = reference(x, s)
            worst = max(worst, (y - ref).abs().max().item())
            x = x + (s_next - s) * y
    return worst, guided


def seg_reference(
    module: torch.nn.Module, fn: Callable[..., torch.Tensor], cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None, w: float, s: float,
    grids: dict[str, tuple[int, int]], blur: float, gaps: list[float],
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """``u + w (c - u) + s (c - g)`` (``c + s (c - g)`` without ``uncond``), three calls."""

    def ref(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        c = fn(x, sig, **cond)
        with seg_processors(module, grids, blur):
            g = fn(x, sig, **cond)
        gaps.append((c - g).abs().max().item())
        if uncond is None:
            return c + s * (c - g)
        u = fn(x, sig, **uncond)
        return u + w * (c - u) + s * (c - g)

    return ref


def texts(width: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return (
        {"text": torch.randn(BATCH, 5, width, generator=g, dtype=torch.float64)},
        {"text": torch.randn(BATCH, 5, width, generator=g, dtype=torch.float64) * 0.1},
    )


def check_calls(guided: guidekit.Guided, steps: int, branches: int) -> None:
    """One model call per step, of ``branches x B`` rows."""
    assert len(guided.calls) == steps
    assert all(c.rows == branches * BATCH and len(c.branches) == branches for c in guided.calls)


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


# -- SD3: joint attention, image queries only ----------------------------------------------------


class NumpyJointSEGProcessor:
    """SD3's joint attention with NumPy-blurred IMAGE queries (text queries unchanged)."""

    def __init__(self, grid: tuple[int, int], sigma: float) -> None:
        self.grid, self.sigma = grid, sigma

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, **kw: Any) -> Any:
        assert attn.norm_q is None and getattr(attn, "norm_added_q", None) is None
        h, n = attn.heads, hidden_states.shape[1]
        q, k, v = (to_np(f(hidden_states), h) for f in (attn.to_q, attn.to_k, attn.to_v))
        tq, tk, tv = (to_np(f(encoder_hidden_states), h)
                      for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        kj, vj = np.concatenate([k, tk], 1), np.concatenate([v, tv], 1)
        img = from_np(np_seg_attention(q, kj, vj, self.grid, self.sigma), hidden_states)
        # text queries: plain attention (a 1-tap kernel leaves them as they are)
        txt = from_np(np_seg_attention(tq, kj, vj, (tq.shape[1], 1), 0.01), hidden_states)
        assert n == self.grid[0] * self.grid[1]
        img = attn.to_out[1](attn.to_out[0](img))
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


def test_seg_on_sd3_blurs_image_queries_only() -> None:
    model = tiny_sd3()
    fn = sd3_fn(model)
    cond, uncond = sd3_conds()
    paths = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]

    def ref(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
        saved = {p: model.get_submodule(p).get_processor() for p in paths}
        try:
            for p in paths:
                model.get_submodule(p).set_processor(NumpyJointSEGProcessor((4, 6), 1.0))
            g = fn(x, sig, **cond)
        finally:
            for p, proc in saved.items():
                model.get_submodule(p).set_processor(proc)
        assert (c - g).abs().max() > 1e-4
        return u + 4 * (c - u) + 2 * (c - g)

    plan = guidekit.compile(CFG(4) + SEG(2, blur_sigma=1, layers=[0, 1]))
    worst, guided = run_and_compare(plan, model, fn, cond, uncond, ref, sigmas=(0.9, 0.5, 0.0))
    check_calls(guided, 2, 3)
    assert worst < TOL


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


# -- Flux: the queries as they enter scaled_dot_product_attention, image tokens only -------------


class NumpySEGMode(torch.overrides.TorchFunctionMode):
    """Inside the reference pass: every SDPA call attends with its IMAGE queries (after
    ``text`` text tokens) blurred by NumPy over ``grid``, explicit softmax, float64."""

    def __init__(self, text: int, grid: tuple[int, int], sigma: float) -> None:
        super().__init__()
        self.text, self.grid, self.sigma, self.calls = text, grid, sigma, 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        bound = dict(zip(("query", "key", "value"), args), **kwargs)
        q, k, v = (bound[n].detach().numpy().transpose(0, 2, 1, 3)  # [b, s, h, d]
                   for n in ("query", "key", "value"))
        assert bound.get("attn_mask") is None and not bound.get("is_causal")
        assert bound.get("scale") is None and not bound.get("dropout_p")
        t = self.text
        img = np_seg_attention(q[:, t:], k, v, self.grid, self.sigma)
        txt = np_seg_attention(q[:, :t], k, v, (t, 1), 0.01)  # a 1-tap kernel: plain
        out = np.concatenate([txt, img], axis=1).transpose(0, 2, 1, 3)
        return torch.from_numpy(np.ascontiguousarray(out)).to(bound["query"].dtype)


@pytest.mark.parametrize("layers", [[0], [1, 3]])  # double block 0; double 1 + single 1
def test_seg_on_flux_blurs_image_queries_only(layers: list[int]) -> None:
    """Flux's packed-token input has no spatial size: the grid is given to install."""
    from ._joint_models import TEXT_TOKENS, flux_fn, tiny_flux

    model = tiny_flux()
    fn = flux_fn(model)
    cond, uncond = sd3_conds()
    table = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
             "single_transformer_blocks.1"]
    paths = [f"{table[i]}.attn" for i in layers]

    def ref(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
        saved = {p: model.get_submodule(p).forward for p in paths}
        modes = []
        try:
            for p in paths:
                mode = NumpySEGMode(TEXT_TOKENS, (4, 4), 1.0)
                modes.append(mode)

                def forward(*a: Any, _f: Any = saved[p], _m: Any = mode, **kw: Any) -> Any:
                    with _m:
                        return _f(*a, **kw)

                model.get_submodule(p).forward = forward
            g = fn(x, sig, **cond)
        finally:
            for p, f in saved.items():
                model.get_submodule(p).forward = f
        assert all(m.calls == 1 for m in modes)
        assert (c - g).abs().max() > 1e-5
        return u + 3 * (c - u) + 2 * (c - g)

    plan = guidekit.compile(CFG(3) + SEG(2, blur_sigma=1, layers=layers))
    worst, guided = run_and_compare(plan, model, fn, cond, uncond, ref, sigmas=(0.9, 0.5, 0.0),
                                    shape=(BATCH, 16, 16), grid=(4, 4))
    check_calls(guided, 2, 3)
    assert worst < TOL
    # the model's own forwards are back (the engine's were restored by the reference too)
    assert all("forward" not in m.__dict__ for m in model.modules())
