"""Post-processors, input modifiers and gates."""

from guidekit.combinators.apg import APG, APGProjection, APGState
from guidekit.combinators.base import AttentionModifier, InputModifier, Processor
from guidekit.combinators.cads import CADS, CADSAnnealing
from guidekit.combinators.extrapolation import (
    GAG,
    NAG,
    PLADIS,
    GAGModifier,
    NAGModifier,
    PLADISModifier,
)
from guidekit.combinators.interval import Gated
from guidekit.combinators.pipe import Piped, Pipeline
from guidekit.combinators.rescale import CFGRescale, Rescale
from guidekit.combinators.threshold import DynamicThreshold

__all__ = [
    "APG", "APGProjection", "APGState", "CADS", "CADSAnnealing", "CFGRescale", "Gated",
    "InputModifier", "Piped", "Pipeline", "Processor", "Rescale",
    "AttentionModifier", "GAG", "GAGModifier", "NAG", "NAGModifier", "PLADIS", "PLADISModifier",
    "DynamicThreshold",
]
