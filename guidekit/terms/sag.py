"""Self-attention guidance (SAG): guide away from the model's own blurred salient regions.

https://arxiv.org/abs/2210.00939 -- with CFG, ``u + w (c - u) + s (u - d)``, where ``d`` is
the unconditional prediction at an input whose regions of high self-attention were
blurred (:mod:`guidekit.attention.sag`). In guidekit ``SAG(s)`` is the direction
``s (u - d)``: the paper's prediction is ``CFG(w) + SAG(s)``. ``d`` depends on this step's
first call, so it is a second model call per step (``print(plan)`` shows both).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from guidekit.attention.ops import Layers, check_layers, to_layers
from guidekit.attention.sag import SAGDegrade, _odd, _positive
from guidekit.branch import MAIN, UNCOND, Branch
from guidekit.fields import Examples, finite_or_schedule, to_float
from guidekit.registry import register
from guidekit.terms.base import DirectionTerm


@register
@attrs.frozen(repr=False)
class SAGTerm(DirectionTerm):
    """``scale * (u - d)``; ``d`` = ``u`` on the input blurred where the unconditional
    pass's self-attention map (layer ``layers``, one layer) is high.

    Defaults follow the paper: Gaussian blur kernel 9, sigma 1, mask threshold 1 (tokens
    receiving more than the average attention); ``layers=None`` is the architecture's
    default layer (the UNet's middle block, the paper's choice for Stable Diffusion).
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    blur_sigma: float = attrs.field(default=1.0, converter=to_float, validator=_positive)
    kernel: int = attrs.field(default=9, validator=_odd)
    threshold: float = attrs.field(default=1.0, converter=to_float, validator=_positive)
    _name: ClassVar[str] = "SAG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "SAG(0.75, layers=-1)"
    field_examples: ClassVar[Examples] = {
        "layers": (None, -1), "blur_sigma": (1.0, 2.0), "kernel": (3,),
    }

    @property
    def perturbation(self) -> Any:
        return SAGDegrade(self.layers, self.blur_sigma, self.kernel, self.threshold)

    def positive(self) -> Branch:
        return Branch(model=MAIN, cond=UNCOND)

    def negative(self) -> Branch:
        return Branch(model=MAIN, cond=UNCOND, perturbation=self.perturbation)


SAG = SAGTerm
