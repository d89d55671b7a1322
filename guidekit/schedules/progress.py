"""Where a step stands: its noise level and the run's progress ``r`` from noise (0) to clean (1).

Shapes such as ``Cosine`` and ``Beta`` are written in a progress ``r`` in ``[0, 1]``. guidekit
defines ``r`` BY NOISE LEVEL, in one direction: ``r = 0`` at the noisiest level of the run,
``r = 1`` at the cleanest.

* With the run's schedule known (``plan.init(sigmas=...)``, ``guide(..., sigmas=...)``, the
  k-diffusion, flow and diffusers adapters), the schedule's positive levels
  ``s_0 > s_1 > ... > s_{N-1}`` give ``r(s_i) = i / (N - 1)`` -- the step fraction the
  official beta-CFG code uses -- and a level between two of them (a sampler's midpoint) is
  placed between their indices linearly in ``log sigma``; above ``s_0`` is 0, below
  ``s_{N-1}`` (and sigma 0) is 1. A one-level schedule is ``r = 0``.
* A shape given ``sigma_max`` and ``sigma_min`` uses them instead, with no schedule needed:
  ``r = log(sigma_max / sigma) / log(sigma_max / sigma_min)``, clamped to ``[0, 1]``.
* Otherwise ``r`` is undefined and the plan refuses the step, naming the term and the fix.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import attrs

from guidekit.errors import GuidanceValueError


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)


@attrs.frozen
class Level:
    """One step's noise level ``sigma`` and the run's schedule ``sigmas`` (``None``: unknown)."""

    sigma: float
    sigmas: tuple[float, ...] | None = None
    #: the progress used where ``sigmas`` is unknown (``None``: refuse); ``print(plan)`` and
    #: other structural views with no run use 1/2
    fallback: float | None = None

    def progress(self, owner: Any, sigma_max: float | None, sigma_min: float | None) -> float:
        """``r`` for ``owner`` (a schedule shape, named in the error) at this level."""
        if sigma_max is not None and sigma_min is not None:
            return log_progress(self.sigma, sigma_max, sigma_min)
        if self.sigmas is None:
            if self.fallback is not None:
                return self.fallback
            raise needs_sigmas(owner)
        return schedule_progress(self.sigma, self.sigmas)


def needs_sigmas(owner: Any) -> GuidanceValueError:
    """The error for a progress shape used where the run's schedule is unknown."""
    return GuidanceValueError(
        f"{owner!r} needs the run's progress r (0 at the noisiest step, 1 at the cleanest), "
        f"and the run's noise levels are not known here: pass the sampler's schedule "
        f"(plan.init(seed, sigmas=...), guide(..., sigmas=...), reset(sigmas=...)) or give the "
        f"shape its own bounds, e.g. sigma_max=14.6, sigma_min=0.03"
    )


def log_progress(sigma: float, sigma_max: float, sigma_min: float) -> float:
    """``r`` between two noise levels, linear in ``log sigma`` and clamped to ``[0, 1]``."""
    if sigma <= sigma_min:
        return 1.0
    if sigma >= sigma_max:
        return 0.0
    return math.log(sigma_max / sigma) / math.log(sigma_max / sigma_min)


def schedule_progress(sigma: float, sigmas: tuple[float, ...]) -> float:
    """``r`` of ``sigma`` on the run's schedule: ``i / (N - 1)`` at its ``i``-th positive level."""
    steps = sorted((s for s in sigmas if s > 0), reverse=True)
    n = len(steps)
    if n <= 1:
        return 0.0
    if sigma >= steps[0] or _close(sigma, steps[0]):
        return 0.0
    if sigma <= steps[-1] or _close(sigma, steps[-1]):
        return 1.0
    ascending = steps[::-1]
    j = bisect.bisect_left(ascending, sigma)  # ascending[j - 1] < sigma <= ascending[j]
    hi, lo = ascending[j], ascending[j - 1]
    i = n - 1 - j  # index of hi in the descending schedule
    if _close(sigma, hi):
        return i / (n - 1)
    if _close(sigma, lo):
        return (i + 1) / (n - 1)
    frac = math.log(hi / sigma) / math.log(hi / lo)
    return (i + frac) / (n - 1)
