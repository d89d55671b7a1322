"""Running a step's forward groups: row inputs, the split into calls, timing, call records.

``Plan.step`` hands each forward group here. A group's rows are ``x`` repeated once per
branch (or, for a dependent group, each branch's prepared input), ``sigma`` as a ``[rows]``
tensor and the conditionings concatenated in layout order; the splitter decides how many
rows go into each model call, is told how long the group took while it is deciding, and each
call is recorded with how the group was split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import Any

import attrs
import torch

from guidekit.branch import Branch
from guidekit.errors import GuidanceValueError
from guidekit.padding import Tokens, share
from guidekit.program import Program
from guidekit.rows import (
    CallRecord,
    ForwardGroup,
    RowLayout,
    check_output,
    concat_conds,
    layout_rows,
    slice_conds,
)
from guidekit.spaces import Noise
from guidekit.split import Splitter, now, split_label, sync
from guidekit.state import ForwardState

ModelFn = Callable[..., torch.Tensor]


def group_key(group: ForwardGroup) -> str:
    """The name a splitter keys its decisions by: the model and its active branches."""
    return group.split_key


def _x_rows(
    group: ForwardGroup, x: torch.Tensor, sigma: float, native: Mapping[Branch, torch.Tensor],
    forward_state: ForwardState | None, prediction: str, noise: Noise,
) -> torch.Tensor:
    k = len(group.branches)
    if not group.stage:
        # cat of k references: the same rows as x.repeat, a fraction of its dispatch cost
        return x if k == 1 else torch.cat([x] * k)
    return torch.cat([
        b.perturbation.prepare(  # type: ignore[union-attr]
            x, sigma, native, forward_state, prediction, noise, b
        ) if getattr(b.perturbation, "dependent", False) else x
        for b in group.branches
    ])


def run_groups(
    prog: Program,
    x: torch.Tensor,
    sigma: float,
    conds: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, ModelFn],
    split: Splitter,
    *,
    prediction: str,
    noise: Noise,
    on_call: Callable[[CallRecord], None] | None = None,
    level: int = 0,
    around_call: Callable[[RowLayout], ContextManager[Any]] | None = None,
    forward_state: ForwardState | None = None,
    tokens: Sequence[Tokens] = (),
    shared: dict[str, str] | None = None,
    whole: list[torch.Tensor] | None = None,
) -> dict[Branch, torch.Tensor]:
    """Every forward group of ``prog`` in order; returns each branch's output rows (and
    appends each group's output, all its rows in layout order, to ``whole`` where the group
    ran as one part).

    A group whose conditionings cannot share one call (token lengths differ, and ``tokens``
    declares no padding or exact repetition that brings them together) runs as one call per
    shape (:func:`guidekit.padding.share`); what was done is each call's
    ``CallRecord.tokens`` and ``shared[group title]``."""
    batch = x.shape[0]
    native: dict[Branch, torch.Tensor] = {}
    for group in prog.groups:
        model = models.get(group.model)
        if model is None:
            raise GuidanceValueError(
                f"the plan needs a model named {group.model!r} (for "
                f"{', '.join(b.label for b in group.branches)}): pass "
                f"models={{{group.model!r}: ...}}"
            )
        parts = share(group.conds, conds, tokens)
        for part in parts:
            sub = group if len(parts) == 1 else attrs.evolve(
                group, branches=tuple(group.branches[i] for i in part.indices)
            )
            if shared is not None:  # what the group's last step did, for print(plan)
                if part.how:
                    shared[sub.title] = part.how
                elif shared:  # (the title is built only when there is one to forget)
                    shared.pop(sub.title, None)
            full = _run_group(
                sub, model, x, sigma, part.conds, split, native, part.how,
                prediction=prediction, noise=noise, on_call=on_call, level=level,
                around_call=around_call, forward_state=forward_state,
            )
            # one split (one operator) gives every branch's rows, the same views as slices
            # (split_with_sizes itself: Tensor.split is a Python wrapper around it)
            if whole is not None and len(parts) == 1:
                whole.append(full)
            k = len(sub.branches)
            rows = full.split_with_sizes([batch] * k) if k > 1 else (full,)
            for branch, rows_of in zip(sub.branches, rows):
                native[branch] = rows_of
    return native


def _run_group(
    group: ForwardGroup, model: ModelFn, x: torch.Tensor, sigma: float,
    conds: Mapping[str, Mapping[str, Any]], split: Splitter,
    native: Mapping[Branch, torch.Tensor], tokens: str, *, prediction: str, noise: Noise,
    on_call: Callable[[CallRecord], None] | None, level: int,
    around_call: Callable[[RowLayout], ContextManager[Any]] | None,
    forward_state: ForwardState | None,
) -> torch.Tensor:
    """One forward group's rows through the model, in the splitter's calls."""
    batch = x.shape[0]
    rows = len(group.branches) * batch
    key = group.split_key
    x_rows = _x_rows(group, x, sigma, native, forward_state, prediction, noise)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    sig_rows = torch.full((rows,), sigma, dtype=dtype, device=x.device)
    cond_rows = concat_conds(group.conds, conds, batch)
    measure = getattr(split, "measure", None)
    # the memory budget's measurement, while it has none for this group (a context to
    # enter; None once it has one)
    meter = measure(key, rows, batch, x.device) if measure is not None else None
    with meter if meter is not None else nullcontext():
        chunk = split.chunk(key, rows, batch)
        deciding = getattr(split, "deciding", None)
        timed = deciding(key, rows, batch) if deciding is not None else split.timing
        how = split_label(rows, batch, chunk) + (" (trial)" if timed else "")
        clock = getattr(split, "clock", now)
        start = clock() if timed else 0.0
        outs = []
        for lo in range(0, rows, chunk):
            hi = min(lo + chunk, rows)
            whole = (lo, hi) == (0, rows)
            sub = cond_rows if whole else slice_conds(cond_rows, lo, hi)
            xs = x_rows if whole else x_rows[lo:hi]
            sig = sig_rows if whole else sig_rows[lo:hi]
            if around_call is None:
                out = model(xs, sig, **sub)
            else:
                with around_call(layout_rows(group, batch, lo, hi, forward_state)):
                    out = model(xs, sig, **sub)
            check_output(out, group.model, hi - lo, xs)
            outs.append(out)
            if on_call is not None:
                labels = group.branch_labels if whole else group.branch_labels[
                    lo // batch : (hi - 1) // batch + 1
                ]
                on_call(CallRecord(group.model, hi - lo, labels, sigma, level, how, tokens))
        full = outs[0] if len(outs) == 1 else torch.cat(outs)
        if timed:
            sync(full)
            split.observe(key, rows, batch, chunk, clock() - start)
        return full
