"""CADS (https://arxiv.org/abs/2310.17347) inside diffusers pipelines: which tensors it anneals.

CADS adds noise to the *conditioning embedding*. What that is depends on the pipeline:

* text pipelines (SD, SDXL, PixArt, SD3, Flux): the token embeddings, the denoiser's
  ``encoder_hidden_states``. ``CADS()`` without ``keys`` anneals exactly those; the pooled
  embeddings (``pooled_projections``, SDXL's ``text_embeds``), masks and micro-conditions
  are left alone, as in the CADS reference. ``keys=`` names others by the denoiser's
  argument names (``"prompt_embeds"`` and ``"pooled_prompt_embeds"`` are read as the
  pipeline's names for ``encoder_hidden_states`` and ``pooled_projections``).
* class-conditional transformers (DiT): the class label is an integer, so the annealed
  tensor is its EMBEDDING. :class:`ClassEmbeddingCADS` (in the core,
  :mod:`guidekit.combinators.cads_embedding`) hooks every diffusers ``LabelEmbedding`` of
  the models for the run (a forward hook, removed on exit) and replaces the embedding rows
  of each branch by their annealed values; ``CADS()`` there means
  ``keys=("class_embedding",)`` (``"class_labels"`` is read as that too). Every label
  embedder gets the same noise (the key names the noise): diffusers' DiT holds one copy of the class embedding per block, equal in
  converted checkpoints, so this is the reference's one noisy embedding seen by every block.

In both cases the noise is CADS's own: seeded by the run's seed, the step and the
conditioning's name, so every pipeline run in a ``guided`` block anneals alike.
"""

from __future__ import annotations

from typing import Any

import attrs

from guidekit.combinators.cads import CADSAnnealing
from guidekit.combinators.cads_embedding import (
    CLASS_EMBEDDING,
    ClassEmbeddingCADS,
    label_embedders,
    with_modifiers,
)
from guidekit.combinators.cads_embedding import adapt as adapt_for
from guidekit.plan import Plan

__all__ = [
    "ALIASES", "CLASS_EMBEDDING", "GUIDER_TOKEN_KEYS", "TOKEN_EMBEDDINGS", "ClassEmbeddingCADS",
    "adapt", "for_guider", "label_embedders", "with_modifiers",
]

#: The token embeddings: what ``CADS()`` anneals in a text pipeline.
TOKEN_EMBEDDINGS = "encoder_hidden_states"
#: Pipeline argument names accepted in ``CADS(keys=...)`` for the denoiser's names.
ALIASES = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"}
#: Guider inputs that hold token embeddings in diffusers' modular pipelines.
GUIDER_TOKEN_KEYS = ("encoder_hidden_states", "prompt_embeds")


def adapt(plan: Plan, class_labels: bool) -> tuple[Plan, Plan, Plan | None]:
    """:func:`guidekit.combinators.cads_embedding.adapt` for a diffusers denoiser:
    ``CADS()`` means the class embedding (``class_labels``) or the token embeddings."""
    return adapt_for(plan, class_labels, token_keys=(TOKEN_EMBEDDINGS,), aliases=ALIASES)


def for_guider(plan: Plan, inputs: Any) -> Plan:
    """``plan`` with ``CADS()`` (no keys) pointed at the token embeddings among a modular
    guider's ``inputs`` (names); unchanged when there is no CADS or no such input."""
    present = tuple(k for k in GUIDER_TOKEN_KEYS if k in set(inputs))
    if not present or not any(
        isinstance(m, CADSAnnealing) and m.keys is None for m in plan.modifiers
    ):
        return plan
    return with_modifiers(plan, [
        attrs.evolve(m, keys=present) if isinstance(m, CADSAnnealing) and m.keys is None else m
        for m in plan.modifiers
    ])
