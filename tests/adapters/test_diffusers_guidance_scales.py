"""A pipeline call's ``guidance_scale`` (and ``guidance_rescale``) may be any finite real
scalar diffusers accepts: a Python or numpy number, a 0-d or one-element real tensor. Bools,
NaN/inf, complex numbers and several values are refused naming the argument. Tiny real SD
pipeline, float64.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from guidekit import CFG, GuidanceValueError
from guidekit.adapters.diffusers import guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from tiny_diffusers import one_thread, sd_fixture  # noqa: E402,F401  (fixtures)


def run_sd(pipe: Any, **kwargs: Any) -> torch.Tensor:
    return tiny.run_sd(pipe, steps=2, **kwargs)


F64 = torch.float64
W = 4.0
PROMPTS = ["a cat", "a photo of a dog"]

pytestmark = pytest.mark.usefixtures("one_thread")


# (numpy arrays pass guidekit's check too, but diffusers' own arithmetic refuses them)
SCALARS = [
    np.float32(W), np.float64(W), np.int64(4), torch.tensor(W), torch.tensor([W]), torch.tensor(4), torch.tensor(W, dtype=F64),
]


@torch.no_grad()
@pytest.mark.parametrize("scale", SCALARS, ids=repr)
def test_a_real_scalar_guidance_scale_runs_as_the_number(sd: Any, scale: Any) -> None:
    with guided(sd, CFG(W)):
        ref = run_sd(sd, guidance_scale=W)
        out = run_sd(sd, guidance_scale=scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@torch.no_grad()
def test_a_tensor_guidance_rescale_is_honoured(sd: Any) -> None:
    with guided(sd, CFG(W)) as g:
        run_sd(sd, guidance_scale=W, guidance_rescale=torch.tensor(0.7, dtype=F64))
        assert repr(g.plan.expr) == "CFG(4) | Rescale(0.7)"


BAD = [
    True, np.bool_(True), torch.tensor(True), float("nan"), np.float32("inf"),
    torch.tensor(float("nan")), 4 + 0j, np.complex64(4), torch.tensor(4 + 0j),
    torch.tensor([W, W]), np.array([W, W]), "4", [W],
]


@pytest.mark.parametrize("scale", BAD, ids=repr)
def test_a_non_scalar_guidance_scale_is_refused_naming_it(sd: Any, scale: Any) -> None:
    with guided(sd, CFG(W)), pytest.raises(
        GuidanceValueError, match=r"guidance_scale=.*expected a finite real number"
    ):
        run_sd(sd, guidance_scale=scale)


def _lcm() -> Any:
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    pipe = LatentConsistencyModelPipeline(
        vae=tiny._vae(), text_encoder=tiny.clip_encoder(), tokenizer=tiny.clip_tokenizer(),
        unet=tiny.unet(0, time_cond_proj_dim=8), scheduler=LCMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).to(F64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_an_lcm_guidance_scale_is_the_models_embedding_not_cfg() -> None:
    # LatentConsistencyModelPipeline feeds guidance_scale to the UNet's timestep_cond and has
    # no CFG: guidekit leaves it to the pipeline (before: refused as a CFG scale under
    # Cond(), and "call it with guidance_scale > 1" under CFG(3), which it was)
    from guidekit import Cond

    pipe = _lcm()
    ref = tiny.run_sd(pipe, steps=2, guidance_scale=3.0)
    with guided(pipe, Cond()) as run:
        out = tiny.run_sd(pipe, steps=2, guidance_scale=3.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert [c.rows for c in run.calls] == [2, 2]
    with pytest.raises(GuidanceValueError, match="no unconditional rows: its guidance_scale "
                                                 "feeds the model's guidance embedding"):
        with guided(pipe, CFG(3)):
            tiny.run_sd(pipe, steps=2, guidance_scale=3.0)
