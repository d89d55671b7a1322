"""Validation of the noise levels that enter a run (a schedule or one call's sigma)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

from guidekit.errors import GuidanceValueError

#: A sigma this close (relatively) to a gate bound is that bound: float32 rounding of a float64
#: schedule moves a sigma by at most 2**-24 relatively, far less than two steps apart.
RTOL = 1e-6


def snap(sigma: float, bounds: Sequence[float], rtol: float = RTOL) -> float:
    """``sigma``, or the bound of the sorted ``bounds`` within ``rtol`` of it.

    Gates compare ``lo < sigma <= hi`` on the bound itself, so the same steps are selected
    whether the sampler hands sigmas over in float64 or rounded to float32.
    """
    i = bisect.bisect_left(bounds, sigma)
    for b in bounds[max(i - 1, 0) : i + 1]:
        if abs(sigma - b) <= rtol * abs(b):
            return float(b)
    return sigma


def check_sigmas(values: Iterable[float], where: str) -> tuple[float, ...]:
    """``values`` as floats, refusing NaN, infinite and negative noise levels.

    ``where`` names the argument (``"sigmas"`` for a schedule, ``"sigma"`` for one call). A
    NaN or an infinite level would run to the end and give NaN samples, so it stops here.
    """
    out = tuple(float(v) for v in values)
    for i, s in enumerate(out):
        at = f"{where}[{i}]" if len(out) > 1 or where == "sigmas" else where
        if math.isnan(s) or math.isinf(s):
            raise GuidanceValueError(
                f"{at} = {s}: noise levels must be finite numbers >= 0; pass the sampler's own "
                f"schedule (e.g. k-diffusion get_sigmas_karras, a diffusers scheduler's sigmas)"
            )
        if s < 0:
            raise GuidanceValueError(f"{at} = {s}: noise levels must be >= 0")
    return out
