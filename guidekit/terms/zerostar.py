"""CFG-Zero*: optimised scale of the unconditional prediction plus zero-init.

https://arxiv.org/abs/2503.18886 -- per sample ``a = <c, u> / ||u||^2`` and
``out = a u + w (c - a u)``; the output is zero for the first ``zero_init_steps`` steps.
As in the official code, ``u`` is scaled by ``a`` inside the difference too (one peer drops it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import attrs
import torch

from guidekit.branch import Branch, cond, uncond
from guidekit.fields import count, finite_or_schedule, to_float
from guidekit.registry import register
from guidekit.terms.base import NonlinearPrediction

if TYPE_CHECKING:
    from guidekit.context import StepContext


@register
@attrs.frozen(repr=False)
class CFGZeroStarTerm(NonlinearPrediction):
    """``a u + w (c - a u)`` with ``a = <c, u> / (||u||^2 + 1e-8)`` per sample.

    Runs in the model's own prediction space (the paper's is the flow velocity). Step
    ``k`` (0-based, counted by :mod:`guidekit.state`) outputs zero while ``k < zero_init_steps``.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    zero_init_steps: int = attrs.field(default=0, validator=count)
    _name: ClassVar[str] = "CFGZeroStar"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "CFGZeroStar(4)"

    def atom_branches(self) -> tuple[Branch, ...]:
        return (cond(), uncond())

    def evaluate(self, values: Mapping[Branch, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        c, u = values[cond()], values[uncond()]
        if ctx.level < self.zero_init_steps:
            return torch.zeros_like(c)
        dims = tuple(range(1, c.ndim))
        cf, uf = c.double(), u.double()
        a = (cf * uf).sum(dims, keepdim=True) / (uf.square().sum(dims, keepdim=True) + 1e-8)
        au = (a * uf).to(c.dtype)
        return au + self.scale * (c - au)


CFGZeroStar = CFGZeroStarTerm
