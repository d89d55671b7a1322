"""Condition-annealed diffusion sampler (CADS), https://arxiv.org/abs/2310.17347.

Noise goes into the CONDITIONING (an embedding), not the image. With ``t`` from 1 (noise) to 0:

1. ``gamma(t) = 1`` if ``t <= tau1``; ``(tau2 - t) / (tau2 - tau1)`` if ``tau1 < t < tau2``;
   ``0`` if ``t >= tau2``
2. ``y_hat = sqrt(gamma) y + s sqrt(1 - gamma) n``, ``n ~ N(0, I)`` (seeded)
3. ``y_r = (y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y)``;
   ``y_out = psi y_r + (1 - psi) y_hat``

``t`` comes from the plan's noise convention (:meth:`guidekit.Noise.t`): the flow time
``sigma`` for rectified flow, the DDPM time for VE/VP models.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.fields import Examples, Range, nonnegative, to_float, unit_interval
from guidekit.processor import InputModifier
from guidekit.registry import register
from guidekit.text import fmt_value

if TYPE_CHECKING:
    from guidekit.context import StepContext


def _names(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise GuidanceTypeError(
            f"CADS({attribute.name}=...): expected a tuple of names such as ('cond',), "
            f"got {value!r}"
        )


def _to_names(value: Any) -> Any:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


@register
@attrs.frozen(repr=False)
class CADSAnnealing(InputModifier):
    """``expr | CADS(tau1, tau2, noise_scale, psi)``: anneal the conditioning of ``expr``'s branches.

    ``keys`` picks the conditioning tensors (default: every floating-point tensor);
    ``conds`` picks the conditionings (default: every one the plan uses, cond and uncond,
    as EMAG's SD3 code does). Noise is seeded by the run's seed and the step index, so a
    sampler that calls the model twice in a step sees the same noise.
    """

    tau1: float = attrs.field(default=0.6, converter=to_float, validator=unit_interval)
    tau2: float = attrs.field(default=0.9, converter=to_float, validator=unit_interval)
    noise_scale: float = attrs.field(default=0.1, converter=to_float, validator=nonnegative)
    psi: float = attrs.field(default=1.0, converter=to_float, validator=unit_interval)
    keys: tuple[str, ...] | None = attrs.field(default=None, converter=_to_names, validator=_names)
    conds: tuple[str, ...] | None = attrs.field(
        default=None, converter=_to_names, validator=_names
    )
    _name: ClassVar[str] = "CADS"
    _example: ClassVar[str] = "CADS(tau1=0.6, tau2=0.9, noise_scale=0.1)"
    field_examples: ClassVar[Examples] = {
        "noise_scale": Range(0, 0.5), "keys": (None, ("emb",)),
        "conds": (None, ("cond",), ("cond", "uncond")),
    }

    def __attrs_post_init__(self) -> None:
        if not self.tau1 < self.tau2:
            raise GuidanceValueError(
                f"CADS(tau1={fmt_value(self.tau1)}, tau2={fmt_value(self.tau2)}): tau1 must be "
                f"below tau2 (t runs from 1 = noise to 0 = data; noise is added for t > tau1)"
            )

    def gamma(self, t: float) -> float:
        if t <= self.tau1:
            return 1.0
        if t >= self.tau2:
            return 0.0
        return (self.tau2 - t) / (self.tau2 - self.tau1)

    def anneal(
        self, y: torch.Tensor, gamma: float, noise: torch.Tensor
    ) -> torch.Tensor:
        """Steps 2 and 3 for one tensor whose first axis is the batch."""
        y_hat = math.sqrt(gamma) * y + self.noise_scale * math.sqrt(1.0 - gamma) * noise
        if self.psi == 0:
            return y_hat
        dims = tuple(range(1, y.ndim))
        # a sample whose y_hat is constant (noise_scale 0 where gamma is 0) has no spread to
        # rescale: it keeps mean(y) rather than 0 / 0 = NaN
        spread = y_hat.std(dims, keepdim=True)
        spread = torch.where(spread > 0, spread, torch.ones_like(spread))
        y_r = (y_hat - y_hat.mean(dims, keepdim=True)) / spread
        y_r = y_r * y.std(dims, keepdim=True) + y.mean(dims, keepdim=True)
        return self.psi * y_r + (1.0 - self.psi) * y_hat

    def noise_for(self, ctx: StepContext, cond: str, key: str, like: torch.Tensor) -> torch.Tensor:
        tag = zlib.crc32(f"{cond}/{key}".encode())
        seed = (ctx.seed * 1_000_003 + ctx.level * 7919 + tag) % (2**63 - 1)
        gen = torch.Generator().manual_seed(seed)
        n = torch.randn(like.shape, generator=gen, dtype=torch.float32)
        return n.to(device=like.device, dtype=like.dtype)

    def modify(
        self, conds: Mapping[str, Mapping[str, Any]], ctx: StepContext
    ) -> dict[str, dict[str, Any]]:
        gamma = self.gamma(ctx.noise.t(ctx.sigma))
        out: dict[str, dict[str, Any]] = {}
        for cname, mapping in conds.items():
            mapping = dict(mapping)
            if self.conds is None or cname in self.conds:
                # keys are checked at every step, so a wrong key fails at the first call,
                # not at the first step where the noise starts
                keys = self._keys(cname, mapping)
                if gamma < 1.0:
                    for key in keys:
                        value = mapping[key]
                        mapping[key] = self.anneal(
                            value, gamma, self.noise_for(ctx, cname, key, value)
                        )
            out[cname] = mapping
        return out

    def _keys(self, cname: str, mapping: dict[str, Any]) -> tuple[str, ...]:
        keys = self.keys
        if keys is None:
            keys = tuple(
                k for k, v in mapping.items()
                if isinstance(v, torch.Tensor) and v.is_floating_point()
            )
            if not keys:
                raise GuidanceTypeError(
                    f"{self!r}: conditioning {cname!r} has no floating-point tensor to anneal "
                    f"(keys: {', '.join(mapping) or 'none'}). CADS adds noise to embeddings: "
                    f"pass the embedding (e.g. the class embedding) instead of integer labels"
                )
        for key in keys:
            value = mapping.get(key)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise GuidanceTypeError(
                    f"{self!r}: conditioning {cname!r} key {key!r} is "
                    f"{'missing' if value is None else type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}; "
                    f"CADS needs a floating-point embedding tensor there"
                )
        return keys


CADS = CADSAnnealing
