"""The modular pipelines' ``guider=`` component, GuidekitGuidance.

Its contract (batches, combine, the step-fraction window), its config round trip, and modular
SD3 with the guider equal to the classic pipelines, one batch per branch or per forward group.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import APG, CFG, Autoguidance, GuidanceValueError
from guidekit.adapters.diffusers import GuidekitGuidance, guided

# the shared set-up and the builders of tiny components live next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
from _diffusers_helpers import (  # noqa: E402
    F64,
    PROMPTS,
    STEPS,
    W,
    forwards,
)
from _modular_sd3 import sd3_modular  # noqa: E402

# the shared fixtures: pytest finds them by name in this module
_quiet_single_thread, pipes, weak_models = (
    helpers._quiet_single_thread, helpers.pipes, helpers.weak_models
)


# -- modular pipelines: the guider= component ---------------------------------------------------


def test_guider_contract_batches_combine_and_window() -> None:
    c, u = torch.randn(2, 3), torch.randn(2, 3)
    guider = GuidekitGuidance("CFG(3)")
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    assert guider.num_conditions == 2
    batches = guider.prepare_inputs({"encoder_hidden_states": (c, u)})
    assert [b.__guidance_identifier__ for b in batches] == ["pred_cond", "pred_uncond"]
    assert batches[0].encoder_hidden_states is c and batches[1].encoder_hidden_states is u
    flags = []
    for b in batches:
        guider.prepare_models(torch.nn.Identity())
        flags.append(guider.is_conditional)
        b.noise_pred = b.encoder_hidden_states * 2
        guider.cleanup_models(torch.nn.Identity())
    assert flags == [True, False]
    out = guider(batches)
    torch.testing.assert_close(out.pred, 2 * u + 3 * (2 * c - 2 * u))
    assert torch.equal(out.pred_cond, batches[0].noise_pred)

    guider.disable()
    assert guider.num_conditions == 1
    (only,) = guider.prepare_inputs({"encoder_hidden_states": (c, u)})
    only.noise_pred = c
    assert guider([only]).pred is c

    windowed = GuidekitGuidance("CFG(3)", start=0.5)
    windowed.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(500))
    assert windowed.num_conditions == 1  # diffusers' step-fraction window, kept for users
    windowed.set_state(step=2, num_inference_steps=4, timestep=torch.tensor(250))
    assert windowed.num_conditions == 2


def test_guider_config_round_trips_and_needs_a_scheduler_for_sigma(tmp_path: Path) -> None:
    expr = CFG(3) + Autoguidance(1.5).between(0.5, 1) | APG(eta=0, momentum=-0.5)
    guider = GuidekitGuidance(expr, batched=True)
    assert guider.config["expression"] == repr(expr)
    guider.save_pretrained(tmp_path)
    again = GuidekitGuidance.from_pretrained(tmp_path)
    assert again.plan.expr == expr and again.config["batched"] is True
    assert guider.new(seed=3).plan.expr == expr
    with pytest.raises(GuidanceValueError, match="attach"):
        guider.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(999))


_modular_sd3 = sd3_modular


@torch.no_grad()
def test_modular_sd3_with_the_guider_matches_the_classic_pipelines(
    pipes: Any, weak_models: Any
) -> None:
    pipe, weak = pipes("sd3"), weak_models("sd3")
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, negative_prompt=["", ""],
        do_classifier_free_guidance=True, max_sequence_length=16,
    )
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    inputs = {
        "prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
        "negative_pooled_prompt_embeds": nppe, "latents": lat,
        "num_inference_steps": STEPS, "height": 16, "width": 16,
    }

    def classic(expr: Any = None) -> torch.Tensor:
        ctx = guided(pipe, expr, models={"weak": weak}) if expr is not None else contextlib.nullcontext()
        with ctx:
            return pipe(guidance_scale=W, output_type="latent", **inputs).images

    guider = GuidekitGuidance(CFG(W)).attach(scheduler=pipe.scheduler)
    out = _modular_sd3(pipe, guider)(output="latents", **inputs)
    torch.testing.assert_close(out, classic(), rtol=0, atol=1e-5)

    expr = CFG(W) + Autoguidance(1.5) | APG(eta=0, momentum=-0.5)
    ref = classic(expr)
    for batched, expected in [
        (False, [("main", 2), ("main", 2), ("weak", 2)]),  # the loop's one batch per branch
        (True, [("main", 4), ("weak", 2)]),  # one batch per forward group
    ]:
        guider = GuidekitGuidance(expr, batched=batched).attach(scheduler=pipe.scheduler, weak=weak)
        with forwards("sd3", main=pipe.transformer, weak=weak) as log:
            out = _modular_sd3(pipe, guider)(output="latents", **inputs)
        assert log == expected * STEPS
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert "forward" not in vars(pipe.transformer)


@pytest.mark.parametrize("kwargs", [{"schedular": object()}, {"weakk": lambda *a, **k: None},
                                    {"models": {"weak": lambda *a, **k: None}}])
def test_attach_refuses_a_keyword_no_term_reads(kwargs: dict[str, Any]) -> None:
    # before: a misspelt scheduler (or a model CFG never reads) was kept as an extra model
    name = next(iter(kwargs["models"])) if "models" in kwargs else next(iter(kwargs))
    with pytest.raises(GuidanceValueError, match=rf"attach\({name}=\.\.\.\): CFG\(4\) reads no "
                                                 rf"model named '{name}'.* scheduler, models"):
        GuidekitGuidance(CFG(W)).attach(**kwargs)
