"""guidekit: composable diffusion guidance compiled to one batched forward per step.

    >>> from guidekit import CFG, Autoguidance, APG, compile
    >>> g = CFG(7) + Autoguidance(1.5) | APG(eta=0)
"""

from guidekit.branch import Branch
from guidekit.combinators import (
    APG,
    CADS,
    GAG,
    NAG,
    PLADIS,
    APGProjection,
    APGState,
    CADSAnnealing,
    CFGRescale,
    DynamicThreshold,
    GAGModifier,
    Gated,
    NAGModifier,
    Piped,
    Pipeline,
    PLADISModifier,
    Rescale,
)
from guidekit.compile import compile
from guidekit.errors import GuidanceError, GuidanceTypeError, GuidanceValueError, ParseError
from guidekit.expr import Expr, Scaled, Sum
from guidekit.padding import Tokens
from guidekit.parse import parse
from guidekit.plan import CallRecord, ForwardGroup, Plan
from guidekit.runner import Guided, guide
from guidekit.schedules import Beta, Constant, Cosine, Linear, Piecewise, PowerLaw, Window
from guidekit.spaces import Noise, convert
from guidekit.split import AutoSplit, FixedSplit
from guidekit.state import State
from guidekit.terms import (
    CFG,
    EMAG,
    EMAGQ,
    FDG,
    ICG,
    PAG,
    SAG,
    SEG,
    SLG,
    TCFG,
    TPG,
    Autoguidance,
    AutoguidanceTerm,
    BetaCFG,
    BetaCFGTerm,
    CFGpp,
    CFGppTerm,
    CFGTerm,
    CFGZeroStar,
    CFGZeroStarTerm,
    Cond,
    CondTerm,
    EMAGQTerm,
    EMAGTerm,
    FDGTerm,
    ICGTerm,
    PAGTerm,
    PerpNeg,
    PerpNegTerm,
    SAGTerm,
    SEGTerm,
    SLGTerm,
    TCFGTerm,
    Toward,
    TowardTerm,
    TPGTerm,
    Uncond,
    UncondTerm,
    composable,
    dual_cfg,
)

__version__ = "0.1.0"

__all__ = [
    "APG", "APGProjection", "APGState", "AutoSplit", "Autoguidance", "AutoguidanceTerm",
    "Branch", "CADS", "CADSAnnealing", "CFG", "CFGRescale", "CFGTerm", "CFGZeroStar",
    "CFGZeroStarTerm", "CallRecord", "Cond", "CondTerm", "Expr", "FixedSplit", "ForwardGroup",
    "Gated", "GuidanceError", "GuidanceTypeError", "GuidanceValueError", "Guided", "Noise",
    "ParseError", "Piped", "Pipeline", "Plan", "Rescale", "Scaled", "State", "Sum", "TCFG",
    "TCFGTerm", "Uncond", "UncondTerm", "compile", "convert", "guide", "parse",
    "PAG", "PAGTerm",
    "EMAG", "EMAGQ", "EMAGQTerm", "EMAGTerm",
    "SAG", "SAGTerm",
    "SEG", "SEGTerm", "SLG", "SLGTerm",
    "GAG", "GAGModifier", "NAG", "NAGModifier", "PLADIS", "PLADISModifier",
    "FDG", "FDGTerm", "DynamicThreshold",
    "Tokens",
    "CFGpp", "CFGppTerm",
    "TPG", "TPGTerm",
    "Toward", "TowardTerm", "composable",
    "PerpNeg", "PerpNegTerm",
    "ICG", "ICGTerm",
    "dual_cfg",
    "BetaCFG", "BetaCFGTerm",
    "Beta", "Constant", "Cosine", "Linear", "Piecewise", "PowerLaw", "Window",
]
