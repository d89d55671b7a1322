"""Schedules by the run's progress ``r`` (0 noisiest -> 1 cleanest, see :mod:`.progress`).

arXiv 2404.13040 (CFG weight schedulers) writes its heuristic shapes in the diffusion time
``t / T`` (1 at pure noise); here ``t / T = 1 - r``, so its increasing shapes read:

* ``Linear(w)``: ``2 w (1 - t/T) = 2 w r``;
* ``Cosine(w)``: ``w (1 + cos(pi t/T)) = w (1 - cos(pi r))``;
* ``PowerLaw(w, p)``: ``w (p + 1) r^p`` (mean ``w`` over ``r``, as the two above;
  ``PowerLaw(w, 1) == Linear(w)`` in value, ``p = 0`` is the constant ``w``);
* ``Beta(w, a, b)``: ``w Beta(a, b).pdf(r)``, the time curve of beta-CFG (arXiv 2502.10574;
  its official code takes ``r = step / (N - 1)``, which this ``r`` equals on the schedule).

Each takes ``sigma_max`` and ``sigma_min`` to define ``r`` without the run's schedule.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs

from guidekit.errors import GuidanceValueError
from guidekit.fields import finite, nonnegative, positive_or_none, to_float
from guidekit.schedule import Schedule, register_schedule
from guidekit.text import fmt_number


class ProgressShape(Schedule):
    """A shape ``f(r)`` of the run's progress; ``sigma_max``/``sigma_min`` (both or neither)
    define ``r`` by log-sigma between them instead of by the run's schedule."""

    __slots__ = ()
    needs_progress: ClassVar[bool] = True

    def progress_free(self) -> bool:
        return self.sigma_max is not None  # type: ignore[attr-defined]

    def check_bounds(self) -> None:
        smax, smin = self.sigma_max, self.sigma_min  # type: ignore[attr-defined]
        if (smax is None) != (smin is None) or (smax is not None and not smax > smin):
            raise GuidanceValueError(
                f"{self!r}: give both sigma_max and sigma_min (sigma_max > sigma_min > 0) or "
                f"neither (then r comes from the run's schedule)"
            )

    def equals_on(self, value: float, lo: float, hi: float) -> bool:
        if value == 0 and self.is_zero():
            return True
        smax, smin = self.sigma_max, self.sigma_min  # type: ignore[attr-defined]
        if smax is None:
            return False  # any r may fall anywhere: it is the run's
        # r = 0 for every sigma >= sigma_max, r = 1 for every sigma <= sigma_min
        return (lo >= smax and self.shape(0.0) == value) or (
            hi <= smin and self.shape(1.0) == value
        )

    def at(self, level: Any) -> float:
        r = level.progress(self, self.sigma_max, self.sigma_min)  # type: ignore[attr-defined]
        return self.shape(min(1.0, max(0.0, r)))

    def shape(self, r: float) -> float:
        raise NotImplementedError

    def peaks(self) -> tuple[float, ...]:
        """Where ``shape`` may have an extreme inside ``(0, 1)`` (none: it is monotone)."""
        return ()

    def bounds(self) -> tuple[float, float]:
        values = [self.shape(r) for r in (0.0, 1.0, *self.peaks())]
        return min(values), max(values)


def _bound() -> Any:
    return attrs.field(default=None, converter=to_float, validator=positive_or_none, kw_only=True)


@register_schedule
@attrs.frozen(repr=False)
class Linear(ProgressShape):
    """``Linear(w)``: ``2 w r``, rising from 0 at the noisiest step to ``2 w`` (arXiv 2404.13040)."""

    scale: float = attrs.field(converter=to_float, validator=finite)
    sigma_max: float | None = _bound()
    sigma_min: float | None = _bound()
    _name: ClassVar[str] = "Linear"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)

    def __attrs_post_init__(self) -> None:
        self.check_bounds()

    def shape(self, r: float) -> float:
        return 2.0 * self.scale * r


@register_schedule
@attrs.frozen(repr=False)
class Cosine(ProgressShape):
    """``Cosine(w)``: ``w (1 - cos(pi r))``, from 0 at the noisiest step to ``2 w`` (arXiv 2404.13040)."""

    scale: float = attrs.field(converter=to_float, validator=finite)
    sigma_max: float | None = _bound()
    sigma_min: float | None = _bound()
    _name: ClassVar[str] = "Cosine"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)

    def __attrs_post_init__(self) -> None:
        self.check_bounds()

    def shape(self, r: float) -> float:
        return self.scale * (1.0 - math.cos(math.pi * r))


@register_schedule
@attrs.frozen(repr=False)
class PowerLaw(ProgressShape):
    """``PowerLaw(w, p)``: ``w (p + 1) r^p`` (mean ``w``; ``p = 1`` is ``Linear(w)``)."""

    scale: float = attrs.field(converter=to_float, validator=finite)
    power: float = attrs.field(default=1.0, converter=to_float, validator=nonnegative)
    sigma_max: float | None = _bound()
    sigma_min: float | None = _bound()
    _name: ClassVar[str] = "PowerLaw"
    _positional: ClassVar[tuple[str, ...]] = ("scale", "power")

    def __attrs_post_init__(self) -> None:
        self.check_bounds()

    def shape(self, r: float) -> float:
        return self.scale * (self.power + 1.0) * (r ** self.power if self.power else 1.0)


def beta_pdf(r: float, a: float, b: float) -> float:
    """The Beta(a, b) density at ``r`` in ``[0, 1]`` (``a, b >= 1``: finite everywhere)."""
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    if r <= 0.0:
        return 0.0 if a > 1.0 else math.exp(log_norm)
    if r >= 1.0:
        return 0.0 if b > 1.0 else math.exp(log_norm)
    return math.exp(log_norm + (a - 1.0) * math.log(r) + (b - 1.0) * math.log1p(-r))


def at_least_one(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    finite(instance, attribute, value)
    if value < 1:
        raise GuidanceValueError(
            f"{type(instance).__name__.removesuffix('Term')}({attribute.name}=...): {attribute.name} must be >= 1 so that the density is "
            f"finite at r = 0 and 1, got {fmt_number(value)}"
        )


@register_schedule
@attrs.frozen(repr=False)
class Beta(ProgressShape):
    """``Beta(w, a=2, b=2)``: ``w Beta(a, b).pdf(r)``, beta-CFG's curve (arXiv 2502.10574):
    zero at the first and last step for ``a, b > 1``, largest in between."""

    scale: float = attrs.field(converter=to_float, validator=finite)
    a: float = attrs.field(default=2.0, converter=to_float, validator=at_least_one)
    b: float = attrs.field(default=2.0, converter=to_float, validator=at_least_one)
    sigma_max: float | None = _bound()
    sigma_min: float | None = _bound()
    _name: ClassVar[str] = "Beta"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)

    def __attrs_post_init__(self) -> None:
        self.check_bounds()

    def shape(self, r: float) -> float:
        return self.scale * beta_pdf(r, self.a, self.b)

    def peaks(self) -> tuple[float, ...]:
        # the density's mode, (a - 1) / (a + b - 2), lies inside (0, 1) when a, b > 1
        return ((self.a - 1) / (self.a + self.b - 2),) if self.a > 1 and self.b > 1 else ()
