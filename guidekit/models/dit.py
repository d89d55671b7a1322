"""The bundled denoiser: diffusers' ``DiTTransformer2DModel`` sized for 1x8x8 digits.

DiT (Peebles & Xie, https://arxiv.org/abs/2212.09748) in pixel space: 8x8 images, one
channel, patch 2 (16 tokens), 2 heads of 32 (width 64), class-conditional through adaLN-Zero with
``num_embeds_ada_norm = 10`` classes plus the null class 10 used for unconditional rows.

Two fixes to diffusers' defaults, both needed for stable training:

* **Initialisation as in the DiT paper.** diffusers leaves PyTorch's default init; DiT
  zero-initialises every block's adaLN modulation and the final layer (its modulation and
  output projection), so each block starts as the identity and the network's output starts
  at zero. :func:`init_weights` does that, plus Xavier-uniform linear layers and N(0, 0.02)
  label and timestep embeddings.
* **Label dropout in one place.** diffusers gives EVERY block its own label embedder, and in
  train mode each drops labels independently (p = 0.1), so a row could be "unconditional" in
  some blocks and conditional in others. :func:`disable_label_dropout` sets each embedder's
  ``dropout_prob`` to 0 (its table keeps the null row 10) and training calls
  :func:`drop_labels` once per batch instead.
"""

from __future__ import annotations

from typing import Any

import torch

#: Number of digit classes; the null (unconditional) class index is ``CLASSES``.
CLASSES = 10
NULL_CLASS = CLASSES
#: One sample: channels, height, width.
SHAPE = (1, 8, 8)
PATCH = 2
HEADS = 2
HEAD_DIM = 32


def patch_transformer_config(
    shape: tuple[int, int, int], patch: int, layers: int, heads: int, head_dim: int
) -> dict[str, Any]:
    """The size arguments shared by diffusers' patch transformers (DiT, PixArt) for square
    images of ``shape`` (channels, side, side) in pixel space."""
    return {
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": shape[0],
        # one output channel per input channel: no learned-variance half
        "out_channels": shape[0],
        "num_layers": layers,
        "sample_size": shape[1],
        "patch_size": patch,
    }


def dit_config(layers: int = 6, *, heads: int = HEADS, head_dim: int = HEAD_DIM) -> dict[str, Any]:
    """Constructor arguments of the bundled DiT with ``layers`` transformer blocks."""
    return {
        **patch_transformer_config(SHAPE, PATCH, layers, heads, head_dim),
        # for DiT this is the number of CLASSES, not of diffusion steps
        "num_embeds_ada_norm": CLASSES,
    }


def label_embedders(model: Any) -> list[Any]:
    """Each block's label embedder (diffusers gives every block its own)."""
    return [block.norm1.emb.class_embedder for block in model.transformer_blocks]


def disable_label_dropout(model: Any) -> None:
    """Turn off the per-block label dropout; the null row of each table stays."""
    for emb in label_embedders(model):
        emb.dropout_prob = 0.0


def xavier_(w: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Xavier-uniform in place (fans of a linear or conv weight), from ``generator``."""
    fan_out, fan_in = w.shape[0], w[0].numel()
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    w.copy_(torch.rand(w.shape, generator=generator) * 2 * bound - bound)


def xavier_linears(model: Any, generator: torch.Generator | None = None) -> None:
    """Xavier-uniform every linear layer and the patch embedding of a diffusers patch
    transformer, biases 0 (the DiT paper's base initialisation)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            xavier_(module.weight, generator)
            if module.bias is not None:
                module.bias.zero_()
    # the patch embedding is a linear map of each flattened patch
    xavier_(model.pos_embed.proj.weight, generator)
    model.pos_embed.proj.bias.zero_()


def init_weights(model: Any, generator: torch.Generator | None = None) -> None:
    """Initialise as the DiT paper does: Xavier linears, N(0, 0.02) embeddings, adaLN-Zero."""
    gen = generator
    with torch.no_grad():
        xavier_linears(model, gen)
        for block in model.transformer_blocks:
            emb = block.norm1.emb
            emb.class_embedder.embedding_table.weight.copy_(
                0.02 * torch.randn(emb.class_embedder.embedding_table.weight.shape, generator=gen)
            )
            for lin in (emb.timestep_embedder.linear_1, emb.timestep_embedder.linear_2):
                lin.weight.copy_(0.02 * torch.randn(lin.weight.shape, generator=gen))
            # adaLN-Zero: shift, scale and gate start at 0, so the block is the identity
            block.norm1.linear.weight.zero_()
            block.norm1.linear.bias.zero_()
        for lin in (model.proj_out_1, model.proj_out_2):
            lin.weight.zero_()
            lin.bias.zero_()


def build_dit(
    layers: int = 6,
    *,
    heads: int = HEADS,
    head_dim: int = HEAD_DIM,
    generator: torch.Generator | None = None,
) -> Any:
    """A freshly initialised bundled DiT (train mode), label dropout off, DiT-paper init."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**dit_config(layers, heads=heads, head_dim=head_dim))
    for emb in label_embedders(model):
        # The table has a null row only because diffusers' default dropout_prob (0.1) is > 0
        # at construction; the null class relies on it.
        if emb.embedding_table.num_embeddings != CLASSES + 1:
            raise RuntimeError(
                f"expected a label table of {CLASSES + 1} rows (classes + null), got "
                f"{emb.embedding_table.num_embeddings}: diffusers changed LabelEmbedding"
            )
    disable_label_dropout(model)
    init_weights(model, generator)
    return model


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null class with probability ``p`` (once, for all blocks)."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
