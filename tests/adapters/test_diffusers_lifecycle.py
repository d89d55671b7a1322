"""guided(pipe, ...) leaves the pipeline and its denoiser exactly as they were.

After errors and interrupts (raised in the block, in the wrapped forward, in the pipeline's
loop), with the attention engine or CADS's embedding hooks in, and with an instance
``forward`` that was there before the run (e.g. an offloading hook).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CADS, CFG, PAG, GuidanceValueError
from guidekit.adapters.diffusers import guided

# the shared set-up and the builders of tiny components live next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _diffusers_helpers as helpers  # noqa: E402
from _diffusers_helpers import (  # noqa: E402
    STEPS,
    W,
    attention_state,
    call_kwargs,
    denoiser,
    pipe_untouched,
    sample,
    snapshot,
)

# the shared fixtures: pytest finds them by name in this module
_quiet_single_thread, pipes, weak_models = (
    helpers._quiet_single_thread, helpers.pipes, helpers.weak_models
)


# -- the module is left exactly as it was ------------------------------------------------------


@torch.no_grad()
def test_the_denoiser_is_restored_after_errors_and_interrupts(pipes: Any) -> None:
    pipe = pipes("sd3")
    module = denoiser(pipe)
    sample(pipe, **call_kwargs("sd3"))  # the pipeline's own attributes exist from here on
    before_module, before_pipe = snapshot(module), snapshot(pipe)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), guided(pipe, CFG(2)):
        assert "forward" in vars(module)
        raise Boom
    assert snapshot(module) == before_module and pipe_untouched(pipe, before_pipe)

    with pytest.raises(KeyboardInterrupt), guided(pipe, CFG(2)):
        raise KeyboardInterrupt
    assert snapshot(module) == before_module and pipe_untouched(pipe, before_pipe)

    # raised inside the wrapped forward, in the middle of the pipeline's loop
    with pytest.raises(GuidanceValueError, match="guidance_scale > 1"), guided(pipe, CFG(2)):
        sample(pipe, **call_kwargs("sd3", scale=1.0))
    assert snapshot(module) == before_module and pipe_untouched(pipe, before_pipe)

    with guided(pipe, CFG(2)), pytest.raises(GuidanceValueError, match="already"):
        with guided(pipe, CFG(3)):
            pass
    assert snapshot(module) == before_module


@torch.no_grad()
def test_an_existing_instance_forward_is_used_and_put_back(pipes: Any) -> None:
    pipe = pipes("sd3")
    module = denoiser(pipe)
    seen: list[int] = []
    original = type(module).forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:  # e.g. an offloading hook
        seen.append(1)
        return original(module, *args, **kwargs)

    module.forward = counting_forward
    try:
        ref = sample(pipe, **call_kwargs("sd3"))
        seen.clear()
        with guided(pipe, CFG(W)):
            out = sample(pipe, **call_kwargs("sd3"))
        assert len(seen) == STEPS  # guidekit's calls went through the existing forward
        assert vars(module)["forward"] is counting_forward
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    finally:
        del module.forward


@torch.no_grad()
def test_attention_errors_leave_everything_as_it_was(pipes: Any) -> None:
    pipe = pipes("pixart")
    module = denoiser(pipe)
    sample(pipe, **call_kwargs("pixart"))  # the pipeline's own attributes exist from here on
    before, before_pipe = attention_state(module), snapshot(pipe)
    # a layer the engine refuses: raised on entering the block, before anything changed
    with pytest.raises(GuidanceValueError, match="cross-attention"):
        with guided(pipe, CFG(W) + PAG(2, layers="transformer_blocks.0.attn2")):
            pass
    assert attention_state(module) == before and pipe_untouched(pipe, before_pipe)

    class Boom(Exception):
        pass

    def explode(*_: Any) -> Any:
        raise Boom

    # an error in the middle of the pipeline's loop, with the engine in
    with pytest.raises(Boom), guided(pipe, CFG(W) + PAG(2) | CADS()) as run:
        sample(pipe, **call_kwargs("pixart"), callback=explode)
    assert len(run.calls) == 1
    assert attention_state(module) == before and pipe_untouched(pipe, before_pipe)
    assert "forward" not in vars(module)


@torch.no_grad()
def test_label_embedding_hooks_are_removed_after_an_error_mid_run(pipes: Any) -> None:
    pipe = pipes("dit")
    net = pipe.transformer
    embedders = [m for m in net.modules() if type(m).__name__ == "LabelEmbedding"]
    before = attention_state(net)

    class Boom(Exception):
        pass

    calls: list[int] = []

    def second_forward_fails(*_: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Boom

    handle = net.pos_embed.register_forward_pre_hook(second_forward_fails)
    try:
        with pytest.raises(Boom), guided(pipe, CFG(W) + PAG(2) | CADS()):
            assert all(m._forward_hooks for m in embedders)  # hooked for the block
            sample(pipe, **call_kwargs("dit"))
    finally:
        handle.remove()
    assert len(calls) == 2
    assert all(not m._forward_hooks for m in embedders)
    assert attention_state(net) == before and "forward" not in vars(net)
