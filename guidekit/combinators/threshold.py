"""Dynamic thresholding (Imagen), https://arxiv.org/abs/2205.11487, section 2.3.

On the guided x0 prediction, per sample: ``s`` is the ``percentile`` quantile of ``|x0|``
over all non-batch dims, ``s <- max(s, 1)``, and ``x0 <- clip(x0, -s, s) / s``. A sample
whose values all lie in ``[-1, 1]`` is left as it is (``s = 1``, nothing clipped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from guidekit.errors import GuidanceValueError
from guidekit.fields import Examples, Range, positive_or_none, to_float, unit_interval
from guidekit.processor import Processor
from guidekit.registry import register

if TYPE_CHECKING:
    from guidekit.context import StepContext


def _at_least_one(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    positive_or_none(instance, attribute, value)
    if value is not None and value < 1:
        raise GuidanceValueError(
            f"DynamicThreshold(max_value=...): max_value caps s, which is at least 1, so it "
            f"must be >= 1 (or None for no cap), got {value:g}"
        )


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Per row of ``[B, D]``, the ``q`` quantile with linear interpolation (as
    ``torch.quantile``, which refuses rows of more than 2^24 values)."""
    ordered = values.sort(dim=1).values
    pos = q * (values.shape[1] - 1)
    lo = int(pos)
    hi = min(lo + 1, values.shape[1] - 1)
    return ordered[:, lo] + (pos - lo) * (ordered[:, hi] - ordered[:, lo])


@register
@attrs.frozen(repr=False)
class DynamicThreshold(Processor):
    """``expr | DynamicThreshold(percentile)``: Imagen's percentile clipping of x0.

    ``max_value`` (default ``None``, the paper) also caps ``s``, as diffusers'
    ``_threshold_sample`` does with ``sample_max_value``. The paper's data lie in
    ``[-1, 1]``; a latent model's x0 has its own range (see docs/terms.md).
    """

    percentile: float = attrs.field(default=0.995, converter=to_float, validator=unit_interval)
    max_value: float | None = attrs.field(
        default=None, converter=to_float, validator=_at_least_one
    )
    space: ClassVar[str] = "x0"
    _name: ClassVar[str] = "DynamicThreshold"
    _positional: ClassVar[tuple[str, ...]] = ("percentile",)
    _example: ClassVar[str] = "DynamicThreshold(0.995)"
    field_examples: ClassVar[Examples] = {
        "percentile": (0.995, Range(0.5, 1)), "max_value": (None, Range(1, 4)),
    }

    def at_noiseless(
        self, y: torch.Tensor, ctx: StepContext, state: Any
    ) -> tuple[torch.Tensor, Any]:
        """At ``b(sigma) = 0`` the guided x0 is ``x`` itself: left as it is when the
        thresholding leaves ``x`` unchanged; otherwise the limit is infinite, refused."""
        x0 = ctx.convert(y, ctx.prediction, self.space)
        if torch.equal(self.apply(x0, ctx, state)[0], x0):
            return y, state
        raise GuidanceValueError(
            f"{self!r} at sigma = 0 (flow time t = 1): with no noise left the guided x0 is the "
            f"sample x itself, which the thresholding would clip, and no prediction of the "
            f"model's kind can express that (its velocity or noise would be infinite). Use a "
            f"solver that never evaluates at t = 1 (euler, midpoint, heun3) or end the time "
            f"grid below 1"
        )

    def apply(self, y: torch.Tensor, ctx: StepContext, state: Any) -> tuple[torch.Tensor, Any]:
        flat = y.reshape(y.shape[0], -1)
        s = quantile(flat.abs(), self.percentile).clamp_min(1.0)
        if self.max_value is not None:
            s = s.clamp_max(self.max_value)
        s = s.view(-1, *([1] * (y.ndim - 1)))
        return torch.maximum(torch.minimum(y, s), -s) / s, state
