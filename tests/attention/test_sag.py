"""SAG on tiny real models: a dependent second call, checked against an independent
implementation of the paper's degradation (numpy float64 blur and mask, separate passes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import guidekit
from guidekit import CFG, SAG, Cond, GuidanceValueError

from ._tiny import BATCH, dit_fn, ref_processors, tiny_dit, tiny_unet, unet_fn

LABELS = torch.tensor([3, 7])
NULL = torch.full((BATCH,), 10)


def np_blur(x0: np.ndarray, size: int = 9, sigma: float = 1.0) -> np.ndarray:
    """2-D Gaussian blur with an explicit (non-separable) kernel and reflection padding."""
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (t / sigma) ** 2)
    kernel = np.outer(g, g)
    kernel /= kernel.sum()
    pad = size // 2
    b, c, h, w = x0.shape
    padded = np.pad(x0, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = np.zeros_like(x0)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = (padded[:, :, i : i + size, j : j + size] * kernel).sum((-1, -2))
    return out


def np_degrade(x: np.ndarray, u_eps: np.ndarray, probs: np.ndarray, sigma: float) -> np.ndarray:
    """methods.md's SAG input for a VE eps model: mask, blur, re-noise."""
    x0 = x - sigma * u_eps
    received = probs.mean(1).sum(1)  # heads averaged, summed over queries: [B, K]
    k = received.shape[-1]
    h, w = x.shape[-2:]
    f = int(round(math.sqrt(h * w / k)))
    mask = (received > 1.0).astype(np.float64).reshape(-1, 1, h // f, w // f)
    mask = mask.repeat(f, axis=2).repeat(f, axis=3)  # nearest upsampling
    x0_deg = mask * np_blur(x0) + (1 - mask) * x0
    return x0_deg + sigma * u_eps


def run_reference(model, fn, x, sigma, cond, uncond, path, w, s):  # type: ignore[no-untyped-def]
    with torch.no_grad(), ref_processors(model, [path]) as procs:
        sig = torch.full((BATCH,), sigma)
        c = fn(x, sig, cond)
        procs[path].mode = "record"
        u = fn(x, sig, uncond)
        probs = procs[path].maps
        procs[path].mode = None
        x_deg = np_degrade(x.double().numpy(), u.double().numpy(), probs.double().numpy(), sigma)
        d = fn(torch.from_numpy(x_deg).float(), sig, uncond)
    mask_frac = float((probs.mean(1).sum(1) > 1).float().mean())
    return u + w * (c - u) + s * (u - d), mask_frac


def run_guided(model, fn, expr, x, sigma, cond, uncond):  # type: ignore[no-untyped-def]
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
        out = g(x, sigma)
    return out, g.calls, plan


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_sag_matches_independent_reference(arch: str) -> None:
    torch.manual_seed(0)
    if arch == "dit":
        model = tiny_dit(num_layers=3)
        fn, path = dit_fn(model), "transformer_blocks.2.attn1"
        cond, uncond = {"class_labels": LABELS}, {"class_labels": NULL}
        ref_c, ref_u = LABELS, NULL
    else:
        model = tiny_unet()
        fn, path = unet_fn(model), "mid_block.attentions.0.transformer_blocks.0.attn1"
        text = torch.randn(BATCH, 5, 32)
        cond, uncond = {"text": text}, {"text": torch.zeros_like(text)}
        ref_c, ref_u = text, torch.zeros_like(text)
    x = torch.randn(BATCH, 4, 8, 8)
    sigma = 1.3
    ref, frac = run_reference(model, fn, x, sigma, ref_c, ref_u, path, 2.0, 0.8)
    assert 0 < frac < 1  # some tokens blurred, some kept: the mask matters
    out, calls, plan = run_guided(model, fn, CFG(2) + SAG(0.8), x, sigma, cond, uncond)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [(c.rows, c.branches) for c in calls] == [
        (2 * BATCH, ("c", "u")), (BATCH, ("u[SAGDegrade()]",)),
    ]
    assert "main (2nd call) [u[SAGDegrade()]]" in str(plan)


def test_sag_changes_the_prediction_and_sag_alone_runs() -> None:
    model = tiny_dit(num_layers=3)
    x = torch.randn(BATCH, 4, 8, 8)
    fn = dit_fn(model)
    cond, uncond = {"class_labels": LABELS}, {"class_labels": NULL}
    out, calls, _ = run_guided(model, fn, Cond() + SAG(1.0), x, 1.0, cond, uncond)
    plain, _, _ = run_guided(model, fn, Cond(), x, 1.0, cond, uncond)
    assert (out - plain).abs().max() > 1e-4
    assert [c.rows for c in calls] == [2 * BATCH, BATCH]


def test_sag_few_steps_and_restoration() -> None:
    model = tiny_dit(num_layers=3)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    fn = dit_fn(model)
    plan = guidekit.compile(CFG(2) + SAG(0.5), prediction="eps", noise="ve")
    sigmas = [2.0, 0.5]
    x = torch.randn(BATCH, 4, 8, 8) * 2
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        g = guidekit.guide(plan, fn, cond={"class_labels": LABELS},
                           uncond={"class_labels": NULL}, sigmas=sigmas, around_call=around)
        for i, s in enumerate(sigmas):
            eps = g(x, s)
            x = x + ((sigmas[i + 1] if i + 1 < len(sigmas) else 0.0) - s) * eps
    assert torch.isfinite(x).all()
    assert len(g.calls) == 4
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert after == before


def test_sag_errors() -> None:
    model = tiny_dit(num_layers=3)
    with pytest.raises(GuidanceValueError, match="ONE attention map"):
        guidekit.attention.install(model, guidekit.compile(CFG(2) + SAG(1, layers=(0, 1))))
    with pytest.raises(GuidanceValueError, match="odd"):
        SAG(1, kernel=4)
    plan = guidekit.compile(CFG(2) + SAG(1))
    g = guidekit.guide(plan, dit_fn(model), cond={"class_labels": LABELS},
                       uncond={"class_labels": NULL})
    with pytest.raises(GuidanceValueError, match="attention engine"):
        g(torch.randn(BATCH, 4, 8, 8), 1.0)
