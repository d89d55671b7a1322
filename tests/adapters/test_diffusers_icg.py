"""ICG through classic pipelines: ``guided(pipe, ICG(w), prompts={"icg": [...]})``.

Tiny real SD, PixArt-alpha, SD3, SDXL, Flux and DiT pipelines (float64). ICG
(https://arxiv.org/abs/2407.02687) is ``w c + (1 - w) u_r``, ``u_r`` the model under a real
condition drawn at random. The pool's prompts are encoded by the pipeline's own
``encode_prompt``; the oracle encodes them itself, draws each step's candidates by the core's
seeded rule (``guidekit.pools.pool_indices(P, B, seed, step, "icg")``), and runs ``c`` and
``u_r`` as separate model calls; the adapter runs one call of ``2 B`` rows per step. DiT's
pool defaults to every real class label. What cannot be honoured is refused by name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, ICG, GuidanceTypeError, GuidanceValueError
from guidekit.adapters.diffusers import guided
from guidekit.pools import pool_indices

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
import tiny_diffusers as tiny  # noqa: E402
from _diffusers_helpers import (  # noqa: E402
    F64,
    STEPS,
    Setup,
    call_kwargs,
    denoiser,
    forwards,
    sample,
    setup_for,
    text_inputs,
)

from guidekit.adapters._diffusers_pools import pooled_rows  # noqa: E402

_quiet_single_thread, pipes = helpers._quiet_single_thread, helpers.pipes
# different word counts: the tiny T5 tokenizer knows few words, so same-length prompts could
# encode alike and make the draws invisible
POOL = ["a cat", "a big dog", "a tall green tree", "a red house by the sea", "birds"]
W, SEED = 3.0, 5


def _oracle(setup: Setup, pool: dict[str, torch.Tensor], w: float, seed: int) -> torch.Tensor:
    """ICG by hand: per step, ``w c + (1 - w) u_r``, ``c`` and ``u_r`` separate calls."""
    now: dict[str, Any] = {}
    net = setup.make(None, now)
    x = setup.latents
    size, batch = next(iter(pool.values())).shape[0], x.shape[0]
    for i, t in enumerate(setup.scheduler.timesteps):
        now["t"], now["i"] = t, i
        scale = getattr(setup.scheduler, "scale_model_input", None)
        inp = scale(x, t) if scale is not None else x
        drawn = pool_indices(size, batch, seed, i, "icg")
        c = net(inp, None, **setup.cond)
        u = net(inp, None, **{k: v[drawn] for k, v in pool.items()})
        x = setup.scheduler.step(w * c + (1 - w) * u, t, x).prev_sample
    return setup.finish(x)


def _no_cfg(setup: Setup) -> dict[str, Any]:
    """The set-up's pipeline call without the pipeline's CFG: ICG alone guides."""
    return {**setup.kwargs, "guidance_scale": 1.0}


@pytest.mark.parametrize("kind", ["sd", "pixart", "sd3"])
@torch.no_grad()
def test_text_pool_equals_a_separate_pass_oracle_in_one_call_per_step(
    kind: str, pipes: Any
) -> None:
    pipe = pipes(kind)
    setup = setup_for(kind, pipe)
    length = {} if kind == "sd" else {"max_sequence_length": 16}
    module = denoiser(pipe)
    with forwards(kind, main=module) as log, guided(
        pipe, ICG(W), prompts={"icg": POOL}, seed=SEED
    ) as run:
        out = sample(pipe, **_no_cfg(setup), **length)
    ref = _oracle(setup, text_inputs(kind, pipe, POOL), W, SEED)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert [(c.rows, c.branches) for c in run.calls] == [(4, ("c", "icg"))] * STEPS
    assert log == [("main", 4)] * STEPS
    # another seed draws other candidates: not the same sample
    with guided(pipe, ICG(W), prompts={"icg": POOL}, seed=SEED + 1):
        other = sample(pipe, **_no_cfg(setup), **length)
    ref = _oracle(setup_for(kind, pipe), text_inputs(kind, pipe, POOL), W, SEED + 1)
    torch.testing.assert_close(other, ref, rtol=0, atol=1e-5)
    assert (other - out).abs().max() > 1e-4


@torch.no_grad()
def test_a_pool_of_another_token_length_runs_as_a_separate_call(pipes: Any) -> None:
    """The call's embeddings were made with 16 T5 tokens, the pool is encoded at the call's
    default (256): the token rule of named prompts, two calls per step, still the oracle."""
    pipe = pipes("sd3")
    setup = setup_for("sd3", pipe)
    with guided(pipe, ICG(W), prompts={"icg": POOL}, seed=SEED) as run:
        out = sample(pipe, **_no_cfg(setup))
    assert [c.branches for c in run.calls] == [("c",), ("icg",)] * STEPS
    assert all("separate call" in c.tokens for c in run.calls)
    ref = _oracle(setup, text_inputs("sd3", pipe, POOL, length=256), W, SEED)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_pool_from_prompt_text_and_images_per_prompt(pipes: Any) -> None:
    """The pool does not follow the call's batch: P candidates for B = 4 samples."""
    pipe = pipes("sd")
    kw = {**call_kwargs("sd", 1.0), "num_images_per_prompt": 2}
    with forwards("sd", main=pipe.unet) as log, guided(
        pipe, ICG(W), prompts={"icg": POOL[:3]}, seed=SEED
    ) as run:
        out = sample(pipe, **kw)
    assert [(c.rows, c.branches) for c in run.calls] == [(8, ("c", "icg"))] * STEPS
    assert log == [("main", 8)] * STEPS
    with guided(pipe, ICG(W), prompts={"icg": POOL[:3]}, seed=SEED):
        again = sample(pipe, **kw)
    torch.testing.assert_close(again, out, rtol=0, atol=0)  # same seed: same draws


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
@torch.no_grad()
def test_sdxl_and_flux_pools_run_in_one_call_per_step(kind: str, pipes: Any) -> None:
    pipe = tiny.sdxl_pipeline().to(F64) if kind == "sdxl" else pipes(kind)
    kw = call_kwargs("sd" if kind == "sdxl" else kind, 1.0)
    plain = sample(pipe, **kw)
    with guided(pipe, ICG(W), prompts={"icg": POOL}, seed=SEED) as run:
        out = sample(pipe, **kw)
    # SDXL's time ids (one per sample, the same for all) go with every candidate
    assert [(c.rows, c.branches) for c in run.calls] == [(4, ("c", "icg"))] * STEPS
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4
    with guided(pipe, ICG(W), prompts={"icg": POOL}, seed=SEED):
        torch.testing.assert_close(sample(pipe, **kw), out, rtol=0, atol=0)


# -- DiT: class labels, every real label by default -------------------------------------------


@pytest.mark.parametrize("given", [None, ["dog", 5, 7]])
@torch.no_grad()
def test_dit_pool_equals_a_separate_pass_oracle(given: Any, pipes: Any) -> None:
    pipe = pipes("dit")
    setup = setup_for("dit", pipe)
    seen: list[torch.Tensor] = []
    embedder = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder
    handle = embedder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        with guided(
            pipe, ICG(W), seed=SEED, **({} if given is None else {"prompts": {"icg": given}})
        ) as run:
            out = sample(pipe, **_no_cfg(setup))
    finally:
        handle.remove()
    labels = torch.arange(1000) if given is None else torch.tensor([1, 5, 7])  # 'dog' is 1
    torch.testing.assert_close(out, _oracle(setup, {"class_labels": labels}, W, SEED),
                               rtol=0, atol=1e-5)
    assert [(c.rows, c.branches) for c in run.calls] == [(4, ("c", "icg"))] * STEPS
    # one call per step: the call's labels, then the drawn real labels (never the null one);
    # DiT's output layer reads block 0's embedder again
    assert len(seen) == 2 * STEPS
    for i, s in enumerate(seen[::2]):
        assert s[:2].tolist() == [0, 1]
        assert torch.equal(s[2:], labels[pool_indices(len(labels), 2, SEED, i, "icg")])


# -- refused by name ----------------------------------------------------------------------------


@torch.no_grad()
def test_pools_that_cannot_be_honoured_are_refused_by_name(pipes: Any) -> None:
    pipe, dit = pipes("sd"), pipes("dit")
    cases: list[tuple[Any, Any, Any, type[Exception], str]] = [
        (pipe, ICG(W), None, GuidanceValueError,
         r"ICG\(3\) draws the conditioning 'icg' from a pool.*prompts=\{'icg': \['a cat', 'a dog'"),
        (pipe, ICG(W, pool="real"), {}, GuidanceValueError, r"'real' from a pool.*prompts=\{'real'"),
        (pipe, ICG(W), {"icg": "a cat"}, GuidanceTypeError, r"is ICG's pool: a non-empty list"),
        (pipe, ICG(W), {"icg": []}, GuidanceTypeError, r"is ICG's pool: a non-empty list"),
        (pipe, ICG(W), {"icg": ["a cat", 3]}, GuidanceTypeError, r"takes a prompt \(str\)"),
        (dit, ICG(W), {"icg": range(3)}, GuidanceTypeError, r"is ICG's pool: a non-empty list"),
        (dit, ICG(W), {"icg": [0, 1000]}, GuidanceValueError,
         r"holds real class labels 0\.\.999, got \[1000\]"),
        (dit, ICG(W), {"icg": ["zebra"]}, GuidanceValueError, r"prompts=\{'icg'"),
    ]
    for p, expr, prompts, error, match in cases:
        cls = type(p)
        with pytest.raises(error, match=match):
            with guided(p, expr, prompts=prompts):
                pass
        assert type(p) is cls and "encode_prompt" not in vars(p)


@torch.no_grad()
def test_a_pool_with_a_controlnet_is_refused() -> None:
    pipe = tiny.sd_controlnet_pipeline().to(F64)
    with pytest.raises(GuidanceValueError, match=r"ICG's pools are not supported with a ControlNet"):
        with guided(pipe, ICG(W), prompts={"icg": POOL}):
            pass
    with guided(pipe, CFG(W)):  # nothing left behind
        pass


def test_rows_that_differ_between_samples_cannot_join_a_pool() -> None:
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    assert pooled_rows("icg", "time_ids", same, 3).tolist() == [[1.0, 2.0]] * 3
    with pytest.raises(GuidanceValueError, match=r"input 'time_ids' differs between the samples"):
        pooled_rows("icg", "time_ids", torch.tensor([[1.0], [2.0]]), 3)
