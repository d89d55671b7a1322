"""SLG (the SD3.5 recipe; STG, arXiv 2411.18664) through the plan and the engine, against
oracles.

Oracle: ``u + w (c - u) + s (c - k)`` with ``c``, ``u`` and ``k`` each from a SEPARATE model
call; ``k`` is the model with the blocks REMOVED (a shorter ``ModuleList``; for SD3 its own
``skip_layers`` argument as well; for DiT, whose forward reads block 0 again after the
loop, and the UNet's transformer blocks, an identity forward),
or, for ``skip="attention"``, with processors that return zeros (``_slg_reference.py``).
guidekit computes all three in ONE call of ``3 x B`` rows, skipping the blocks for the ``k``
rows only; also with PAG in the same call and under row budgets.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, PAG, SLG, Cond
from guidekit.attention import install

from ._joint_models import flux_fn, sd3_conds, sd3_fn, tiny_flux, tiny_sd3
from ._slg_reference import (
    LABELS,
    SIGMAS,
    TOL,
    check_calls,
    identity_blocks,
    latent,
    no_instance_forwards,
    removed,
    run_and_compare,
    zero_attention,
)
from ._tiny import (
    BATCH,
    SelfAttention,
    dit_fn,
    tiny_dit,
    tiny_plain,
    tiny_unet,
    unet_fn,
    value_only,
)

# -- oracles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, paths", [
    (1, ("transformer_blocks.1",)),
    ([0, 2], ("transformer_blocks.0", "transformer_blocks.2")),
    (range(3), ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2")),
    ("transformer_blocks.2", ("transformer_blocks.2",)),
])
def test_cfg_plus_slg_on_dit_equals_the_model_without_the_blocks(layers: Any,
                                                                  paths: tuple[str, ...]) -> None:
    model = tiny_dit().double()
    fn = dit_fn(model)
    cond, uncond = LABELS

    def k(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        with identity_blocks(model, paths):
            return fn(x, sig, **cond)

    plan = guidekit.compile(CFG(3) + SLG(2, layers=layers))
    worst, gap, guided = run_and_compare(plan, model, fn, cond, uncond, k, 3, 2, latent(4, 8, 8))
    check_calls(guided, len(SIGMAS) - 1, 3)
    assert gap > 1e-3, "skipping must change the prediction for the test to bite"
    assert worst < TOL
    assert no_instance_forwards(model)


def test_slg_only_really_perturbs() -> None:
    """Defect 1 of diffusers' guiders: SLG at CFG scale 1 ran an unperturbed extra pass."""
    model = tiny_dit().double()
    fn = dit_fn(model)
    cond, _ = LABELS

    def k(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        with identity_blocks(model, ("transformer_blocks.1",)):
            return fn(x, sig, **cond)

    plan = guidekit.compile(Cond() + SLG(2, layers=1))
    worst, gap, guided = run_and_compare(plan, model, fn, cond, cond, k, 0, 2, latent(4, 8, 8))
    check_calls(guided, len(SIGMAS) - 1, 2)
    assert gap > 1e-3
    assert worst < TOL


@pytest.mark.parametrize("layers", [[1], [2], [0, 2]])  # block 2 is the last (context_pre_only)
def test_slg_on_sd3_equals_its_own_skip_layers(layers: list[int]) -> None:
    """SD3's joint blocks return ``(encoder_hidden_states, hidden_states)``: skipped rows get
    both back unchanged, as SD3's own ``skip_layers`` (and removing the blocks) do."""
    model = tiny_sd3(3)
    fn = sd3_fn(model)
    cond, uncond = sd3_conds()
    skip_fn = sd3_fn(model, skip_layers=layers)
    paths = tuple(f"transformer_blocks.{i}" for i in layers)

    def k(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        theirs = skip_fn(x, sig, **cond)
        with removed(model, paths):
            ours = fn(x, sig, **cond)
        assert (theirs - ours).abs().max() < TOL  # the two references agree
        return theirs

    plan = guidekit.compile(CFG(4) + SLG(2.8, layers=layers))
    worst, gap, guided = run_and_compare(plan, model, fn, cond, uncond, k, 4, 2.8, latent(4, 8, 12))
    check_calls(guided, len(SIGMAS) - 1, 3)
    assert gap > 1e-4
    assert worst < TOL


def test_slg_attention_skip_on_sd3_zeroes_both_streams() -> None:
    model = tiny_sd3(3)
    fn = sd3_fn(model)
    cond, uncond = sd3_conds()

    def k(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        with zero_attention(model, ("transformer_blocks.0.attn", "transformer_blocks.1.attn")):
            return fn(x, sig, **cond)

    plan = guidekit.compile(CFG(4) + SLG(2, layers=[0, 1], skip="attention"))
    worst, gap, guided = run_and_compare(plan, model, fn, cond, uncond, k, 4, 2, latent(4, 8, 12))
    check_calls(guided, len(SIGMAS) - 1, 3)
    assert gap > 1e-4
    assert worst < TOL


@pytest.mark.parametrize("layers, paths", [
    ([1, 2], ("transformer_blocks.1", "single_transformer_blocks.0")),
    (-1, ("single_transformer_blocks.1",)),
    ("transformer_blocks", ("transformer_blocks.0", "transformer_blocks.1")),
])
def test_slg_on_flux_double_and_single_blocks(layers: Any, paths: tuple[str, ...]) -> None:
    model = tiny_flux()
    fn = flux_fn(model)
    cond, uncond = sd3_conds()

    def k(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        with removed(model, paths):
            return fn(x, sig, **cond)

    plan = guidekit.compile(CFG(3) + SLG(2, layers=layers))
    worst, gap, guided = run_and_compare(plan, model, fn, cond, uncond, k, 3, 2, latent(16, 16))
    check_calls(guided, len(SIGMAS) - 1, 3)
    assert gap > 1e-4
    assert worst < TOL


def test_slg_attention_skip_on_flux() -> None:
    model = tiny_flux()
    fn = flux_fn(model)
    cond, uncond = sd3_conds()

    def k(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        with zero_attention(model, ("transformer_blocks.0.attn", "single_transformer_blocks.1.attn")):
            return fn(x, sig, **cond)

    plan = guidekit.compile(CFG(3) + SLG(2, layers=[0, 3], skip="attention"))
    worst, gap, guided = run_and_compare(plan, model, fn, cond, uncond, k, 3, 2, latent(16, 16))
    check_calls(guided, len(SIGMAS) - 1, 3)
    assert gap > 1e-4
    assert worst < TOL


def test_slg_on_unet_transformer_blocks() -> None:
    """The UNet's transformer blocks at two resolutions (identity for the skipped rows);
    then a block skip of the middle block's and an attention skip of the first down
    block's (``attn1`` zero, cross-attention ``attn2`` untouched) as two branches of one
    call."""
    model = tiny_unet().double()
    fn = unet_fn(model)
    g = torch.Generator().manual_seed(5)
    cond = {"text": torch.randn(BATCH, 5, 32, generator=g, dtype=torch.float64)}
    uncond = {"text": 0.1 * torch.randn(BATCH, 5, 32, generator=g, dtype=torch.float64)}
    mid = "mid_block.attentions.0.transformer_blocks.0"
    down = "down_blocks.0.attentions.0.transformer_blocks.0"

    def k_blocks(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        with identity_blocks(model, (down, mid)):
            return fn(x, sig, **cond)

    plan = guidekit.compile(CFG(3) + SLG(2, layers=[down, mid]))
    worst, gap, guided = run_and_compare(plan, model, fn, cond, uncond, k_blocks, 3, 2,
                                         latent(4, 8, 12))
    check_calls(guided, len(SIGMAS) - 1, 3)
    assert gap > 1e-6
    assert worst < TOL

    plan = guidekit.compile(
        CFG(3) + SLG(2, layers="mid_block") + SLG(1, layers=0, skip="attention")
    )
    x = latent(4, 8, 12)
    sig = torch.full((BATCH,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
        with identity_blocks(model, (mid,)):
            km = fn(x, sig, **cond)
        with zero_attention(model, (f"{down}.attn1",)):
            kd = fn(x, sig, **cond)
        ref = u + 3 * (c - u) + 2 * (c - km) + (c - kd)
        with install(model, plan) as around:
            guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
            y = guided(x, 0.5)
    assert [call.rows for call in guided.calls] == [4 * BATCH]
    assert min((c - km).abs().max(), (c - kd).abs().max()) > 1e-6
    assert (y - ref).abs().max() < TOL
    assert no_instance_forwards(model)


@pytest.mark.parametrize("skip", ["block", "attention"])
def test_slg_on_a_plain_module(skip: str) -> None:
    model = tiny_plain().double()
    cond, uncond = {"y": torch.tensor([3, 7])}, {"y": torch.tensor([10, 10])}

    def k(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        if skip == "block":
            with removed(model, ("blocks.1",)):
                return model(x, sig, **cond)
        attn = model.blocks[1].attn
        saved = attn.__dict__.get("forward")
        attn.forward = lambda h: torch.zeros_like(h)  # type: ignore[method-assign]
        try:
            return model(x, sig, **cond)
        finally:
            del attn.forward
            if saved is not None:
                attn.forward = saved  # type: ignore[method-assign]

    plan = guidekit.compile(CFG(2) + SLG(1.5, layers=1, skip=skip))
    kw = {"attention_class": SelfAttention} if skip == "attention" else {}
    worst, gap, guided = run_and_compare(plan, model, model, cond, uncond, k, 2, 1.5,
                                         latent(4, 8, 8), **kw)
    check_calls(guided, len(SIGMAS) - 1, 3)
    assert gap > 1e-3
    assert worst < TOL
    assert no_instance_forwards(model)


# -- with other perturbations, row budgets and what runs -----------------------------------------


@pytest.mark.parametrize("max_rows", [None, BATCH, 3])
def test_pag_inside_a_skipped_block_and_row_budgets(max_rows: int | None) -> None:
    """PAG hooks ``attn1`` of the block SLG skips: the block then runs on all rows (the PAG
    rows need it) and the SLG rows are replaced. With a row budget of B, the SLG rows get
    a call of their own, in which the skipped blocks do not run at all."""
    model = tiny_dit().double()
    fn = dit_fn(model)
    cond, uncond = LABELS
    x = latent(4, 8, 8)
    sig = torch.full((BATCH,), 0.7, dtype=torch.float64)
    runs: list[int] = []
    # rows reaching block 2's feed-forward (a pre-hook on the block itself would run before
    # guidekit's forward and see every row)
    hook = model.transformer_blocks[2].ff.register_forward_pre_hook(
        lambda m, a: runs.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
            with value_only(model, ("transformer_blocks.1.attn1",)):
                p = fn(x, sig, **cond)
            with identity_blocks(model, ("transformer_blocks.1", "transformer_blocks.2")):
                k = fn(x, sig, **cond)
            ref = u + 3 * (c - u) + 1.5 * (c - p) + 2 * (c - k)
            plan = guidekit.compile(CFG(3) + PAG(1.5, layers=1) + SLG(2, layers=[1, 2]),
                                    max_rows=max_rows)
            runs.clear()
            with install(model, plan) as around:
                guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
                y = guided(x, 0.7)
    finally:
        hook.remove()
    rows = [call.rows for call in guided.calls]
    assert sum(rows) == 4 * BATCH and max(rows) <= (max_rows or 4 * BATCH)
    assert min((c - p).abs().max(), (c - k).abs().max()) > 1e-3
    assert (y - ref).abs().max() < TOL
    # block 2 holds no hooked attention: it runs on the non-SLG rows only, never on SLG ones
    assert sum(runs) == 3 * BATCH
    if max_rows == BATCH:
        assert len(runs) == 3  # the SLG-only call did not run block 2


def test_slg_and_pag_in_one_call_on_sd3() -> None:
    """``CFG + PAG + SLG`` on SD3 (joint attention): 4 x B rows in one call."""
    model = tiny_sd3(3)
    fn = sd3_fn(model)
    cond, uncond = sd3_conds()
    x = latent(4, 8, 8)
    sig = torch.full((BATCH,), 0.5, dtype=torch.float64)
    plan = guidekit.compile(CFG(4) + PAG(1, layers=0) + SLG(2.8, layers=[1]))
    with torch.no_grad():
        c = fn(x, sig, **cond)
        k = sd3_fn(model, skip_layers=[1])(x, sig, **cond)
        plan_pag = guidekit.compile(CFG(4) + PAG(1, layers=0))
        with install(model, plan_pag) as around:
            y_pag = guidekit.guide(plan_pag, fn, cond=cond, uncond=uncond, around_call=around)(x, 0.5)
        with install(model, plan) as around:
            guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
            y = guided(x, 0.5)
    assert [call.rows for call in guided.calls] == [4 * BATCH]
    assert (c - k).abs().max() > 1e-4
    assert (y - (y_pag + 2.8 * (c - k))).abs().max() < TOL
