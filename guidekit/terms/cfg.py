"""The model's own predictions and classifier-free guidance.

CFG: https://arxiv.org/abs/2207.12598 -- ``u + w (c - u)``.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from guidekit.branch import MAIN, Branch, cond, uncond
from guidekit.fields import Examples, finite, name, to_float
from guidekit.registry import register
from guidekit.terms.base import LinearTerm


@register
@attrs.frozen(repr=False)
class CondTerm(LinearTerm):
    """The conditional prediction ``c`` of ``model`` (``Cond()``)."""

    model: str = attrs.field(default=MAIN, validator=name)
    _name: ClassVar[str] = "Cond"
    _example: ClassVar[str] = "Cond()"
    field_examples: ClassVar[Examples] = {"model": ("main", "weak")}

    def coefficients(self) -> dict[Branch, float]:
        return {cond(self.model): 1.0}


@register
@attrs.frozen(repr=False)
class UncondTerm(LinearTerm):
    """The unconditional prediction ``u`` of ``model`` (``Uncond()``)."""

    model: str = attrs.field(default=MAIN, validator=name)
    _name: ClassVar[str] = "Uncond"
    _example: ClassVar[str] = "Uncond()"
    field_examples: ClassVar[Examples] = {"model": ("main", "weak")}

    def coefficients(self) -> dict[Branch, float]:
        return {uncond(self.model): 1.0}


@register
@attrs.frozen(repr=False)
class CFGTerm(LinearTerm):
    """Classifier-free guidance, https://arxiv.org/abs/2207.12598.

    ``CFG(w) = u + w (c - u)``: a prediction. ``CFG(1)`` is ``c`` (the unconditional
    branch then has coefficient 0 and is not computed); ``CFG(0)`` is ``u``.
    """

    scale: float = attrs.field(converter=to_float, validator=finite)
    _name: ClassVar[str] = "CFG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "CFG(7)"

    def coefficients(self) -> dict[Branch, float]:
        return {cond(): self.scale, uncond(): 1.0 - self.scale}

    @property
    def weight(self) -> int:
        return 1


Cond = CondTerm
Uncond = UncondTerm
CFG = CFGTerm
