"""Smoothed energy guidance (SEG).

https://arxiv.org/abs/2408.00760 -- ``u + w (c - u) + s (c - g)``, where ``g`` is the
conditional prediction of the same model with the QUERIES of the chosen self-attention
layers blurred by a Gaussian of standard deviation ``blur_sigma`` over the image token grid
(``blur_sigma > 9999`` or ``inf``: every query replaced by the mean query). In guidekit
``SEG(s)`` is the direction ``s (c - g)``: the paper's prediction is ``CFG(w) + SEG(s)``,
SEG alone (the paper's unconditional and ``w = 1`` results) is ``Cond() + SEG(s)``.

The perturbed branch rides in the same batched call as ``c`` and ``u``; the attention engine
(:func:`guidekit.attention.install`) applies the blur to the ``g`` rows only and reads each
layer's token grid from the model's input (:mod:`guidekit.attention.seg`). ``layers=None``
is the architecture's default: the middle block's self-attention of a UNet (the SEG
authors' choice for SDXL, ``['mid']``) and the last block of DiT / PixArt (as PAG).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs

from guidekit.attention.ops import Layers, check_layers, to_layers
from guidekit.attention.seg import BlurredQueryAttention, _blur_sigma, _float
from guidekit.branch import COND, MAIN, Branch
from guidekit.fields import Examples, finite_or_schedule, to_float
from guidekit.registry import register
from guidekit.terms.base import DirectionTerm


@register
@attrs.frozen(repr=False)
class SEGTerm(DirectionTerm):
    """``scale * (c - g)``, ``g`` = ``c`` with Gaussian-blurred queries in ``layers``.

    ``blur_sigma`` is the Gaussian's standard deviation in tokens (larger = more blur;
    default ``inf``, the infinite blur: the mean query, which needs no grid). ``layers`` as
    for PAG: an int, a module path, or a list / tuple / range of them; ``None`` is the
    architecture's default.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    blur_sigma: float = attrs.field(default=math.inf, converter=_float, validator=_blur_sigma)
    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    _name: ClassVar[str] = "SEG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "SEG(3, blur_sigma=10, layers=-1)"
    field_examples: ClassVar[Examples] = {
        "blur_sigma": (math.inf, 1.0, 10.0), "layers": (None, -1, (1, 2)),
    }

    @property
    def perturbation(self) -> Any:
        """The frozen perturbation value of the negative branch."""
        return BlurredQueryAttention(self.layers, self.blur_sigma)

    def negative(self) -> Branch:
        return Branch(model=MAIN, cond=COND, perturbation=self.perturbation)


SEG = SEGTerm
