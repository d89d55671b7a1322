"""Guidance interval: restrict a term to a range of noise levels.

https://arxiv.org/abs/2404.07724 -- guidance applied only for ``sigma`` in ``(lo, hi]``,
plain ``c`` elsewhere; scheduled by noise level, never by step count. ``expr.between(lo, hi)``
builds the :class:`Gated` node, which lives with the other nodes in :mod:`guidekit.expr`.
"""

from guidekit.checks import RTOL, snap
from guidekit.expr import Gated, gate

__all__ = ["RTOL", "Gated", "gate", "snap"]
