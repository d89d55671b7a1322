"""Skip-layer guidance (SLG): guide away from the model with some blocks skipped.

The SD3.5 recipe (Stability AI's SD3.5 reference code) and spatiotemporal skip guidance,
STG (https://arxiv.org/abs/2411.18664): ``u + w (c - u) + s (c - k)``, where ``k`` is the
conditional prediction with the chosen blocks skipped -- whole (``skip="block"``: the
block passes its input on, STG's residual skip) or only their self-attention
(``skip="attention"``: the attention output is zero, so the residual carries the input).
In guidekit ``SLG(s)`` is the direction ``s (c - k)``: the recipe is ``CFG(w) + SLG(s,
layers=(7, 8, 9)).between(lo, hi)``, built for a given schedule by :meth:`SLGTerm.sd35`.

``SLG(s, cond="uncond")`` perturbs the unconditional rows instead: ``s (u - u')``, ``u'`` the
unconditional prediction with the blocks skipped. ``CFG(w) + SLG(w - 1, cond="uncond")``
is ``u' + w (c - u')`` (ComfyUI's ``SkipLayerGuidanceDiTSimple``): ``u`` cancels, so a step
runs TWO row blocks (``c``, ``u'``), and ``.between(lo, hi)`` on the SLG part gives plain
CFG outside the window (:meth:`SLGTerm.on_uncond` builds it).

``k`` rides in the same batched call as ``c`` and ``u``; the attention engine
(:func:`guidekit.attention.install`) skips the blocks for the ``k`` rows only
(:mod:`guidekit.attention.blocks`, which also lists what ``layers`` indexes per model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import torch

from guidekit.attention.blocks import SD35_LAYERS, BlockSkip, _skip_kind
from guidekit.attention.ops import Layers, check_layers, to_layers
from guidekit.branch import COND, MAIN, UNCOND, Branch
from guidekit.errors import GuidanceValueError
from guidekit.expr import Expr, fmt_number
from guidekit.fields import Examples, finite_or_schedule, name, to_float
from guidekit.registry import register
from guidekit.terms.base import DirectionTerm

#: The SD3.5 recipe: scale (diffusers' SD3 pipeline default; Stability's reference config
#: for SD3.5 Medium uses 2.5 with CFG 4), and the fraction of the steps it is active.
SD35_SCALE = 2.8
SD35_START = 0.01
SD35_STOP = 0.2


def step_window(
    sigmas: Sequence[float] | torch.Tensor, start: float, stop: float
) -> tuple[float, float] | None:
    """The noise interval ``(lo, hi]`` holding exactly the steps ``i`` (0-based) of the
    schedule with ``start * n < i < stop * n``, ``n`` its number of steps (noise levels
    above 0); ``None`` when no step qualifies.

    This is the step-fraction rule of the SD3.5 reference code and of diffusers' SD3
    pipeline (strict on both sides), turned into noise levels: ``hi`` is the first active
    step's sigma and ``lo`` the sigma of the step after the last active one (0 when it is
    the last step).
    """
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.detach().flatten().tolist()
    levels = [float(s) for s in sigmas if float(s) > 0]
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise GuidanceValueError(
            f"the schedule must decrease strictly (noisiest first), got {levels}"
        )
    n = len(levels)
    active = [i for i in range(n) if start * n < i < stop * n]
    if not active:
        return None
    last = active[-1]
    return (levels[last + 1] if last + 1 < n else 0.0), levels[active[0]]


@register
@attrs.frozen(repr=False)
class SLGTerm(DirectionTerm):
    """``scale * (c - k)``, ``k`` = ``c`` with the blocks ``layers`` skipped.

    ``layers``: indices into the model's BLOCK list (``transformer_blocks``; Flux: double
    then single blocks), module paths, or a list / tuple / range of them; ``None`` is the
    model's default (SD3: blocks 7, 8, 9; others have none and raise at install).
    ``skip``: ``"block"`` (whole blocks) or ``"attention"`` (their self-attention only).
    ``cond``: the conditioning whose rows are perturbed: ``"cond"`` (``s (c - k)``) or
    ``"uncond"`` (``s (u - u')``, see :meth:`on_uncond`), or any named conditioning.
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    skip: str = attrs.field(default="block", validator=_skip_kind)
    cond: str = attrs.field(default=COND, validator=name, kw_only=True)
    _name: ClassVar[str] = "SLG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "SLG(2.8, layers=(7, 8, 9))"
    field_examples: ClassVar[Examples] = {
        "layers": (None, (7, 8, 9), -1), "skip": ("block", "attention"),
        "cond": (COND, UNCOND),
    }

    @property
    def perturbation(self) -> Any:
        """The frozen perturbation value of the negative branch."""
        return BlockSkip(self.layers, self.skip)

    def positive(self) -> Branch:
        return Branch(model=MAIN, cond=self.cond)

    def negative(self) -> Branch:
        return Branch(model=MAIN, cond=self.cond, perturbation=self.perturbation)

    @classmethod
    def on_uncond(
        cls, w: float, layers: Any = None, skip: str = "block",
        between: tuple[float, float] | None = None,
    ) -> Expr:
        """CFG whose unconditional branch has the blocks skipped (ComfyUI's
        ``SkipLayerGuidanceDiTSimple``): ``u' + w (c - u')`` in two row blocks, written
        ``CFG(w) + SLG(w - 1, layers=..., cond="uncond")``. ``between=(lo, hi)`` skips
        only for ``lo < sigma <= hi`` (ComfyUI's ``sigma_end < sigma <= sigma_start``)
        and is plain ``CFG(w)`` elsewhere."""
        return on_uncond(cls, w, between, layers=layers, skip=skip)

    @classmethod
    def sd35(
        cls,
        sigmas: Sequence[float] | torch.Tensor,
        scale: float = SD35_SCALE,
        layers: Any = SD35_LAYERS,
        start: float = SD35_START,
        stop: float = SD35_STOP,
        skip: str = "block",
    ) -> Expr:
        """The SD3.5 recipe for the schedule ``sigmas``: ``SLG(2.8, layers=(7, 8, 9))``
        active on the steps ``i`` with ``0.01 n < i < 0.2 n`` (the first ~20 % of the
        ``n`` steps, step 0 excluded), as ``.between(lo, hi)`` on noise levels.

        guidekit gates by noise level; the reference code and diffusers count steps. The
        interval built here holds exactly the steps they pick for THIS schedule (see
        :func:`step_window`); for another schedule build it again. Add CFG yourself:
        ``CFG(w) + SLG.sd35(sigmas)``. Raises when no step of the schedule qualifies.
        """
        for label, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise GuidanceValueError(
                    f"SLG.sd35: {label} must be a fraction of the steps in [0, 1], got {v!r}"
                )
        window = step_window(sigmas, float(start), float(stop))
        if window is None:
            n = len([s for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)
                     if float(s) > 0])
            raise GuidanceValueError(
                f"SLG.sd35: no step i of this {n}-step schedule has {fmt_number(start)} * {n} "
                f"< i < {fmt_number(stop)} * {n}; use more steps or a wider window (start, stop)"
            )
        lo, hi = window
        return cls(scale, layers=layers, skip=skip).between(lo, hi)


def on_uncond(cls: Any, w: float, between: tuple[float, float] | None, **fields: Any) -> Expr:
    """``CFG(w) + cls(w - 1, cond="uncond", **fields)``, gated by ``between``: the
    unconditional branch of CFG perturbed (shared by SLG and PAG)."""
    from guidekit.terms.cfg import CFG

    w = to_float(w)
    direction: Expr = cls(w - 1.0, cond=UNCOND, **fields)
    if between is not None:
        direction = direction.between(*between)
    return CFG(w) + direction


SLG = SLGTerm
