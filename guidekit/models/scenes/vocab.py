"""The scenes' attributes, their captions and the caption grammar (work in progress, issue 13).

A scene holds one or two objects on a plain background. Each object has a shape, a colour,
a size and a position; one object sits at one of four places (``left``, ``right``, ``top``,
``bottom``), two sit side by side (``left`` and ``right``) or one above the other (``top``
and ``bottom``). A :class:`Scene` keeps its objects in canonical order (the left or top one
first), so two captions that mention them in either order describe the same scene::

    a small red circle on the left on a black background
    a large blue square left of a small green triangle on a grey background
    a small green triangle right of a large blue square on a grey background   (the same)

:func:`caption` writes a caption, :func:`parse` reads one back; the grammar is fixed and
every word is in :data:`WORDS`, so a caption always round-trips.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
BACKGROUNDS = ("black", "grey", "white")
COUNTS = (1, 2)

#: Where one object is placed, as a caption says it.
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom"}
#: The relation of the FIRST-mentioned object of two to the second, by its position.
RELATIONS = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}
#: Two objects' positions: the canonical (first) one and its partner.
PARTNER = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

#: Every word a caption may hold, in a fixed order (the tokenizer's ids follow it).
WORDS = (
    "a", *SIZES, *COLOURS, *SHAPES, "on", "at", "the", "left", "right", "top", "bottom",
    "of", "above", "below", *BACKGROUNDS, "background",
)


def _one_of(values: Sequence[str]) -> Any:
    return attrs.validators.in_(values)


@attrs.frozen
class SceneObject:
    """One shape: ``shape`` in :data:`SHAPES`, ``colour``, ``size``, ``position``."""

    shape: str = attrs.field(validator=_one_of(SHAPES))
    colour: str = attrs.field(validator=_one_of(COLOURS))
    size: str = attrs.field(validator=_one_of(SIZES))
    position: str = attrs.field(validator=_one_of(POSITIONS))

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


def _as_objects(value: Iterable[SceneObject]) -> tuple[SceneObject, ...]:
    return tuple(value)


def _objects(instance: Scene, attribute: attrs.Attribute, value: tuple[SceneObject, ...]) -> None:
    if len(value) not in COUNTS:
        raise ValueError(f"Scene(objects=...): give 1 or 2 objects, got {len(value)}")
    if len(value) == 2:
        first, second = value
        if first.position not in ("left", "top") or second.position != PARTNER[first.position]:
            raise ValueError(
                f"Scene(objects=...): two objects sit left and right or top and bottom, the "
                f"left or top one first; got {first.position!r}, {second.position!r}"
            )


@attrs.frozen
class Scene:
    """One or two :class:`SceneObject` (canonical order) on a ``background``."""

    objects: tuple[SceneObject, ...] = attrs.field(converter=_as_objects, validator=_objects)
    background: str = attrs.field(validator=_one_of(BACKGROUNDS))

    @property
    def count(self) -> int:
        return len(self.objects)


def caption(scene: Scene, *, second_first: bool = False) -> str:
    """The caption of ``scene``; with two objects ``second_first`` mentions the right or
    bottom one first (``"... right of ..."`` / ``"... below ..."``)."""
    tail = f"on a {scene.background} background"
    if scene.count == 1:
        (obj,) = scene.objects
        return f"{obj.words()} {PLACE_PHRASES[obj.position]} {tail}"
    a, b = scene.objects[::-1] if second_first else scene.objects
    return f"{a.words()} {RELATIONS[a.position]} {b.words()} {tail}"


class _Reader:
    """Reads a caption word by word, naming the place and the expected words on an error."""

    def __init__(self, text: str) -> None:
        self.text, self.words, self.at = text, text.split(), 0

    def fail(self, expected: Sequence[str]) -> ValueError:
        got = self.words[self.at] if self.at < len(self.words) else "the end of the caption"
        return ValueError(
            f"caption {self.text!r}, word {self.at + 1}: expected "
            f"{' or '.join(map(repr, expected))}, got {got!r}"
        )

    def take(self, expected: Sequence[str]) -> str:
        if self.at < len(self.words) and self.words[self.at] in expected:
            self.at += 1
            return self.words[self.at - 1]
        raise self.fail(expected)

    def peek(self) -> str | None:
        return self.words[self.at] if self.at < len(self.words) else None

    def thing(self) -> tuple[str, str, str]:
        self.take(("a",))
        size, colour, shape = self.take(SIZES), self.take(COLOURS), self.take(SHAPES)
        return shape, colour, size


def parse(text: str) -> Scene:
    """The :class:`Scene` a caption describes (the inverse of :func:`caption`)."""
    r = _Reader(text)
    shape, colour, size = r.thing()
    place = r.peek()
    if place in ("on", "at"):
        r.take(("on", "at"))
        r.take(("the",))
        pos = r.take(("left", "right") if place == "on" else ("top", "bottom"))
        objects = [SceneObject(shape, colour, size, pos)]
    else:
        rel = r.take(("left", "right", "above", "below"))
        if rel in ("left", "right"):
            r.take(("of",))
        pos = {"left": "left", "right": "right", "above": "top", "below": "bottom"}[rel]
        other = r.thing()
        objects = [SceneObject(shape, colour, size, pos), SceneObject(*other, PARTNER[pos])]
        if pos in ("right", "bottom"):
            objects.reverse()
    r.take(("on",))
    r.take(("a",))
    background = r.take(BACKGROUNDS)
    r.take(("background",))
    if r.peek() is not None:
        raise r.fail(("the end of the caption",))
    return Scene(tuple(objects), background)
