"""Tiny real models for the attention tests, built offline in float32, and independent
reference implementations of PAG's perturbed pass written here (not taken from guidekit).

Random-weight models have nearly uniform attention maps, under which the identity map of
PAG changes little; :func:`sharpen` scales the query and key projections so the maps are
peaked and a perturbation changes the output clearly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention

BATCH = 2
SHARPEN = 4.0


def sharpen(model: torch.nn.Module, factor: float = SHARPEN) -> torch.nn.Module:
    """Scale every attention's query and key weights by ``factor`` (logits by factor**2)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Attention):
                m.to_q.weight.mul_(factor)
                m.to_k.weight.mul_(factor)
            elif isinstance(m, SelfAttention):
                m.qkv.weight[: 2 * m.dim].mul_(factor)
    return model


def tiny_dit(num_layers: int = 3, seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=10,
    )
    return sharpen(model.eval())


def tiny_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        caption_channels=32, norm_num_groups=2, use_additional_conditions=False,
    )
    return sharpen(model.eval())


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=2,
    )
    return sharpen(model.eval())


# -- a plain PyTorch model whose attention calls scaled_dot_product_attention ---------------------


class SelfAttention(torch.nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` ([B, H, L, D])."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim // self.heads).transpose(1, 2)

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v))
        return self.proj(self.merge(out))


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim)
        )

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h) + c[:, None])
        return h + self.mlp(self.norm2(h))


class TinyTransformer(torch.nn.Module):
    """``model(x [B, 4, 8, 8], sigma [B], y [B]) -> [B, 4, 8, 8]``; label 10 is the null class."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 3) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, dim)
        self.pos = torch.nn.Parameter(torch.randn(64, dim) * 0.5)
        self.label = torch.nn.Embedding(11, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out = torch.nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = x / (sigma**2 + 1).sqrt()[:, None, None, None]  # unit-variance input, as c_in
        h = self.inp(x.flatten(2).transpose(1, 2)) + self.pos
        c = self.label(y) + torch.log(sigma)[:, None]
        for block in self.blocks:
            h = block(h, c)
        return self.out(h).transpose(1, 2).reshape(b, 4, 8, 8)


def tiny_plain(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return sharpen(TinyTransformer().eval())


# -- model functions in guidekit's convention model(x_rows, sigma_rows, **cond_rows) -------------


def dit_fn(model: DiTTransformer2DModel) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor, **kw: Any) -> Any:
        return model(x, timestep=sigma, class_labels=class_labels, **kw).sample

    return fn


def pixart_fn(model: PixArtTransformer2DModel) -> Callable[..., torch.Tensor]:
    added = {"resolution": None, "aspect_ratio": None}

    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        out = model(x, encoder_hidden_states=text, timestep=sigma, added_cond_kwargs=added)
        return out.sample

    return fn


def unet_fn(model: UNet2DConditionModel) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return model(x, sigma, encoder_hidden_states=text).sample

    return fn


# -- independent references for the perturbed pass ----------------------------------------------


class ValueOnlyProcessor:
    """A diffusers processor whose attention map is the identity: ``to_out(to_v(h))``,
    with the module's residual and rescale. Written for the tests, self-attention only."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert encoder_hidden_states is None, "the reference is for self-attention"
        out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def value_only(model: torch.nn.Module, paths: tuple[str, ...]) -> Iterator[None]:
    """Make ``paths`` identity-attention layers for the duration (diffusers or plain)."""
    saved: list[tuple[torch.nn.Module, Any, Any]] = []
    try:
        for path in paths:
            module = model.get_submodule(path)
            if isinstance(module, Attention):
                saved.append((module, module.get_processor(), None))
                module.set_processor(ValueOnlyProcessor())
            else:
                assert isinstance(module, SelfAttention)
                saved.append((module, None, module.__dict__.get("forward")))

                def forward(h: torch.Tensor, m: SelfAttention = module) -> torch.Tensor:
                    v = h @ m.qkv.weight[2 * m.dim :].T + m.qkv.bias[2 * m.dim :]
                    return m.proj(v)

                module.forward = forward  # type: ignore[method-assign]
        yield
    finally:
        for module, proc, forward in saved:
            if proc is not None:
                module.set_processor(proc)
            elif forward is not None:
                module.forward = forward  # type: ignore[method-assign]
            else:
                del module.forward


def processors(model: torch.nn.Module) -> dict[str, Any]:
    """Every attention module's processor object, by path."""
    return {n: m.processor for n, m in model.named_modules() if isinstance(m, Attention)}


# -- EMAG / SAG references: a processor that records or replaces maps, one pass at a time -------


class RefProcessor:
    """Self-attention of a diffusers ``Attention`` with an explicit softmax.

    ``mode`` "record" stores the map (``[B, heads, Q, K]``) in ``maps``; "map" replaces it by
    ``replacement``; "query" replaces the queries by ``replacement``; None just computes.
    """

    def __init__(self) -> None:
        self.mode: str | None = None
        self.replacement: torch.Tensor | None = None
        self.maps: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        d = q.shape[-1] // heads
        q, k, v = (t.view(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
        self.queries = q.detach().clone()
        if self.mode == "query":
            q = self.replacement
        logits = q @ k.transpose(-1, -2) / d**0.5
        probs = logits.softmax(-1)
        if self.mode == "record":
            self.maps = probs.detach().clone()
        if self.mode == "map":
            probs = self.replacement
        out = (probs @ v).transpose(1, 2).reshape(b, n, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def ref_processors(model: Any, paths: list[str]) -> Iterator[dict[str, RefProcessor]]:
    old = {p: model.get_submodule(p).processor for p in paths}
    procs = {p: RefProcessor() for p in paths}
    for p, proc in procs.items():
        model.get_submodule(p).set_processor(proc)
    try:
        yield procs
    finally:
        for p, proc in old.items():
            model.get_submodule(p).set_processor(proc)


# -- ending a run early: the model must be restored however the run ends ---------------------

#: How a restoration test leaves its run (parametrise over these).
ENDINGS = ("normal", "exception", "interrupt")


class Boom(Exception):
    """An error raised inside a run, to check that the model is restored."""


def leave(ending: str) -> None:
    """Raise as ``ending`` says (inside the run): nothing, Boom or KeyboardInterrupt."""
    if ending == "exception":
        raise Boom
    if ending == "interrupt":
        raise KeyboardInterrupt


@contextlib.contextmanager
def ended_as(ending: str) -> Iterator[None]:
    """Around a run that calls :func:`leave`: swallow the error it raised, and check that
    it raised exactly when ``ending`` says so."""
    raised: BaseException | None = None
    try:
        yield
    except (Boom, KeyboardInterrupt) as err:
        raised = err
    assert (raised is None) == (ending == "normal")
