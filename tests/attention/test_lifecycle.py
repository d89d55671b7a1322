"""The engine's life cycle: it captures the model on entry, refuses a second engine on the
same layers, and copies or saves of the model during a run hold the user's own objects."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import guidekit
from guidekit import CFG, PAG, SLG, GuidanceValueError
from guidekit.attention import install
from guidekit.attention.hooks import ProcessorWrapper, ReplacedForward

from ._tiny import BATCH, SelfAttention, dit_fn, processors, tiny_dit, tiny_plain

LAYER = "transformer_blocks.1.attn1"


def inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(BATCH, 4, 8, 8, generator=g)
    return x, {"class_labels": torch.tensor([3, 7])}, {"class_labels": torch.tensor([0, 0])}


def guided(model: Any, plan: Any, around: Any, fn: Any = None) -> torch.Tensor:
    x, cond, uncond = inputs()
    with torch.no_grad():
        out = guidekit.guide(plan, fn or dit_fn(model), cond=cond, uncond=uncond,
                             around_call=around)(x, 1.0)
    return out  # type: ignore[no-any-return]


def test_exit_restores_the_processor_found_on_entry_not_at_install() -> None:
    model = tiny_dit()
    engine = install(model, guidekit.compile(CFG(3) + PAG(2, layers=1)))
    mine = AttnProcessor2_0()
    model.get_submodule(LAYER).set_processor(mine)  # after install(), before `with`
    with engine as around:
        inner = processors(model)[LAYER]
        assert isinstance(inner, ProcessorWrapper) and inner.original is mine
        guided(model, engine.plan, around)
    assert processors(model)[LAYER] is mine


def test_a_second_engine_built_before_entry_is_refused_at_entry() -> None:
    model = tiny_dit()
    cfg = guidekit.compile(CFG(3))
    with torch.no_grad():
        plain = guidekit.guide(cfg, dit_fn(model), cond=inputs()[1], uncond=inputs()[2])(
            inputs()[0], 1.0)
    plan = guidekit.compile(CFG(3) + PAG(2, layers=1))
    first = install(model, plan)
    second = install(model, guidekit.compile(CFG(3) + PAG(4, layers=[0, 1])))
    before = processors(model)
    with first as around:
        hooked = processors(model)
        with pytest.raises(GuidanceValueError, match=f"{LAYER}.*already hooked.*one engine"):
            with second:
                pass
        assert processors(model) == hooked  # the second took nothing out, put nothing in
        pag = guided(model, plan, around)
    assert (pag - plain).abs().max() > 1e-3  # the first engine's PAG still perturbs
    assert processors(model) == before


def test_slg_blocks_refuse_a_second_engine_at_entry() -> None:
    model = tiny_dit()
    first = install(model, guidekit.compile(CFG(3) + SLG(2, layers=1)))
    second = install(model, guidekit.compile(CFG(3) + SLG(3, layers=1)))
    with first:
        hooked = model.transformer_blocks[1].forward
        with pytest.raises(GuidanceValueError, match="already hooked"):
            with second:
                pass
        assert model.transformer_blocks[1].forward is hooked
    assert "forward" not in model.transformer_blocks[1].__dict__


def _bare(model: Any) -> torch.Tensor:
    x, cond, _ = inputs()
    with torch.no_grad():
        return dit_fn(model)(x, torch.ones(BATCH), **cond)  # type: ignore[no-any-return]


def _reloaded(model: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_made_during_a_run_hold_the_original_processors(how: str) -> None:
    model = tiny_dit()
    ref = _bare(model)
    originals = processors(model)
    plan = guidekit.compile(CFG(3) + PAG(2, layers=[0, 1]) + SLG(1, layers=2))
    with install(model, plan):
        twin = copy.deepcopy(model) if how == "deepcopy" else _reloaded(model)
    for path, proc in processors(twin).items():
        assert type(proc) is type(originals[path]), path
    for name, module in twin.named_modules():
        assert not isinstance(module.__dict__.get("forward"), ReplacedForward), name
    assert torch.equal(_bare(twin), ref)
    assert processors(model) == originals  # the run itself was restored as usual


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_of_a_plain_module_during_a_run_run_unhooked(how: str) -> None:
    model = tiny_plain()
    x = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma, y = torch.ones(BATCH), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x, sigma, y)
    plan = guidekit.compile(CFG(3) + PAG(2, layers=0))
    with install(model, plan, attention_class=SelfAttention) as around:
        twin = copy.deepcopy(model) if how == "deepcopy" else _reloaded(model)
        with torch.no_grad():
            guidekit.guide(plan, model, cond={"y": y}, uncond={"y": torch.tensor([10, 10])},
                           around_call=around)(x, 1.0)
    attn = twin.blocks[0].attn
    assert not isinstance(attn.__dict__.get("forward"), ReplacedForward)
    with torch.no_grad():
        assert torch.equal(twin(x, sigma, y), ref)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_install_on_a_compiled_model_hooks_its_orig_mod() -> None:
    model = tiny_dit()
    plan = guidekit.compile(CFG(3) + PAG(2, layers=1))
    with install(model, plan) as around:
        eager = guided(model, plan, around)
    compiled = torch.compile(model, backend="eager")
    engine = install(compiled, plan)
    assert engine.model is model
    with engine as around:
        assert isinstance(processors(model)[LAYER], ProcessorWrapper)
        out = guided(compiled, plan, around, fn=dit_fn(compiled))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert not isinstance(processors(model)[LAYER], ProcessorWrapper)
