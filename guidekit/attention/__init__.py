"""Attention-space guidance: perturbed branches computed inside the same batched forward.

``install(model, plan)`` hooks the attention layers that a plan's perturbed branches target
and yields the ``around_call`` to pass to :func:`guidekit.guide` (see
:mod:`guidekit.attention.engine`); layers are addressed as in
:mod:`guidekit.attention.layers`; the perturbations themselves are in
:mod:`guidekit.attention.ops`.
"""

from guidekit.attention.blocks import BlockSkip, block_table
from guidekit.attention.ema import EMAMapAttention, EMAQueryAttention, EMAState
from guidekit.attention.engine import AttentionEngine, install
from guidekit.attention.layers import LayerTable, layer_table, resolve_layers
from guidekit.attention.maths import perturbed_self_attention
from guidekit.attention.ops import AttentionPerturbation, IdentityAttention, identity_attention
from guidekit.attention.route import Route
from guidekit.attention.seg import BlurredQueryAttention

__all__ = [
    "AttentionEngine", "AttentionPerturbation", "EMAMapAttention", "EMAQueryAttention", "EMAState", "IdentityAttention", "LayerTable", "Route",
    "identity_attention", "install", "layer_table", "perturbed_self_attention", "resolve_layers",
    "BlockSkip", "BlurredQueryAttention", "block_table",
]
