"""EMAG's run state and its transition: a typed value and a pure update.

One run's state of one EMAG perturbation is an :class:`EMAState` (each candidate layer's
moving average ``E``, each layer's selection statistic, the layer used, the steps seen). It
lives in the run's :class:`~guidekit.State` under the perturbation's name (``"EMAG"``,
``"EMAGQ"``, ``"EMAG#2"``...). During a step the attention engine only READS it and hands
the step's observations back (:class:`StepMemo`: this step's maps or queries of the
conditional rows); ``Plan.step`` then computes the next state with :func:`update`, a pure
function of the state and the observations, and commits it by name::

    E_n <- A_n                          at the first step
    E_n <- beta E_n + (1 - beta) A_n    after that
    delta_n = mean |E_n - A_n|

``delta_n`` is each sample's mean over heads and tokens, averaged over the samples whose
value is finite: with every sample finite this is the paper's pooled mean, and a sample
that went non-finite (a NaN in its input) neither switches EMAG off for the others nor
changes which layer they use.

Averages are stored in ``state_dtype`` (float16 / bfloat16 halve their memory); the default
``"float32"`` is at least the model's precision, so a float64 model keeps float64 averages.
The arithmetic runs in float32, or float64 for a float64 model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from guidekit.attention.explicit import compute_dtype
from guidekit.errors import GuidanceValueError

STATE_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _state_dtype(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in STATE_DTYPES:
        raise GuidanceValueError(
            f"{type(instance).__name__}(state_dtype=...) must be one of "
            f"{', '.join(map(repr, STATE_DTYPES))}, got {value!r}"
        )


def _beta(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, float) or not 0.0 <= value < 1.0:
        raise GuidanceValueError(
            f"{type(instance).__name__}(beta=...) must be a number in [0, 1), got {value!r} "
            f"(the paper uses 0.988)"
        )


def _lam(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, float) or not 0.0 < value <= 1.0:
        raise GuidanceValueError(
            f"{type(instance).__name__}(lam=...) must be a number in (0, 1], got {value!r} "
            f"(1 replaces the map by its average, the paper's default)"
        )


def _float(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def storage_dtype(state_dtype: str, observed: torch.dtype) -> torch.dtype:
    """The dtype averages are kept in: ``state_dtype``, raised to float64 for a float64
    model when it is the default ``"float32"``."""
    if state_dtype == "float32" and observed == torch.float64:
        return torch.float64
    return STATE_DTYPES[state_dtype]


@attrs.frozen
class EMAState:
    """One run's EMAG state for one perturbation.

    ``ema``: each candidate layer's average (``[B, heads, Q, K]`` maps or ``[B, heads, Q,
    d]`` queries) in the state dtype; ``delta``: each layer's ``mean |E - A|`` of the last
    committed step, which selects the next step's layer; ``used``: the layer the EMAG rows
    used at that step (``None``: none); ``steps``: steps observed.
    """

    ema: Mapping[str, torch.Tensor] = attrs.field(factory=dict, eq=False)
    delta: Mapping[str, float] = attrs.field(factory=dict)
    used: str | None = None
    steps: int = 0

    @property
    def nbytes(self) -> int:
        """Memory held by the averages."""
        return sum(t.numel() * t.element_size() for t in self.ema.values())


@attrs.define(eq=False)
class StepMemo:
    """One step's observations of one EMAG perturbation, handed back to ``Plan.step``.

    ``observed``: each candidate layer's maps (or queries) of the conditional rows, ``[B,
    ...]`` in the storage dtype, filled sample by sample as the step's calls run; ``seen``:
    samples filled per layer; ``used``: the layer whose average the perturbed rows used;
    ``batch``: the sampler's batch ``B``.
    """

    observed: dict[str, torch.Tensor] = attrs.field(factory=dict)
    seen: dict[str, int] = attrs.field(factory=dict)
    used: str | None = None
    #: the sampler's batch ``B`` of the step
    batch: int = 0
    #: the layer the step selected for the perturbed rows (the engine notes it at every
    #: call): under branch parallelism a rank whose share has none of those rows still
    #: commits the ``used`` of the rank that ran them (guidekit.parallel)
    selected: str | None = None
    #: this step's blended average of a layer, when the perturbed rows computed it for the
    #: whole batch at once (``update`` takes it instead of blending the same maps again)
    averages: dict[str, torch.Tensor] = attrs.field(factory=dict)


def select(delta: Mapping[str, float], candidates: tuple[str, ...]) -> str | None:
    """The candidate with the largest ``delta`` (ties: the first in layer order; a
    non-finite ``delta`` is never selected)."""
    best, best_value = None, -1.0
    for path in candidates:
        value = delta.get(path)
        if value is not None and value > best_value:
            best, best_value = path, value
    return best


def blend(previous: torch.Tensor | None, current: torch.Tensor, beta: float) -> torch.Tensor:
    """This step's average: ``current`` at the first step, then ``beta E + (1 - beta) A``,
    in :func:`~guidekit.attention.explicit.compute_dtype`."""
    dtype = compute_dtype(current.dtype)
    if previous is None:
        return current.to(dtype)
    return previous.to(dtype).mul(beta).add_(current.to(dtype), alpha=1.0 - beta)


def spread(average: torch.Tensor, current: torch.Tensor) -> float:
    """``mean |E - A|``: each sample's mean, averaged over the finite ones (NaN if none)."""
    current = current.to(average.dtype)
    # every sample has as many entries, so the mean of the per-sample means is the mean over
    # all entries: one fused |E - A| sum (one operator, where sub, abs and a per-sample mean
    # are four) is the usual case; the per-sample means only when some sample is not finite
    whole = float(torch.dist(average, current, p=1)) / max(1, average.numel())
    if math.isfinite(whole):
        return whole
    per_sample = (average - current).abs().flatten(1).mean(dim=1)
    finite = per_sample[torch.isfinite(per_sample)]
    return float(finite.mean()) if finite.numel() else float("nan")


def check_batch(owner: Any, path: str, held: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """Refuse a step whose maps (or queries) do not match the averages held (``owner``:
    the perturbation, named in the message)."""
    if held is not None and tuple(held.shape) != shape:
        raise GuidanceValueError(
            f"{owner!r}: layer {path!r} gives {list(shape)} (batch, heads, tokens...) at this "
            f"step, but the average held has {list(held.shape)}: the batch or image size "
            f"changed within one run; start a new run (plan.init() / reset())"
        )


def update(state: EMAState, memo: StepMemo | None, beta: float) -> EMAState:
    """The next state from ``state`` and one step's observations (``None``: nothing seen)."""
    if memo is None:
        return state
    ema = dict(state.ema)
    delta = dict(state.delta)
    for path, current in memo.observed.items():
        seen = memo.seen.get(path, 0)
        if seen != memo.batch:
            raise GuidanceValueError(
                f"EMAG observed {seen} of the {memo.batch} samples in layer {path!r} this step: "
                f"every call of a step must run through the attention engine"
            )
        average = memo.averages.get(path)
        if average is None:
            average = blend(state.ema.get(path), current, beta)
        delta[path] = spread(average, current)
        ema[path] = average.to(current.dtype)
    return EMAState(ema=ema, delta=delta, used=memo.used, steps=state.steps + 1)
