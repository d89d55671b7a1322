"""The demo's labelled PNG grid: one row per expression, one column per digit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from guidekit.models.cache import DIGITS

if TYPE_CHECKING:
    from guidekit.models.demo import DemoRow

#: Pixels per image pixel in the grid, and the gaps around cells.
ZOOM = 4
PAD = 4
HEADER = 18


def grid_size(n_rows: int, label_width: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a grid of ``n_rows`` expressions."""
    cell = 8 * ZOOM
    return (label_width + DIGITS * (cell + PAD) + PAD, HEADER + n_rows * (cell + PAD) + PAD)


def cell_box(row: int, digit: int, label_width: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the cell of ``digit`` in grid row ``row``."""
    cell = 8 * ZOOM
    left = label_width + PAD + digit * (cell + PAD)
    top = HEADER + PAD + row * (cell + PAD)
    return left, top, left + cell, top + cell


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """One ``[1, 8, 8]`` sample in [-1, 1] as uint8 grey ``[8 * ZOOM, 8 * ZOOM]``."""
    grey = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return grey.repeat_interleave(ZOOM, 0).repeat_interleave(ZOOM, 1)


def _text_centred(draw: Any, at: tuple[int, int], text: str, font: Any, centre_x: bool) -> None:
    """Draw ``text`` centred vertically on ``at`` (and horizontally with ``centre_x``); no
    ``anchor=``, which Pillow's bitmap fallback font does not support."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = at[0] - ((right - left) // 2 if centre_x else 0) - left
    draw.text((x, at[1] - (bottom + top) // 2), text, fill=0, font=font)


def render_grid(rows: Sequence[DemoRow]) -> Any:
    """A labelled PIL image: one row per entry, the first sample of each digit.

    The initial noise of sample ``k`` is the same in every row (same seed, same labels), so
    the rows show what each expression does to the same starting point.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    shown = list(rows)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_width = PAD + max([int(probe.textlength(r.entry.label, font=font)) for r in shown]
                            + [40]) + PAD
    size = grid_size(len(shown), label_width)
    img = Image.new("L", size, color=255)
    draw = ImageDraw.Draw(img)
    for d in range(DIGITS):
        left, _, right, _ = cell_box(0, d, label_width)
        _text_centred(draw, ((left + right) // 2, HEADER // 2), str(d), font, centre_x=True)
    for i, r in enumerate(shown):
        assert r.images is not None and r.labels is not None
        top = cell_box(i, 0, label_width)[1]
        _text_centred(draw, (PAD, top + 4 * ZOOM), r.entry.label, font, centre_x=False)
        for d in range(DIGITS):
            hits = torch.nonzero(r.labels == d).flatten().tolist()
            if not hits:
                continue
            pixels = to_pixels(r.images[hits[0]]).numpy()
            left, top_d, _, _ = cell_box(i, d, label_width)
            img.paste(Image.fromarray(pixels, mode="L"), (left, top_d))
    return img
