"""Autoguidance: guide with a weaker version of the same model.

https://arxiv.org/abs/2406.02507 -- ``d0 + w (d1 - d0)`` with ``d1`` the main model and ``d0``
a weaker model given the SAME conditioning. In guidekit's additive convention the guidance
direction is ``s (c - c_weak)``, so the paper's prediction is ``Cond() + Autoguidance(w - 1)``.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from guidekit.branch import Branch, cond
from guidekit.fields import Examples, finite_or_schedule, name, to_float
from guidekit.registry import register
from guidekit.terms.base import DirectionTerm


@register
@attrs.frozen(repr=False)
class AutoguidanceTerm(DirectionTerm):
    """``scale * (c - c_weak)``; ``c_weak`` is the conditional prediction of ``model``.

    The weak model is its own forward group: it runs as a separate call with its own rows.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    model: str = attrs.field(default="weak", validator=name)
    _name: ClassVar[str] = "Autoguidance"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "Autoguidance(2, model='weak')"
    field_examples: ClassVar[Examples] = {"model": ("weak", "small")}

    def __attrs_post_init__(self) -> None:
        from guidekit.branch import MAIN
        from guidekit.errors import GuidanceValueError

        if self.model == MAIN:
            raise GuidanceValueError(
                "Autoguidance(model='main') would guide the model with itself (a zero "
                "direction): name the weak model, e.g. Autoguidance(2, model='weak')"
            )

    def negative(self) -> Branch:
        return cond(self.model)


Autoguidance = AutoguidanceTerm
