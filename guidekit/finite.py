"""NaN and inf in a run: the model's outputs and the guided output, reported where they appear.

A non-finite value in one branch's rows (an fp16 overflow in the unconditional rows, a
perturbation that breaks the attention at one step) would otherwise flow through the combine,
the processors and every later step, and the sampler would return NaN images without a word.
:class:`StepWatch` keeps each model call's output and, once the guided output exists, checks
them all with the guided output in ONE reduction read by the host (one device
synchronisation per guided call: the combine's kernels are queued while the model still
runs). Only when that sum is not finite does it work out which call, rows, branches, samples
and terms are concerned -- a model output first (the model produced it), else the guided
output (the combine or a processor). Where the combine or a processor raises, the model
outputs are checked before the error goes on: a NaN they hold is reported as such.

``nonfinite="raise"`` (default) raises :class:`NonFiniteError` in the guided call where the
value appears (before the run's state moves on); ``"warn"`` emits one
:class:`NonFiniteWarning` per run (the run goes on, as a user who wants to see the damaged
samples asks). See docs/reliability.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from guidekit.branch import Branch
from guidekit.errors import GuidanceValueError, NonFiniteError, NonFiniteWarning
from guidekit.rows import CallRecord

NonFinite = Literal["raise", "warn"]
POLICIES = ("raise", "warn")


def check_policy(value: Any, where: str) -> NonFinite:
    """``value`` if it is a policy, else a clear error naming ``where``'s argument."""
    if value not in POLICIES:
        raise GuidanceValueError(
            f"{where}(nonfinite={value!r}): use 'raise' (stop at the first NaN/inf, the "
            f"default) or 'warn' (warn once per run and go on)"
        )
    return value  # type: ignore[no-any-return]


def terms_using(expr: Any, branch: Branch) -> list[str]:
    """The leaf terms and pipe steps of ``expr`` that read ``branch``, as printed."""
    found: list[str] = []

    def walk(node: Any) -> None:
        kids = node.children() if hasattr(node, "children") else ()
        if not kids and branch in node.branches():
            found.append(repr(node))
        for kid in kids:
            walk(kid)
        for step in getattr(node, "steps", ()):
            if branch in step.branches():
                found.append(repr(step))

    walk(expr)
    return list(dict.fromkeys(found))


def _kinds(t: torch.Tensor) -> str:
    has_nan = bool(torch.isnan(t).any())
    has_inf = bool(torch.isinf(t).any())
    return " and ".join(k for k, on in (("NaN", has_nan), ("inf", has_inf)) if on)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: a finite sum proves it in one reduction (a NaN
    or inf makes the sum NaN or inf); only a sum that overflowed, or complex values, need
    the full check."""
    # the sum read as a Python number: two operators (the reduction, the read) where
    # isfinite on the device and a bool of it dispatch six
    return _sum_finite([t]) or bool(torch.isfinite(t).all())


def _sum_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether the sum of every entry of ``tensors`` is finite (then every entry is: a NaN or
    inf makes any sum it enters NaN or inf), read with one device synchronisation; ``False``
    also where it cannot say (complex values, a finite sum that overflowed)."""
    if any(t.is_complex() for t in tensors):
        return False
    total = tensors[0].sum()
    for t in tensors[1:]:
        part = t.sum()
        # (a model of its own on another device: its sum joins the others on theirs)
        total = total + (part if part.device == total.device else part.to(total.device))
    return math.isfinite(total.item())


def _bad_samples(t: torch.Tensor) -> list[int]:
    flat = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1)
    return torch.nonzero(~torch.isfinite(flat).all(dim=1)).flatten().tolist()


class StepWatch:
    """The non-finite check of a run's guided calls: wrap its models, observe its calls.

    One per run (``Run.start``): ``plan`` is the run's plan, ``warned`` the run's set of
    warnings already given (one per kind and run), ``log`` receives every call record;
    :meth:`begin` starts each guided call with the sampler's ``batch`` and the ``policy``
    (``"raise"`` or ``"warn"``).
    """

    def __init__(self, plan: Any, warned: set[str], log: Callable[[CallRecord], None]) -> None:
        self.plan = plan
        self.warned = warned
        self.log = log
        self.schedule: tuple[float, ...] | None = None  # the run's, for scheduled scales
        self.batch = 1
        self.policy: NonFinite = "raise"
        self.records: list[CallRecord] = []
        self.bad_model = False
        self._last: Any = None
        #: (index in records, output) of this guided call's model calls, not yet checked
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._given: tuple[tuple[str, Callable[..., Any]], ...] | None = None
        self._wrapped: dict[str, Callable[..., Any]] = {}

    def begin(self, batch: int, schedule: tuple[float, ...] | None, policy: NonFinite) -> None:
        """Start one guided call."""
        self.batch, self.schedule, self.policy = batch, schedule, policy
        self.records = []
        self.bad_model = False
        self._last = None
        self._pending = []

    # -- model outputs --------------------------------------------------------------------
    def models(self, models: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
        """``models`` with each output kept for :meth:`on_call`'s check (the wrappers made
        once while the caller hands over the same models, as a guided model does)."""
        given = tuple(models.items())  # compared by identity of each model: no stale wrapper
        if given != self._given:
            self._given = given
            self._wrapped = {name: self._keep(fn) for name, fn in models.items()}
        return self._wrapped

    def _keep(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def model(*args: Any, **kwargs: Any) -> Any:
            self._last = out = fn(*args, **kwargs)
            return out

        return model

    def on_call(self, record: CallRecord) -> None:
        """The ``on_call`` of ``plan.step``: logs the call and keeps its output for the
        check (:meth:`output`, or :meth:`settle` where the step fails)."""
        self.log(record)
        self.records.append(record)
        out, self._last = self._last, None
        if isinstance(out, torch.Tensor):
            self._pending.append((len(self.records) - 1, out))

    def settle(self) -> None:
        """Check the model outputs kept so far, each on its own (reports the first bad one)."""
        pending, self._pending = self._pending, []
        for index, out in pending:
            if not all_finite(out):
                self.bad_model = True
                self._report("model", self._describe_call(index, out))

    def _offset(self, index: int) -> tuple[tuple[Branch, ...], int]:
        """Call ``index``'s group branches and its first row within that group."""
        record = self.records[index]
        groups = self.plan.program(record.sigma, self.schedule).groups
        g, lo = 0, 0
        for r in self.records[:index]:  # this guided call's earlier model calls, in group order
            lo += r.rows
            if g < len(groups) and lo >= len(groups[g].branches) * self.batch:
                g, lo = g + 1, 0
        branches = groups[g].branches if g < len(groups) else ()
        return branches, lo

    def _describe_call(self, index: int, out: torch.Tensor) -> str:
        record = self.records[index]
        branches, lo = self._offset(index)
        per: dict[Branch, list[int]] = {}
        for row in _bad_samples(out):
            i = (lo + row) // self.batch
            if i < len(branches):
                per.setdefault(branches[i], []).append((lo + row) % self.batch)
        parts = []
        for branch, samples in per.items():
            terms = terms_using(self.plan.expr, branch) or [repr(self.plan.expr)]
            parts.append(
                f"branch {branch.label} (sample(s) {', '.join(map(str, samples[:8]))}), used by "
                f"{', '.join(terms)}"
            )
        where = "; ".join(parts) or f"rows {', '.join(record.branches)}"
        return (
            f"model {record.model!r} returned {_kinds(out)} at step {record.step} "
            f"(sigma={record.sigma:g}) in {where}. The model produced it, not the guidance "
            f"(an fp16 overflow, a perturbation or a weak model that breaks at this level, "
            f"bad conditioning rows)"
        )

    def native(self, native: Mapping[Branch, Any] | None, step: int, sigma: float) -> None:
        """Check branch outputs a caller computed itself (``native=``: the modular guider's
        batches), each named by its branch and the terms that use it."""
        for branch, out in (native or {}).items():
            if isinstance(out, torch.Tensor) and not all_finite(out):
                self.bad_model = True
                terms = terms_using(self.plan.expr, branch) or [repr(self.plan.expr)]
                samples = ", ".join(map(str, _bad_samples(out)[:8]))
                self._report("model", (
                    f"the output of branch {branch.label} handed in (native=) holds "
                    f"{_kinds(out)} at step {step} (sigma={sigma:g}, sample(s) {samples}), "
                    f"used by {', '.join(terms)}. The model produced it, not the guidance"
                ))

    # -- the guided output ------------------------------------------------------------------
    def output(self, y: torch.Tensor, step: int, sigma: float) -> None:
        """Check the call's model outputs and its guided output: one reduction over all of
        them, read once; only where it is not finite, each on its own (a model output first)."""
        if self._pending and _sum_finite([out for _, out in self._pending] + [y]):
            self._pending = []
            return
        self.settle()
        if self.bad_model or all_finite(y):
            return
        post = ", ".join(repr(p) for p in self.plan.post) or "none"
        samples = ", ".join(map(str, _bad_samples(y)[:8]))
        self._report("output", (
            f"the guided output of {self.plan.expr!r} holds {_kinds(y)} at step {step} "
            f"(sigma={sigma:g}, sample(s) {samples}) although every model output was finite: "
            f"the combine or a processor (processors: {post}) overflowed; lower the scales "
            f"or run in float32"
        ))

    def _report(self, kind: str, message: str) -> None:
        if self.policy == "raise":
            raise NonFiniteError(message + "; pass nonfinite='warn' to only warn")
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(
                message + " (warned once per run; nonfinite='raise' stops here)",
                NonFiniteWarning, stacklevel=4,
            )


__all__ = [
    "POLICIES", "NonFinite", "NonFiniteError", "NonFiniteWarning", "StepWatch", "check_policy",
    "terms_using",
]
