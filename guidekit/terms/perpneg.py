"""Perp-Neg: subtract only the part of each negative that is perpendicular to the positive.

https://arxiv.org/abs/2304.04968 (App. A.1, Alg. 1) -- with ``d = c - u`` and, for each
negative conditioning ``n_i``, ``d_i = c_{n_i} - u``:
``u + w [ d - sum_i w_i perp(d_i, d) ]``, ``perp(a, b) = a - (<a, b> / <b, b>) b`` per sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from guidekit.branch import COND, UNCOND, Branch
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.fields import Examples, finite_or_schedule, name, to_float
from guidekit.registry import register
from guidekit.schedule import Schedule
from guidekit.schedules.shapes import Piecewise, Window
from guidekit.terms.base import NonlinearPrediction
from guidekit.text import fmt_call, fmt_value, is_number

if TYPE_CHECKING:
    from guidekit.context import StepContext


def _to_names(value: Any) -> Any:
    return (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value


def _to_scales(value: Any) -> Any:
    if is_number(value) or isinstance(value, Schedule):
        return (float(value) if is_number(value) else value,)
    if isinstance(value, (tuple, list)):
        return tuple(float(v) if is_number(v) else v for v in value)
    return value


def _names(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, tuple) or not value:
        raise GuidanceTypeError(
            f"PerpNeg(negative=...): expected a conditioning name or a tuple of them, such as "
            f"'neg' or ('neg', 'blurry'), got {value!r}"
        )
    for v in value:
        name(instance, attribute, v)


def _scales(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, tuple) or not value:
        raise GuidanceTypeError(
            f"PerpNeg(neg_scale=...): expected a number, a schedule or a tuple of them, got "
            f"{value!r}"
        )
    for v in value:
        finite_or_schedule(instance, attribute, v)


def _zero(value: Any) -> bool:
    """0 at every level (a schedule: everywhere; a compile-time view of an unresolved term)."""
    return value.is_zero() if isinstance(value, Schedule) else value == 0


@register
@attrs.frozen(repr=False)
class PerpNegTerm(NonlinearPrediction):
    """``PerpNeg(w, negative="neg", neg_scale=1)``: CFG toward ``cond`` whose negatives only
    remove what is perpendicular to ``c - u``.

    ``negative`` names one conditioning or a tuple of them; ``neg_scale`` is one weight for
    all, or one per negative. ``scale`` and each weight may be a schedule by noise level; at
    a level where ``scale`` is 0 the term is ``u``, and a negative whose weight is 0 there is
    not computed (:meth:`linear_at`). The projection is per sample (ComfyUI's ``PerpNegGuider``
    projects over the whole batch, which mixes samples when ``B > 1``: **paper, not peer**).
    The result is the same in every prediction space (differences of predictions convert by
    one scalar per step, which the projection keeps), so it runs in the model's own space.
    A sample whose ``c - u`` is exactly zero has no direction to keep: its negatives are
    subtracted whole.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    negative: tuple[str, ...] = attrs.field(default=("neg",), converter=_to_names, validator=_names)
    neg_scale: tuple[float, ...] = attrs.field(
        default=(1.0,), converter=_to_scales, validator=_scales
    )
    cond: str = attrs.field(default=COND, validator=name, kw_only=True)
    _name: ClassVar[str] = "PerpNeg"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "PerpNeg(7, negative='neg', neg_scale=1)"
    field_examples: ClassVar[Examples] = {
        "negative": (("neg",), ("neg", "style")), "neg_scale": (
            (1.0,), (0.5,), (1.0, -0.5), (0.0,), (Window(1, 0.3, 4),),
            (Piecewise((0.05, 0), (7, 1)), -0.5),
        ),
        "cond": ("cond", "style"),
    }

    def __attrs_post_init__(self) -> None:
        if len(self.neg_scale) not in (1, len(self.negative)):
            raise GuidanceValueError(
                f"{self!r}: neg_scale has {len(self.neg_scale)} weights for "
                f"{len(self.negative)} negatives; give one weight, or one per negative"
            )
        if len(set(self.negative)) != len(self.negative):
            raise GuidanceValueError(f"{self!r}: a negative conditioning is named twice")
        clash = [n for n in self.negative if n in (self.cond, UNCOND)]
        if clash:
            raise GuidanceValueError(
                f"{self!r}: the negative {clash[0]!r} is the positive or the unconditional "
                f"conditioning, whose direction is zero or c - u itself; name another one"
            )

    def _fmt(self) -> str:
        # one negative or one weight prints bare (negative='neg'), as it may be written
        text = fmt_call(self)
        for field in ("negative", "neg_scale"):
            value = getattr(self, field)
            if len(value) == 1:
                text = text.replace(f"{field}={fmt_value(value)}", f"{field}={fmt_value(value[0])}")
        return text

    def weights(self) -> tuple[float, ...]:
        """One weight per negative (a single ``neg_scale`` applies to every negative)."""
        if len(self.neg_scale) == 1:
            return self.neg_scale * len(self.negative)
        return self.neg_scale

    def linear_at(self) -> dict[Any, float] | None:
        """This term (its scales numbers) as a linear form when a zero scale makes it one:
        ``u`` at ``scale = 0``, ``CFG(scale)`` when every weight is 0, the term without its
        zero-weight negatives otherwise (``None``: no weight is 0; the plan then runs it as
        it is). The plan drops the branches the form does not read."""
        c, u = Branch(cond=self.cond), Branch(cond=UNCOND)
        if _zero(self.scale):
            return {u: 1.0}
        kept = [(n, w) for n, w in zip(self.negative, self.weights()) if not _zero(w)]
        if len(kept) == len(self.negative):
            return None
        if not kept:
            return {c: self.scale, u: 1.0 - self.scale}
        names, ws = zip(*kept)
        return {attrs.evolve(self, negative=names, neg_scale=ws): 1.0}

    def atom_branches(self) -> tuple[Branch, ...]:
        return (Branch(cond=self.cond), Branch(cond=UNCOND), *(Branch(cond=n) for n in self.negative))

    def evaluate(self, values: Mapping[Branch, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        c, u = values[Branch(cond=self.cond)], values[Branch(cond=UNCOND)]
        dims = tuple(range(1, c.ndim))
        d = (c - u).double()
        dd = d.square().sum(dims, keepdim=True)
        guided = d.clone()
        for n, w in zip(self.negative, self.weights()):
            dn = (values[Branch(cond=n)] - u).double()
            along = (dn * d).sum(dims, keepdim=True) / dd.clamp_min(1e-300)
            guided -= w * (dn - torch.where(dd > 0, along, 0.0) * d)
        return u + (self.scale * guided).to(c.dtype)


PerpNeg = PerpNegTerm
