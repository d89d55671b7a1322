"""``KDiffusionGuided.sample``: reading a k-diffusion sampler call for CFG++.

A CFG++ step (https://arxiv.org/abs/2406.08070) depends on the sampler's step -- which
sampler, and for ``sample_euler_ancestral`` its ``eta`` -- and a denoiser handed to
the sampler never sees that call. ``guided.sample(fn, x, sigmas, **kwargs)`` does: it binds
the call to ``fn``'s signature (the arguments given, else the function's own defaults, so
``functools.partial`` works too), names the sampler from the function and reads the
settings the re-noising needs. What it cannot make a CFG++ step is refused by name:
another function, ``s_churn > 0``, a sampler without a schedule.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

import torch

from guidekit.errors import GuidanceTypeError, GuidanceValueError

from ._frames import calling_frame

#: k-diffusion's sampler functions whose step guidekit makes a CFG++ step, by name
FUNCTIONS = {
    "sample_euler": "euler", "sample_euler_ancestral": "euler_ancestral",
    "sample_dpmpp_2m": "dpmpp_2m",
}
MODULE = "k_diffusion.sampling"


def function_name(fn: Callable[..., Any]) -> str:
    """``module.name`` of a sampler function (through ``functools.partial``)."""
    base = fn.func if isinstance(fn, functools.partial) else fn
    module, name = getattr(base, "__module__", None), getattr(base, "__name__", None)
    return f"{module}.{name}" if module and name else repr(fn)


def bind(fn: Callable[..., Any], model: Any, x: Any, args: tuple[Any, ...],
         kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The call ``fn(model, x, *args, **kwargs)`` by parameter, defaults filled in."""
    try:
        bound = inspect.signature(fn).bind(model, x, *args, **kwargs)
    except TypeError as e:
        raise GuidanceTypeError(
            f"KDiffusionGuided.sample({function_name(fn)}, ...): {e}; the call is "
            f"sample(fn, x, *args, **kwargs) for fn(model, x, *args, **kwargs)"
        ) from None
    except ValueError:  # a builtin without a signature: nothing to read
        return {}
    bound.apply_defaults()
    return dict(bound.arguments)


def cfgpp_settings(fn: Callable[..., Any], call: Mapping[str, Any], term: Any) -> tuple[str, float | None]:
    """``(sampler, eta)`` for the renoiser, from a bound k-diffusion sampler call; refuses a
    function or setting guidekit cannot make a CFG++ step."""
    name = function_name(fn)
    module, _, short = name.rpartition(".")
    where = f"KDiffusionGuided.sample({name}, ...)"
    if module != MODULE or short not in FUNCTIONS:
        raise GuidanceValueError(
            f"{where}: {term!r} re-noises inside the sampler's step, which guidekit makes a "
            f"CFG++ step for {', '.join(f'{MODULE}.{n}' for n in FUNCTIONS)}; {name} is none "
            f"of them. Sample with one of those, or use CFG"
        )
    sampler = FUNCTIONS[short]
    if sampler == "euler" and float(call.get("s_churn", 0.0)):
        raise GuidanceValueError(
            f"{where}: s_churn={call['s_churn']:g} raises each step's level before calling "
            f"the model, which is not a CFG++ step of the schedule; sample with s_churn=0"
        )
    # s_noise only scales the ancestral noise both steps add: any value is exact
    eta = float(call["eta"]) if sampler == "euler_ancestral" else None
    return sampler, eta


def sampler_sigmas(depth: int = 32) -> tuple[str, list[float]] | None:
    """``(sampler name, its sigmas)`` of the ``k_diffusion.sampling`` sampler calling the
    model now, or ``None`` when none is on the stack (``sample_dpm_fast`` and
    ``sample_dpm_adaptive`` have no schedule to read).

    A denoiser handed to a sampler never sees the sampler's schedule; read from the
    sampler's frame once per run, it lets the adapter refuse a schedule whose levels the
    sampler does not step on (a refined schedule's extra levels would otherwise read as
    DPM-2 midpoints, and the state advance on a subset of the steps)."""
    def is_sampler(frame: FrameType) -> bool:
        code = frame.f_code
        return (code.co_name.startswith("sample_") and frame.f_globals.get("__name__") == MODULE
                and "sigmas" in code.co_varnames[: code.co_argcount])

    frame = calling_frame(is_sampler, depth)
    sigmas = None if frame is None else frame.f_locals.get("sigmas")
    if frame is None or not isinstance(sigmas, torch.Tensor):
        return None
    return frame.f_code.co_name, [float(v) for v in sigmas.detach().flatten().tolist()]


def off_schedule(sampler: list[float], schedule: tuple[float, ...]) -> list[float]:
    """The sampler's levels above 0 that are not in ``schedule`` (relative 1e-5)."""
    def known(s: float) -> bool:
        return any(math.isclose(s, t, rel_tol=1e-5, abs_tol=1e-8) for t in schedule)

    return [s for s in sampler if s > 0 and not known(s)]


__all__ = ["FUNCTIONS", "bind", "cfgpp_settings", "function_name", "off_schedule",
           "sampler_sigmas"]
