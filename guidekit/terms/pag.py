"""Perturbed-attention guidance (PAG).

https://arxiv.org/abs/2403.17377 -- ``u + w (c - u) + s (c - p)``, where ``p`` is the
conditional prediction of the same model with the self-attention map of the chosen layers
replaced by the identity (each token attends only to itself, so attention returns ``V``).
In guidekit ``PAG(s)`` is the direction ``s (c - p)``: the paper's prediction is
``CFG(w) + PAG(s)``, PAG alone is ``Cond() + PAG(s)``.

``PAG(s, cond="uncond")`` perturbs the unconditional rows instead (``s (u - u')``);
``CFG(w) + PAG(w - 1, cond="uncond")`` is ``u' + w (c - u')`` in two row blocks
(:meth:`PAGTerm.on_uncond`).

The perturbed branch rides in the same batched call as ``c`` and ``u``; it needs the
attention engine installed on the model (:func:`guidekit.attention.install`), which also
resolves the layers. ``layers=None`` (the default) means the architecture's documented
default (:mod:`guidekit.attention.layers`: the last block of DiT and PixArt, the middle
block of a UNet); defaults are starting points that must be measured per model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from guidekit.attention.ops import IdentityAttention, Layers, check_layers, to_layers
from guidekit.branch import COND, MAIN, UNCOND, Branch
from guidekit.expr import Expr
from guidekit.fields import Examples, finite_or_schedule, name, to_float
from guidekit.registry import register
from guidekit.terms.base import DirectionTerm


@register
@attrs.frozen(repr=False)
class PAGTerm(DirectionTerm):
    """``scale * (c - p)``, ``p`` = ``c`` with identity self-attention in ``layers``.

    ``layers``: one int, a module path, or a list / tuple / range of them (stored as a
    tuple, printed as ``(7, 8, 9)``); ints index the model's named layer list, negative
    from the end. ``None`` is the architecture's default, resolved when the engine is
    installed. Unknown or out-of-range layers raise then, listing the valid ones.
    ``cond``: the conditioning whose rows are perturbed (``"uncond"``: ``s (u - u')``).
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    cond: str = attrs.field(default=COND, validator=name, kw_only=True)
    _name: ClassVar[str] = "PAG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "PAG(3, layers=(7, 8, 9))"
    field_examples: ClassVar[Examples] = {
        "layers": (None, -1, (1, 2), "blocks.0.attn1"), "cond": (COND, UNCOND),
    }

    @property
    def perturbation(self) -> Any:
        """The frozen perturbation value of the negative branch."""
        return IdentityAttention(self.layers)

    def positive(self) -> Branch:
        return Branch(model=MAIN, cond=self.cond)

    def negative(self) -> Branch:
        return Branch(model=MAIN, cond=self.cond, perturbation=self.perturbation)

    @classmethod
    def on_uncond(
        cls, w: float, layers: Any = None, between: tuple[float, float] | None = None
    ) -> Expr:
        """CFG whose unconditional branch has identity self-attention in ``layers``:
        ``u' + w (c - u')`` = ``CFG(w) + PAG(w - 1, layers=..., cond="uncond")``, two row
        blocks; ``between=(lo, hi)`` perturbs only for ``lo < sigma <= hi``."""
        from guidekit.terms.slg import on_uncond

        return on_uncond(cls, w, between, layers=layers)


PAG = PAGTerm
