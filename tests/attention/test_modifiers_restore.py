"""The attention modifiers leave the model as it was (every ending), and refuse what they
cannot honour, saying what to do."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, GAG, NAG, PAG, PLADIS, Cond, GuidanceValueError
from guidekit.attention import install

from ._modifiers_reference import cross_layers, inputs, model_and_fn
from ._tiny import BATCH, ENDINGS, Boom, SelfAttention, processors, tiny_dit, tiny_plain

# -- restoration and refusals -----------------------------------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_exit_restores_processors_and_outputs(ending: str) -> None:
    model, fn = model_and_fn("pixart", torch.float32)
    x, cond, uncond = inputs(torch.float32)
    s = torch.full((BATCH,), 1.0)
    with torch.no_grad():
        before_out = fn(x, s, cond["text"])
        before = processors(model)
        plan = guidekit.compile(CFG(3) + PAG(1) | GAG(5) | NAG(3))
        error = {"normal": None, "exception": Boom, "interrupt": KeyboardInterrupt}[ending]
        try:
            with install(model, plan) as around_call:
                changed = processors(model)
                assert all(changed[p] is not before[p] for p in cross_layers(model))
                # outside a guided call the hooked model is unchanged
                assert torch.equal(fn(x, s, cond["text"]), before_out)
                guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around_call)(x, 1.0)
                if error is Boom:
                    raise Boom()
                if error is KeyboardInterrupt:  # from inside a model call, hooks active

                    def interrupted(*args: Any, **kw: Any) -> torch.Tensor:
                        fn(*args, **kw)
                        raise KeyboardInterrupt

                    guidekit.guide(plan, interrupted, cond=cond, uncond=uncond,
                                   around_call=around_call)(x, 1.0)
        except (Boom, KeyboardInterrupt):
            pass
        after = processors(model)
        assert after.keys() == before.keys()
        assert all(after[k] is v for k, v in before.items())
        assert torch.equal(fn(x, s, cond["text"]), before_out)


def test_refusals_say_what_to_do() -> None:
    x, cond, uncond = inputs(torch.float32)
    with pytest.raises(GuidanceValueError, match="no cross-attention layer"):
        install(tiny_dit(), guidekit.compile(CFG(3) | PLADIS(2)))
    model, fn = model_and_fn("pixart", torch.float32)
    plan = guidekit.compile(CFG(3) | PLADIS(2))
    with pytest.raises(GuidanceValueError, match="needs the attention engine"):
        guidekit.guide(plan, fn, cond=cond, uncond=uncond)(x, 1.0)
    with pytest.raises(GuidanceValueError, match="conditioning"):
        guidekit.guide(guidekit.compile(Cond() | NAG(4)), fn, cond=cond)
    with pytest.raises(GuidanceValueError, match="at most one of"):
        install(model, guidekit.compile(CFG(3) | PLADIS(2) | GAG(5, layers=1)))
    with pytest.raises(GuidanceValueError, match=r"out of range.*transformer_blocks.1.attn2"):
        install(model, guidekit.compile(CFG(3) | PLADIS(2, layers=5)))
    with pytest.raises(GuidanceValueError, match="cannot share a layer"):
        install(tiny_plain(), guidekit.compile(CFG(3) + PAG(1, layers=0) | PLADIS(2, layers=0)),
                attention_class=SelfAttention)
    # nothing was hooked by the refused installs
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in processors(model).values())
