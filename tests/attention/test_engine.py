"""The attention engine: restoration, custom processors, row routing and its refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import guidekit
from guidekit import CFG, PAG, Cond, GuidanceTypeError, GuidanceValueError
from guidekit.attention import install
from guidekit.plan import RowLayout

from ._tiny import (
    BATCH,
    ENDINGS,
    SelfAttention,
    dit_fn,
    ended_as,
    leave,
    processors,
    tiny_dit,
    tiny_plain,
    tiny_unet,
    unet_fn,
    value_only,
)

TOL = 1e-5


def inputs(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(BATCH, 4, 8, 8, generator=g)
    return x, {"class_labels": torch.tensor([3, 7])}, {"class_labels": torch.tensor([0, 0])}


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """What must be exactly as before: processor objects, instance attributes named
    ``forward``, module names, state_dict keys (in order) and every tensor's values."""
    return {
        "processors": processors(model),
        "forwards": {n: m.__dict__.get("forward") for n, m in model.named_modules()},
        "modules": [n for n, _ in model.named_modules()],
        "state": list(model.state_dict().items()),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["processors"].keys() == after["processors"].keys()
    for name, proc in before["processors"].items():
        assert after["processors"][name] is proc, name
    assert before["forwards"].keys() == after["forwards"].keys()
    for name, fwd in before["forwards"].items():
        assert after["forwards"][name] is fwd, name
    assert before["modules"] == after["modules"]
    assert [k for k, _ in before["state"]] == [k for k, _ in after["state"]]
    for (k, v), (_, v2) in zip(before["state"], after["state"]):
        assert torch.equal(v, v2), k


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("kind", ["dit", "plain"])
def test_exit_restores_everything(kind: str, ending: str) -> None:
    if kind == "dit":
        model: torch.nn.Module = tiny_dit()
        fn: Any = dit_fn(model)
        x, cond, uncond = inputs()
        kw: dict[str, Any] = {}
    else:
        model = tiny_plain()
        fn = model
        x, _, _ = inputs()
        cond, uncond = {"y": torch.tensor([3, 7])}, {"y": torch.tensor([10, 10])}
        kw = {"attention_class": SelfAttention}
    sig = torch.full((BATCH,), 2.0)
    with torch.no_grad():
        out_before = fn(x, sig, **cond)
    before = snapshot(model)
    plan = guidekit.compile(CFG(3) + PAG(2, layers=[0, 1, 2]))
    engine = install(model, plan, **kw)
    with ended_as(ending):
        with torch.no_grad(), engine as around:
            guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
            y = guided(x, 2.0)
            assert (y - out_before).abs().max() > 0.05  # the engine was active
            leave(ending)
    assert_same(before, snapshot(model))
    with torch.no_grad():
        out_after = fn(x, sig, **cond)
    assert torch.equal(out_before, out_after)
    # a layout after exit is refused, not silently unperturbed
    with pytest.raises(GuidanceValueError, match="not installed"):
        with engine.around_call(RowLayout("main", BATCH, ())):
            pass


def test_interrupt_inside_a_model_call_restores() -> None:
    """KeyboardInterrupt raised from inside a hooked layer, mid-forward."""
    model = tiny_dit()
    before = snapshot(model)
    x, cond, uncond = inputs()

    def fn(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        def stop(*_: Any) -> None:
            raise KeyboardInterrupt

        model.transformer_blocks[2].register_forward_pre_hook(stop)
        return dit_fn(model)(x, sigma, class_labels)

    plan = guidekit.compile(CFG(3) + PAG(2, layers=0))
    with pytest.raises(KeyboardInterrupt):
        with torch.no_grad(), install(model, plan) as around:
            guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)(x, 2.0)
    model.transformer_blocks[2]._forward_pre_hooks.clear()
    assert_same(before, snapshot(model))


def test_outside_guided_calls_the_model_is_unchanged() -> None:
    model = tiny_dit()
    fn = dit_fn(model)
    x, cond, _ = inputs()
    sig = torch.full((BATCH,), 2.0)
    with torch.no_grad():
        ref = fn(x, sig, **cond)
        with install(model, guidekit.compile(Cond() + PAG(2, layers=(0, 1, 2)))):
            assert torch.equal(fn(x, sig, **cond), ref)


class ScaledProcessor(torch.nn.Module):
    """A user's custom processor with weights: plain attention, output times ``gain`` times
    a learnable factor; ``gain`` arrives through ``cross_attention_kwargs``."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = torch.nn.Parameter(torch.tensor(0.7))
        self.gains: list[float] = []

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        gain: float = 1.0,
    ) -> torch.Tensor:
        self.gains.append(gain)
        b, n, _ = hidden_states.shape
        q, k, v = (f(hidden_states).view(b, n, attn.heads, -1).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out)) * self.factor * gain


class HalfProcessor:
    """A plain-object custom processor (any callable is a processor)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        v = attn.to_v(hidden_states)
        return attn.to_out[0](0.5 * v + 0.5 * v.mean(1, keepdim=True))


def test_custom_processors_keep_working_for_unperturbed_rows() -> None:
    """Defect 6 of diffusers' guiders: custom processors made PAG raise. Here the custom
    processor of a HOOKED layer still computes the c and u rows (with its weights and the
    cross_attention_kwargs it accepts), and one of an unhooked layer is untouched."""
    model = tiny_dit()
    custom, half = ScaledProcessor(), HalfProcessor()
    model.transformer_blocks[0].attn1.set_processor(custom)
    model.transformer_blocks[1].attn1.set_processor(half)
    before = snapshot(model)
    x, cond, uncond = inputs()

    def fn(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return dit_fn(model)(x, sigma, class_labels, cross_attention_kwargs={"gain": 1.3})

    sig = torch.full((BATCH,), 2.0)
    with torch.no_grad():
        c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
        with value_only(model, ("transformer_blocks.0.attn1",)):
            p = fn(x, sig, **cond)
        ref = u + 3 * (c - u) + 2 * (c - p)
        custom.gains.clear()
        plan = guidekit.compile(CFG(3) + PAG(2, layers=0))
        with install(model, plan) as around:
            wrapper = model.transformer_blocks[0].attn1.processor
            assert isinstance(wrapper, torch.nn.Module)  # takes the nn.Module slot
            assert [n for n, _ in model.named_modules()][:3] == before["modules"][:3]
            y = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)(x, 2.0)
    assert custom.gains == [1.3]  # one call, for the 2B unperturbed rows, kwargs passed on
    assert (c - p).abs().max() > 0.05
    assert (y - ref).abs().max() < TOL
    assert_same(before, snapshot(model))
    assert [k for k in model.state_dict() if "factor" in k] == [
        "transformer_blocks.0.attn1.processor.factor"
    ]


def test_several_perturbed_branches_in_one_call() -> None:
    """``[c, u, p0, p2]``: in layer 0 the p2 rows go through the original attention."""
    model = tiny_dit()
    fn = dit_fn(model)
    x, cond, uncond = inputs()
    sig = torch.full((BATCH,), 2.0)
    with torch.no_grad():
        c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
        with value_only(model, ("transformer_blocks.0.attn1",)):
            p0 = fn(x, sig, **cond)
        with value_only(model, ("transformer_blocks.2.attn1",)):
            p2 = fn(x, sig, **cond)
        ref = u + 3 * (c - u) + 1.5 * (c - p0) + 2 * (c - p2)
        for max_rows in (None, BATCH, 3, 5):
            plan = guidekit.compile(
                CFG(3) + PAG(1.5, layers=0) + PAG(2, layers=-1), max_rows=max_rows
            )
            with install(model, plan) as around:
                guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
                y = guided(x, 2.0)
            rows = [call.rows for call in guided.calls]
            assert sum(rows) == 4 * BATCH and max(rows) <= (max_rows or 4 * BATCH)
            assert (y - ref).abs().max() < TOL, max_rows
    assert min((c - p0).abs().max(), (c - p2).abs().max()) > 0.05


def test_unet_default_layer_is_the_mid_block_self_attention() -> None:
    model = tiny_unet()
    plan = guidekit.compile(CFG(3) + PAG(2))
    engine = install(model, plan)
    assert engine.layers == {
        plan.branches[2].perturbation: ("mid_block.attentions.0.transformer_blocks.0.attn1",)
    }
    text = torch.randn(BATCH, 5, 32)
    x, _, _ = inputs()
    with torch.no_grad(), engine as around:
        y = guidekit.guide(plan, unet_fn(model), cond={"text": text},
                           uncond={"text": 0 * text}, around_call=around)(x, 1.0)
    assert torch.isfinite(y).all()


# -- refusals ------------------------------------------------------------------------------------


def test_rows_changed_inside_the_model_raise() -> None:
    model = tiny_dit()
    x, cond, uncond = inputs()

    def doubled(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        out = dit_fn(model)(torch.cat([x, x]), torch.cat([sigma, sigma]),
                            torch.cat([class_labels, class_labels]))
        return out[: x.shape[0]]

    plan = guidekit.compile(CFG(3) + PAG(2, layers=0))
    with pytest.raises(GuidanceValueError, match="rows"):
        with torch.no_grad(), install(model, plan) as around:
            guidekit.guide(plan, doubled, cond=cond, uncond=uncond, around_call=around)(x, 1.0)


def test_plain_module_without_sdpa_raises_instead_of_a_silent_no_op() -> None:
    model = tiny_plain()
    plan = guidekit.compile(Cond() + PAG(2, layers="blocks.0.mlp"))
    x, _, _ = inputs()
    with pytest.raises(GuidanceValueError, match="no torch.nn.functional.scaled_dot_product"):
        with torch.no_grad(), install(model, plan) as around:
            guidekit.guide(plan, model, cond={"y": torch.tensor([1, 2])}, around_call=around)(x, 1.0)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_double_install_and_wrong_plan_raise() -> None:
    model = tiny_dit()
    plan = guidekit.compile(CFG(3) + PAG(2, layers=0))
    other = guidekit.compile(CFG(3) + PAG(2, layers=1))
    x, cond, uncond = inputs()
    with install(model, plan) as around:
        with pytest.raises(GuidanceValueError, match="already hooked"):
            with install(model, plan):
                pass
        assert type(processors(model)["transformer_blocks.0.attn1"]).__name__ == (
            "RowAwareProcessor"
        )
        with pytest.raises(GuidanceValueError, match="install the engine with the plan"):
            with torch.no_grad():
                guidekit.guide(other, dit_fn(model), cond=cond, uncond=uncond,
                               around_call=around)(x, 1.0)
    with pytest.raises(GuidanceTypeError, match="compiled plan"):
        install(model, CFG(3) + PAG(2))  # type: ignore[arg-type]
    with pytest.raises(GuidanceTypeError, match="torch.nn.Module"):
        install(dit_fn(model), plan)  # type: ignore[arg-type]


def test_guide_without_the_engine_refuses_perturbed_plans() -> None:
    """Without an around_call nothing perturbs the PAG rows, so ``p`` would silently equal
    ``c`` (defect 1 of diffusers' guiders). FAILS until the proposed core check in
    ``Plan.step`` lands (guidekit/plan.py; see the attention foundation report)."""
    model = tiny_dit()
    x, cond, uncond = inputs()
    plan = guidekit.compile(CFG(3) + PAG(2, layers=0))
    guided = guidekit.guide(plan, dit_fn(model), cond=cond, uncond=uncond)
    with pytest.raises(GuidanceValueError, match="around_call"), torch.no_grad():
        guided(x, 1.0)
