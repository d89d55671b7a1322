"""CFG rescale, https://arxiv.org/abs/2305.08891 (section 3.4).

``x_r = x * std(c) / std(x)`` (std per sample over all non-batch dims),
``out = phi x_r + (1 - phi) x``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from guidekit.branch import Branch, cond
from guidekit.fields import to_float, unit_interval_or_schedule
from guidekit.processor import Processor
from guidekit.registry import register

if TYPE_CHECKING:
    from guidekit.context import StepContext


@register
@attrs.frozen(repr=False)
class CFGRescale(Processor):
    """``Rescale(phi)``: pull the guided prediction's std back towards the conditional's.

    Works in the model's own prediction space, as the paper (v-prediction) and diffusers do.
    ``phi = 0`` is the identity; the paper recommends ``phi = 0.7``.
    """

    phi: float = attrs.field(default=0.7, converter=to_float, validator=unit_interval_or_schedule)
    _name: ClassVar[str] = "Rescale"
    _positional: ClassVar[tuple[str, ...]] = ("phi",)
    _example: ClassVar[str] = "Rescale(0.7)"

    def branches(self) -> tuple[Branch, ...]:
        return (cond(),)

    def requires(self, coefs: Mapping[Any, float]) -> tuple[Branch, ...]:
        return (cond(),) if self.phi != 0 else ()

    def apply(self, y: torch.Tensor, ctx: StepContext, state: Any) -> tuple[torch.Tensor, Any]:
        if self.phi == 0:
            return y, state
        c = ctx.value(cond(), self.space)
        dims = tuple(range(1, y.ndim))
        std_y = y.std(dim=dims, keepdim=True)
        # a constant sample (e.g. CFG-Zero*'s zero-init step) has nothing to rescale
        ratio = torch.where(std_y > 0, c.std(dim=dims, keepdim=True) / std_y, 1.0)
        rescaled = y * ratio
        return self.phi * rescaled + (1 - self.phi) * y, state


Rescale = CFGRescale
