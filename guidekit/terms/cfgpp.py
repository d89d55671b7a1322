"""CFG++: manifold-constrained classifier-free guidance, https://arxiv.org/abs/2406.08070.

A CFG++ step takes the denoised estimate from the guided prediction and re-noises it with
the UNCONDITIONAL one. In the k-diffusion (variance-exploding) Euler form, with ``u`` and
``c`` the noise predictions::

    x0     = x - sigma (u + lam (c - u))
    x_next = x0 + sigma_next u

with ``lam`` in ``[0, 1]`` (the paper's range: the guided estimate interpolates between
the unconditional and the conditional one and never extrapolates). One such step is a CFG
Euler step with ``w = lam sigma / (sigma - sigma_next)``.

The prediction alone cannot say this: the sampler's step must use ``u`` for the re-noising.
``CFGpp(lam)`` is therefore its own kind of term (``"sampler"``): its value is the
prediction ``u + lam (c - u)`` that the denoised estimate comes from, and only a run that
steps the sampler's re-noising may evaluate it (see :mod:`guidekit.renoise`, which lists
the samplers that do and checks how the term composes). Direction terms added to it
(``CFGpp(0.6) + PAG(2)``) add to the denoised estimate; the re-noising stays ``u``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import attrs
import torch

from guidekit.branch import COND, UNCOND, Branch
from guidekit.errors import GuidanceValueError
from guidekit.fields import Examples, name, to_float, unit_interval_or_schedule
from guidekit.registry import register
from guidekit.terms.base import NonlinearPrediction

if TYPE_CHECKING:
    from guidekit.context import StepContext


@register
@attrs.frozen(repr=False)
class CFGppTerm(NonlinearPrediction):
    """CFG++, https://arxiv.org/abs/2406.08070: ``x0`` from ``n + lam (c - n)``, re-noised with ``n``.

    ``n`` is the unconditional prediction (or the one under ``negative``). Linear in its
    branches, but a nonlinear atom of the plan so that ``n`` is computed at every step, also
    at ``lam = 1`` where its coefficient in the prediction is zero: the sampler needs it to
    re-noise.
    """

    scale: float = attrs.field(converter=to_float, validator=unit_interval_or_schedule)
    cond: str = attrs.field(default=COND, validator=name, kw_only=True)
    negative: str = attrs.field(default=UNCOND, validator=name, kw_only=True)
    _name: ClassVar[str] = "CFGpp"
    _kind: ClassVar[str] = "sampler"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "CFGpp(0.6)"
    field_examples: ClassVar[Examples] = {
        "scale": (0.0, 0.6, 1.0), "cond": ("cond", "style"), "negative": ("uncond", "neg"),
    }

    def __attrs_post_init__(self) -> None:
        if self.cond == self.negative:
            raise GuidanceValueError(
                f"CFGpp(cond={self.cond!r}, negative={self.negative!r}): the two conditionings "
                f"are the same, so the guidance (c - n) is zero; name two different ones"
            )

    @property
    def renoise(self) -> Branch:
        """The branch the sampler re-noises with."""
        return Branch(cond=self.negative)

    def atom_branches(self) -> tuple[Branch, ...]:
        return (Branch(cond=self.cond), self.renoise)

    def evaluate(self, values: Mapping[Branch, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        c, n = values[Branch(cond=self.cond)], values[self.renoise]
        return n + self.scale * (c - n)


CFGpp = CFGppTerm
