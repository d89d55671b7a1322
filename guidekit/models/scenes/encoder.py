"""The caption encoder: token and position embeddings and a small pre-norm transformer.

Trained jointly with the denoiser from scratch (no pretrained text model: the vocabulary
has 28 ids). Attention is bidirectional over the unmasked tokens; the output at padded
positions is set to 0 (the denoiser masks them anyway, so they carry nothing). The output
``[B, L, width]`` is the denoiser's ``encoder_hidden_states``, the tokenizer's mask its
``encoder_attention_mask``.
"""

from __future__ import annotations

import torch
from torch import nn

from guidekit.models.scenes.tokenizer import MAX_LENGTH


class TokenEncoder(nn.Module):
    """``forward(ids [B, L], mask [B, L]) -> hidden states [B, L, width]``."""

    def __init__(self, vocab_size: int, width: int = 64, layers: int = 2, heads: int = 2,
                 max_length: int = MAX_LENGTH) -> None:
        super().__init__()
        self.width, self.max_length = width, max_length
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.zeros(max_length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        # nested tensors are a fast path for post-norm layers only; off, so no warning
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        with torch.no_grad():
            nn.init.normal_(self.tokens.weight, std=0.02)
            nn.init.normal_(self.positions, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.shape != mask.shape or ids.ndim != 2:
            raise ValueError(
                f"TokenEncoder: ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must both "
                f"be [batch, tokens]"
            )
        if ids.shape[1] > self.max_length:
            raise ValueError(f"TokenEncoder: {ids.shape[1]} tokens, over {self.max_length}")
        h = self.tokens(ids) + self.positions[: ids.shape[1]]
        h = self.blocks(h, src_key_padding_mask=mask == 0)
        return self.norm(h) * mask.unsqueeze(-1).to(h.dtype)
