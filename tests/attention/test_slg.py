"""SLG (the SD3.5 recipe; STG, arXiv 2411.18664): the term, the SD3.5 preset, the block lists.

Against oracles on real models: test_slg_models.py; restoration: test_slg_restore.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, PAG, SLG, Cond, GuidanceTypeError, GuidanceValueError, parse
from guidekit.attention import install
from guidekit.attention.blocks import BlockSkip, block_table
from guidekit.branch import Branch

from ._joint_models import tiny_flux, tiny_sd3
from ._slg_reference import no_instance_forwards
from ._tiny import BATCH, processors, tiny_dit, tiny_plain, tiny_unet

# -- the term and the preset -----------------------------------------------------------------------


def test_term_normalises_and_round_trips() -> None:
    assert repr(SLG(2.8, layers=[7, 8, 9])) == "SLG(2.8, layers=(7, 8, 9))"
    assert repr(SLG(1, layers=3, skip="attention")) == "SLG(1, layers=(3,), skip='attention')"
    assert SLG(2, layers=range(7, 10)) == SLG(2.0, layers=(7, 8, 9))
    term = SLG(2, layers="transformer_blocks.1", skip="attention")
    assert term.negative() == Branch(
        "main", "cond", BlockSkip(("transformer_blocks.1",), "attention")
    )
    for expr in (SLG(3), CFG(4) + SLG(2.8, layers=(7, 8, 9)).between(0.2, 0.98),
                 Cond() + SLG(1, layers=-1, skip="attention")):
        assert parse(repr(expr)) == expr
        assert repr(parse(repr(expr))) == repr(expr)


@pytest.mark.parametrize(
    "kw, error, match",
    [({"skip": "blocks"}, GuidanceValueError, r"SLG\(skip=...\) must be 'block'"),
     ({"skip": None}, GuidanceValueError, "'attention'"),
     ({"layers": 1.5}, GuidanceTypeError, r"SLG\(layers=...\)"),
     ({"layers": (1, 1)}, GuidanceValueError, "listed twice")],
)
def test_bad_values_name_the_term(kw: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SLG(2, **kw)


def schedule(n: int) -> list[float]:
    """``n`` decreasing noise levels and a final 0, as samplers pass them."""
    return [round(1.0 - i / (n + 1), 6) for i in range(n)] + [0.0]


@pytest.mark.parametrize("n", [*range(1, 40), 50, 100])
def test_sd35_preset_holds_exactly_the_peer_steps(n: int) -> None:
    """The reference code and diffusers' SD3 pipeline run SLG on steps ``i`` with
    ``0.01 n < i < 0.2 n``; the preset's noise interval holds exactly those steps."""
    sigmas = schedule(n)
    peer = [i for i in range(n) if 0.01 * n < i < 0.2 * n]
    if not peer:
        with pytest.raises(GuidanceValueError, match=f"no step i of this {n}-step schedule"):
            SLG.sd35(sigmas)
        return
    if n % 2:  # a float32 tensor, as schedulers hold them: the sampler passes its values
        tensor = torch.tensor(sigmas)
        sigmas = tensor.tolist()
        gated = SLG.sd35(tensor)
    else:
        gated = SLG.sd35(sigmas)
    assert gated.expr == SLG(2.8, layers=(7, 8, 9))
    ours = [i for i, s in enumerate(sigmas[:-1]) if gated.lo < s <= gated.hi]
    assert ours == peer
    assert parse(repr(CFG(4) + gated)) == CFG(4) + gated
    if n == 28:
        assert peer == [1, 2, 3, 4, 5]
    # the plan adds the SLG rows on exactly those steps
    plan = guidekit.compile(CFG(4) + gated)
    rows = [plan.rows(s, BATCH) for s in sigmas[:-1]]
    assert [i for i, r in enumerate(rows) if r == 3 * BATCH] == peer
    assert all(r == 2 * BATCH for i, r in enumerate(rows) if i not in peer)


def test_sd35_preset_arguments() -> None:
    sigmas = schedule(28)
    g = SLG.sd35(sigmas, scale=2.5, layers=[3, 4], start=0.0, stop=0.5, skip="attention")
    assert g.expr == SLG(2.5, layers=(3, 4), skip="attention")
    assert [i for i, s in enumerate(sigmas[:-1]) if g.lo < s <= g.hi] == list(range(1, 14))
    with pytest.raises(GuidanceValueError, match="fraction of the steps"):
        SLG.sd35(sigmas, stop=20)
    with pytest.raises(GuidanceValueError, match="decrease strictly"):
        SLG.sd35([1.0, 0.5, 0.7, 0.0])


# -- the block lists -----------------------------------------------------------------------------


def test_block_lists_per_architecture() -> None:
    dit = block_table(tiny_dit())
    assert dit.paths == ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2")
    assert dit.default == ()
    sd3 = block_table(tiny_sd3(10))
    assert sd3.paths == tuple(f"transformer_blocks.{i}" for i in range(10))
    assert sd3.default == ("transformer_blocks.7", "transformer_blocks.8", "transformer_blocks.9")
    assert block_table(tiny_sd3(3)).default == ()
    flux = block_table(tiny_flux())
    assert flux.paths == ("transformer_blocks.0", "transformer_blocks.1",
                          "single_transformer_blocks.0", "single_transformer_blocks.1")
    unet = block_table(tiny_unet())
    assert unet.paths == (
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.0",
        "mid_block.attentions.0.transformer_blocks.0",
    )
    assert block_table(tiny_plain()).paths == ("blocks.0", "blocks.1", "blocks.2")


@pytest.mark.parametrize(
    "model, kw, message",
    [("dit", {"layers": 3}, r"layer 3 is out of range for 3 layers .*0: transformer_blocks\.0"),
     ("dit", {"layers": [0, -4]}, "layer -4 is out of range"),
     ("dit", {"layers": "transformer_blocks.9"}, "unknown layer 'transformer_blocks.9'"),
     ("dit", {}, r"no default blocks to skip.*layers=\(7, 8, 9\).*1: transformer_blocks\.1"),
     ("plain", {"layers": 0, "skip": "attention"}, "no self-attention module.*attention_class"),
     ("sd3", {}, "no default blocks")],
)
def test_unknown_blocks_raise_at_install_before_anything_changes(
    model: str, kw: dict[str, Any], message: str
) -> None:
    m = {"dit": tiny_dit, "plain": tiny_plain, "sd3": lambda: tiny_sd3(3)}[model]()
    before = processors(m)
    plan = guidekit.compile(CFG(3) + PAG(1, layers=0) + SLG(2, **kw)) if model == "dit" else (
        guidekit.compile(CFG(3) + SLG(2, **kw)))
    with pytest.raises(GuidanceValueError, match=message):
        install(m, plan)
    assert no_instance_forwards(m)
    after = processors(m)
    assert all(after[k] is v for k, v in before.items())
