"""A scene as one integer per attribute head: what the attribute classifier predicts.

The heads (:data:`HEADS`, name -> number of classes) describe a :class:`~.vocab.Scene` in
canonical order: ``count`` (0: one object, 1: two), ``position`` of the first object (for
two objects ``left`` or ``top``, which fixes the second), the first object's ``shape1``,
``colour1``, ``size1``, the second's ``shape2``, ``colour2``, ``size2`` (each with a last
class "none" for one-object scenes) and the ``background``. :func:`scene_labels` and
:func:`scene_from_labels` are inverses.
"""

from __future__ import annotations

from collections.abc import Mapping

from guidekit.models.scenes.vocab import (
    BACKGROUNDS,
    COLOURS,
    COUNTS,
    PARTNER,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
)

_PER_OBJECT = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}

#: Attribute head -> number of classes (the second object's heads have an extra "none").
HEADS: dict[str, int] = {
    "count": len(COUNTS),
    "position": len(POSITIONS),
    **{f"{k}1": len(v) for k, v in _PER_OBJECT.items()},
    **{f"{k}2": len(v) + 1 for k, v in _PER_OBJECT.items()},
    "background": len(BACKGROUNDS),
}


def scene_labels(scene: Scene) -> dict[str, int]:
    """One class index per head of :data:`HEADS`."""
    first = scene.objects[0]
    out = {"count": COUNTS.index(scene.count), "position": POSITIONS.index(first.position)}
    for k, values in _PER_OBJECT.items():
        out[f"{k}1"] = values.index(getattr(first, k))
        out[f"{k}2"] = (values.index(getattr(scene.objects[1], k)) if scene.count == 2
                        else len(values))
    out["background"] = BACKGROUNDS.index(scene.background)
    return out


def scene_from_labels(labels: Mapping[str, int]) -> Scene:
    """The scene of one class index per head (the inverse of :func:`scene_labels`).

    A label set no scene has (two objects with the first on the right, a second object
    with a "none" attribute, ...) raises ``ValueError`` naming the head.
    """
    missing = set(HEADS) - set(labels)
    if missing:
        raise ValueError(f"scene_from_labels: missing heads {sorted(missing)}")
    count = COUNTS[labels["count"]]
    pos = POSITIONS[labels["position"]]

    def obj(i: int, position: str) -> SceneObject:
        values = {}
        for k, names in _PER_OBJECT.items():
            idx = labels[f"{k}{i}"]
            if not 0 <= idx < len(names):
                raise ValueError(
                    f"scene_from_labels: head {k}{i} = {idx} is not one of 0..{len(names) - 1} "
                    f"for a scene of {count} object(s)"
                )
            values[k] = names[idx]
        return SceneObject(position=position, **values)

    objects = [obj(1, pos)]
    if count == 2:
        objects.append(obj(2, PARTNER[pos]))
    else:
        for k, names in _PER_OBJECT.items():
            if labels[f"{k}2"] != len(names):
                raise ValueError(
                    f"scene_from_labels: head {k}2 must be {len(names)} ('none') for a "
                    f"one-object scene, got {labels[f'{k}2']}"
                )
    return Scene(tuple(objects), BACKGROUNDS[labels["background"]])
