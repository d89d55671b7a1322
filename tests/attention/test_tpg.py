"""TPG (token perturbation guidance, arXiv 2506.10036): the term, its permutation rule, and
the batched call against separate passes on real tiny diffusers models.

Oracle: ``u + w (c - u) + s (c - p)`` with ``c``, ``u`` and ``p`` each from a SEPARATE model
call (float32), ``p`` the conditional pass with a forward pre-hook written here that permutes
the tokens of the chosen blocks' ``hidden_states`` by the documented rule, re-implemented
here in Python integers rather than imported. guidekit computes all three in ONE
call of ``3 x B`` rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, SLG, TPG, Cond, GuidanceValueError, parse
from guidekit.attention import install
from guidekit.branch import Branch
from guidekit.state import ForwardState
from guidekit.terms.tpg import TokenShuffle, token_permutation

from ._joint_models import sd3_conds, sd3_fn, tiny_sd3
from ._slg_reference import LABELS, identity_blocks
from ._tiny import BATCH, dit_fn, tiny_dit, tiny_unet, unet_fn

SIGMAS = (0.9, 0.6, 0.3, 0.0)
TOL = 1e-5  # float32, batched rows against separate calls
Fn = Callable[..., torch.Tensor]


M64 = 2**64


def _mix(z: int) -> int:
    """SplitMix64's step on Python ints mod 2**64 (unsigned, logical shifts)."""
    z = (z + 0x9E3779B97F4A7C15) % M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M64
    return z ^ (z >> 31)


def rule(seed: int, level: int, path: str, n: int) -> torch.Tensor:
    """The documented permutation, written from the docstring's words in Python ints."""
    tag = 0
    for ch in path:
        tag = (tag * 131 + ord(ch)) % (2**61 - 1)
    b = _mix(_mix(seed) ^ level ^ tag)

    def signed(v: int) -> int:
        return v - M64 if v >= 2**63 else v

    return torch.tensor(sorted(range(n), key=lambda i: signed(_mix((i + b) % M64))))


@contextlib.contextmanager
def shuffled(model: torch.nn.Module, perms: dict[str, torch.Tensor | None]) -> Iterator[None]:
    """Forward pre-hooks permuting each block's ``hidden_states`` tokens by ``perms[path]``
    (filled in by the caller per step; the token count is checked)."""

    def hook(path: str) -> Any:
        def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            perm = perms[path]
            assert perm is not None
            if "hidden_states" in kwargs:
                hs = kwargs["hidden_states"]
                assert hs.shape[1] == perm.numel()
                return args, {**kwargs, "hidden_states": hs[:, perm]}
            assert args[0].shape[1] == perm.numel()
            return (args[0][:, perm], *args[1:]), kwargs

        return pre

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True)
               for p in perms]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_and_compare(
    expr: Any, module: torch.nn.Module, fn: Fn, cond: dict[str, Any], uncond: dict[str, Any],
    tokens: dict[str, int], w: float, s: float, x: torch.Tensor, seed: int = 11,
    **compile_kw: Any,
) -> tuple[float, float, guidekit.Guided]:
    """Euler over ``SIGMAS`` with ``seed``; every step against separate passes, ``p`` with
    the permutation of step ``i``. Returns the worst error, the smallest ``|c - p|``."""
    plan = guidekit.compile(expr, **compile_kw)
    worst, gap = 0.0, float("inf")
    perms: dict[str, torch.Tensor | None] = dict.fromkeys(tokens)
    with torch.no_grad(), install(module, plan) as around:
        guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around, seed=seed)
        for i, (sg, s_next) in enumerate(zip(SIGMAS[:-1], SIGMAS[1:])):
            y = guided(x, sg)
            sig = torch.full((x.shape[0],), sg)
            c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
            perms.update({p: rule(seed, i, p, n) for p, n in tokens.items()})
            with shuffled(module, perms):
                p = fn(x, sig, **cond)
            ref = (u + w * (c - u) if w else c) + s * (c - p)
            worst = max(worst, (y - ref).abs().max().item())
            gap = min(gap, (c - p).abs().max().item())
            x = x + (s_next - sg) * y
    return worst, gap, guided


def latent(*shape: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(seed))


# -- the term and the rule -------------------------------------------------------------------------


def test_term_round_trips_and_names_its_branch() -> None:
    assert repr(TPG(3, layers=[1, 2])) == "TPG(3, layers=(1, 2))"
    assert TPG(2, layers=range(2)) == TPG(2.0, layers=(0, 1))
    assert TPG(2, layers=1).negative() == Branch("main", "cond", TokenShuffle((1,)))
    for expr in (TPG(3), CFG(4) + TPG(2, layers=(0, 1)).between(0.2, 0.9),
                 Cond() + TPG(1, layers="transformer_blocks.0")):
        assert parse(repr(expr)) == expr
    plan = guidekit.compile(CFG(3) + TPG(2, layers=1))
    assert plan.rows(1.0, BATCH) == 3 * BATCH and plan.nfe(1.0, BATCH) == 1


def key(seed: int, level: int) -> torch.Tensor:
    return ForwardState(batch=BATCH, level=level, inputs={}, seed=seed).key


@pytest.mark.parametrize("seed", [0, 5, 2**62 + 3])
def test_the_rule_is_a_seeded_permutation_per_step_and_block(seed: int) -> None:
    a = token_permutation(key(seed, 2), "transformer_blocks.1", 64)
    assert torch.equal(a, rule(seed, 2, "transformer_blocks.1", 64))
    assert torch.equal(a.sort().values, torch.arange(64))
    assert torch.equal(a, token_permutation(key(seed, 2), "transformer_blocks.1", 64))
    others = [token_permutation(key(seed + 1, 2), "transformer_blocks.1", 64),  # another run
              token_permutation(key(seed, 3), "transformer_blocks.1", 64),  # another step
              token_permutation(key(seed, 2), "transformer_blocks.2", 64)]  # another block
    assert all(not torch.equal(a, o) for o in others)


def test_no_default_blocks_even_where_slg_has_one() -> None:
    model = tiny_sd3(10)  # SD3 with 10 blocks: SLG's default 7, 8, 9 exists
    with pytest.raises(GuidanceValueError, match=r"TPG\(layers=default\).*name"):
        install(model, guidekit.compile(CFG(3) + TPG(2)))
    install(model, guidekit.compile(CFG(3) + SLG(2)))  # SLG's default stays


# -- oracles on real models ------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, [0, 2]])
def test_cfg_plus_tpg_on_dit_equals_separate_passes(layers: Any) -> None:
    model = tiny_dit()
    paths = [f"transformer_blocks.{i}" for i in ([layers] if isinstance(layers, int) else layers)]
    worst, gap, guided = run_and_compare(
        CFG(3) + TPG(2, layers=layers), model, dit_fn(model), *LABELS,
        dict.fromkeys(paths, 16), 3, 2, latent(4, 8, 8))
    assert all(c.rows == 3 * BATCH for c in guided.calls) and len(guided.calls) == 3
    assert gap > 1e-3, "shuffling must change the prediction for the test to bite"
    assert worst < TOL


def test_tpg_alone_on_sd3_shuffles_the_image_stream_only() -> None:
    """SD3's joint blocks: the image tokens are permuted, the text stream is not."""
    model = tiny_sd3(3).float()
    cond, uncond = ({k: v.float() for k, v in d.items()} for d in sd3_conds())
    worst, gap, guided = run_and_compare(
        Cond() + TPG(1.5, layers=1), model, sd3_fn(model), cond, uncond,
        {"transformer_blocks.1": 16}, 0, 1.5, latent(4, 8, 8))
    assert all(c.rows == 2 * BATCH for c in guided.calls)
    assert gap > 1e-4
    assert worst < TOL


def test_tpg_on_unet_transformer_blocks_equals_separate_passes() -> None:
    model = tiny_unet()
    fn = unet_fn(model)
    g = torch.Generator().manual_seed(4)
    cond, uncond = ({"text": torch.randn(BATCH, 5, 32, generator=g)} for _ in range(2))
    paths = {"down_blocks.0.attentions.0.transformer_blocks.0": 64,
             "mid_block.attentions.0.transformer_blocks.0": 16}
    worst, gap, _ = run_and_compare(CFG(4) + TPG(2, layers=list(paths)), model, fn, cond,
                                    uncond, paths, 4, 2, latent(4, 8, 8))
    assert gap > 1e-4
    assert worst < TOL


@pytest.mark.parametrize("max_rows", [BATCH, 3])
def test_row_budget_chunks_share_the_steps_permutation(max_rows: int) -> None:
    model = tiny_dit()
    worst, _, guided = run_and_compare(
        CFG(3) + TPG(2, layers=1), model, dit_fn(model), *LABELS,
        {"transformer_blocks.1": 16}, 3, 2, latent(4, 8, 8), max_rows=max_rows)
    assert max(c.rows for c in guided.calls) <= max_rows
    assert worst < TOL


def test_with_slg_on_the_same_block() -> None:
    """A block both shuffled (TPG rows) and skipped (SLG rows) in one call."""
    model = tiny_dit()
    fn = dit_fn(model)
    cond, uncond = LABELS
    x, sig = latent(4, 8, 8), torch.full((BATCH,), 0.7)
    plan = guidekit.compile(CFG(3) + TPG(1.5, layers=1) + SLG(2, layers=1))
    with torch.no_grad():
        with install(model, plan) as around:
            y = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around,
                               seed=2)(x, 0.7)
        c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
        with shuffled(model, {"transformer_blocks.1": rule(2, 0, "transformer_blocks.1", 16)}):
            p = fn(x, sig, **cond)
        with identity_blocks(model, ("transformer_blocks.1",)):
            k = fn(x, sig, **cond)
    assert (y - (u + 3 * (c - u) + 1.5 * (c - p) + 2 * (c - k))).abs().max() < TOL


def test_runs_differ_by_seed_and_repeat_exactly() -> None:
    model = tiny_dit()
    fn = dit_fn(model)
    plan = guidekit.compile(Cond() + TPG(2, layers=1))
    x = latent(4, 8, 8)

    def sample(seed: int) -> torch.Tensor:
        with torch.no_grad(), install(model, plan) as around:
            guided = guidekit.guide(plan, fn, cond=LABELS[0], around_call=around, seed=seed)
            return torch.stack([guided(x, s) for s in SIGMAS[:-1]])

    a = sample(0)
    assert torch.equal(a, sample(0))
    assert (a - sample(1)).abs().max() > 1e-3


def test_compiled_model_runs_every_step_in_one_graph() -> None:
    """The permutation is tensor maths on the step's key (a graph input): no graph break
    and no recompile from step to step, and the compiled samples equal the eager ones."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny_dit()
    plan = guidekit.compile(CFG(3) + TPG(2, layers=[0, 1]))
    x = latent(4, 8, 8)

    def sample(fn: Fn) -> list[torch.Tensor]:
        with torch.no_grad(), install(model, plan) as around:
            guided = guidekit.guide(plan, fn, cond=LABELS[0], uncond=LABELS[1],
                                    around_call=around, seed=1)
            return [guided(x, s) for s in SIGMAS[:-1]]

    torch._dynamo.reset()
    counters.clear()
    compiled = sample(torch.compile(dit_fn(model), backend="eager"))
    assert counters["frames"]["ok"] == 1 and not counters["graph_break"]
    for a, b in zip(compiled, sample(dit_fn(model))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
