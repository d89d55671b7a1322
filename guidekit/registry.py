"""Every public term, post-processor and modifier by the name ``parse`` and ``repr`` use.

New terms register here (one line each); the parser, the law tests and the docs read it.
"""

from __future__ import annotations

from guidekit.combinators.apg import APGProjection
from guidekit.combinators.base import AttentionModifier, InputModifier, Processor
from guidekit.combinators.cads import CADSAnnealing
from guidekit.combinators.extrapolation import GAGModifier, NAGModifier, PLADISModifier
from guidekit.combinators.rescale import CFGRescale
from guidekit.expr import display_name
from guidekit.terms.autoguidance import AutoguidanceTerm
from guidekit.terms.base import DirectionTerm, NonlinearPrediction, Term
from guidekit.terms.cfg import CFGTerm, CondTerm, UncondTerm
from guidekit.terms.emag import EMAGQTerm, EMAGTerm
from guidekit.terms.pag import PAGTerm
from guidekit.terms.sag import SAGTerm
from guidekit.terms.seg import SEGTerm
from guidekit.terms.slg import SLGTerm
from guidekit.terms.tcfg import TCFGTerm
from guidekit.terms.zerostar import CFGZeroStarTerm

TERM_CLASSES: tuple[type[Term], ...] = (
    CondTerm, UncondTerm, CFGTerm, AutoguidanceTerm, CFGZeroStarTerm, TCFGTerm,
    PAGTerm, EMAGTerm, EMAGQTerm, SAGTerm, SEGTerm, SLGTerm,
)
PROCESSOR_CLASSES: tuple[type[Processor], ...] = (
    APGProjection, CFGRescale, CADSAnnealing, PLADISModifier, GAGModifier, NAGModifier,
)

#: constructor name -> class, e.g. ``"CFG" -> CFGTerm``
TERMS: dict[str, type[Term]] = {display_name(c): c for c in TERM_CLASSES}
PROCESSORS: dict[str, type[Processor]] = {display_name(c): c for c in PROCESSOR_CLASSES}
CONSTRUCTORS: dict[str, type] = {**TERMS, **PROCESSORS}


def kind(cls: type) -> str:
    """``"prediction"``, ``"direction"``, ``"nonlinear"``, ``"processor"``, ``"modifier"``
    (conditioning) or ``"attention"`` (an attention modifier: PLADIS, GAG, NAG)."""
    if issubclass(cls, AttentionModifier):
        return "attention"
    if issubclass(cls, InputModifier):
        return "modifier"
    if issubclass(cls, Processor):
        return "processor"
    if issubclass(cls, NonlinearPrediction):
        return "nonlinear"
    if issubclass(cls, DirectionTerm):
        return "direction"
    return "prediction"
