"""The scenes denoiser: diffusers' ``PixArtTransformer2DModel`` sized for 3x32x32 scenes.

PixArt-alpha (Chen et al., https://arxiv.org/abs/2310.00426) in pixel space: patch 4, so
64 image tokens; each block has self-attention (``attn1``), cross-attention over the
caption tokens (``attn2``) and adaLN-single timestep modulation. The caption enters as the
:class:`~.encoder.TokenEncoder`'s hidden states through PixArt's ``caption_projection``.

Initialisation as in the DiT and PixArt papers (diffusers keeps PyTorch's defaults):
Xavier-uniform linear layers and patch embedding, N(0, 0.02) timestep embedding and
adaLN-single projection, and zero for every cross-attention output projection and the final
projection, so the network starts at output 0 and each block's cross-attention starts as a
no-op. One departure from PixArt: the caption projection stays Xavier-uniform. PixArt's
N(0, 0.02) there suits 4096-wide T5 features; on our 64-wide encoder it shrinks the caption
to about 0.01, and behind the zero output projection the cross-attention then starts at a
saddle and learns only the background (docs/models.md, "why the first denoiser ignored
its caption").
"""

from __future__ import annotations

from typing import Any

import torch

from guidekit.models.dit import patch_transformer_config, xavier_linears

#: One sample: channels, height, width.
SHAPE = (3, 32, 32)
PATCH = 4
HEADS = 2
HEAD_DIM = 32
LAYERS = 6


def pixart_config(
    layers: int = LAYERS, *, heads: int = HEADS, head_dim: int = HEAD_DIM,
    caption_channels: int = HEADS * HEAD_DIM, side: int = SHAPE[1], patch: int = PATCH,
) -> dict[str, Any]:
    """Constructor arguments of the scenes denoiser."""
    return {
        **patch_transformer_config((SHAPE[0], side, side), patch, layers, heads, head_dim),
        # PixArt requires it to equal heads * head_dim (its default, 1152, breaks small ones)
        "cross_attention_dim": heads * head_dim,
        "caption_channels": caption_channels,
        # resolution / aspect-ratio embeddings are PixArt's 1024 px conditioning: off
        "use_additional_conditions": False,
        "dropout": 0.0,
    }


def _normal(w: torch.Tensor, gen: torch.Generator | None, std: float = 0.02) -> None:
    w.copy_(std * torch.randn(w.shape, generator=gen))


def init_weights(model: Any, generator: torch.Generator | None = None) -> None:
    """Initialise as the module docstring says (seeded by ``generator``)."""
    gen = generator
    with torch.no_grad():
        xavier_linears(model, gen)
        emb = model.adaln_single.emb.timestep_embedder
        for lin in (emb.linear_1, emb.linear_2, model.adaln_single.linear):
            _normal(lin.weight, gen)
        for block in model.transformer_blocks:
            block.attn2.to_out[0].weight.zero_()
            block.attn2.to_out[0].bias.zero_()
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()


def build_denoiser(
    layers: int = LAYERS, *, heads: int = HEADS, head_dim: int = HEAD_DIM,
    caption_channels: int = HEADS * HEAD_DIM, generator: torch.Generator | None = None,
) -> Any:
    """A freshly initialised scenes PixArt (train mode)."""
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(**pixart_config(
        layers, heads=heads, head_dim=head_dim, caption_channels=caption_channels))
    init_weights(model, generator)
    return model
