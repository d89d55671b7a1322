"""PLADIS, GAG and NAG: attention modifiers written after ``|`` (attention-space extrapolation).

They change the attention INSIDE the forward of the branches on their left, in their layers
(by default every cross-attention layer of the model), and add no branch and no rows::

    CFG(3) | PLADIS(2)           # every row of the call, sparse-dense extrapolation
    Cond() | NAG(4)              # the positive rows, against the `uncond` conditioning
    CFG(2) + PAG(1) | GAG(5)     # c, u and PAG's perturbed rows, in cross-attention

The math is in :mod:`guidekit.attention.extrapolation`, the hooking in
:mod:`guidekit.attention.modifiers`; ``docs/semantics.md`` ("Attention modifiers") says
which rows each one changes and how they combine with perturbations and other processors.

* PLADIS, https://arxiv.org/abs/2503.07677 (ICCV 2025): ``A = A_dense + scale (A_sparse -
  A_dense)`` on the same logits, in every cross-attention layer, for every row.
* GAG, https://arxiv.org/abs/2603.02531: the same two attention outputs, the sparse-dense
  difference split along the sparse output and clamped (formula of methods.md; no author
  code exists, see the module docstring of the math).
* NAG, https://arxiv.org/abs/2505.21179: extrapolates the positive rows' cross-attention
  output away from the output the same queries get with the negative prompt, L1-normalised.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from guidekit.attention.extrapolation import (
    SPARSE_MAPS,
    gag_attention,
    nag_combine,
    pladis_attention,
)
from guidekit.attention.ops import Layers, check_layers, to_layers
from guidekit.branch import COND, Branch
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.fields import (
    Examples,
    Range,
    finite,
    finite_or_schedule,
    name,
    positive_or_none,
    to_float,
    unit_interval,
)
from guidekit.processor import AttentionModifier
from guidekit.registry import register


def _sparse(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in SPARSE_MAPS:
        raise GuidanceValueError(
            f"{instance._name}(sparse=...): one of {', '.join(map(repr, SPARSE_MAPS))}, "
            f"got {value!r}"
        )


def _key(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise GuidanceTypeError(
            f"NAG(key=...): the name of the conditioning tensor holding the text context "
            f"(e.g. 'encoder_hidden_states'), or None to take the only 3-D one; got {value!r}"
        )


class AttentionCore(AttentionModifier):
    """A modifier that replaces the attention core ``softmax(L) V`` of its layers (PLADIS,
    GAG); at most one of them acts in a layer."""

    __slots__ = ()

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        logit_scale: float | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


#: layer choices the examples and property tests use (distinct ones are distinct modifiers)
_LAYER_EXAMPLES = (None, -1, (0, 1), "blocks.0.attn2")


@register
@attrs.frozen(repr=False)
class PLADISModifier(AttentionCore):
    """``expr | PLADIS(scale)``: sparse-dense attention extrapolation, https://arxiv.org/abs/2503.07677.

    In each of ``layers`` (default: every cross-attention layer, as the paper) and for every
    row of the call, the attention map becomes ``A_dense + scale (A_sparse - A_dense)``
    with ``A_sparse`` the 1.5-entmax (default) or sparsemax of the same logits. ``scale``
    is the paper's ``lambda``: 0 leaves the model unchanged, 1 is pure sparse attention;
    the authors use 1.5 to 2.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    sparse: str = attrs.field(default="entmax15", validator=_sparse)
    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    #: ``.between(lo, hi)``: the noise levels it acts on (``None``: every level)
    window: tuple[float, float] | None = attrs.field(default=None, kw_only=True, repr=False)
    _name: ClassVar[str] = "PLADIS"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "PLADIS(2)"
    field_examples: ClassVar[Examples] = {
        "scale": Range(0, 8), "sparse": ("entmax15", "sparsemax"), "layers": _LAYER_EXAMPLES,
    }

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        logit_scale: float | None = None,
    ) -> torch.Tensor:
        return pladis_attention(
            query, key, value, scale=self.scale, mask=mask, logit_scale=logit_scale,
            sparse=self.sparse,
        )


@register
@attrs.frozen(repr=False)
class GAGModifier(AttentionCore):
    """``expr | GAG(scale, eta=15, zeta=0)``: geometry-aware attention guidance,
    https://arxiv.org/abs/2603.02531 (formula of methods.md; unverified against the paper).

    Per query token and head: ``S = A_sparse V``, ``D = A_dense V``, ``delta = S - D``;
    ``g = delta_par + zeta delta_perp`` (parallel to ``S`` and the rest); the output is
    ``S + scale min(1, eta / ||g||) g``. ``eta=None`` turns the clamp off. Note that
    ``GAG(0)`` is pure sparse attention, not the model's own; with ``zeta=1`` and no clamp
    ``GAG(s)`` equals ``PLADIS(s + 1)``.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    eta: float | None = attrs.field(default=15.0, converter=to_float, validator=positive_or_none)
    zeta: float = attrs.field(default=0.0, converter=to_float, validator=finite)
    sparse: str = attrs.field(default="entmax15", validator=_sparse)
    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    #: ``.between(lo, hi)``: the noise levels it acts on (``None``: every level)
    window: tuple[float, float] | None = attrs.field(default=None, kw_only=True, repr=False)
    _name: ClassVar[str] = "GAG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "GAG(5, eta=15)"
    field_examples: ClassVar[Examples] = {
        "scale": Range(0, 8), "eta": (None, Range(1, 20)), "zeta": Range(0, 1),
        "layers": _LAYER_EXAMPLES,
    }

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        logit_scale: float | None = None,
    ) -> torch.Tensor:
        return gag_attention(
            query, key, value, scale=self.scale, eta=float("inf") if self.eta is None else self.eta,
            zeta=self.zeta, mask=mask, logit_scale=logit_scale, sparse=self.sparse,
        )


@register
@attrs.frozen(repr=False)
class NAGModifier(AttentionModifier):
    """``expr | NAG(scale, tau=2.5, alpha=0.25)``: normalized attention guidance,
    https://arxiv.org/abs/2505.21179.

    In each of ``layers`` (default: every cross-attention layer, as the official code's
    ``attn2``), the rows of the positive branches (conditioning ``cond``, perturbed ones
    included) attend twice with the same queries: to their own context (``Z+``) and to the
    context of the ``negative`` conditioning (default ``uncond``) of the same sample
    (``Z-``); the attention output becomes ``alpha Zh + (1 - alpha) Z+`` with
    ``Zt = scale Z+ - (scale - 1) Z-`` and ``Zh = Zt min(r, tau) / r``,
    ``r = ||Zt||_1 / ||Z+||_1`` per token over all heads' channels. ``NAG(1)`` changes
    nothing; ``tau=None`` turns the normalisation off. On a left side without ``cond``
    rows (``Uncond() | NAG(3)``) it changes nothing either.

    The negative context comes from the negative conditioning's rows of the same call when
    there are any (``CFG(w) | NAG(s)``), else from the negative conditioning itself through
    the model's own context projection (``key`` names the tensor; ``None``: the only 3-D
    floating tensor). See docs/semantics.md.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    tau: float | None = attrs.field(default=2.5, converter=to_float, validator=positive_or_none)
    alpha: float = attrs.field(default=0.25, converter=to_float, validator=unit_interval)
    negative: str = attrs.field(default="uncond", validator=name)  # type: ignore[misc]
    key: str | None = attrs.field(default=None, validator=_key)
    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    #: ``.between(lo, hi)``: the noise levels it acts on (``None``: every level)
    window: tuple[float, float] | None = attrs.field(default=None, kw_only=True, repr=False)
    _name: ClassVar[str] = "NAG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "NAG(4)"
    field_examples: ClassVar[Examples] = {
        "scale": Range(0, 8), "tau": (None, Range(1, 5)), "layers": _LAYER_EXAMPLES,
    }

    def __attrs_post_init__(self) -> None:
        if self.negative == COND:
            raise GuidanceValueError(
                f"NAG(negative={self.negative!r}): the negative conditioning must differ from "
                f"the positive one ('cond'); the default is 'uncond'"
            )

    def applies_to(self, branch: Branch) -> bool:
        return branch.cond == COND

    def combine(
        self, positive: torch.Tensor, negative: torch.Tensor, dims: tuple[int, ...]
    ) -> torch.Tensor:
        """NAG's output from the attention outputs ``Z+`` and ``Z-`` (``dims``: one token's
        channels)."""
        return nag_combine(
            positive, negative, scale=self.scale,
            tau=self.tau, alpha=self.alpha, dims=dims,
        )


PLADIS = PLADISModifier
GAG = GAGModifier
NAG = NAGModifier
