"""The model's own predictions and classifier-free guidance.

CFG: https://arxiv.org/abs/2207.12598 -- ``u + w (c - u)``.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from guidekit.branch import COND, MAIN, UNCOND, Branch, uncond
from guidekit.errors import GuidanceValueError
from guidekit.fields import Examples, finite_or_schedule, name, to_float
from guidekit.registry import register
from guidekit.terms.base import LinearTerm
from guidekit.text import display_name


def check_distinct(term: object, cond: str, negative: str) -> None:
    """Refuse a guidance between one conditioning and itself (a zero ``c - n``)."""
    if cond == negative:
        raise GuidanceValueError(
            f"{display_name(type(term))}(cond={cond!r}, negative={negative!r}): the two conditionings "
            f"are the same, so the guidance (c - n) is zero; name two different ones"
        )


@register
@attrs.frozen(repr=False)
class CondTerm(LinearTerm):
    """The conditional prediction of ``model`` under the conditioning named ``cond``.

    ``Cond()`` is ``c`` (the conditioning ``cond``); ``Cond("style")`` is the prediction
    under the conditioning passed as ``style`` (``conds={"style": ...}``, or
    ``prompts={"style": ...}`` in the diffusers adapter).
    """

    cond: str = attrs.field(default=COND, validator=name)
    model: str = attrs.field(default=MAIN, validator=name, kw_only=True)
    _name: ClassVar[str] = "Cond"
    _positional: ClassVar[tuple[str, ...]] = ("cond",)
    _example: ClassVar[str] = "Cond()"
    field_examples: ClassVar[Examples] = {"cond": ("cond", "style"), "model": ("main", "weak")}

    def coefficients(self) -> dict[Branch, float]:
        return {Branch(model=self.model, cond=self.cond): 1.0}


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
    ``CFG(w, cond="a", negative="neg")`` guides from the conditioning ``neg`` (a negative
    prompt in place of the empty one) toward ``a``: ``n + w (c_a - n)``.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    cond: str = attrs.field(default=COND, validator=name, kw_only=True)
    negative: str = attrs.field(default=UNCOND, validator=name, kw_only=True)
    _name: ClassVar[str] = "CFG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "CFG(7)"
    field_examples: ClassVar[Examples] = {
        "cond": ("cond", "style"), "negative": ("uncond", "neg"),
    }

    def __attrs_post_init__(self) -> None:
        check_distinct(self, self.cond, self.negative)

    def coefficients(self) -> dict[Branch, float]:
        c, n = Branch(cond=self.cond), Branch(cond=self.negative)
        return {c: self.scale, n: 1.0 - self.scale}

    @property
    def weight(self) -> int:
        return 1


Cond = CondTerm
Uncond = UncondTerm
CFG = CFGTerm
