"""Layer addressing: named layer lists per architecture, selections, errors, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, PAG, Cond, GuidanceValueError
from guidekit.attention import install, layer_table, resolve_layers

from ._tiny import SelfAttention, processors, tiny_dit, tiny_pixart, tiny_plain, tiny_unet

DIT = tuple(f"transformer_blocks.{i}.attn1" for i in range(3))
UNET = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    "mid_block.attentions.0.transformer_blocks.0.attn1",
)
PLAIN = ("blocks.0.attn", "blocks.1.attn", "blocks.2.attn")


def test_named_layer_lists_per_architecture() -> None:
    dit = layer_table(tiny_dit())
    assert (dit.paths, dit.default) == (DIT, DIT[-1:])
    pixart = layer_table(tiny_pixart())
    assert pixart.paths == ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")
    assert pixart.default == ("transformer_blocks.1.attn1",)
    unet = layer_table(tiny_unet())
    assert (unet.paths, unet.default) == (UNET, UNET[-1:])  # registration order; mid default
    plain = layer_table(tiny_plain(), attention_class=SelfAttention)
    assert (plain.paths, plain.default) == (PLAIN, PLAIN[-1:])
    free = layer_table(tiny_plain())
    assert free.free and free.paths == ()


@pytest.mark.parametrize(
    "layers, expected",
    [(0, DIT[:1]), (-1, DIT[2:]), ([2, 0], (DIT[0], DIT[2])), (range(1, 3), DIT[1:]),
     ((0, -3), DIT[:1]), ("transformer_blocks.1.attn1", DIT[1:2]),
     (("transformer_blocks.2", 0), (DIT[0], DIT[2])), (None, DIT[2:])],
)
def test_selections_on_dit(layers: Any, expected: tuple[str, ...]) -> None:
    model = tiny_dit()
    assert resolve_layers(model, layer_table(model), layers) == expected
    engine = install(model, guidekit.compile(CFG(3) + PAG(2, layers=layers)))
    assert list(engine.layers.values()) == [expected]


def test_selections_on_unet_and_plain_modules() -> None:
    unet = tiny_unet()
    table = layer_table(unet)
    assert resolve_layers(unet, table, "up_blocks.1") == UNET[1:3]
    assert resolve_layers(unet, table, [3, 0]) == (UNET[0], UNET[3])
    plain = tiny_plain()
    assert resolve_layers(plain, layer_table(plain, attention_class=SelfAttention), [0, 2]) == (
        PLAIN[0], PLAIN[2]
    )
    free = layer_table(plain)
    assert resolve_layers(plain, free, ("blocks.2.attn", "blocks.0.attn")) == (PLAIN[0], PLAIN[2])


@pytest.mark.parametrize(
    "layers, message",
    [(3, r"layer 3 is out of range for 3 layers \(-3\.\.2\)"),
     (-4, "layer -4 is out of range"),
     ([0, 7], "layer 7 is out of range"),
     ("transformer_blocks.9.attn1", "unknown layer 'transformer_blocks.9.attn1'"),
     ("transformer_blocks.0.norm1", r"unknown layer 'transformer_blocks.0.norm1' \(not in the")],
)
def test_unknown_layers_raise_at_install_listing_valid_ones(layers: Any, message: str) -> None:
    model = tiny_dit()
    before = processors(model)
    plan = guidekit.compile(CFG(3) + PAG(2, layers=layers))  # compiles: no model yet
    with pytest.raises(GuidanceValueError, match=message) as info:
        install(model, plan)
    text = str(info.value)
    assert "0: transformer_blocks.0.attn1, 1: transformer_blocks.1.attn1, 2: " in text
    assert "PAG" in text or "IdentityAttention" in text
    assert all(processors(model)[n] is p for n, p in before.items())


def test_cross_attention_is_not_addressable() -> None:
    model = tiny_pixart()
    with pytest.raises(GuidanceValueError, match="cross-attention layer: only self-attention"):
        install(model, guidekit.compile(Cond() + PAG(2, layers="transformer_blocks.0.attn2")))
    unet = tiny_unet()
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    with pytest.raises(GuidanceValueError, match="cross-attention"):
        install(unet, guidekit.compile(Cond() + PAG(2, layers=path)))


def test_plain_modules_without_a_list() -> None:
    model = tiny_plain()
    with pytest.raises(GuidanceValueError, match="no named layer list"):
        install(model, guidekit.compile(Cond() + PAG(2, layers=0)))
    with pytest.raises(GuidanceValueError, match="no default attention layers; pass attention"):
        install(model, guidekit.compile(Cond() + PAG(2)))
    with pytest.raises(GuidanceValueError, match="no submodule 'blocks.5.attn'"):
        install(model, guidekit.compile(Cond() + PAG(2, layers="blocks.5.attn")))
    with pytest.raises(GuidanceValueError, match="overlap"):
        install(model, guidekit.compile(Cond() + PAG(2, layers=("blocks.0", "blocks.0.attn"))))
    with pytest.raises(GuidanceValueError, match="no submodule of class"):
        install(model, guidekit.compile(Cond() + PAG(2)), attention_class=torch.nn.Conv2d)


def test_sd3_joint_attention_table_and_unsupported_perturbations() -> None:
    import attrs
    from diffusers import SD3Transformer2DModel

    from guidekit.attention.ops import AttentionPerturbation
    from guidekit.branch import Branch
    from guidekit.terms.base import DirectionTerm

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16,
    )
    table = layer_table(sd3)
    assert table.paths == ("transformer_blocks.0.attn", "transformer_blocks.1.attn")
    assert table.default == ("transformer_blocks.1.attn",)

    @attrs.frozen
    class NoJoint(AttentionPerturbation):  # a perturbation defined for plain attention only
        layers: tuple = (0,)

    @attrs.frozen
    class Term(DirectionTerm):
        scale: float = 1.0

        def negative(self) -> Branch:
            return Branch(perturbation=NoJoint())

    with pytest.raises(GuidanceValueError, match="joint text-image attention"):
        install(sd3, guidekit.compile(CFG(3) + Term()))


_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from attention._tiny import SelfAttention, tiny_plain, tiny_unet
from guidekit.attention import layer_table, resolve_layers
unet, plain = tiny_unet(), tiny_plain()
ut, pt = layer_table(unet), layer_table(plain, attention_class=SelfAttention)
print(json.dumps({
    "unet": ut.paths, "unet_default": ut.default,
    "unet_sel": resolve_layers(unet, ut, [3, 1, "down_blocks"]),
    "plain": pt.paths, "plain_sel": resolve_layers(plain, pt, range(3)),
}))
"""


@pytest.mark.slow
def test_layer_choice_is_independent_of_pythonhashseed() -> None:
    """Defect 5 of diffusers' guiders: block discovery depended on the hash seed."""
    tests = str(Path(__file__).resolve().parent.parent)
    procs = []
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, tests], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    assert results[0]["unet"] == list(UNET)
    assert results[0]["unet_sel"] == [UNET[0], UNET[1], UNET[3]]
