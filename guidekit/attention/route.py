"""Per-row dispatch, shared by perturbations and modifiers: which rows of a model call go
through which op in one hooked layer, and putting the rows back in order.

A layer's rows are cut into ``segments`` ``(start, stop, op)`` that cover ``0..rows`` in
order; ``op is None`` means the layer's own attention (all such rows in ONE call), any
other op (a perturbation, or a :class:`~guidekit.attention.modifiers.LayerOps`) is run on
its segment by the caller's ``modified``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

Ranges = tuple[tuple[int, int], ...]
Segment = tuple[int, int, Any]


def plain_ranges(segments: Sequence[Segment]) -> Ranges:
    """The row ranges of ``segments`` that go through the layer's own attention."""
    return tuple((a, b) for a, b, op in segments if op is None)


def add_block(segments: list[Segment], start: int, stop: int, op: Any) -> None:
    """Append rows ``start..stop`` with ``op``, merged into the last segment when they
    continue it with the same op."""
    if segments and segments[-1][2] == op and segments[-1][1] == start:
        segments[-1] = (segments[-1][0], stop, op)
    else:
        segments.append((start, stop, op))


def watches_only(op: Any) -> bool:
    """Whether ``op`` only watches its rows (EMAG's observed conditional rows): their output
    is the layer's own attention."""
    return op is not None and getattr(op, "observes_only", False)


def watched_as_plain(segments: Sequence[Segment]) -> list[Segment]:
    """``segments`` with the rows an op only watches as plain rows (adjacent ones merged):
    what the layer's own attention computes once their op has seen them."""
    out: list[Segment] = []
    for a, b, op in segments:
        add_block(out, a, b, None if watches_only(op) else op)
    return out


def _rows(out: Any, a: int, b: int) -> Any:
    return tuple(t[a:b] for t in out) if isinstance(out, tuple) else out[a:b]


def assemble(
    segments: Sequence[Segment],
    plain: Callable[[Ranges], Any],
    modified: Callable[[Any, int, int], Any],
) -> Any:
    """Run the plain rows in one call and each other segment on its own; rows in order.

    An output is one tensor, or a tuple of streams (joint attention: image, text), each
    put back in order.
    """
    ranges = plain_ranges(segments)
    plain_out = plain(ranges) if ranges else None
    pieces: list[Any] = []
    offset = 0
    for a, b, op in segments:
        if op is None:
            pieces.append(_rows(plain_out, offset, offset + b - a))
            offset += b - a
        else:
            pieces.append(modified(op, a, b))
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*pieces))
    return torch.cat(pieces)


@attrs.frozen
class Route:
    """How one hooked layer treats the rows of one model call.

    ``segments`` cover ``0..rows`` in order; a segment with a perturbation is computed by it,
    the others (``None``) go through the layer's own attention together.
    """

    rows: int
    segments: tuple[Segment, ...]
    #: the call's first row in its forward group and the sampler batch (see RowLayout)
    offset: int = 0
    batch: int = 0
    #: the unperturbed row ranges, in order (derived from ``segments``)
    plain: tuple[tuple[int, int], ...] = attrs.field(init=False)

    @plain.default
    def _plain(self) -> tuple[tuple[int, int], ...]:
        return plain_ranges(self.segments)

    def sample(self, row: int) -> int:
        """Index in the sampler's batch of the call's row ``row``."""
        return (row + self.offset) % self.batch if self.batch else row


@attrs.frozen
class LayerOps:
    """What one hooked layer applies: an attention core (PLADIS / GAG) and / or NAG."""

    core: Any = None
    nag: Any = None


@attrs.frozen
class LayerCall:
    """How one hooked layer treats the rows of one model call.

    ``segments`` cover ``0..rows`` in order as ``(start, stop, ops)``
    (:mod:`guidekit.attention.route`); ``ops`` is a :class:`LayerOps`, or ``None`` for the
    layer's own attention. ``negatives`` maps a sample index to the
    call's row of NAG's negative conditioning for that sample.
    """

    rows: int
    segments: tuple[tuple[int, int, LayerOps | None], ...]
    negatives: tuple[tuple[int, int], ...]
    layout: Any = attrs.field(eq=False, hash=False, repr=False)

    def negative_row(self, row: int) -> int | None:
        """The call's row holding the negative context of ``row``'s sample, if any."""
        return dict(self.negatives).get(self.layout.sample(row))
