"""Validation of what enters a run: noise levels (a schedule or one call's sigma) and the
conditioning tensors of a call."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from guidekit.errors import GuidanceTypeError, GuidanceValueError

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
    if isinstance(values, (str, bytes)) or (
        isinstance(values, torch.Tensor) and values.ndim != 1 and where == "sigmas"
    ):
        got = f"a {values.ndim}-d tensor" if isinstance(values, torch.Tensor) else repr(values)
        raise GuidanceTypeError(
            f"{where} must be the sampler's noise levels as a 1-d sequence or tensor, got {got}: "
            f"pass the schedule itself (e.g. k-diffusion get_sigmas_karras(...), a diffusers "
            f"scheduler's .sigmas)"
        )
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise GuidanceTypeError(
            f"{where} must hold numbers (noise levels), got {values!r}: {err}"
        ) from None
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


def check_cond_tensors(
    conds: Mapping[str, Mapping[str, Any]], names: Iterable[str], x: Any
) -> None:
    """Refuse conditioning tensors the batched call cannot use, naming the key and the fix.

    The rows of every conditioning are concatenated into one tensor per key: tensors under
    one key must share a dtype (``torch.cat`` would promote float32 to float64 silently, or
    mix integer labels with floats, and the model then fails with torch's own message), and
    must be on ``x``'s device. Checked on metadata only (no device synchronisation).
    """
    device = x.device if isinstance(x, torch.Tensor) else None
    first: dict[str, tuple[str, torch.Tensor]] = {}
    for name in names:
        values = conds.get(name)
        # a dict's type first: isinstance against the Mapping ABC costs several calls
        if type(values) is not dict and not isinstance(values, Mapping):
            continue  # a missing or malformed conditioning is refused by the caller, by name
        for key, v in values.items():
            if not isinstance(v, torch.Tensor):
                continue
            at = f"{name}[{key!r}]"
            if device is not None and v.device != device:
                raise GuidanceValueError(
                    f"{at} is on {v.device} but x is on {device}: the model call would mix "
                    f"devices; move it first, {name}={{{key!r}: ....to({str(device)!r})}}"
                )
            seen, ref = first.setdefault(key, (name, v))
            if ref.dtype != v.dtype:
                hint = (
                    "; class labels are integers: give both as torch.long"
                    if ref.is_floating_point() != v.is_floating_point() else ""
                )
                raise GuidanceValueError(
                    f"{seen}[{key!r}] is {ref.dtype} but {at} is {v.dtype}: their rows are "
                    f"concatenated into one batched tensor, so they must share a dtype; "
                    f"convert one, e.g. {name}={{{key!r}: ....to({ref.dtype})}}{hint}"
                )


def check_first_level(
    s: float, schedule: Sequence[float] | None, where: str, above: str = ""
) -> None:
    """Refuse a run's first call at a level off the given ``schedule``, saying why.

    Before the first step there is no step for an off-schedule level to belong to. ``above``
    is the caller's hint for a level above the schedule's first (a sampler's churn).
    """
    if schedule is None or any(math.isclose(s, v, rel_tol=1e-5, abs_tol=1e-9) for v in schedule):
        return
    top = max(schedule)
    head = ", ".join(f"{v:g}" for v in list(schedule)[:4])
    if s > top and above:
        raise GuidanceValueError(
            f"{where}: the first call is at sigma={s:g}, above the first level {top:g} of the "
            f"sigmas given. {above}; or it runs another schedule: pass the very tensor the "
            f"sampler steps on as sigmas="
        )
    raise GuidanceValueError(
        f"{where}: the first call is at sigma={s:g}, which is not a level of the sigmas given "
        f"({head}, ...): the sampler runs another schedule; pass the very schedule it steps on "
        f"as sigmas= (or leave sigmas out: every new lower level is then a step)"
    )
