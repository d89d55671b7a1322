"""Adaptive projected guidance (APG), https://arxiv.org/abs/2410.02416, Algorithm 1.

In x0 space, with ``c``, ``u`` the conditional and unconditional predictions and scale ``w``:

1. ``D = c - u``
2. momentum ``beta`` (may be negative): ``m <- D + beta m``; ``D <- m``
3. norm threshold ``r``: ``D <- D min(1, r / ||D||)`` (norm over all non-batch dims)
4. ``D_par = (<D, c> / <c, c>) c``, ``D_perp = D - D_par`` (in float64; ``D_par = 0`` for a
   sample whose ``c`` is exactly zero)
5. ``out = c + (w - 1) (D_perp + eta D_par)``

guidekit reads any prediction ``y`` on the left of ``|`` in CFG form ``y = u + w (X - u)``:
``w = 1 - alpha_u`` from the coefficient ``alpha_u`` of the unconditional branch and
``X = (y - alpha_u u) / w``. For ``CFG(w)`` alone ``X = c`` and this is Algorithm 1 exactly;
for ``CFG(w) + s (c - n)`` it is APG applied to the guided conditional ``X = c + (s / w)(c - n)``
(EMAG's ``c'``), which is how the EMAG paper combines EMAG and APG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from guidekit.branch import Branch, uncond
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.expr import Expr
from guidekit.fields import Examples, Range, finite, finite_or_schedule, positive_or_none, to_float
from guidekit.processor import Processor
from guidekit.registry import register
from guidekit.terms.base import NonlinearPrediction

if TYPE_CHECKING:
    from guidekit.context import StepContext


@attrs.frozen
class APGState:
    """APG's momentum buffer (x0 space, float64), ``None`` before the first step."""

    momentum: torch.Tensor | None = attrs.field(default=None, eq=False)


_UNCOND = uncond()
#: the smallest normal float64: below any <X, X> > 0 of a float32 / float64 prediction
_TINY = torch.finfo(torch.float64).tiny


@register
@attrs.frozen(repr=False)
class APGProjection(Processor):
    """``APG(eta, norm_threshold, momentum)``: Algorithm 1 of the APG paper, in x0 space.

    Defaults are neutral in the threshold and momentum (``norm_threshold=None``,
    ``momentum=0``) because ``r`` depends on the data's scale; the paper's DiT-XL/2 setting
    is ``APG(eta=0, norm_threshold=5, momentum=-0.5)``.
    """

    eta: float = attrs.field(default=0.0, converter=to_float, validator=finite_or_schedule)
    norm_threshold: float | None = attrs.field(
        default=None, converter=to_float, validator=positive_or_none
    )
    momentum: float = attrs.field(default=0.0, converter=to_float, validator=finite)
    space: ClassVar[str] = "x0"
    _name: ClassVar[str] = "APG"
    _example: ClassVar[str] = "APG(eta=0)"
    field_examples: ClassVar[Examples] = {
        "eta": Range(0, 1), "norm_threshold": (None, Range(0.5, 20)), "momentum": Range(-0.9, 0.9),
    }

    def check(self, left: Expr) -> None:
        atoms = [e.atom for e in left.entries()]
        nonlinear = [a for a in atoms if isinstance(a, NonlinearPrediction)]
        if nonlinear:
            raise GuidanceTypeError(
                f"{left!r} | {self!r}: APG reads its left side in CFG form u + w (X - u), which "
                f"needs a linear left side; {nonlinear[0]!r} is not linear. Use CFG(w) instead"
            )
        if uncond() not in atoms:
            raise GuidanceTypeError(
                f"{left!r} | {self!r}: APG projects the CFG update c - u, but {left!r} has no "
                f"unconditional branch, so APG would change nothing. Write CFG(w) + ... | {self!r}"
            )

    def init_state(self) -> APGState:
        return APGState()

    def apply(self, y: torch.Tensor, ctx: StepContext, state: Any) -> tuple[torch.Tensor, Any]:
        form = _cfg_form(y, ctx, self.space)
        if form is None:
            return y, state  # no CFG update at this noise level: nothing to project
        w, cond_like, diff = form
        new_state = state
        if self.momentum != 0.0:
            m = diff if state.momentum is None else diff + self.momentum * state.momentum
            new_state = APGState(m.detach())
            diff = m
        if self.norm_threshold is not None:
            norm = diff.flatten(1).norm(dim=1).view(-1, *([1] * (diff.ndim - 1)))
            diff = diff * torch.clamp(self.norm_threshold / norm, max=1.0)
        return _project(cond_like, diff, cond_like, w, self.eta).to(y.dtype), new_state

    def at_noiseless(
        self, y: torch.Tensor, ctx: StepContext, state: Any
    ) -> tuple[torch.Tensor, Any]:
        """The limit of Algorithm 1 as ``b(sigma) -> 0``, in the model's own space.

        Each branch's x0 is ``P + q y`` there with ``q -> 0`` (``P = x / a``), so ``D = q
        (X - u)``, the threshold stops clipping and the projection direction tends to ``P``:
        ``out = X + (w - 1) (X - u) - (w - 1) (1 - eta) (<X - u, P> / <P, P>) P``. With
        momentum from earlier steps the x0 update no longer vanishes and no prediction of
        the model's kind gives it (the limit is infinite): refused, naming the fix."""
        form = _cfg_form(y, ctx, "native")
        if form is None:
            return y, state
        held = None if state is None else state.momentum
        if self.momentum != 0.0 and held is not None and bool(held.any()):
            raise GuidanceValueError(
                f"{self!r} at sigma = 0 (flow time t = 1): with no noise left every x0 is x, "
                f"and the momentum carried from earlier steps moves it, which no prediction "
                f"of the model's kind can express (its velocity or noise would be infinite). "
                f"Use a solver that never evaluates at t = 1 (euler, midpoint, heun3), end "
                f"the time grid below 1, or use momentum=0"
            )
        w, cond_like, diff = form
        along = ctx.value(_UNCOND, self.space).double()  # P: every branch's x0 here
        return _project(cond_like, diff, along, w, self.eta).to(y.dtype), state

    def branches(self) -> tuple[Branch, ...]:
        # u, which its left side has (check): named so a NaN report in u names APG too
        return (_UNCOND,)

    def requires(self, coefs: Mapping[Any, float]) -> tuple[Branch, ...]:
        return ()


def _cfg_form(
    y: torch.Tensor, ctx: StepContext, space: str
) -> tuple[float, torch.Tensor, torch.Tensor] | None:
    """``(w, X, X - u)`` of ``y = u + w (X - u)`` in ``space``, float64 (``None``: no CFG
    update at this noise level)."""
    alpha_u = ctx.coefs.get(_UNCOND, 0.0)
    w = 1.0 - alpha_u
    if abs(alpha_u) <= 1e-12 or abs(w) <= 1e-12:
        return None
    u = ctx.value(_UNCOND, space).double()
    cond_like = torch.add(y.double(), u, alpha=-alpha_u).div_(w)  # X: c for plain CFG
    return w, cond_like, cond_like - u


def _project(
    cond_like: torch.Tensor, diff: torch.Tensor, along: torch.Tensor, w: float, eta: float
) -> torch.Tensor:
    """``X + (w - 1) (D_perp + eta D_par)`` with ``D_par`` the part of ``D`` along ``along``
    (``X`` itself in Algorithm 1; the noiseless limit's direction otherwise)."""
    # D_par = (<D, A> / <A, A>) A, and out = X + (w - 1) (D - (1 - eta) D_par) =
    # X + (w - 1) D - k (<D, A> / <A, A>) A with k = (w - 1) (1 - eta): per sample one
    # scalar times A, two whole-map operations (an add, a multiply-add; each is a kernel
    # launch, and at a few rows they, not the arithmetic, are the cost). A sample whose A
    # is exactly zero has <D, A> = 0, so clamping <A, A> away from 0 gives it D_par = 0
    # (not 0/0 = NaN).
    flat = along.flatten(1)
    dot = (diff.flatten(1) * flat).sum(dim=1)
    gram = (flat * flat).sum(dim=1).clamp_min_(_TINY)
    ratio = dot.div_(gram).view(-1, *([1] * (diff.ndim - 1)))
    k = (w - 1.0) * (1.0 - eta)
    return torch.add(cond_like, diff, alpha=w - 1.0).addcmul_(along, ratio, value=-k)


APG = APGProjection
