"""Tangential CFG: drop the unconditional prediction's off-manifold component.

https://arxiv.org/abs/2503.18137 -- per sample, take the SVD of the stacked flattened
``[c; u]`` (a 2 x D matrix), project ``u`` on the top right singular vector ``v1``:
``u' = <u, v1> v1``, and return ``u' + w (c - u')``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import attrs
import torch

from guidekit.branch import Branch, cond, uncond
from guidekit.fields import finite_or_schedule, to_float
from guidekit.registry import register
from guidekit.terms.base import NonlinearPrediction

if TYPE_CHECKING:
    from guidekit.context import StepContext


@register
@attrs.frozen(repr=False)
class TCFGTerm(NonlinearPrediction):
    """``u' + w (c - u')`` with ``u'`` the projection of ``u`` on the top singular direction."""

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    _name: ClassVar[str] = "TCFG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "TCFG(5)"

    def atom_branches(self) -> tuple[Branch, ...]:
        return (cond(), uncond())

    def evaluate(self, values: Mapping[Branch, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        c, u = values[cond()], values[uncond()]
        stacked = torch.stack([c.flatten(1), u.flatten(1)], dim=1).double()  # [B, 2, D]
        _, _, vh = torch.linalg.svd(stacked, full_matrices=False)
        v1 = vh[:, :1, :]  # [B, 1, D]
        uf = u.flatten(1).double().unsqueeze(1)
        u_proj = ((uf * v1).sum(-1, keepdim=True) * v1).reshape(u.shape).to(u.dtype)
        return u_proj + self.scale * (c - u_proj)


TCFG = TCFGTerm
