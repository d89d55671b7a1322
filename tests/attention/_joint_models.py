"""Tiny SD3 and Flux transformers in float64 (configs from shared/reference/tiny-models.md)
and their model functions in guidekit's convention ``model(x_rows, sigma_rows, **cond_rows)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._tiny import BATCH, sharpen

TEXT_TOKENS = 7


def tiny_sd3(layers: int = 2, seed: int = 0) -> Any:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
    )
    return sharpen(model.eval()).double()


def sd3_fn(model: Any, **extra: Any) -> Callable[..., torch.Tensor]:
    """``x [B, 4, H, W]``; ``timestep = 100 sigma``; ``extra`` goes to the transformer."""

    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> Any:
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=sigma * 100, **extra).sample

    return fn


def sd3_conds(seed: int = 6) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def one(scale: float) -> dict[str, torch.Tensor]:
        return {
            "text": scale * torch.randn(BATCH, TEXT_TOKENS, 32, generator=g, dtype=torch.float64),
            "pooled": scale * torch.randn(BATCH, 32, generator=g, dtype=torch.float64),
        }

    return one(1.0), one(0.1)


def tiny_flux(double: int = 2, single: int = 2, seed: int = 0) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 4, 8),
    )
    return model.eval().double()


def flux_fn(model: Any, side: int = 4) -> Callable[..., torch.Tensor]:
    """``x [B, side * side, 16]`` packed image tokens; ``timestep = sigma``."""
    s = side * side
    img_ids = torch.zeros(s, 3, dtype=torch.float64)
    img_ids[:, 1] = torch.arange(s) // side
    img_ids[:, 2] = torch.arange(s) % side
    txt_ids = torch.zeros(TEXT_TOKENS, 3, dtype=torch.float64)

    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> Any:
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=sigma, img_ids=img_ids, txt_ids=txt_ids).sample

    return fn
