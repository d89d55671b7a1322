"""Dual CFG, as ComfyUI's ``DualCFGGuider`` computes it: two positives, one negative.

ComfyUI (``comfy_extras/nodes_custom_sampler.py``) takes a positive ``p``, a second
("middle") positive ``m``, a negative ``n``, scales ``w1`` (``cfg_conds``) and ``w2``
(``cfg_cond2_negative``) and a style:

* ``"regular"``: ``n + w2 (m - n) + w1 (p - m)``;
* ``"nested"``: ``n + w2 (m + w1 (p - m) - n)``: CFG from ``m`` to ``p``, then CFG from
  ``n`` to that.

Both are linear, so they are plain expressions of ``CFG``, ``Toward`` and ``Cond``; this
module only builds them (the result prints and parses as that expression).
"""

from __future__ import annotations

from typing import Any

from guidekit.branch import COND, UNCOND
from guidekit.errors import GuidanceTypeError
from guidekit.expr import Expr
from guidekit.schedule import Schedule
from guidekit.terms.cfg import CFG, Cond, Uncond
from guidekit.terms.toward import Toward
from guidekit.text import is_number


def dual_cfg(
    cfg_conds: float, cfg_cond2_negative: float, *, cond2: str = "cond2",
    negative: str = UNCOND, cond: str = COND, nested: bool = False,
) -> Expr:
    """ComfyUI's ``DualCFGGuider`` as an expression.

    ``dual_cfg(w1, w2)`` is ``CFG(w2, cond='cond2') + Toward(w1, negative='cond2')``
    (style ``"regular"``); ``nested=True`` is
    ``Uncond() + w2 * (CFG(w1, negative='cond2') - Uncond())``. ``cond`` is the first
    positive (``cond1``), ``cond2`` the second, ``negative`` the negative conditioning.

    Either scale may be a schedule by noise level (``dual_cfg(Cosine(3), 5)``). A nested
    ``w2`` schedule multiplies ``w1``, so there it is written
    ``CFG(w2, cond='cond2') + w1 * Toward(w2, negative='cond2')``, the same value; both
    nested scales scheduled would be a product of schedules, which no scale field holds.
    """
    for arg, value in (("cfg_conds", cfg_conds), ("cfg_cond2_negative", cfg_cond2_negative)):
        if not (is_number(value) or isinstance(value, Schedule)):
            raise GuidanceTypeError(
                f"dual_cfg({arg}=...): expected a number or a schedule, got {value!r}"
            )
    if not isinstance(nested, bool):
        raise GuidanceTypeError(f"dual_cfg(nested=...): expected True or False, got {nested!r}")
    if nested and isinstance(cfg_cond2_negative, Schedule):
        if isinstance(cfg_conds, Schedule):
            raise GuidanceTypeError(
                f"dual_cfg({cfg_conds!r}, {cfg_cond2_negative!r}, nested=True): the nested "
                f"style multiplies the two scales, and a product of two schedules is no "
                f"schedule shape; schedule one of them, or use the regular style "
                f"(nested=False)"
            )
        outer = CFG(cfg_cond2_negative, cond=cond2, negative=negative)
        return outer + cfg_conds * Toward(cfg_cond2_negative, cond, negative=cond2)  # type: ignore[no-any-return]
    if nested:
        base: Any = Uncond() if negative == UNCOND else Cond(negative)
        inner = CFG(cfg_conds, cond=cond, negative=cond2)
        return base + cfg_cond2_negative * (inner - base)  # type: ignore[no-any-return]
    outer = CFG(cfg_cond2_negative, cond=cond2, negative=negative)
    return outer + Toward(cfg_conds, cond, negative=cond2)  # type: ignore[no-any-return]
