"""The classic adapter's run state belongs to a ``guidekit.run.Run`` (issue 10).

Each pipeline call inside one ``guided`` block is a new run (fresh APG momentum, the
scheduler's schedule of that call), and a noise level that rises without a new pipeline call
restarts the run (``on_rise="restart"``). Tiny real SD pipeline, float64.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import APG, CFG
from guidekit.adapters.diffusers import guided
from guidekit.run import Run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (a fixture)

F64 = torch.float64
EXPR = CFG(4) | APG(eta=0, momentum=-0.5)  # stateful: a stale run would show

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd() -> Any:
    return tiny.sd_pipeline().to(F64)


def run_sd(pipe: Any, steps: int) -> torch.Tensor:
    return pipe(
        prompt=["a cat", "a dog"], height=16, width=16, num_inference_steps=steps,
        output_type="latent", generator=torch.Generator().manual_seed(0),
    ).images


@torch.no_grad()
def test_every_pipeline_call_is_a_fresh_run_with_its_own_schedule(sd: Any) -> None:
    with guided(sd, EXPR) as g:
        assert g.runs == 0 and g.steps == 0 and g.state is None
        first = run_sd(sd, 3)
        assert isinstance(g._run, Run) and g._run.on_rise == "restart"
        second = run_sd(sd, 3)
        five = run_sd(sd, 5)
        assert g.runs == 3 and g.steps == 5 and len(g.calls) == 3 + 3 + 5
    with guided(sd, EXPR):
        alone = run_sd(sd, 5)
    assert torch.equal(first, second)
    torch.testing.assert_close(five, alone, rtol=0, atol=0)
    assert [c.step for c in g.calls] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4]


@torch.no_grad()
def test_a_rising_level_without_a_pipeline_call_restarts_the_run(sd: Any) -> None:
    x = torch.randn(2, 4, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 77, 32, dtype=F64)
    sd.scheduler.set_timesteps(4)
    ts = [int(t) for t in sd.scheduler.timesteps]
    with guided(sd, EXPR) as g:
        outs = [sd.unet(x.repeat(2, 1, 1, 1), t, encoder_hidden_states=text.repeat(2, 1, 1)).sample
                for t in (ts[0], ts[1], ts[0], ts[1])]
    assert g.runs == 2 and [c.step for c in g.calls] == [0, 1, 0, 1]
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[3], outs[1], rtol=0, atol=0)


@torch.no_grad()
def test_a_nan_in_the_unets_output_names_the_step_and_branch(sd: Any) -> None:
    """Issue 11 through a real pipeline: the UNet returns NaN in half of its rows from the
    second call on; the run stops at that step with the step, sigma, branch and terms."""
    from guidekit.errors import NonFiniteError

    calls = []

    def poison(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) >= 2:  # the UNet's last layer, inside the guided model call
            out = out.clone()
            out[out.shape[0] // 2:] = float("nan")
        return out

    handle = sd.unet.conv_out.register_forward_hook(poison)
    try:
        with guided(sd, EXPR), pytest.raises(
            NonFiniteError, match=r"returned NaN at step 1 \(sigma=[0-9.]+\) in branch [cu] .*used by CFG\(4\)"
        ):
            run_sd(sd, 3)
    finally:
        handle.remove()
    assert len(calls) == 2  # stopped at the step where it appeared


def test_autoguidance_against_the_main_denoiser_is_refused(sd: Any) -> None:
    from guidekit import Autoguidance, GuidanceValueError

    with pytest.raises(GuidanceValueError, match=r"weak"):
        with guided(sd, CFG(4) + Autoguidance(1), models={"weak": sd.unet}):
            pass


@torch.no_grad()
def test_nan_latents_from_outside_are_named_as_such(sd: Any) -> None:
    """Something after guidekit (here a hook on the UNet's output) puts NaN into the latents:
    the next call says the latents hold NaN, not that the CFG halves differ."""
    from guidekit.errors import NonFiniteError

    def poison(module: Any, args: Any, kwargs: Any, out: Any) -> None:
        (out[0] if isinstance(out, tuple) else out.sample)[0] = float("nan")

    handle = sd.unet.register_forward_hook(poison, with_kwargs=True)
    try:
        with guided(sd, EXPR), pytest.raises(NonFiniteError, match=r"latents .* hold NaN"):
            run_sd(sd, 3)
    finally:
        handle.remove()
