"""Branch parallelism: the ranks of a ``torch.distributed`` group share one step's rows.

What xDiT, sglang and vllm-omni call *CFG parallelism*: ``compile(expr, parallel=group)``
makes every model call of a forward group run on the ranks of ``group`` (``None`` or
``torch.distributed.group.WORLD``: every process), each rank computing whole branch blocks
(``B`` rows each) of the call; one ``all_gather`` then gives every rank every row, so the
combine, the post-processors and the sampler run identically on all ranks and every rank
returns the same guided output.

Which rank computes what (:func:`shares`, deterministic, the same on every rank):

* the **source** blocks of the step's observations -- the conditional rows EMAG and EMAG-Q
  average, the unconditional rows SAG takes its map from -- are computed by EVERY rank, from
  identical inputs. Each rank's attention engine then sees all of those rows, so its state
  (EMAG's averages and the layer-selection statistic, a mean over every sample) is built
  exactly as in one process, with no state sent between ranks, and an EMAG block can run on
  any rank because the rows it averages are in its call. Rank 0's copy is the one gathered.
  The layer an EMAG block used, known to every rank (each selects it from the same state),
  is recorded by the ranks that did not compute that block too, so the states agree;
* the other blocks are dealt out one at a time to the rank with the fewest (ties: the rank
  that sends fewer, then the lowest), in layout order;
* a rank with no block to compute only joins the gather.

Every rank's buffer is padded to the largest share, so a step costs one call of
``max share`` blocks plus one all_gather; ``CFG`` and ``CFG + PAG`` on two ranks run 1 and
2 blocks per rank instead of 2 and 3, ``CFG + EMAG`` 2 instead of 3.

Limits (each refused with a message): a row budget that cuts a branch's block
(``max_rows`` not a multiple of the batch) and ``max_rows="auto"`` (each rank would time,
and might choose, on its own, and the ranks' collectives would no longer match).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import torch

from guidekit.branch import COND, Branch
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.rows import RowLayout


def _dist() -> Any:
    import torch.distributed as dist  # not every torch build has it

    return dist


@attrs.frozen(eq=False)
class BranchParallel:
    """Share each model call's branch blocks among the ranks of ``group``
    (``None``: the default group)."""

    group: Any = None

    @property
    def rank(self) -> int:
        return int(_dist().get_rank(self.group))

    @property
    def world(self) -> int:
        return int(_dist().get_world_size(self.group))

    def wrap(
        self,
        plan: Any,
        models: Mapping[str, Callable[..., torch.Tensor]],
        around_call: Callable[[RowLayout], Any] | None,
    ) -> tuple[dict[str, Callable[..., torch.Tensor]], Callable[[RowLayout], Any]]:
        """The step's models and ``around_call`` as ``Plan`` calls them: the wrapped
        ``around_call`` records the call's layout, the wrapped model computes this rank's
        share under the user's ``around_call`` and gathers every rank's rows."""
        seen: list[RowLayout] = []

        @contextlib.contextmanager
        def remember(layout: RowLayout) -> Iterator[None]:
            seen.append(layout)
            try:
                yield
            finally:
                seen.pop()

        sources = _sources(plan)

        def shared(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            def call(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
                return self._call(fn, seen[-1], sources, around_call, x, sigma, kw)

            return call

        return {name: shared(fn) for name, fn in models.items()}, remember

    def _call(
        self,
        fn: Callable[..., torch.Tensor],
        layout: RowLayout,
        sources: frozenset[Branch],
        around_call: Callable[[RowLayout], Any] | None,
        x: torch.Tensor,
        sigma: torch.Tensor,
        kw: dict[str, Any],
    ) -> torch.Tensor:
        batch = layout.batch
        blocks = layout.blocks
        if layout.offset % batch or any(stop - start != batch for _, start, stop in blocks):
            raise GuidanceValueError(
                f"compile(parallel=...): a row budget cut a branch's block of {batch} rows "
                f"(a call of {layout.rows} rows from row {layout.offset}); the ranks share "
                f"whole blocks, so use max_rows=None or a multiple of the batch"
            )
        compute, send = shares(tuple(b for b, _, _ in blocks), sources, self.world)
        mine = compute[self.rank]
        out: torch.Tensor | None = None
        if mine:
            rows = torch.cat([torch.arange(blocks[i][1], blocks[i][2]) for i in mine])
            rows = rows.to(x.device)
            sub = RowLayout(
                layout.model, len(mine) * batch,
                tuple((blocks[i][0], j * batch, (j + 1) * batch) for j, i in enumerate(mine)),
                0, batch, layout.state,
            )
            args = (x.index_select(0, rows), sigma.index_select(0, rows))
            sub_kw = {k: _take(v, rows, layout.rows) for k, v in kw.items()}
            if around_call is None:
                out = fn(*args, **sub_kw)
            else:
                with around_call(sub):
                    out = fn(*args, **sub_kw)
            if not isinstance(out, torch.Tensor):
                raise GuidanceTypeError(
                    f"model {layout.model!r} returned {type(out).__name__}; branch "
                    f"parallelism gathers tensors (return the prediction tensor)"
                )
        width = max(len(s) for s in send) * batch
        like = x if out is None else out
        buf = like.new_zeros((width, *x.shape[1:]))
        if out is not None:
            for j, i in enumerate(send[self.rank]):
                k = mine.index(i)
                buf[j * batch : (j + 1) * batch] = out[k * batch : (k + 1) * batch]
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        _dist().all_gather(parts, buf, group=self.group)
        for i, (branch, _, _) in enumerate(blocks):
            elsewhere = getattr(branch.perturbation, "ran_elsewhere", None)
            if i not in mine and elsewhere is not None and layout.state is not None:
                elsewhere(layout.state)  # EMAG: the layer it used, as on the rank that ran it
        full = buf.new_empty((layout.rows, *x.shape[1:]))
        for part, owned in zip(parts, send):
            for j, i in enumerate(owned):
                full[blocks[i][1] : blocks[i][2]] = part[j * batch : (j + 1) * batch]
        return full


def shares(
    branches: tuple[Branch, ...], sources: frozenset[Branch], world: int
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """``(compute, send)``: per rank, the indices of the blocks it computes and of those it
    contributes to the gather (see the module docstring)."""
    common = [i for i, b in enumerate(branches) if b in sources]
    rest = [i for i, b in enumerate(branches) if b not in sources]
    own: list[list[int]] = [[] for _ in range(world)]
    for i in rest:
        r = min(range(world), key=lambda r: (len(own[r]), len(own[r]) + (r == 0) * len(common), r))
        own[r].append(i)
    compute = tuple(tuple(sorted(common + own[r])) for r in range(world))
    send = tuple(tuple(sorted((common if r == 0 else []) + own[r])) for r in range(world))
    return compute, send


def _sources(plan: Any) -> frozenset[Branch]:
    """Branches whose rows the step's stateful perturbations observe (EMAG's ``c``, SAG's
    ``u``): every rank computes them."""
    return frozenset(
        Branch(model=model, cond=getattr(p, "source", COND)) for p, model in plan.stateful
    )


def _take(value: Any, rows: torch.Tensor, n: int) -> Any:
    """``value`` with each tensor of ``n`` rows (at any depth of lists, tuples and dicts)
    cut to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.ndim and value.shape[0] == n else value
    if isinstance(value, Mapping):
        return type(value)({k: _take(v, rows, n) for k, v in value.items()})  # type: ignore[call-arg]
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_take(v, rows, n) for v in value)
    return value


def as_parallel(value: Any, max_rows: Any) -> BranchParallel | None:
    """``compile``'s ``parallel=`` argument as a :class:`BranchParallel` (checked)."""
    if value is None:
        return None
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise GuidanceValueError(
            "compile(parallel=...) needs torch.distributed initialised: call "
            "torch.distributed.init_process_group('gloo' or 'nccl') in every process first "
            "(torchrun sets the environment it reads)"
        )
    if max_rows == "auto" or type(max_rows).__name__ == "AutoSplit":
        raise GuidanceValueError(
            f"compile(parallel=..., max_rows={max_rows!r}): every rank would time the split "
            f"on its own and might choose another; use max_rows=None (with parallel= one call "
            f"per group, shared by the ranks), 'branch' or a fixed multiple of the batch"
        )
    if isinstance(value, BranchParallel):
        return value
    if isinstance(value, dist.ProcessGroup):
        return BranchParallel(value)
    raise GuidanceTypeError(
        f"compile(parallel={value!r}): pass a torch.distributed process group, e.g. "
        f"torch.distributed.group.WORLD, or guidekit.parallel.BranchParallel(group)"
    )


__all__ = ["BranchParallel", "as_parallel", "shares"]
