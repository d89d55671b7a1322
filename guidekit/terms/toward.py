"""A guidance direction toward a named conditioning, and Composable Diffusion built from it.

Composable Diffusion, https://arxiv.org/abs/2206.01714 -- ``u + sum_i w_i (c_i - u)``:
``Toward(w, "style")`` is one summand ``w (c_style - u)``; a negative weight steers away
(the paper's negation). ``CFG(7) - Toward(2, "neg")`` is a negative prompt next to the
empty prompt, ``u + 7 (c - u) - 2 (c_neg - u)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from guidekit.branch import COND, UNCOND, Branch
from guidekit.errors import GuidanceTypeError
from guidekit.expr import Expr
from guidekit.fields import Examples, finite_or_schedule, name, to_float
from guidekit.registry import register
from guidekit.schedule import Schedule
from guidekit.terms.base import LinearTerm
from guidekit.terms.cfg import Cond, Uncond, check_distinct
from guidekit.text import is_number


@register
@attrs.frozen(repr=False)
class TowardTerm(LinearTerm):
    """``scale * (c_cond - c_negative)``: a direction (weight 0) between two conditionings.

    ``Toward(w, "style")`` is ``w (c_style - u)``; ``negative="neg"`` measures it from the
    conditioning ``neg`` instead of the empty one. Add it to a prediction:
    ``Uncond() + Toward(3, "a") + Toward(2, "b")`` is Composable Diffusion's AND.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    cond: str = attrs.field(default=COND, validator=name)
    negative: str = attrs.field(default=UNCOND, validator=name, kw_only=True)
    # a direction like PAG's, but its negative side is a field (a name), as in CFG
    _kind: ClassVar[str] = "direction"
    _name: ClassVar[str] = "Toward"
    _positional: ClassVar[tuple[str, ...]] = ("scale", "cond")
    _example: ClassVar[str] = "Toward(2, 'style')"
    field_examples: ClassVar[Examples] = {
        "cond": ("cond", "style", "neg"), "negative": ("uncond", "neg"),
    }

    def __attrs_post_init__(self) -> None:
        check_distinct(self, self.cond, self.negative)

    def coefficients(self) -> dict[Branch, float]:
        return {Branch(cond=self.cond): self.scale, Branch(cond=self.negative): -self.scale}


def composable(weights: Mapping[str, float], *, negative: str = UNCOND) -> Expr:
    """Composable Diffusion (arXiv 2206.01714): ``u + sum_i w_i (c_i - u)`` from a mapping.

    ``composable({"cond": 7, "neg": -2})`` is ``Uncond() + Toward(7) + Toward(-2, 'neg')``,
    a plain expression (it prints and parses as such). The weights are not divided by their
    number, as in the paper's code; a negative weight steers away from that conditioning. A
    weight may be a schedule by noise level (``composable({"cond": Cosine(7)})``).
    """
    if not isinstance(weights, Mapping) or not weights:
        raise GuidanceTypeError(
            f"composable(weights): expected a non-empty mapping of conditioning name -> weight, "
            f"e.g. {{'cond': 7, 'neg': -2}}, got {weights!r}"
        )
    expr: Any = Uncond() if negative == UNCOND else Cond(negative)
    for cond, w in weights.items():
        if not (is_number(w) or isinstance(w, Schedule)):
            raise GuidanceTypeError(
                f"composable(weights): the weight of {cond!r} must be a number or a schedule, "
                f"got {w!r}"
            )
        expr = expr + TowardTerm(w, cond, negative=negative)
    return expr  # type: ignore[no-any-return]


Toward = TowardTerm
