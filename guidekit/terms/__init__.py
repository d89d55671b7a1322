"""Guidance terms: the leaves of an expression."""

from guidekit.terms.autoguidance import Autoguidance, AutoguidanceTerm
from guidekit.terms.base import DirectionTerm, LinearTerm, NonlinearPrediction, Term
from guidekit.terms.betacfg import BetaCFG, BetaCFGTerm
from guidekit.terms.cfg import CFG, CFGTerm, Cond, CondTerm, Uncond, UncondTerm
from guidekit.terms.cfgpp import CFGpp, CFGppTerm
from guidekit.terms.dual import dual_cfg
from guidekit.terms.emag import EMAG, EMAGQ, EMAGQTerm, EMAGTerm
from guidekit.terms.fdg import FDG, FDGTerm
from guidekit.terms.icg import ICG, ICGTerm
from guidekit.terms.pag import PAG, PAGTerm
from guidekit.terms.perpneg import PerpNeg, PerpNegTerm
from guidekit.terms.sag import SAG, SAGTerm
from guidekit.terms.seg import SEG, SEGTerm
from guidekit.terms.slg import SLG, SLGTerm
from guidekit.terms.tcfg import TCFG, TCFGTerm
from guidekit.terms.toward import Toward, TowardTerm, composable
from guidekit.terms.tpg import TPG, TPGTerm
from guidekit.terms.zerostar import CFGZeroStar, CFGZeroStarTerm

__all__ = [
    "CFG", "CFGTerm", "CFGZeroStar", "CFGZeroStarTerm", "Cond", "CondTerm", "DirectionTerm",
    "LinearTerm", "NonlinearPrediction", "TCFG", "TCFGTerm", "Term", "Uncond", "UncondTerm",
    "Autoguidance", "AutoguidanceTerm",
    "PAG", "PAGTerm",
    "EMAG", "EMAGQ", "EMAGQTerm", "EMAGTerm",
    "SAG", "SAGTerm",
    "SEG", "SEGTerm", "SLG", "SLGTerm",
    "FDG", "FDGTerm",
    "CFGpp", "CFGppTerm",
    "TPG", "TPGTerm",
    "Toward", "TowardTerm", "composable",
    "PerpNeg", "PerpNegTerm",
    "ICG", "ICGTerm",
    "dual_cfg",
    "BetaCFG", "BetaCFGTerm",
]
