"""SLG's independent references for the attention tests: the model with blocks taken out.

``removed`` (a shorter ``ModuleList``), ``identity_blocks`` (for DiT, whose forward reads
block 0 again after the loop, and the UNet's transformer blocks) and ``zero_attention``
(processors that return zeros, ``skip="attention"``); ``run_and_compare`` runs guidekit's ONE
call of ``3 x B`` rows against a reference of separate model calls at every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

import guidekit
from guidekit.attention import install

from ._tiny import BATCH

TOL = 1e-9
SIGMAS = (0.9, 0.6, 0.3, 0.0)


def no_instance_forwards(model: torch.nn.Module) -> bool:
    return all("forward" not in m.__dict__ for m in model.modules())


# -- the references: blocks removed, identity blocks, zero attention -----------------------------


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
