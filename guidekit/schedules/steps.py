"""What a plan needs of its schedules per step: which parts hold them, and their values there.

A plan whose expression, post-processors or modifiers hold no schedule runs exactly as
before (one program per interval between gate bounds). A scheduled plan builds one program
per noise level of the run (cached), with every scheduled coefficient evaluated there, each
nonlinear term and post-processor resolved to plain numbers (:func:`resolve`), and each
attention modifier resolved or switched off (:func:`modifier_at`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from guidekit.schedule import Schedule, resolve, scheduled_fields
from guidekit.schedules.progress import Level, needs_sigmas


def _nodes(expr: Any) -> Iterable[Any]:
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children()))


def scheduled_parts(expr: Any, steps: Iterable[Any]) -> tuple[tuple[Any, Schedule], ...]:
    """``(part, schedule)`` for each scheduled field of the expression's terms and of the
    pipe's steps, in order (empty: the plan has no schedule)."""
    out: list[tuple[Any, Schedule]] = []
    for part in (*_nodes(expr), *steps):
        out.extend((part, s) for s in scheduled_fields(part).values())
        # a term whose formula reads the progress itself (BetaCFG's time curve)
        implicit = getattr(part, "implicit_schedules", None)
        if implicit is not None:
            out.extend((part, s) for s in implicit())
    return tuple(dict.fromkeys(out))


def check_progress(parts: tuple[tuple[Any, Schedule], ...], sigmas: Any) -> None:
    """Refuse a step whose schedules need the run's progress when the run's levels are unknown,
    naming the term (the shape's own error names only the shape)."""
    if sigmas is not None:
        return
    for part, s in parts:
        if not s.progress_free():
            err = needs_sigmas(s)
            raise type(err)(f"{part!r}: {err}")


def level_at(sigma: float, sigmas: Any, structural: bool = False) -> Level:
    """The :class:`Level` of a step; ``structural`` (a plan printed or inspected with no run)
    reads a progress shape at ``r = 1/2`` rather than refusing."""
    return Level(sigma, sigmas, 0.5 if structural else None)


#: the value of an attention modifier's scale at which it changes nothing (GAG has none)
NEUTRAL = {"NAG": 1.0, "PLADIS": 0.0}


def modifier_at(modifier: Any, where: Level) -> Any:
    """The attention modifier as it acts at ``where``: resolved to numbers, or ``None`` when
    it is gated off there or its scale is at its neutral value (the layer's own attention)."""
    window = getattr(modifier, "window", None)
    if window is not None and not window[0] < where.sigma <= window[1]:
        return None
    out = resolve(modifier, where)
    if window is not None:
        import attrs

        out = attrs.evolve(out, window=None)
    neutral = NEUTRAL.get(getattr(type(modifier), "_name", ""))
    if neutral is not None and scheduled_fields(modifier) and out.scale == neutral:
        return None
    return out


def is_dynamic(modifier: Any) -> bool:
    """Whether an attention modifier changes with the noise level (gated or scheduled)."""
    return getattr(modifier, "window", None) is not None or bool(scheduled_fields(modifier))
