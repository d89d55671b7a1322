"""SLG's engine leaves the model as it was: on exit (every ending), after an interrupt
inside a skipped block, on a second install, and outside guided calls.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, SLG, Cond, GuidanceValueError
from guidekit.attention import install

from ._joint_models import sd3_conds, sd3_fn, tiny_sd3
from ._slg_reference import LABELS, latent, no_instance_forwards
from ._tiny import BATCH, ENDINGS, dit_fn, ended_as, leave, processors, tiny_dit

# -- restoration -------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("skip", ["block", "attention"])
def test_exit_restores_everything(skip: str, ending: str) -> None:
    model = tiny_sd3(3)
    fn = sd3_fn(model)
    cond, uncond = sd3_conds()
    x = latent(4, 8, 8)
    sig = torch.full((BATCH,), 0.5, dtype=torch.float64)
    before = processors(model)
    with torch.no_grad():
        out_before = fn(x, sig, **cond)
    plan = guidekit.compile(CFG(3) + SLG(2, layers=[0, 2], skip=skip))
    with ended_as(ending):
        with torch.no_grad(), install(model, plan) as around:
            assert not no_instance_forwards(model)
            y = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)(x, 0.5)
            assert (y - out_before).abs().max() > 1e-3
            leave(ending)
    assert no_instance_forwards(model)
    after = processors(model)
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(fn(x, sig, **cond), out_before)


def test_interrupt_inside_a_skipped_block_restores() -> None:
    model = tiny_dit().double()
    cond, uncond = LABELS
    x = latent(4, 8, 8)

    def fn(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        def stop(*_: Any) -> None:
            raise KeyboardInterrupt

        model.transformer_blocks[2].attn1.register_forward_pre_hook(stop)
        return dit_fn(model)(x, sigma, class_labels)

    plan = guidekit.compile(CFG(3) + SLG(2, layers=2, skip="attention"))
    with pytest.raises(KeyboardInterrupt):
        with torch.no_grad(), install(model, plan) as around:
            guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)(x, 1.0)
    model.transformer_blocks[2].attn1._forward_pre_hooks.clear()
    assert no_instance_forwards(model)


def test_double_install_raises_and_leaves_the_first() -> None:
    model = tiny_dit()
    plan = guidekit.compile(CFG(3) + SLG(2, layers=1))
    with install(model, plan):
        hooked = model.transformer_blocks[1].forward
        with pytest.raises(GuidanceValueError, match="already hooked"):
            with install(model, plan):
                pass
        assert model.transformer_blocks[1].forward is hooked
    assert no_instance_forwards(model)


def test_outside_guided_calls_the_model_is_unchanged() -> None:
    model = tiny_sd3(3)
    fn = sd3_fn(model)
    cond, _ = sd3_conds()
    x = latent(4, 8, 8)
    sig = torch.full((BATCH,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        ref = fn(x, sig, **cond)
        with install(model, guidekit.compile(Cond() + SLG(2, layers=[0, 1, 2]))):
            assert torch.equal(fn(x, sig, **cond), ref)
        with install(model, guidekit.compile(Cond() + SLG(2, layers=[0, 1], skip="attention"))):
            assert torch.equal(fn(x, sig, **cond), ref)
