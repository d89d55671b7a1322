"""Oracle for frequency-decoupled guidance (FDG), https://arxiv.org/abs/2506.19713.

The oracle is written in numpy from the paper's description, pixel by pixel: a Laplacian
pyramid (5-tap binomial blur with mirrored borders, every second pixel kept; expansion by
putting the pixels back on the even positions and blurring with four times the kernel), in
each band ``c_l + (w_l - 1)(eta d_par + d_perp)`` with ``d = c_l - u_l``, the bands summed
back; in x0 space. Also: the same call count as CFG through ``guide()`` and through a tiny
real diffusers pipeline, where equal scales reproduce the pipeline's own CFG.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import guidekit
from guidekit import CFG, GuidanceValueError, parse
from guidekit.terms import FDG

from ._support import BATCH, FakeModel, conditioning, noise_coefficients, np64, t64

KERNEL = np.array([1, 4, 6, 4, 1]) / 16


def _blur(img: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """2-d binomial blur of ``[..., H, W]``, borders mirrored (``np.pad`` ``reflect``)."""
    h, w = img.shape[-2:]
    pad = np.pad(img, [(0, 0)] * (img.ndim - 2) + [(2, 2), (2, 2)], mode="reflect")
    out = np.zeros_like(img)
    for i in range(5):
        for j in range(5):
            out += gain * KERNEL[i] * KERNEL[j] * pad[..., i : i + h, j : j + w]
    return out


def _expand(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    grid = np.zeros(img.shape[:-2] + shape)
    grid[..., ::2, ::2] = img
    return _blur(grid, 4.0)


def fdg_oracle(c: np.ndarray, u: np.ndarray, low: float, high: float, levels: int = 2,
               eta: float = 1.0) -> np.ndarray:
    """FDG on x0 predictions ``[B, C, H, W]``."""
    def bands(img: np.ndarray) -> list[np.ndarray]:
        out = []
        for _ in range(levels - 1):
            small = _blur(img)[..., ::2, ::2]
            out.append(img - _expand(small, img.shape[-2:]))
            img = small
        return [*out, img]

    guided = []
    for level, (bc, bu) in enumerate(zip(bands(c), bands(u))):
        w = low if level == levels - 1 else high
        d = bc - bu
        out = np.empty_like(bc)
        for b in range(len(bc)):  # the projection is per sample
            along = (d[b] * bc[b]).sum() / (bc[b] * bc[b]).sum()
            par = along * bc[b]
            out[b] = bc[b] + (w - 1) * (eta * par + (d[b] - par))
        guided.append(out)
    img = guided[-1]
    for band in reversed(guided[:-1]):
        img = band + _expand(img, band.shape[-2:])
    return img


def _fixed_model(c: np.ndarray, u: np.ndarray) -> Callable[..., torch.Tensor]:
    calls: list[int] = []

    def model(x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        rows = [c[t % 1000] if t < 2000 else u[t % 1000] for t in cond["tag"].tolist()]
        return t64(np.stack(rows))

    model.calls = calls  # type: ignore[attr-defined]
    return model


def _pair(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((BATCH, *shape)) + rng.standard_normal((BATCH, 1, 1, 1))
    return c, 0.7 * c + 0.5 * rng.standard_normal(c.shape)


@pytest.mark.parametrize(
    ("shape", "levels", "eta"),
    [((2, 8, 8), 2, 1.0), ((3, 7, 10), 2, 1.0), ((2, 12, 9), 3, 1.0), ((2, 8, 8), 2, 0.0),
     ((3, 7, 10), 3, 0.4)],
)
def test_fdg_matches_the_pyramid_oracle_in_x0_space(
    shape: tuple[int, ...], levels: int, eta: float
) -> None:
    """eps predictions at VE sigma 1.5: guidekit turns them into x0, applies FDG, and back."""
    sigma, low, high = 1.5, 2.0, 7.0
    c, u = _pair(shape, seed=levels + 10 * shape[1])
    x = np.random.default_rng(3).standard_normal(c.shape) * 2.0
    plan = guidekit.compile(FDG(low, high, levels=levels, eta=eta), prediction="eps", noise="ve")
    model = _fixed_model(c, u)
    guided = guidekit.guide(plan, model, cond=conditioning("cond"), uncond=conditioning("uncond"))
    out = np64(guided(t64(x), sigma))
    a, b = noise_coefficients("ve", sigma)
    x0 = fdg_oracle((x - b * c) / a, (x - b * u) / a, low, high, levels, eta)
    np.testing.assert_allclose(out, (x - a * x0) / b, rtol=1e-9, atol=1e-9)
    assert model.calls == [2 * BATCH]  # type: ignore[attr-defined]
    # two different scales are neither CFG(low) nor CFG(high)
    for w in (low, high):
        assert not np.allclose(out, u + w * (c - u), atol=1e-3)


def test_equal_scales_are_cfg_and_sizes_survive() -> None:
    """``low == high == w`` (no projection) is exactly ``CFG(w)``: the pyramid rebuilds its
    input, odd sizes included (diffusers' kornia pyramid returns a padded size instead)."""
    c, u = _pair((3, 7, 10), seed=1)
    model = _fixed_model(c, u)
    plan = guidekit.compile(FDG(4, 4), prediction="x0")
    out = np64(guidekit.guide(plan, model, cond=conditioning("cond"),
                              uncond=conditioning("uncond"))(t64(c), 2.0))
    assert out.shape == c.shape
    np.testing.assert_allclose(out, u + 4 * (c - u), rtol=1e-12, atol=1e-12)


def test_one_call_per_step_through_guide() -> None:
    """Several steps through ``guide()``: one batched call (cond and uncond) per step."""
    model = FakeModel()
    plan = guidekit.compile(FDG(low=2, high=6), prediction="eps")
    guided = guidekit.guide(plan, model, cond=conditioning("cond"), uncond=conditioning("uncond"))
    x = t64(np.random.default_rng(0).standard_normal((BATCH, 2, 3, 4)))
    for sigma in (5.0, 2.0, 0.5):
        assert torch.isfinite(guided(x, sigma)).all()
    assert [c["rows"] for c in model.calls] == [2 * BATCH] * 3


def test_no_noise_left_projects_in_the_limit() -> None:
    """At sigma 0 an eps model's x0 is ``x`` for every branch and cannot be turned back: the
    projection (``eta != 1``) acts as its limit as sigma -> 0 (the oracle at a tiny sigma,
    VE), not an error and not left out; an x0 model still projects as at any level."""
    c, u = _pair((2, 8, 8), seed=4)
    xn = np.random.default_rng(5).standard_normal(c.shape)
    tiny = 1e-7
    near = (xn - fdg_oracle(xn - tiny * c, xn - tiny * u, 2.0, 6.0, eta=0.3)) / tiny
    for prediction, want, tol in (("eps", near, 1e-5),
                                  ("x0", fdg_oracle(c, u, 2.0, 6.0, eta=0.3), 1e-9)):
        plan = guidekit.compile(FDG(2, 6, eta=0.3), prediction=prediction, noise="ve")
        out = guidekit.guide(plan, _fixed_model(c, u), cond=conditioning("cond"),
                             uncond=conditioning("uncond"))(t64(xn), 0.0)
        np.testing.assert_allclose(np64(out), want, rtol=tol, atol=tol)
    assert not np.allclose(near, fdg_oracle(c, u, 2.0, 6.0), atol=1e-3)  # not the old skip


def test_text_round_trip_and_refusals() -> None:
    for expr in (FDG(low=5, high=10), FDG(1, 3, levels=3, eta=0.5), CFG(2) - CFG(2) + FDG(2, 2)):
        assert parse(str(expr)) == expr
    with pytest.raises(GuidanceValueError, match="levels"):
        FDG(2, 4, levels=1)
    plan = guidekit.compile(FDG(2, 4, levels=4), prediction="x0")
    guided = guidekit.guide(
        plan, FakeModel(), cond=conditioning("cond"), uncond=conditioning("uncond")
    )
    with pytest.raises(GuidanceValueError, match="too small.*fewer levels"):
        guided(t64(np.zeros((BATCH, 2, 3, 4))), 1.0)
    flat = guidekit.guide(
        guidekit.compile(FDG(2, 4), prediction="x0"),
        lambda x, s, **k: x, cond=conditioning("cond"), uncond=conditioning("uncond"),
    )
    with pytest.raises(GuidanceValueError, match="latent grid"):
        flat(torch.zeros(BATCH, 16, 8, dtype=torch.float64), 1.0)


# -- through the classic diffusers adapter on a tiny real pipeline --------------------------------


@torch.no_grad()
def test_fdg_through_a_tiny_stable_diffusion_pipeline() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    import tiny_diffusers as tiny

    from guidekit.adapters.diffusers import guided

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = tiny.sd_pipeline().to(torch.float64)
        calls: list[int] = []
        hook = pipe.unet.conv_in.register_forward_pre_hook(
            lambda _m, args: calls.append(int(args[0].shape[0]))
        )

        def run(expr: object | None) -> torch.Tensor:
            gen = torch.Generator().manual_seed(0)
            kwargs = {"prompt": ["a cat", "a dog"], "height": 16, "width": 16,
                      "output_type": "latent", "num_inference_steps": 3}
            if expr is None:  # the pipeline's own CFG
                return torch.as_tensor(pipe(generator=gen, guidance_scale=4.0, **kwargs).images)
            # the pipeline's default scale (> 1) prepares the unconditional rows FDG reads
            with guided(pipe, expr):
                return torch.as_tensor(pipe(generator=gen, **kwargs).images)

        try:
            own = run(None)
            calls.clear()
            same = run(FDG(4, 4))
            assert calls == [4, 4, 4]  # one call per step: both prompts, cond and uncond
            split = run(FDG(low=2, high=6))
        finally:
            hook.remove()
        torch.testing.assert_close(same, own, rtol=0, atol=1e-6)
        assert torch.isfinite(split).all()
        assert (split - own).abs().max() > 1e-4
    finally:
        torch.set_num_threads(threads)
