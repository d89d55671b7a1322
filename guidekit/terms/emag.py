"""EMAG and EMAG-Q: guide away from the model with one attention layer averaged over steps.

https://arxiv.org/abs/2512.17303 -- the paper's prediction is ``c' = e + w_e (c - e)``,
``out = u + w (c' - u) = u + w (c - u) + w (w_e - 1) (c - e)``, where ``e`` is the
conditional pass with the selected layer's attention map replaced by its exponential
moving average over denoising steps (:mod:`guidekit.attention.ema`). In guidekit
``EMAG(s)`` is the direction ``s (c - e)``, so the paper's prediction is
``CFG(w) + EMAG(w * (w_e - 1))``, built by ``EMAG.paper(w, w_e)``.

``EMAG(...).between(lo, hi)`` is the active window: outside it EMAG adds no rows, while
its averages keep accumulating from the conditional rows at every step (the paper starts
the average at step 0 and applies the replacement later). The attention engine
(:func:`guidekit.attention.install`) must be installed for the whole run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import torch

from guidekit.attention.ema import (
    DIT_XL_LAYERS,
    SD3_MEDIUM_LAYERS,
    EMAMapAttention,
    EMAQueryAttention,
    MovingAverage,
)
from guidekit.attention.ema_state import (
    EMAState,
    StepMemo,
    _beta,
    _float,
    _lam,
    _state_dtype,
)
from guidekit.attention.ops import Layers, check_layers, to_layers
from guidekit.branch import COND, MAIN, Branch
from guidekit.errors import GuidanceValueError
from guidekit.expr import Expr
from guidekit.fields import Examples, finite_or_schedule, to_float
from guidekit.registry import register
from guidekit.terms.base import DirectionTerm
from guidekit.terms.cfg import CFG


def _window(sigmas: Sequence[float] | torch.Tensor, first: int, last_off: int) -> tuple[float, float]:
    """The sigma interval ``(lo, hi]`` holding steps ``first .. n - 1 - last_off``."""
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.detach().flatten().tolist()
    levels = [float(s) for s in sigmas if float(s) > 0]
    n = len(levels)
    if n <= first + last_off:
        raise GuidanceValueError(
            f"the schedule has {n} steps; the preset's window (steps {first} .. n-{last_off + 1}) "
            f"needs more than {first + last_off}"
        )
    hi = levels[first]
    last = n - 1 - last_off
    lo = levels[last + 1] if last + 1 < n else 0.0
    return lo, hi


@attrs.frozen(repr=False)
class _EMAGBase(DirectionTerm):
    """Shared fields and presets of EMAG and EMAG-Q."""

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    beta: float = attrs.field(default=0.988, converter=_float, validator=_beta)
    lam: float = attrs.field(default=1.0, converter=_float, validator=_lam)
    state_dtype: str = attrs.field(default="float32", validator=_state_dtype)
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    #: the perturbation class: what the negative branch's layer does
    _perturbation: ClassVar[type[MovingAverage]]

    def negative(self) -> Branch:
        return Branch(model=MAIN, cond=COND, perturbation=self.perturbation)

    @property
    def perturbation(self) -> MovingAverage:
        return self._perturbation(self.layers, self.beta, self.lam, self.state_dtype)

    def update(self, state: EMAState, observations: StepMemo | None) -> EMAState:
        """The state transition of this term's averages, a pure function: ``state`` and one
        step's ``observations`` (handed back by the attention engine) give the next state
        (:func:`guidekit.attention.ema_state.update`). ``Plan.step`` applies it once per
        step and commits the result under the state's name (``"EMAG"``)."""
        return self.perturbation.commit(state, observations)

    @classmethod
    def paper(cls, w: float, w_e: float, **kwargs: Any) -> Expr:
        """The paper's ``u + w (c' - u)``, ``c' = e + w_e (c - e)``: ``CFG(w) + EMAG(w (w_e - 1))``."""
        for label, v in (("w", w), ("w_e", w_e)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise GuidanceValueError(f"{cls._name}.paper: {label} must be a number, got {v!r}")
        return CFG(w) + cls(float(w) * (float(w_e) - 1.0), **kwargs)

    @classmethod
    def dit(cls, w: float = 1.5, w_e: float = 3.0, **kwargs: Any) -> Expr:
        """The paper's DiT-XL/2 setting: ``w = 1.5``, ``w_e = 3``, candidates 12-15."""
        kwargs.setdefault("layers", DIT_XL_LAYERS)
        return cls.paper(w, w_e, **kwargs)

    @classmethod
    def sd3(
        cls, sigmas: Sequence[float] | torch.Tensor, w: float = 7.0, w_e: float = 1.5,
        **kwargs: Any,
    ) -> Expr:
        """The paper's SD3-Medium setting: ``w = 7``, ``w_e = 1.5``, candidates 6-8, the
        replacement at steps 5 .. n-6 of the schedule (5-22 of 28) as a noise interval.

        ``sigmas`` is the sampler's schedule; the window becomes ``.between(lo, hi)`` on
        EMAG only (CFG stays on). On SD3 the engine replaces the image queries' map of the
        joint attention (see docs/terms.md, EMAG).
        """
        kwargs.setdefault("layers", SD3_MEDIUM_LAYERS)
        lo, hi = _window(sigmas, 5, 5)
        return CFG(w) + cls(float(w) * (float(w_e) - 1.0), **kwargs).between(lo, hi)


@register
@attrs.frozen(repr=False)
class EMAGTerm(_EMAGBase):
    """``scale * (c - e)``; ``e`` = ``c`` with the selected candidate layer's attention map
    replaced by its moving average (``beta``), mixed by ``lam`` (1: replaced).

    ``layers`` are the candidates (default: the paper's DiT-XL/2 candidates, blocks 12-15
    of 28, scaled to the model's depth); ``state_dtype`` ``"float16"`` / ``"bfloat16"``
    halves the averages' memory.
    """

    _name: ClassVar[str] = "EMAG"
    _example: ClassVar[str] = "EMAG(1.5, layers=(2, 3))"
    field_examples: ClassVar[Examples] = {"layers": (None, (1, 2)), "beta": (0.988, 0.9)}
    _perturbation: ClassVar[type[MovingAverage]] = EMAMapAttention


@register
@attrs.frozen(repr=False)
class EMAGQTerm(_EMAGBase):
    """``scale * (c - e_q)``; ``e_q`` = ``c`` with the selected candidate layer's QUERIES
    replaced by their moving average; attention stays fused (EMAG-Q)."""

    _name: ClassVar[str] = "EMAGQ"
    _example: ClassVar[str] = "EMAGQ(1.5, layers=(2, 3))"
    field_examples: ClassVar[Examples] = {"layers": (None, (1, 2)), "beta": (0.988, 0.9)}
    _perturbation: ClassVar[type[MovingAverage]] = EMAQueryAttention


EMAG = EMAGTerm
EMAGQ = EMAGQTerm
