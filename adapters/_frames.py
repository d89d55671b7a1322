"""The nearest frame up the call stack that matches: how an adapter reads what its caller
never hands it (a solver's grid, a sampler's schedule, the pipeline making the call)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType


def calling_frame(match: Callable[[FrameType], bool], depth: int | None = None) -> FrameType | None:
    """The nearest frame for which ``match`` holds, from the one that called this
    function's caller upwards, looking at ``depth`` frames at most (``None``: all)."""
    frame: FrameType | None = sys._getframe(2)
    seen = 0
    while frame is not None and (depth is None or seen < depth):
        if match(frame):
            return frame
        frame, seen = frame.f_back, seen + 1
    return None


__all__ = ["calling_frame"]
