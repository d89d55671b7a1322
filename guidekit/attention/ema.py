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

The state of one run is an :class:`EMAState` value, created by ``Plan.init`` and advanced
once per sampler step by ``Plan.step`` (see :mod:`guidekit.state`). Buffers may be kept in
float16 / bfloat16 (``state_dtype``) to halve their memory; the arithmetic is float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F

from guidekit.attention.ops import (
    AttentionPerturbation,
    Layers,
    check_layers,
    fmt_layers,
    to_layers,
)
from guidekit.errors import GuidanceValueError
from guidekit.state import ForwardState

STATE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """What one step's forward has built so far (per perturbation)."""

    ema: dict[str, torch.Tensor] = attrs.field(factory=dict)
    seen: dict[str, int] = attrs.field(factory=dict)
    abs_sum: dict[str, torch.Tensor] = attrs.field(factory=dict)
    count: dict[str, int] = attrs.field(factory=dict)
    used: str | None = None


def select(delta: Mapping[str, float], candidates: tuple[str, ...]) -> str | None:
    """The candidate with the largest ``delta`` (ties: the first in layer order)."""
    best, best_value = None, -1.0
    for path in candidates:
        value = delta.get(path)
        if value is not None and value > best_value:
            best, best_value = path, value
    return best


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The post-softmax map ``softmax(q k^T scale + mask)`` in float32, ``[..., Q, K]``.

    A boolean mask keeps the ``True`` positions (as ``scaled_dot_product_attention``); a
    float mask is added to the logits. Fewer key heads than query heads are shared.
    """
    key = _share_heads(key, query.shape[-3]) if query.ndim >= 3 and key.ndim >= 3 else key
    s = query.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * s
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    return logits.softmax(dim=-1)


def _share_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    if t.ndim < 4 or t.shape[-3] == heads:
        return t
    if heads % t.shape[-3]:
        raise GuidanceValueError(f"{heads} query heads cannot share {t.shape[-3]} key/value heads")
    return t.repeat_interleave(heads // t.shape[-3], dim=-3)


def apply_probs(probs: torch.Tensor, value: torch.Tensor, heads: int | None) -> torch.Tensor:
    """``probs @ value`` in the value's dtype (value heads shared as in grouped queries)."""
    if heads is not None:
        value = _share_heads(value, heads)
    return torch.matmul(probs.to(value.dtype), value)


def fused(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
    scale: float | None, mask: torch.Tensor | None,
) -> torch.Tensor:
    """The model's usual fused attention of these rows."""
    if query.ndim >= 4 and key.shape[-3] != query.shape[-3]:
        key, value = _share_heads(key, query.shape[-3]), _share_heads(value, query.shape[-3])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


@attrs.define(eq=False)
class Scope:
    """Where a stateful perturbation is being evaluated: the layer, the step's forward
    state, and the sampler-batch index of the first row handed to ``attend``."""

    path: str
    state: ForwardState
    sample: int


@attrs.frozen(repr=False)
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

    # -- run state ------------------------------------------------------------------------
    def init_state(self) -> EMAState:
        return EMAState()

    def selected(self, state: EMAState | None, candidates: tuple[str, ...]) -> str | None:
        """The layer the perturbed rows use at a step that starts from ``state``."""
        if state is None:
            return None
        return select(state.delta, candidates)

    def commit(self, state: EMAState, memo: StepMemo | None) -> EMAState:
        """The next state from this step's observations (``None``: nothing observed)."""
        if memo is None:
            return state
        ema = dict(state.ema)
        ema.update(memo.ema)
        delta = dict(state.delta)
        for path, total in memo.abs_sum.items():
            delta[path] = float(total) / max(memo.count[path], 1)
        return EMAState(ema=ema, delta=delta, used=memo.used, steps=state.steps + 1)

    # -- inside the forward ---------------------------------------------------------------
    def _observe(self, scope: Scope, current: torch.Tensor) -> None:
        """Fold this step's ``current`` (maps or queries of the conditional rows starting at
        ``scope.sample``) into the average; record ``|E - current|`` for the selection."""
        fs = scope.state
        memo: StepMemo = fs.memo(self, StepMemo)
        state: EMAState = fs.inputs[self]
        rows = current.shape[0]
        lo, hi = scope.sample, scope.sample + rows
        prev = state.ema.get(scope.path)
        cur = current.detach().float()
        if prev is None:
            new = cur
        else:
            if prev.shape[1:] != cur.shape[1:] or prev.shape[0] != fs.batch:
                raise GuidanceValueError(
                    f"{self!r}: layer {scope.path!r} has shape {list(cur.shape[1:])} at this step "
                    f"but {list(prev.shape[1:])} before (batch {prev.shape[0]} vs {fs.batch}): "
                    f"the batch or image size changed within one run; call plan.init() again"
                )
            new = prev[lo:hi].float().mul(self.beta).add_(cur, alpha=1.0 - self.beta)
        buf = memo.ema.get(scope.path)
        if buf is None:
            buf = memo.ema[scope.path] = torch.empty(
                (fs.batch, *cur.shape[1:]), dtype=STATE_DTYPES[self.state_dtype],
                device=cur.device,
            )
        buf[lo:hi] = new
        # kept on the device: one host sync per step, at commit, not one per layer
        diff = (new - cur).abs().sum()
        prev_sum = memo.abs_sum.get(scope.path)
        memo.abs_sum[scope.path] = diff if prev_sum is None else prev_sum + diff
        memo.count[scope.path] = memo.count.get(scope.path, 0) + cur.numel()
        memo.seen[scope.path] = memo.seen.get(scope.path, 0) + rows

    def _average(self, scope: Scope, rows: int) -> torch.Tensor:
        """This step's average of layer ``scope.path`` for the perturbed rows (float32)."""
        memo: StepMemo | None = scope.state.memos.get(self)
        buf = None if memo is None else memo.ema.get(scope.path)
        lo, hi = scope.sample, scope.sample + rows
        if buf is None or memo is None or memo.seen.get(scope.path, 0) < hi:
            raise GuidanceValueError(
                f"{self!r}: the perturbed rows of layer {scope.path!r} ran before the "
                f"conditional rows they average (samples {lo}..{hi - 1}); the plan lays the "
                f"conditional branch out first, so a custom around_call reordered the rows"
            )
        memo.used = scope.path
        return buf[lo:hi].float()

    def __repr__(self) -> str:
        parts = [] if self.layers is None else [fmt_layers(self.layers)]
        if self.beta != 0.988:
            parts.append(f"beta={self.beta:g}")
        if self.lam != 1.0:
            parts.append(f"lam={self.lam:g}")
        if self.state_dtype != "float32":
            parts.append(f"state_dtype={self.state_dtype!r}")
        return f"{self.label}({', '.join(parts)})"


@attrs.frozen(repr=False)
class EMAMapAttention(MovingAverage):
    """EMAG's perturbation: the selected layer's attention map becomes
    ``(1 - lam) A + lam E`` (see the module docstring)."""

    averages: ClassVar[str] = "map"
    label: ClassVar[str] = "EMAMap"

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


@attrs.frozen(repr=False)
class EMAQueryAttention(MovingAverage):
    """EMAG-Q's perturbation: the selected layer attends with ``(1 - lam) q + lam E_q``,
    the moving average of the conditional rows' queries; attention stays fused."""

    averages: ClassVar[str] = "query"
    label: ClassVar[str] = "EMAQuery"

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
        q = average if self.lam == 1.0 else query.float().mul(1.0 - self.lam).add_(
            average, alpha=self.lam
        )
        return fused(q.to(query.dtype), key, value, scale=scale, mask=mask)


@attrs.frozen
class Observe(AttentionPerturbation):
    """Not a perturbation: the conditional rows of a candidate layer, computed as the model
    would (explicit softmax only when a map is averaged) while EMAG's averages watch."""

    watchers: tuple[MovingAverage, ...]
    layers: Layers = None
    stateful: ClassVar[bool] = True
    joint: ClassVar[bool] = True

    @property
    def needs_map(self) -> bool:
        return any(w.averages == "map" for w in self.watchers)

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
        probs = None
        if self.needs_map:
            probs = attention_probs(query, key, scale=scale, mask=mask)
            out = apply_probs(probs, value, query.shape[-3] if query.ndim >= 4 else None)
        else:
            out = fused(query, key, value, scale=scale, mask=mask)
        for w in self.watchers:
            w.observe(scope, probs, query, image=image)  # type: ignore[attr-defined]
        return out
