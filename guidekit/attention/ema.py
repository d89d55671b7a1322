"""EMAG's perturbations: attention maps (or queries) replaced by their moving average.

https://arxiv.org/abs/2512.17303 (EMAG, exponential moving average guidance). For every
candidate layer ``n`` the run keeps ``E_n``, the elementwise exponential moving average
over denoising steps of the post-softmax attention map ``A_n`` of the CONDITIONAL rows
(``[B, heads, queries, keys]``, per sample and head)::

    E_n <- A_n                          at the first step
    E_n <- beta E_n + (1 - beta) A_n    after that (beta = 0.988)

The EMAG branch is the conditional pass with the map of ONE layer replaced by
``(1 - lam) A + lam E`` (``lam = 1``: hard replacement). The layer is the candidate with
the largest ``delta_n = mean |E_n - A_n|`` (over batch, heads and tokens), one layer for
the whole batch.

How guidekit runs it in the SAME batched call as ``c`` and ``u``: in each candidate layer
the conditional rows are computed with an explicit softmax (the only place the map is
materialised), which updates ``E_n`` with this step's ``A_n``; the EMAG rows of the same
call then use that updated ``E_n`` in the selected layer and the model's own fused
attention elsewhere. The layer is selected from the previous step's ``delta`` (the paper
notes this variant; the official DiT script recomputes it after the current update, which
needs a separate forward). Since ``E - A = beta (E_prev - A)``, both variants rank layers
by the same statistic; they differ by a one-step lag. At the first step nothing is
selected: ``E = A`` there, so the replacement would change nothing anyway.

EMAG-Q averages the (normalised) QUERY vectors instead of the maps: the selected layer
attends with ``(1 - lam) q + lam E_q`` and keeps fused attention; layers are selected by
``mean |E_q - q|`` in the same way (the paper does not spell out EMAG-Q's selection: this
rule is guidekit's documented choice).

The state of one run is an :class:`~guidekit.attention.ema_state.EMAState` value under the
perturbation's name in the run state, created by ``Plan.init`` and advanced once per
sampler step by ``Plan.step`` with the pure :func:`~guidekit.attention.ema_state.update`
(see :mod:`guidekit.attention.ema_state`): inside the forward this module only reads the
state and records the step's observations.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from guidekit.attention.ema_state import (
    STATE_DTYPES,
    EMAState,
    StepMemo,
    _beta,
    _float,
    _lam,
    _state_dtype,
    blend,
    check_batch,
    select,
    storage_dtype,
    update,
)
from guidekit.attention.explicit import apply_probs, attention_probs, compute_dtype, fused
from guidekit.attention.ops import (
    AttentionPerturbation,
    Layers,
    check_layers,
    fmt_layers,
    to_layers,
)
from guidekit.errors import GuidanceValueError
from guidekit.state import ForwardState

#: The paper's candidate layers: DiT-XL/2 blocks 12-15 (of 28), SD3-Medium blocks 6-8.
DIT_XL_LAYERS = (12, 13, 14, 15)
SD3_MEDIUM_LAYERS = (6, 7, 8)
#: each preset's constructor and the model it was chosen for
PRESETS = {
    DIT_XL_LAYERS: ("dit", "DiT-XL/2 (28 layers)"),
    SD3_MEDIUM_LAYERS: ("sd3", "SD3-Medium (24 layers)"),
}

# the state, its update and the explicit-softmax maths moved to ema_state.py and
# explicit.py; code imports them from here as before
__all__ = [
    "STATE_DTYPES", "EMAMapAttention", "EMAQueryAttention", "EMAState", "MovingAverage",
    "Observe", "Scope", "StepMemo", "_beta", "_float", "_lam", "_state_dtype",
    "apply_probs", "attention_probs", "fused", "select",
]


def _whole(t: torch.Tensor) -> bool:
    """Whether ``t`` is a contiguous tensor over all of its storage (not a view into a
    larger one, which keeping would keep alive)."""
    storage = t.untyped_storage()
    return (t.is_contiguous() and t.data_ptr() == storage.data_ptr()
            and t.numel() * t.element_size() == storage.nbytes())


@attrs.define(eq=False)
class Scope:
    """Where a stateful perturbation is being evaluated: the layer, the step's forward
    state, and the sampler-batch index of the first row handed to ``attend``."""

    path: str
    state: ForwardState
    sample: int


# hashed at every call (the step's inputs and memos are keyed by it): the hash is kept
@attrs.frozen(repr=False, cache_hash=True)
class MovingAverage(AttentionPerturbation):
    """Base of EMAG's perturbations (maps or queries): state, observation, selection.

    ``layers`` are the CANDIDATE layers; ``None`` means :meth:`default_layers`.
    """

    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    beta: float = attrs.field(default=0.988, converter=_float, validator=_beta)
    lam: float = attrs.field(default=1.0, converter=_float, validator=_lam)
    state_dtype: str = attrs.field(default="float32", validator=_state_dtype)
    stateful: ClassVar[bool] = True
    #: joint attention (SD3): the image-query rows are averaged and replaced
    joint: ClassVar[bool] = True
    #: what is averaged: "map" (post-softmax probabilities) or "query"
    averages: ClassVar[str] = "map"
    #: the name ``repr`` shows
    label: ClassVar[str] = "EMA"
    #: the name of this perturbation's state in the run state (:mod:`guidekit.state`)
    state_name: ClassVar[str] = "EMA"

    # -- defaults -------------------------------------------------------------------------
    @staticmethod
    def default_layers(paths: tuple[str, ...], architecture: str = "") -> tuple[str, ...]:
        """The paper's candidates scaled to ``len(paths)`` blocks, at least one: for SD3
        blocks 6-8 of 24 (``[6/24, 9/24)`` of the depth), otherwise its DiT-XL/2 choice,
        blocks 12-15 of 28 (``[12/28, 16/28)``)."""
        n = len(paths)
        if architecture.startswith("SD3"):
            lo, hi = round(6 * n / 24), round(9 * n / 24)
        else:
            lo, hi = round(12 * n / 28), round(16 * n / 28)
        if hi <= lo:
            hi = lo + 1
        return paths[min(lo, n - 1) : min(hi, n)]

    def check_model(self, count: int, architecture: str) -> None:
        """Refuse a preset's candidate layers on a model too shallow for them (checked
        when the engine is built), naming the preset, the model's depth and the fix."""
        preset = PRESETS.get(self.layers)  # type: ignore[arg-type]
        indices = [i for i in self.layers or () if isinstance(i, int)]
        if preset is None or all(-count <= i < count for i in indices):
            return
        ctor, source = preset
        raise GuidanceValueError(
            f"{self!r}: layers={self.layers} is the {self.state_name}.{ctor}(...) preset, the "
            f"paper's {source} candidates, but this {architecture} has {count} attention "
            f"layer{'s' if count != 1 else ''} (0..{count - 1}): pass layers= that this model "
            f"has, e.g. {self.state_name}.{ctor}(..., layers=None) for the paper's choice "
            f"scaled to its depth"
        )

    # -- run state ------------------------------------------------------------------------
    def init_state(self) -> EMAState:
        return EMAState()

    def selected(self, state: EMAState | None, candidates: tuple[str, ...]) -> str | None:
        """The layer the perturbed rows use at a step that starts from ``state``."""
        if state is None:
            return None
        return select(state.delta, candidates)

    def note_selection(self, fs: ForwardState, path: str | None) -> None:
        """Record the layer this step selected (the engine calls it with every call)."""
        fs.memo(self, StepMemo).selected = path

    def ran_elsewhere(self, fs: ForwardState) -> None:
        """This step's perturbed rows ran on another rank (branch parallelism): they used
        the selected layer there, so this rank's state says the same."""
        memo: StepMemo = fs.memo(self, StepMemo)
        memo.used = memo.selected

    def commit(self, state: EMAState, memo: StepMemo | None) -> EMAState:
        """The next state from this step's observations: the pure
        :func:`~guidekit.attention.ema_state.update` (``None``: nothing observed)."""
        return update(state, memo, self.beta)

    # -- inside the forward: read the state, record observations --------------------------
    def _observe(self, scope: Scope, current: torch.Tensor) -> None:
        """Record this step's ``current`` (maps or queries of the conditional rows starting
        at ``scope.sample``) as an observation; the state itself is not touched."""
        fs = scope.state
        memo: StepMemo = fs.memo(self, StepMemo)
        rows = current.shape[0]
        lo, hi = scope.sample, scope.sample + rows
        shape = (fs.batch, *current.shape[1:])
        check_batch(self, scope.path, fs.inputs[self].ema.get(scope.path), shape)
        buf = memo.observed.get(scope.path)
        dtype = storage_dtype(self.state_dtype, current.dtype)
        if buf is None and lo == 0 and rows == fs.batch and current.dtype == dtype \
                and _whole(current):
            # the whole batch in one call (the usual case) and a tensor of its own (a map
            # made by this call's softmax): kept as it is, no buffer to fill
            memo.observed[scope.path] = current.detach() if current.requires_grad else current
            memo.seen[scope.path] = memo.seen.get(scope.path, 0) + rows
            memo.batch = fs.batch
            return
        if buf is None:
            buf = memo.observed[scope.path] = torch.empty(
                shape, dtype=dtype, device=current.device,
            )
        buf[lo:hi] = current.detach()
        memo.seen[scope.path] = memo.seen.get(scope.path, 0) + rows
        memo.batch = fs.batch

    def _average(self, scope: Scope, rows: int) -> torch.Tensor:
        """This step's average of layer ``scope.path`` for the perturbed rows: the state's
        average blended with this step's observation of the same samples."""
        memo: StepMemo | None = scope.state.memos.get(self)
        buf = None if memo is None else memo.observed.get(scope.path)
        lo, hi = scope.sample, scope.sample + rows
        if buf is None or memo is None or memo.seen.get(scope.path, 0) < hi:
            raise GuidanceValueError(
                f"{self!r}: the perturbed rows of layer {scope.path!r} ran before the "
                f"conditional rows they average (samples {lo}..{hi - 1}); the plan lays the "
                f"conditional branch out first, so a custom around_call reordered the rows"
            )
        memo.used = scope.path
        held = scope.state.inputs[self].ema.get(scope.path)
        if lo == 0 and hi == memo.batch == buf.shape[0]:  # the whole batch: update reuses it
            average = memo.averages[scope.path] = blend(held, buf, self.beta)
            return average
        return blend(None if held is None else held[lo:hi], buf[lo:hi], self.beta)

    def __repr__(self) -> str:
        parts = [] if self.layers is None else [fmt_layers(self.layers)]
        if self.beta != 0.988:
            parts.append(f"beta={self.beta:g}")
        if self.lam != 1.0:
            parts.append(f"lam={self.lam:g}")
        if self.state_dtype != "float32":
            parts.append(f"state_dtype={self.state_dtype!r}")
        return f"{self.label}({', '.join(parts)})"


@attrs.frozen(repr=False, cache_hash=True)
class EMAMapAttention(MovingAverage):
    """EMAG's perturbation: the selected layer's attention map becomes
    ``(1 - lam) A + lam E`` (see the module docstring)."""

    averages: ClassVar[str] = "map"
    label: ClassVar[str] = "EMAMap"
    state_name: ClassVar[str] = "EMAG"

    def observe(
        self, scope: Scope, probs: torch.Tensor, query: torch.Tensor,
        image: tuple[int, int] | None = None,
    ) -> None:
        self._observe(scope, probs)

    def attend(
        self,
        query: torch.Tensor | None,
        key: torch.Tensor | None,
        value: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
        scope: Scope | None = None,
        image: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        assert query is not None and key is not None and scope is not None
        average = self._average(scope, query.shape[0])
        if self.lam == 1.0:
            probs = average
        else:
            probs = attention_probs(query, key, scale=scale, mask=mask)
            probs = probs.mul(1.0 - self.lam).add_(average, alpha=self.lam)
        if image is not None:
            # joint attention: the image-query rows (image and text columns) were replaced;
            # renormalise them, as the paper does (a no-op up to round-off when every
            # column is replaced, as here)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return apply_probs(probs, value, query.shape[-3] if query.ndim >= 4 else None)


@attrs.frozen(repr=False, cache_hash=True)
class EMAQueryAttention(MovingAverage):
    """EMAG-Q's perturbation: the selected layer attends with ``(1 - lam) q + lam E_q``,
    the moving average of the conditional rows' queries; attention stays fused."""

    averages: ClassVar[str] = "query"
    label: ClassVar[str] = "EMAQuery"
    state_name: ClassVar[str] = "EMAGQ"

    def observe(
        self, scope: Scope, probs: torch.Tensor | None, query: torch.Tensor,
        image: tuple[int, int] | None = None,
    ) -> None:
        self._observe(scope, query)

    def attend(
        self,
        query: torch.Tensor | None,
        key: torch.Tensor | None,
        value: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
        scope: Scope | None = None,
        image: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        assert query is not None and key is not None and scope is not None
        average = self._average(scope, query.shape[0])
        q = average if self.lam == 1.0 else query.to(compute_dtype(query.dtype)).mul(
            1.0 - self.lam
        ).add_(average, alpha=self.lam)
        return fused(q.to(query.dtype), key, value, scale=scale, mask=mask)


@attrs.frozen(cache_hash=True)
class Observe(AttentionPerturbation):
    """Not a perturbation: the conditional rows of a candidate layer, computed as the model
    would (explicit softmax only when a map is averaged) while EMAG's averages watch."""

    watchers: tuple[MovingAverage, ...]
    layers: Layers = None
    stateful: ClassVar[bool] = True
    joint: ClassVar[bool] = True

    @property  # (a cached_property breaks torch.compile's graph here)
    def needs_map(self) -> bool:
        return any(w.averages == "map" for w in self.watchers)

    #: its rows' output is the layer's own attention: the fused path runs them with the
    #: layer's other plain rows and calls :meth:`watch` only (guidekit.attention.fused)
    observes_only: ClassVar[bool] = True

    def watch(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
        scope: Scope | None = None,
        image: tuple[int, int] | None = None,
    ) -> torch.Tensor | None:
        """Record these rows for the watchers (their map, made explicitly, where one is
        averaged); returns the map (``None`` where only queries are averaged)."""
        assert scope is not None
        probs = attention_probs(query, key, scale=scale, mask=mask) if self.needs_map else None
        for w in self.watchers:
            w.observe(scope, probs, query, image=image)  # type: ignore[attr-defined]
        return probs

    def attend(
        self,
        query: torch.Tensor | None,
        key: torch.Tensor | None,
        value: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
        scope: Scope | None = None,
        image: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        assert query is not None and key is not None and scope is not None
        probs = self.watch(query, key, mask=mask, scale=scale, scope=scope, image=image)
        if probs is not None:
            return apply_probs(probs, value, query.shape[-3] if query.ndim >= 4 else None)
        return fused(query, key, value, scale=scale, mask=mask)
