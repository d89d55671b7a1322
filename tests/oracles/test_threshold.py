"""Oracle for dynamic thresholding (Imagen), https://arxiv.org/abs/2205.11487.

Per sample, on the guided x0: ``s = max(percentile_p(|x0|), 1)``, ``x0 <- clip(x0, -s, s) / s``
(numpy's ``quantile`` here). Also: through ``guide()`` it adds no model call, and on a tiny
Stable Diffusion pipeline ``CFG(w) | DynamicThreshold(p, max_value=M)`` under a plain DDPM
scheduler equals the scheduler's own ``thresholding=True`` (its posterior reads only x0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import guidekit
from guidekit import CFG, GuidanceValueError, Rescale, parse
from guidekit.combinators import DynamicThreshold

from ._support import BATCH, FakeModel, branch, conditioning, noise_coefficients, np64, t64, x_at


def threshold_oracle(x0: np.ndarray, p: float, max_value: float | None = None) -> np.ndarray:
    out = np.empty_like(x0)
    for b in range(len(x0)):
        s = max(float(np.quantile(np.abs(x0[b]), p)), 1.0)
        if max_value is not None:
            s = min(s, max_value)
        out[b] = np.clip(x0[b], -s, s) / s
    return out


@pytest.mark.parametrize(
    ("p", "max_value", "prediction", "noise", "sigma"),
    [(0.995, None, "eps", "ve", 3.0), (0.8, None, "x0", "ve", 1.0), (0.9, 2.0, "v", "vp", 0.7),
     (0.6, None, "flow", "flow", 0.4)],
)
def test_threshold_matches_the_percentile_clip_of_x0(
    p: float, max_value: float | None, prediction: str, noise: str, sigma: float
) -> None:
    w = 5.0
    plan = guidekit.compile(
        CFG(w) | DynamicThreshold(p, max_value=max_value), prediction=prediction, noise=noise
    )
    model = FakeModel()
    x = x_at(0, scale=3.0)
    out = np64(guidekit.guide(
        plan, model, cond=conditioning("cond"), uncond=conditioning("uncond"),
    )(t64(x), sigma))
    c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
    a, b = noise_coefficients(noise, sigma)
    guided = u + w * (c - u)
    if prediction == "x0":
        x0 = guided
    elif prediction == "eps":
        x0 = (x - b * guided) / a
    elif prediction == "flow":
        x0 = (x - b * guided) / (a + b)
    else:  # v = (a n - b x0) / r
        r2 = a * a + b * b
        x0 = (a * x - b * np.sqrt(r2) * guided) / r2
    clipped = threshold_oracle(x0, p, max_value)
    assert np.abs(x0).max() > 1.5 and not np.allclose(clipped, x0)  # the clip is active
    n = (x - a * clipped) / b
    want = {"x0": clipped, "eps": n, "flow": n - clipped,
            "v": (a * n - b * clipped) / np.sqrt(a * a + b * b)}[prediction]
    np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-9)
    assert [c["rows"] for c in model.calls] == [2 * BATCH]


def test_small_values_are_left_alone_and_one_call_per_step() -> None:
    """An x0 within [-1, 1] gives s = 1: unchanged; over several steps, one call each."""
    model = FakeModel()
    plan = guidekit.compile(CFG(1) | DynamicThreshold(), prediction="x0")
    guided = guidekit.guide(plan, model, cond=conditioning("cond"), uncond=conditioning("uncond"))
    x = t64(x_at(0))
    for sigma in (4.0, 1.0, 0.25):
        out = np64(guided(x, sigma))
        c = branch("main", "cond", sigma)
        np.testing.assert_allclose(out, threshold_oracle(c, 0.995), rtol=1e-12, atol=1e-12)
    assert [c["rows"] for c in model.calls] == [BATCH] * 3  # CFG(1) is c alone
    tiny = guidekit.guide(plan, lambda x, s, **k: 0.5 * x, cond={}, uncond={})
    small = torch.rand(2, 3, 4, dtype=torch.float64) - 0.5
    torch.testing.assert_close(tiny(small, 1.0), 0.5 * small, rtol=0, atol=0)


def test_text_round_trip_and_refusals() -> None:
    for expr in (CFG(7) | DynamicThreshold(),
                 CFG(7) | Rescale(0.7) | DynamicThreshold(0.9, max_value=2)):
        assert parse(str(expr)) == expr
    assert str(CFG(7) | DynamicThreshold(0.9)) == "CFG(7) | DynamicThreshold(0.9)"
    with pytest.raises(GuidanceValueError, match=r"percentile must lie in \[0, 1\]"):
        DynamicThreshold(99.5)
    with pytest.raises(GuidanceValueError, match="max_value.*>= 1"):
        DynamicThreshold(max_value=0.5)


@torch.no_grad()
def test_equals_the_ddpm_schedulers_own_thresholding() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    import tiny_diffusers as tiny
    from diffusers import DDPMScheduler

    from guidekit.adapters.diffusers import guided

    def ddpm(**extra: object) -> DDPMScheduler:
        return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             steps_offset=1, **extra)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kwargs = {"prompt": ["a cat", "a dog"], "guidance_scale": 4.0, "height": 16,
                  "width": 16, "output_type": "latent", "num_inference_steps": 3}

        def run(scheduler: DDPMScheduler, expr: object | None = None) -> torch.Tensor:
            pipe = tiny.sd_pipeline(scheduler).to(torch.float64)
            gen = torch.Generator().manual_seed(0)
            if expr is None:
                return torch.as_tensor(pipe(generator=gen, **kwargs).images)
            calls: list[int] = []
            hook = pipe.unet.conv_in.register_forward_pre_hook(
                lambda _m, args: calls.append(int(args[0].shape[0]))
            )
            try:
                with guided(pipe, expr):
                    out = torch.as_tensor(pipe(generator=gen, **kwargs).images)
            finally:
                hook.remove()
            assert calls == [4, 4, 4]  # the processor adds no call
            return out

        own = run(ddpm(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0,
                       clip_sample=False))
        plain = run(ddpm(clip_sample=False))
        ours = run(ddpm(clip_sample=False), CFG(4) | DynamicThreshold(0.9, max_value=3))
        torch.testing.assert_close(ours, own, rtol=0, atol=1e-6)
        assert (ours - plain).abs().max() > 1e-3  # the threshold was active
    finally:
        torch.set_num_threads(threads)
