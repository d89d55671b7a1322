"""ControlNet pipelines through guided(...): the residuals follow the plan's rows.

StableDiffusionControlNetPipeline passes the ControlNet's residuals to the UNet with the CFG
batch as leading dimension (``[uncond, cond]``; with ``guess_mode`` zeros for the uncond
rows). guidekit lays them out with its rows like the text embeddings, so plain CFG equals
the pipeline's own and a PAG branch gets the conditional residuals.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from guidekit import CFG, PAG, GuidanceValueError
from guidekit.adapters.diffusers import guided
from guidekit.branch import UNCOND

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402

from adapters._diffusers_rows import Leaf, fill, take_apart  # noqa: E402

PROMPTS = ["a cat", "a photo of a big dog"]
B = len(PROMPTS)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe() -> Any:
    return tiny.sd_controlnet_pipeline()


def _run(pipe: Any, **kw: Any) -> torch.Tensor:
    out = pipe(
        prompt=PROMPTS, image=tiny.control_image(), height=tiny.IMAGE, width=tiny.IMAGE,
        num_inference_steps=3, guidance_scale=4.0, output_type="latent",
        generator=torch.Generator().manual_seed(0), **kw,
    )
    return out.images


@pytest.mark.parametrize("guess_mode", [False, True])
def test_plain_cfg_equals_the_pipelines_own(pipe: Any, guess_mode: bool) -> None:
    ref = _run(pipe, guess_mode=guess_mode)
    with guided(pipe, CFG(4)):
        out = _run(pipe, guess_mode=guess_mode)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cfg_plus_pag_runs_and_perturbs(pipe: Any) -> None:
    ref = _run(pipe)
    with guided(pipe, CFG(4) + PAG(3)) as run:
        out = _run(pipe)
    assert all(c.rows == 3 * B for c in run.calls)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3


def test_residuals_follow_the_rows(pipe: Any) -> None:
    """Each row block of the UNet's residuals is the pipeline's rows of its branch's cond."""
    sent: list[tuple[list[torch.Tensor], torch.Tensor]] = []
    got: list[dict[str, Any]] = []
    unet = pipe.unet

    def record(*args: Any, **kwargs: Any) -> Any:
        got.append(kwargs)
        return type(unet).forward(unet, *args, **kwargs)

    hook = pipe.controlnet.register_forward_hook(lambda m, a, out: sent.append(out))
    unet.forward = record  # a user's instance forward: guidekit calls through it
    try:
        with guided(pipe, CFG(4) + PAG(3)) as run:
            _run(pipe)
    finally:
        hook.remove()
        del unet.forward
    assert len(sent) == len(got) == len(run.calls) == 3
    for (down, mid), kwargs, rec in zip(sent, got, run.calls):
        (group,) = run.plan.program(rec.sigma).groups
        assert any(b.perturbation is not None for b in group.branches)
        theirs = [*kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]]
        for mine, their in zip([*down, mid], theirs):
            assert their.shape[0] == len(group.branches) * B
            for j, branch in enumerate(group.branches):
                rows = slice(0, B) if branch.cond == UNCOND else slice(B, 2 * B)
                torch.testing.assert_close(their[j * B : (j + 1) * B], mine[rows], rtol=0, atol=0)


def _unet_args(pipe: Any, rows: int) -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 8, 8).repeat(rows, 1, 1, 1),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(rows, 77, 32),
    }


def test_residual_with_other_rows_is_refused_by_name(pipe: Any) -> None:
    args = _unet_args(pipe, 2 * B)
    args["mid_block_additional_residual"] = torch.zeros(3, 8, 4, 4)
    with guided(pipe, CFG(4)), pytest.raises(GuidanceValueError, match="mid_block_additional_residual"):
        pipe.unet(**args)


@dataclasses.dataclass
class _Embeds:
    values: torch.Tensor


def test_per_row_tensor_in_an_opaque_object_is_refused_by_name(pipe: Any) -> None:
    args = _unet_args(pipe, 2 * B)
    args["cross_attention_kwargs"] = {"extra": _Embeds(torch.zeros(2 * B, 3))}
    with guided(pipe, CFG(4)), pytest.raises(GuidanceValueError, match="cross_attention_kwargs.extra"):
        pipe.unet(**args)


def test_take_apart_and_fill_round_trip_through_nested_containers() -> None:
    n = 4
    args = {
        "sample": torch.zeros(n, 1),
        "timestep": torch.arange(n),
        "txt_ids": torch.zeros(n, 3),
        "added_cond_kwargs": {"text_embeds": torch.randn(n, 2), "image_embeds": [torch.randn(n, 5)]},
        "down_block_additional_residuals": (torch.randn(n, 2), torch.randn(n, 3)),
        "cross_attention_kwargs": {"scale": 0.5, "mask": torch.ones(n, 7), "table": torch.ones(1, 7)},
    }
    parts = take_apart(args, "sample", n, n // 2)
    assert set(parts.shared) == {"timestep"}
    assert set(parts.rows) == {
        "added_cond_kwargs.text_embeds", "added_cond_kwargs.image_embeds.0",
        "down_block_additional_residuals.0", "down_block_additional_residuals.1",
        "cross_attention_kwargs.mask",
    }
    assert parts.template["txt_ids"] is args["txt_ids"]  # never per-row
    assert isinstance(parts.template["down_block_additional_residuals"][0], Leaf)
    halves = {k: v[:2] for k, v in {**parts.rows, **parts.shared}.items()}
    back = fill(parts.template, halves)
    assert isinstance(back["down_block_additional_residuals"], tuple)
    assert torch.equal(back["added_cond_kwargs"]["image_embeds"][0], args["added_cond_kwargs"]["image_embeds"][0][:2])
    assert back["cross_attention_kwargs"]["scale"] == 0.5
    assert back["cross_attention_kwargs"]["table"] is args["cross_attention_kwargs"]["table"]
