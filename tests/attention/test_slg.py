"""SLG (the SD3.5 recipe; STG, arXiv 2411.18664) through the plan and the engine, against
oracles.

Oracle: ``u + w (c - u) + s (c - k)`` with ``c``, ``u`` and ``k`` each from a SEPARATE model
call; ``k`` is the model with the blocks REMOVED (a shorter ``ModuleList``; for SD3 its own
``skip_layers`` argument as well; for DiT, whose forward reads block 0 again after the
loop, and the UNet's transformer blocks, an identity forward),
or, for ``skip="attention"``, with processors that return zeros. guidekit computes all
three in ONE call of ``3 x B`` rows, skipping the blocks for the ``k`` rows only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, PAG, SLG, Cond, GuidanceTypeError, GuidanceValueError, parse
from guidekit.attention import install
from guidekit.attention.blocks import BlockSkip, block_table
from guidekit.branch import Branch

from ._joint_models import flux_fn, sd3_conds, sd3_fn, tiny_flux, tiny_sd3
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

TOL = 1e-9
SIGMAS = (0.9, 0.6, 0.3, 0.0)


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


def no_instance_forwards(model: torch.nn.Module) -> bool:
    return all("forward" not in m.__dict__ for m in model.modules())


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


# -- oracles -------------------------------------------------------------------------------------


@contextlib.contextmanager
def removed(model: torch.nn.Module, paths: tuple[str, ...]) -> Iterator[None]:
    """The model with the blocks ``paths`` removed from their ``ModuleList``s."""
    lists: dict[str, torch.nn.ModuleList] = {}
    for path in paths:
        name, _ = path.rsplit(".", 1)
        lists.setdefault(name, model.get_submodule(name))
    try:
        for name, blocks in lists.items():
            keep = [b for i, b in enumerate(blocks) if f"{name}.{i}" not in paths]
            setattr(model, name, torch.nn.ModuleList(keep))
        yield
    finally:
        for name, blocks in lists.items():
            setattr(model, name, blocks)


@contextlib.contextmanager
def identity_blocks(model: torch.nn.Module, paths: tuple[str, ...]) -> Iterator[None]:
    """The blocks ``paths`` return their ``hidden_states`` (for DiT, whose forward reads
    ``transformer_blocks[0]`` after the loop, so removing block 0 would change more)."""
    saved = {p: model.get_submodule(p).__dict__.get("forward") for p in paths}
    try:
        for p in paths:
            model.get_submodule(p).forward = (  # type: ignore[method-assign]
                lambda hidden_states, *a, **kw: hidden_states)
        yield
    finally:
        for p, f in saved.items():
            del model.get_submodule(p).forward
            if f is not None:
                model.get_submodule(p).forward = f  # type: ignore[method-assign]


class ZeroAttention:
    """A processor whose attention output is zero (both streams of a joint attention)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 *args: Any, **kw: Any) -> Any:
        zero = torch.zeros_like(hidden_states)
        if encoder_hidden_states is None or not hasattr(attn, "add_k_proj"):
            return zero
        return zero, torch.zeros_like(encoder_hidden_states)


@contextlib.contextmanager
def zero_attention(model: torch.nn.Module, paths: tuple[str, ...]) -> Iterator[None]:
    saved = {p: model.get_submodule(p).get_processor() for p in paths}
    try:
        for p in paths:
            model.get_submodule(p).set_processor(ZeroAttention())
        yield
    finally:
        for p, proc in saved.items():
            model.get_submodule(p).set_processor(proc)


def run_and_compare(
    plan: guidekit.Plan, module: torch.nn.Module, fn: Callable[..., torch.Tensor],
    cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor],
    negative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], w: float, s: float,
    x: torch.Tensor, sigmas: tuple[float, ...] = SIGMAS, **install_kw: Any,
) -> tuple[float, float, guidekit.Guided]:
    """Euler over ``sigmas``; at every step compare with ``u + w (c - u) + s (c - k)``,
    ``k = negative(x, sigma_rows)``. Returns the worst error, the smallest ``|c - k|`` and
    the guided model."""
    worst, gap = 0.0, float("inf")
    with torch.no_grad(), install(module, plan, **install_kw) as around:
        guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
        for sg, s_next in zip(sigmas[:-1], sigmas[1:]):
            y = guided(x, sg)
            sig = torch.full((x.shape[0],), sg, dtype=torch.float64)
            c, u, k = fn(x, sig, **cond), fn(x, sig, **uncond), negative(x, sig)
            ref = (u + w * (c - u) + s * (c - k)) if w else c + s * (c - k)
            worst = max(worst, (y - ref).abs().max().item())
            gap = min(gap, (c - k).abs().max().item())
            assert torch.isfinite(y).all()
            x = x + (s_next - sg) * y
    return worst, gap, guided


def check_calls(guided: guidekit.Guided, steps: int, branches: int) -> None:
    assert len(guided.calls) == steps
    assert all(c.rows == branches * BATCH and len(c.branches) == branches for c in guided.calls)


def latent(*shape: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


LABELS = ({"class_labels": torch.tensor([3, 7])}, {"class_labels": torch.tensor([0, 0])})


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
