"""Validation of the noise levels that enter a run (a schedule or one call's sigma)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from guidekit.errors import GuidanceValueError


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
