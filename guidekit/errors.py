"""Errors raised by guidekit: each names the offending term and the fix."""

from __future__ import annotations


class GuidanceError(Exception):
    """Base class of every error guidekit raises on purpose."""


class GuidanceTypeError(GuidanceError, TypeError):
    """An expression was built from the wrong kind of thing (a class, a tensor, two predictions)."""


class GuidanceValueError(GuidanceError, ValueError):
    """A value is out of range or inputs do not fit together (shapes, noise levels, scales)."""


class NonFiniteError(GuidanceValueError):
    """A model output or the guided output holds NaN or inf: the message names the step,
    sigma, branch and the terms that read it (see :mod:`guidekit.finite`)."""


class NonFiniteWarning(UserWarning):
    """The ``nonfinite="warn"`` form of :class:`NonFiniteError`: the run goes on."""


class ParseError(GuidanceValueError):
    """Malformed guidance text; ``position`` is the 0-based character offset of the problem."""

    def __init__(self, message: str, text: str, position: int) -> None:
        self.text = text
        self.position = position
        start = text.rfind("\n", 0, position) + 1
        end = text.find("\n", position)
        line = text[start:] if end < 0 else text[start:end]
        pointer = " " * (position - start) + "^"
        super().__init__(f"{message} at position {position}:\n  {line}\n  {pointer}")
