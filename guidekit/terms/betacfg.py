"""beta-CFG: classifier-free guidance with a Beta-density time curve and a normalised direction.

https://arxiv.org/abs/2502.10574 -- ``u + w Beta(a, b).pdf(r) (c - u) / ||c - u||^gamma``,
the norm per sample over all non-batch dimensions. ``r`` is guidekit's progress by noise
level (:mod:`guidekit.schedules.progress`: 0 at the noisiest step, 1 at the cleanest; on
the run's schedule ``r = step / (N - 1)``, as the official code), or log-sigma between
``sigma_max`` and ``sigma_min`` when given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from guidekit.branch import Branch, cond, uncond
from guidekit.fields import Examples, finite_or_schedule, nonnegative, positive_or_none, to_float
from guidekit.registry import register
from guidekit.schedules import Beta, Level
from guidekit.schedules.curves import at_least_one
from guidekit.terms.base import NonlinearPrediction

if TYPE_CHECKING:
    from guidekit.context import StepContext


@register
@attrs.frozen(repr=False)
class BetaCFGTerm(NonlinearPrediction):
    """``u + w Beta(a, b).pdf(r) (c - u) / ||c - u||^gamma`` per sample, https://arxiv.org/abs/2502.10574.

    With ``a, b > 1`` the guidance is 0 at the first and last step and largest in between
    (``a = b = 2``: at ``r = 1/2``, ``1.5 w``). ``gamma = 0`` (the default) leaves the
    direction unnormalised; ``gamma = 1`` makes it a unit vector per sample. Runs in the
    model's own prediction space. ``scale`` may itself be a schedule.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    a: float = attrs.field(default=2.0, converter=to_float, validator=at_least_one)
    b: float = attrs.field(default=2.0, converter=to_float, validator=at_least_one)
    gamma: float = attrs.field(default=0.0, converter=to_float, validator=nonnegative)
    sigma_max: float | None = attrs.field(
        default=None, converter=to_float, validator=positive_or_none, kw_only=True
    )
    sigma_min: float | None = attrs.field(
        default=None, converter=to_float, validator=positive_or_none, kw_only=True
    )
    _name: ClassVar[str] = "BetaCFG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "BetaCFG(7, a=2, b=2)"
    # the laws step plans without the run's schedule: give them bounds so r is defined
    field_examples: ClassVar[Examples] = {
        "a": (1.0, 2.0, 3.5), "b": (1.0, 2.0, 1.5), "gamma": (0.0, 0.5, 1.0),
        "sigma_max": (20.0,), "sigma_min": (0.05,),
    }

    def __attrs_post_init__(self) -> None:
        self.curve()  # checks the bounds (both or neither, sigma_max > sigma_min)

    def curve(self) -> Beta:
        """The time curve ``w Beta(a, b).pdf(r)`` as a schedule value."""
        scale = self.scale if isinstance(self.scale, float) else 1.0
        return Beta(scale, self.a, self.b, sigma_max=self.sigma_max, sigma_min=self.sigma_min)

    def implicit_schedules(self) -> tuple[Any, ...]:
        """The schedule the plan must be able to evaluate (the run's progress, see
        :func:`guidekit.schedules.steps.scheduled_parts`)."""
        return (self.curve(),)

    def atom_branches(self) -> tuple[Branch, ...]:
        return (cond(), uncond())

    def evaluate(self, values: Mapping[Branch, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        c, u = values[cond()], values[uncond()]
        where = ctx.where if ctx.where is not None else Level(ctx.sigma)
        k = self.curve().at(where)
        d = c - u
        if self.gamma:
            dims = tuple(range(1, d.ndim))
            norm = d.double().square().sum(dims, keepdim=True).sqrt().clamp_min(1e-12)
            d = d / norm.pow(self.gamma).to(d.dtype)
        return u + k * d


BetaCFG = BetaCFGTerm
