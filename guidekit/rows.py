"""One model call's rows: forward groups, the row layout of a call, and the conditioning
concatenated for (and sliced out of) the batched call.

Row layout (fixed and documented): forward groups in the order ``main`` first, then other
models by first appearance in the expression. Within a group, the branches that run at a
step are laid out unperturbed first -- ``cond``, then ``uncond``, then other conditionings --
then perturbed ones; every branch is a block of ``B`` rows (the sampler's batch).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from guidekit.branch import Branch
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.state import ForwardState


@attrs.frozen
class ForwardGroup:
    """The branches of one model that run together as one batched call.

    ``stage`` 1 marks a DEPENDENT group: its branches' inputs are made from the outputs of
    the stage-0 groups of the same step (SAG's degraded input), so it runs after them, as
    a second call.
    """

    model: str
    branches: tuple[Branch, ...]
    stage: int = 0

    # read at every call: made once per group (the fields are frozen)
    @functools.cached_property
    def branch_labels(self) -> tuple[str, ...]:
        return tuple(b.label for b in self.branches)

    @functools.cached_property
    def labels(self) -> str:
        return " ".join(self.branch_labels)

    @functools.cached_property
    def conds(self) -> tuple[str, ...]:
        """Each branch's conditioning name, in layout order."""
        return tuple(b.cond for b in self.branches)

    @functools.cached_property
    def split_key(self) -> str:
        """The name a splitter keys its decisions by: the model and its active branches."""
        return f"{self.model} [{self.labels}]"

    @functools.cached_property
    def title(self) -> str:
        """``main [c u]``, or ``main (2nd call) [u[SAG...]]`` for a dependent group."""
        return f"{self.model}{' (2nd call)' if self.stage else ''} [{self.labels}]"


@attrs.frozen
class CallRecord:
    """One model call made by ``Plan.step``: for tests, logs and benchmarks."""

    model: str
    rows: int
    branches: tuple[str, ...]
    sigma: float
    step: int
    #: how the group was split: "one call", "per branch", "N-row calls", "+ (trial)" while
    #: the auto split is still timing (not part of equality: the same call whatever the policy)
    split: str = attrs.field(default="", eq=False)
    #: how conditionings of different token lengths share the call (guidekit/padding.py):
    #: "padded ...", "repeated ...", "separate call i of n (...)"; "" where nothing differed
    tokens: str = attrs.field(default="", eq=False)


@attrs.frozen
class RowLayout:
    """Which rows of one model call belong to which branch: ``(branch, start, stop)`` blocks.

    Passed to ``around_call`` so that code running inside the forward (an attention
    engine, for example) can treat each branch's rows differently. ``offset`` is the call's
    first row within its forward group (non-zero only when a row budget splits the group)
    and ``batch`` the sampler's batch ``B``, so row ``r`` of a block is sample
    ``(r + offset) % batch``. ``state`` is the step's :class:`~guidekit.state.ForwardState`
    (not part of equality: equal layouts route rows alike whatever the state).
    """

    model: str
    rows: int
    blocks: tuple[tuple[Branch, int, int], ...]
    offset: int = 0
    batch: int = 0
    state: Any = attrs.field(default=None, eq=False, hash=False, repr=False)

    def sample(self, row: int) -> int:
        """Index in the sampler's batch of the call's row ``row``."""
        return (row + self.offset) % self.batch if self.batch else row


def stateless(layout: RowLayout) -> RowLayout:
    """``layout`` without its step state (equal to it): a cache key that keeps nothing of
    the step alive."""
    if layout.state is None:
        return layout
    return RowLayout(layout.model, layout.rows, layout.blocks, layout.offset, layout.batch)


def layout_rows(
    group: ForwardGroup, batch: int, lo: int, hi: int, state: ForwardState | None = None
) -> RowLayout:
    blocks = []
    for i, branch in enumerate(group.branches):
        start, stop = max(i * batch, lo), min((i + 1) * batch, hi)
        if start < stop:
            blocks.append((branch, start - lo, stop - lo))
    return RowLayout(group.model, hi - lo, tuple(blocks), lo, batch, state)


def concat_conds(
    names: Sequence[str], conds: Mapping[str, Mapping[str, Any]], batch: int
) -> dict[str, Any]:
    """Concatenate each named conditioning's tensors along the batch axis, in order."""
    dicts = []
    for n in names:
        if n not in conds:
            raise GuidanceValueError(
                f"the plan needs the conditioning {n!r} but got only "
                f"{', '.join(map(repr, conds)) or 'none'}: pass {n}=... (a dict of tensors)"
            )
        dicts.append(conds[n])
    first_name, first = names[0], dicts[0]
    for n, d in zip(names[1:], dicts[1:]):
        if d.keys() != first.keys():
            raise GuidanceValueError(
                f"conditionings {first_name!r} and {n!r} have different keys "
                f"({sorted(first)} vs {sorted(d)}): they must match so their rows share a batch"
            )
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            for n, d in zip(names, dicts):
                v = d[key]
                if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != batch:
                    got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise GuidanceValueError(
                        f"conditioning {n!r} key {key!r} has shape {got}: its first axis must "
                        f"be the batch, B = x.shape[0] = {batch}"
                    )
                if v.shape[1:] != value.shape[1:]:
                    raise GuidanceValueError(
                        f"conditionings {first_name!r} and {n!r} differ at key {key!r}: shape "
                        f"{list(value.shape)} vs {list(v.shape)}; pad or mask them to the same "
                        f"shape so their rows share one batch (token sequences [B, L, C] of "
                        f"different L run as separate calls, or share one under "
                        f"tokens=guidekit.Tokens({key!r}, mask=...))"
                    )
            out[key] = value if len(dicts) == 1 else torch.cat([d[key] for d in dicts])
        else:
            for n, d in zip(names[1:], dicts[1:]):
                if d[key] is not value and d[key] != value:
                    raise GuidanceValueError(
                        f"conditionings {first_name!r} and {n!r} differ at non-tensor key "
                        f"{key!r}; only tensors may differ between rows"
                    )
            out[key] = value
    return out


def slice_conds(cond_rows: Mapping[str, Any], lo: int, hi: int) -> dict[str, Any]:
    return {k: v[lo:hi] if isinstance(v, torch.Tensor) else v for k, v in cond_rows.items()}


def check_output(out: Any, model: str, rows: int, x_rows: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise GuidanceTypeError(
            f"model {model!r} returned {type(out).__name__}; the custom-sampler API needs a "
            f"tensor (wrap the model, e.g. lambda *a, **k: model(*a, **k).sample)"
        )
    if out.shape != x_rows.shape:
        raise GuidanceValueError(
            f"model {model!r} returned shape {list(out.shape)} for {rows} rows; expected "
            f"{list(x_rows.shape)} (the shape of its input x)"
        )
