"""ControlNet residuals for named prompts: the named rows ride in the pipeline's ControlNet call.

A ControlNet pipeline computes its residuals from the prompt's embeddings, so a named
conditioning (``prompts={"neg": ...}``) needs residuals of its own. For the ``guided`` block
the ControlNet's call is wrapped: each call the pipeline makes (its CFG batch, or the
conditional rows) gets, in the same batched ControlNet call, one more block of ``B`` rows per
named prompt -- the conditional rows with the named prompt's embeddings in place of the
prompt's (:class:`~._diffusers_prompts.NamedPrompts`), the control image and SDXL's time ids
as they are. The pipeline gets its own rows back; the denoiser call that follows hands each
named row block the residuals computed for it.

``guess_mode`` (residuals for the conditional rows only, zeros for the unconditional ones)
has no rule for a named conditioning, so it is refused with named prompts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from guidekit.compiled import current_call, forward_class
from guidekit.errors import GuidanceValueError

from ._diffusers_call import read_call
from ._diffusers_prompts import NamedPrompts
from ._diffusers_rows import fill, take_apart

#: per-row ControlNet inputs a prompt does not decide: a named block takes the conditional rows'
CONTROL_FOLLOW = ("controlnet_cond", "controlnet_mode")


def _tree(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor, through tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        parts = [_tree(v, fn) for v in value]
        return parts if isinstance(value, list) else type(value)(parts)
    if isinstance(value, dict):
        return {k: _tree(v, fn) for k, v in value.items()}
    return value


def _leaves(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _tree(value, found.append)
    return found


class ControlNetRows:
    """The wrapped ControlNet call of one ``guided`` block (installed as its ``forward``)."""

    def __init__(
        self, module: torch.nn.Module, prompts: NamedPrompts, batch: Callable[[], int | None]
    ) -> None:
        self.prompts = prompts
        self._batch = batch
        self._orig = current_call(module)
        params = list(inspect.signature(forward_class(module).forward).parameters.values())
        self._signature = inspect.Signature(params[1:])
        self.rows: int | None = None  # rows of the pipeline's last ControlNet call
        self._own: list[torch.Tensor] = []  # the conditional rows of each output tensor
        self._named: dict[str, list[torch.Tensor]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = self._batch()
        names = self.prompts.names
        if not self.prompts.in_call or self.prompts.own is None or batch is None:
            return self._orig(*args, **kwargs)
        call = read_call(self._signature, args, kwargs)
        n = call.rows
        if n not in (batch, 2 * batch):
            raise GuidanceValueError(
                f"the ControlNet got {n} rows for a batch of {batch} samples; guided(prompts=...) "
                f"expects {batch} or {2 * batch} (the CFG batch [uncond, cond])"
            )
        c = slice(n - batch, n)  # [uncond, cond] or the conditional rows alone
        parts = take_apart(call.arguments, call.x_name, n, batch)
        cond = {p: v[c] for p, v in parts.rows.items()}
        follow = {p for p in cond if p.split(".")[0] in CONTROL_FOLLOW}
        uncond = {p: v[:batch] for p, v in parts.rows.items()} if n == 2 * batch else None
        named = self.prompts.conds(
            {p: v for p, v in cond.items() if p not in follow}, names, uncond=uncond
        )
        values: dict[str, Any] = {}
        for p, v in parts.rows.items():
            values[p] = torch.cat([v, *(named[m].get(p, cond[p]) for m in names)])
        for p, v in parts.shared.items():
            values[p] = torch.cat([v, *[v[c]] * len(names)])
        kwargs = fill(parts.template, values)
        kwargs[call.x_name] = torch.cat([call.x, *[call.x[c]] * len(names)])
        out = self._orig(**kwargs)
        total = n + batch * len(names)

        def rows(lo: int, hi: int) -> Callable[[torch.Tensor], Any]:
            return lambda t: t[lo:hi] if t.ndim >= 1 and t.shape[0] == total else t

        self.rows = n
        self._own = _leaves(_tree(out, rows(n - batch, n)))
        self._named = {
            m: _leaves(_tree(out, rows(n + i * batch, n + (i + 1) * batch)))
            for i, m in enumerate(names)
        }
        return _tree(out, rows(0, n))

    def lookup(self, name: str, value: torch.Tensor) -> torch.Tensor | None:
        """The residual of the named block ``name`` for the denoiser input whose conditional
        rows are ``value`` (``None``: not a residual of the last ControlNet call)."""
        for own, named in zip(self._own, self._named.get(name, [])):
            if own.shape == value.shape and torch.equal(own.to(value), value):
                return named.to(value)
        return None

    def check(self, rows: int) -> None:
        """Refuse a denoiser call of ``rows`` rows after a ControlNet call of other rows."""
        if self.rows is not None and self.rows != rows:
            raise GuidanceValueError(
                f"the ControlNet ran on {self.rows} rows but the denoiser on {rows} "
                f"(guess_mode=True: residuals for the conditional rows only), which has no "
                f"rule for the named conditionings of guided(prompts=...): call the pipeline "
                f"with guess_mode=False, or leave prompts= out"
            )
