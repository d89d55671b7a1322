"""ICG in the modular ``guider=``: ``GuidekitGuidance(ICG(w)).attach(conds={"icg": pool})``.

A tiny modular SD3 denoise step (float64). The pool is the ``P`` candidates' guider inputs
stacked along the first axis; each step every sample draws one by the core's seeded rule
(``guidekit.pools.pool_indices``). The guided latents must equal a hand-written loop of
``w c + (1 - w) u_r`` with ``c`` and ``u_r`` as separate transformer calls, and the classic
adapter given the same pool as prompts (the same draws); one batch per step with
``batched=True``. A missing or malformed pool is refused by name.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import ICG, GuidanceValueError
from guidekit.adapters.diffusers import GuidekitGuidance, guided
from guidekit.pools import pool_indices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _diffusers_helpers import STEPS, forwards, modular_sd3, modular_sd3_case  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (a fixture)

POOL = ["a cat", "a big dog", "a tall green tree", "a red house by the sea", "birds"]
W, SEED = 3.0, 5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3() -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    return modular_sd3_case(POOL)


def _oracle(pipe: Any, inputs: dict[str, Any], pool: dict[str, torch.Tensor]) -> torch.Tensor:
    """ICG by hand: per step, ``w c + (1 - w) u_r``, ``c`` and ``u_r`` separate calls."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    x = inputs["latents"]
    size, batch = pool["encoder_hidden_states"].shape[0], x.shape[0]

    def model(text: torch.Tensor, pooled: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return pipe.transformer(
            hidden_states=x, timestep=t.expand(batch), encoder_hidden_states=text,
            pooled_projections=pooled, return_dict=False,
        )[0]

    for i, t in enumerate(scheduler.timesteps):
        drawn = pool_indices(size, batch, SEED, i, "icg")
        c = model(inputs["prompt_embeds"], inputs["pooled_prompt_embeds"], t)
        u = model(pool["encoder_hidden_states"][drawn], pool["text_embeds"][drawn], t)
        x = scheduler.step(W * c + (1 - W) * u, t, x).prev_sample
    return x


@pytest.mark.parametrize("batched", [False, True])
@torch.no_grad()
def test_a_pool_equals_a_separate_pass_oracle_and_the_classic_adapter(
    sd3: Any, batched: bool
) -> None:
    pipe, inputs, pool = sd3
    guider = GuidekitGuidance(ICG(W), seed=SEED, batched=batched).attach(
        scheduler=pipe.scheduler, conds={"icg": pool}
    )
    with forwards("sd3", main=pipe.transformer) as log:
        out = modular_sd3(pipe, guider, inputs)
    torch.testing.assert_close(out, _oracle(pipe, inputs, pool), rtol=0, atol=1e-10)
    assert [rows for _, rows in log] == ([4] * STEPS if batched else [2, 2] * STEPS)
    assert guider._input_predictions == ["pred_cond", "pred_icg"]
    # the classic adapter, the pool given as prompts, draws the same candidates
    with guided(pipe, ICG(W), prompts={"icg": POOL}, seed=SEED):
        classic = pipe(guidance_scale=1, output_type="latent", max_sequence_length=16,
                       **inputs).images
    torch.testing.assert_close(out, classic, rtol=0, atol=1e-10)
    # the same guider again: a new run, the same draws
    torch.testing.assert_close(modular_sd3(pipe, guider, inputs), out, rtol=0, atol=0)


@torch.no_grad()
def test_a_missing_or_malformed_pool_is_refused_by_name(sd3: Any) -> None:
    pipe, inputs, pool = sd3
    guider = GuidekitGuidance(ICG(W)).attach(scheduler=pipe.scheduler)
    with pytest.raises(GuidanceValueError, match=r"draws 'icg' from a pool.*attach\(conds=\{'icg'.*P candidates stacked"):
        modular_sd3(pipe, guider, inputs)
    with pytest.raises(GuidanceValueError, match=r"'icg' has tensors of different leading sizes"):
        guider.attach(conds={"icg": {**pool, "text_embeds": pool["text_embeds"][:2]}})
    with pytest.raises(GuidanceValueError, match=r"'icg' holds no tensor with a leading axis"):
        guider.attach(conds={"icg": {}})
    assert "forward" not in vars(pipe.transformer)


@torch.no_grad()
def test_cads_anneals_the_drawn_rows_as_in_the_classic_adapter(sd3: Any) -> None:
    """The pool is drawn first, then CADS anneals the ``B`` drawn rows (``Plan.step``'s
    order) -- in the guider as in ``guided``; drawn once, not again from the drawn rows."""
    from guidekit import CADS

    pipe, inputs, pool = sd3
    expr = ICG(W) | CADS(tau1=0.2, tau2=0.9, noise_scale=0.5)
    guider = GuidekitGuidance(expr, seed=SEED).attach(scheduler=pipe.scheduler, conds={"icg": pool})
    out = modular_sd3(pipe, guider, inputs)
    with guided(pipe, expr, prompts={"icg": POOL}, seed=SEED):
        classic = pipe(guidance_scale=1, output_type="latent", max_sequence_length=16,
                       **inputs).images
    torch.testing.assert_close(out, classic, rtol=0, atol=1e-10)
    plain = GuidekitGuidance(ICG(W), seed=SEED).attach(scheduler=pipe.scheduler, conds={"icg": pool})
    assert (out - modular_sd3(pipe, plain, inputs)).abs().max() > 1e-6
