"""A scenes model ready for guidekit: caption -> conditioning, ``model_fn``, schedule.

``SceneModel.conditions(captions)`` runs the tokenizer and the token encoder and returns
the keyword arguments of ``model_fn``: ``{"encoder_hidden_states": [B, L, C],
"encoder_attention_mask": [B, L]}``. An unconditional row is the empty caption ``""``
(what caption dropout trains). So a guidance expression's conditionings are captions::

    m = load_scene_model()                      # the shipped weights
    plan = m.compile(CFG(3, negative="neg") | NAG(4, negative="neg"))
    guided = guidekit.guide(plan, m.model_fn, cond=m.conditions(captions),
                            uncond=m.conditions([""] * n),
                            conds={"neg": m.conditions(negatives)}, sigmas=m.sigmas(20))

Attention-space guidance hooks ``m.transformer`` (``guidekit.attention.install``): PixArt's
``attn1`` for PAG / SEG / EMAG, its cross-attention ``attn2`` for NAG / PLADIS / GAG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from guidekit.models.bundled import compile_for
from guidekit.models.scenes.denoiser import HEAD_DIM, HEADS, LAYERS, SHAPE, build_denoiser
from guidekit.models.scenes.encoder import TokenEncoder
from guidekit.models.scenes.tokenizer import Tokenizer
from guidekit.models.schedules import Convention, convention

#: PixArt's resolution / aspect-ratio inputs, unused with ``use_additional_conditions=False``.
ADDED_COND = {"resolution": None, "aspect_ratio": None}


def network_prediction(
    transformer: Any, conv: Convention, x: torch.Tensor, sigma: torch.Tensor,
    encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
) -> torch.Tensor:
    """The denoiser's raw prediction at sampler state ``x`` and noise levels ``sigma`` [rows];
    shared by training and sampling, so both see the same input scaling and timesteps."""
    x_in, timestep = conv.model_input(x, sigma)
    out = transformer(
        x_in, encoder_hidden_states=encoder_hidden_states,
        encoder_attention_mask=encoder_attention_mask, timestep=timestep.to(x.device),
        added_cond_kwargs=ADDED_COND, return_dict=False,
    )
    return out[0]  # type: ignore[no-any-return]


class SceneNetworks(nn.Module):
    """What training optimises and saves: the token encoder and the PixArt denoiser."""

    def __init__(self, encoder: TokenEncoder, transformer: Any) -> None:
        super().__init__()
        self.encoder, self.transformer = encoder, transformer

    def forward(self, conv: Convention, x: torch.Tensor, sigma: torch.Tensor,
                ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(ids, mask)
        return network_prediction(self.transformer, conv, x, sigma, hidden, mask)


def build_networks(
    layers: int = LAYERS, *, heads: int = HEADS, head_dim: int = HEAD_DIM,
    text_width: int = 64, text_layers: int = 2, generator: torch.Generator | None = None,
) -> SceneNetworks:
    """Freshly initialised encoder and denoiser (seeded by ``generator``)."""
    if generator is not None:
        # nn.TransformerEncoderLayer draws from the global generator: seed it from ours
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    encoder = TokenEncoder(Tokenizer().vocab_size, text_width, text_layers)
    transformer = build_denoiser(layers, heads=heads, head_dim=head_dim,
                                 caption_channels=text_width, generator=generator)
    return SceneNetworks(encoder, transformer)


@attrs.define(eq=False)
class SceneModel:
    """A text-conditioned scenes denoiser with what guidekit needs to sample it."""

    networks: SceneNetworks
    prediction: str = "flow"
    tokenizer: Tokenizer = attrs.field(factory=Tokenizer)
    shape: tuple[int, int, int] = SHAPE
    metadata: dict[str, str] = attrs.field(factory=dict)

    @classmethod
    def fresh(cls, prediction: str = "flow", seed: int = 0, **kwargs: Any) -> SceneModel:
        """Random-init networks (eval mode), for tests and as the start of training."""
        nets = build_networks(generator=torch.Generator().manual_seed(seed), **kwargs)
        return cls(nets.eval().requires_grad_(False), prediction)

    @property
    def transformer(self) -> Any:
        return self.networks.transformer

    @property
    def convention(self) -> Convention:
        return convention(self.prediction)

    @property
    def device(self) -> torch.device:
        return next(self.networks.parameters()).device

    def conditions(self, captions: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """``model_fn``'s keyword arguments for ``captions`` (``""``: unconditional): the
        encoder's hidden states, the mask, and the token ids (``caption_ids``, which a weak
        model of Autoguidance encodes with its own encoder: :meth:`weak_fn`)."""
        ids, mask = self.tokenizer.encode(captions)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.no_grad():
            hidden = self.networks.encoder(ids, mask)
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask,
                "caption_ids": ids}

    def model_fn(self, x: torch.Tensor, sigma_rows: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                 caption_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``prediction`` for ``x`` [rows, 3, 32, 32] at ``sigma_rows`` [rows]: guidekit's
        model convention (``caption_ids`` is not read: the hidden states carry the caption)."""
        return network_prediction(self.transformer, self.convention, x, sigma_rows,
                                  encoder_hidden_states, encoder_attention_mask)

    def weak_fn(self, x: torch.Tensor, sigma_rows: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                caption_ids: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`model_fn` as Autoguidance's weak model: its encoder was trained with its
        denoiser, so it encodes ``caption_ids`` itself instead of reading the main model's
        hidden states."""
        if caption_ids is None:
            raise ValueError("SceneModel.weak_fn needs caption_ids (SceneModel.conditions "
                             "gives them): a weak scenes model encodes the caption itself")
        hidden = self.networks.encoder(caption_ids, encoder_attention_mask)
        return network_prediction(self.transformer, self.convention, x, sigma_rows, hidden,
                                  encoder_attention_mask)

    def sigmas(self, steps: int) -> torch.Tensor:
        return self.convention.sigmas(steps)

    def compile(self, expr: Any, **kwargs: Any) -> Any:
        """``guidekit.compile`` with this model's prediction and noise (text is parsed)."""
        return compile_for(expr, self.convention, "SceneModel.compile", **kwargs)


def load_scene_model(path: str | Path | None = None, *, device: Any = "cpu",
                     name: str = "scenes") -> SceneModel:
    """A shipped scenes model, ``name`` (``scenes``, ``scenes-weak`` or ``scenes-fast``; no
    training needed), or ``path``: a file written by ``python -m guidekit.models.scenes.train``
    (float32, eval mode)."""
    from guidekit.models.store import SCENE_MODELS, read, weight_path

    if path is None and name not in SCENE_MODELS:
        raise ValueError(f"unknown scenes model {name!r}: use one of "
                         f"{', '.join(map(repr, SCENE_MODELS))}")
    path = path or weight_path(name)
    tensors, meta = read(path)
    if not meta.get("format", "").startswith("guidekit-scenes-pixart/"):
        raise ValueError(f"{path} is not a scenes denoiser (format {meta.get('format')!r})")
    nets = build_networks(
        int(meta["layers"]), heads=int(meta["heads"]), head_dim=int(meta["head_dim"]),
        text_width=int(meta["text_width"]), text_layers=int(meta["text_layers"]),
    )
    nets.load_state_dict({k: v.float() for k, v in tensors.items()})
    nets.eval().requires_grad_(False).to(device)
    return SceneModel(nets, meta["prediction"], metadata=dict(meta))
