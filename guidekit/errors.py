"""Errors raised by guidekit: each names the offending term and the fix."""

from __future__ import annotations


class GuidanceError(Exception):
    """Base class of every error guidekit raises on purpose."""


class GuidanceTypeError(GuidanceError, TypeError):
    """An expression was built from the wrong kind of thing (a class, a tensor, two predictions)."""


class GuidanceValueError(GuidanceError, ValueError):
    """A value is out of range or inputs do not fit together (shapes, noise levels, scales)."""


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
