"""Named conditionings in the modular ``guider=``: ``GuidekitGuidance.attach(conds=...)``.

A tiny modular SD3 denoise step (float64). A named conditioning is a dict keyed by the loop's
guider inputs (``encoder_hidden_states``, ``text_embeds``); ``CFG(7, negative="neg")`` with
the embeddings of a negative prompt must equal plain CFG given those embeddings as the
pipeline's negative ones, and a three-conditioning expression must equal the classic adapter
with ``prompts=``, batched (one batch of three row blocks) or not; what the guider cannot
build is refused by name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, Cond, GuidanceTypeError, GuidanceValueError, Uncond
from guidekit.adapters.diffusers import GuidekitGuidance, guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _diffusers_helpers import modular_sd3, modular_sd3_case  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (a fixture)

NEG = "blurry, dark"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3() -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    return modular_sd3_case([NEG, NEG])


def _counted(pipe: Any, guider: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, list[int]]:
    """The modular step's latents and the rows of each transformer call it made."""
    rows: list[int] = []
    handle = pipe.transformer.pos_embed.register_forward_pre_hook(
        lambda m, a: rows.append(int(a[0].shape[0]))
    )
    try:
        return modular_sd3(pipe, guider, inputs), rows
    finally:
        handle.remove()


@pytest.mark.parametrize("batched", [False, True])
@torch.no_grad()
def test_a_named_negative_equals_the_pipelines_negative_embeddings(sd3: Any, batched: bool) -> None:
    pipe, inputs, neg = sd3
    as_negative = {**inputs, "negative_prompt_embeds": neg["encoder_hidden_states"],
                   "negative_pooled_prompt_embeds": neg["text_embeds"]}
    plain = GuidekitGuidance(CFG(7), batched=batched).attach(scheduler=pipe.scheduler)
    ref = modular_sd3(pipe, plain, as_negative)
    guider = GuidekitGuidance(CFG(7, negative="neg"), batched=batched).attach(
        scheduler=pipe.scheduler, conds={"neg": neg}
    )
    out, rows = _counted(pipe, guider, inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert rows == ([4] * 3 if batched else [2, 2] * 3)
    assert guider._input_predictions == ["pred_cond", "pred_neg"]


@pytest.mark.parametrize("batched", [False, True])
@torch.no_grad()
def test_three_conditionings_equal_the_classic_adapter_with_prompts(sd3: Any, batched: bool) -> None:
    pipe, inputs, neg = sd3
    expr = CFG(7) - 2 * (Cond("neg") - Uncond())
    with guided(pipe, expr, prompts={"neg": NEG}):
        ref = pipe(guidance_scale=7, output_type="latent", max_sequence_length=16, **inputs).images
    guider = GuidekitGuidance(expr, batched=batched).attach(
        scheduler=pipe.scheduler, conds={"neg": neg}
    )
    out, rows = _counted(pipe, guider, inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert rows == ([6] * 3 if batched else [2, 2, 2] * 3)
    assert (out - modular_sd3(pipe, GuidekitGuidance(CFG(7)).attach(scheduler=pipe.scheduler), inputs)).abs().max() > 1e-4


@torch.no_grad()
def test_named_conditionings_the_guider_cannot_build_are_refused(sd3: Any) -> None:
    pipe, inputs, neg = sd3
    expr = CFG(7, negative="neg")
    cases: list[tuple[Any, type[Exception], str]] = [
        (None, GuidanceValueError, r"uses conditioning\(s\) \['neg'\].*attach\(conds=.*encoder_hidden_states, text_embeds"),
        ({"neg": {"encoder_hidden_states": neg["encoder_hidden_states"]}}, GuidanceValueError,
         r"lacks the guider input 'text_embeds', which differs"),
        ({"neg": {**neg, "prompt_embeds": neg["text_embeds"]}}, GuidanceValueError,
         r"gives \['prompt_embeds'\], which the loop does not pass"),
    ]
    for conds, error, match in cases:
        guider = GuidekitGuidance(expr).attach(scheduler=pipe.scheduler)
        if conds is not None:
            guider.attach(conds=conds)
        with pytest.raises(error, match=match):
            modular_sd3(pipe, guider, inputs)
    guider = GuidekitGuidance(expr)
    with pytest.raises(GuidanceValueError, match=r"does not read 'style'"):
        guider.attach(conds={"style": neg})
    with pytest.raises(GuidanceValueError, match=r"'uncond' comes from the pipeline's own"):
        guider.attach(conds={"uncond": neg})
    with pytest.raises(GuidanceTypeError, match=r"maps conditioning names to dicts"):
        guider.attach(conds={"neg": neg["text_embeds"]})
    assert "forward" not in vars(pipe.transformer)
