"""``expr | p | q``: pipe a prediction through post-processors, left to right.

The piped expression and the pipeline live in :mod:`guidekit.processor` with the
post-processors they hold; they are importable from here as before.
"""

from guidekit.processor import Piped, Pipeline, chain, pipe

__all__ = ["Piped", "Pipeline", "chain", "pipe"]
