"""Independent condition guidance (ICG): CFG whose unconditional side is a random real condition.

https://arxiv.org/abs/2407.02687 -- ``u_r + w (c - u_r)``, ``u_r`` the model's prediction
under a condition drawn at random from the real ones (never the null condition), for models
trained without a null condition: the prediction under an independent condition estimates
the unconditional score.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from guidekit.branch import COND, Branch
from guidekit.errors import GuidanceValueError
from guidekit.fields import Examples, finite_or_schedule, name, to_float
from guidekit.registry import register
from guidekit.terms.base import LinearTerm


@register
@attrs.frozen(repr=False)
class ICGTerm(LinearTerm):
    """``ICG(w) = u_r + w (c - u_r)``: a prediction; ``u_r`` reads the pool named ``pool``.

    Pass the pool of P real conditions stacked along the first axis
    (``conds={"icg": {"y": torch.arange(10)}}``): at every sampler step each sample draws
    one of them (:mod:`guidekit.pools`: seeded by the run's seed and the step, the same for
    every call of that step). ``cond`` names the positive side.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    pool: str = attrs.field(default="icg", validator=name, kw_only=True)
    cond: str = attrs.field(default=COND, validator=name, kw_only=True)
    _name: ClassVar[str] = "ICG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "ICG(3)"
    field_examples: ClassVar[Examples] = {"cond": ("cond", "style")}

    def __attrs_post_init__(self) -> None:
        if self.pool == self.cond:
            raise GuidanceValueError(
                f"ICG(pool={self.pool!r}, cond={self.cond!r}): the pool and the positive "
                f"conditioning must have different names"
            )

    @property
    def pools(self) -> tuple[str, ...]:
        """The conditionings this term reads as pools (see :mod:`guidekit.pools`)."""
        return (self.pool,)

    def coefficients(self) -> dict[Branch, float]:
        return {Branch(cond=self.cond): self.scale, Branch(cond=self.pool): 1.0 - self.scale}

    @property
    def weight(self) -> int:
        return 1


ICG = ICGTerm
