"""Drawing a :class:`~.vocab.Scene` as a small RGB image, in numpy only (no fonts, no files).

Each pixel is the mean of ``supersample x supersample`` point samples (anti-aliased edges);
objects are painted in canonical order over the background. Jitter (drawn from the given
generator) keeps images of one caption apart: the centre moves by up to
:data:`CENTRE_JITTER` of the side, the radius by +-10 %, each colour channel by up to
:data:`COLOUR_JITTER`. Being plain float arithmetic, the result does not depend on a drawing
library's version.
"""

from __future__ import annotations

import numpy as np

from guidekit.models.scenes.vocab import Scene, SceneObject

#: Object centres as fractions of the side (x, y).
CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
           "bottom": (0.5, 0.75)}
#: Radii as fractions of the side; a square's half side and a triangle's circumradius
#: are scaled from it so the three shapes cover similar areas.
RADII = {"small": 0.11, "large": 0.19}
SQUARE_HALF = 0.88
TRIANGLE_RADIUS = 1.3
CENTRE_JITTER = 0.04
COLOUR_JITTER = 0.05
RGB = {
    "red": (0.86, 0.16, 0.16), "green": (0.16, 0.70, 0.24), "blue": (0.20, 0.31, 0.86),
    "yellow": (0.90, 0.82, 0.16), "purple": (0.59, 0.24, 0.75),
    "black": (0.06, 0.06, 0.06), "grey": (0.50, 0.50, 0.50), "white": (0.94, 0.94, 0.94),
}


def _inside(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of the points ``(x, y)`` (relative to the centre) inside ``shape``."""
    if shape == "circle":
        return np.asarray(x * x + y * y <= r * r)
    if shape == "square":
        h = SQUARE_HALF * r
        return np.asarray((np.abs(x) <= h) & (np.abs(y) <= h))
    # an upright equilateral triangle around its centroid: three half-planes
    R = TRIANGLE_RADIUS * r
    inside = np.ones(x.shape, dtype=bool)
    for angle in (np.pi / 2, 7 * np.pi / 6, 11 * np.pi / 6):  # outward normals, y down
        nx, ny = np.cos(angle), np.sin(angle)
        inside &= x * nx + y * ny <= R / 2
    return inside


def _jittered(rgb: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(rgb) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 1)


def render(
    scene: Scene, rng: np.random.Generator, size: int = 32, supersample: int = 4
) -> np.ndarray:
    """``[3, size, size]`` float32 image of ``scene`` in [0, 1]."""
    n = size * supersample
    grid = (np.arange(n) + 0.5) / supersample  # sample points in pixel units
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    image = np.broadcast_to(_jittered(RGB[scene.background], rng)[:, None, None], (3, n, n))
    image = image.copy()
    for obj in scene.objects:
        image = _paint(image, obj, xs, ys, size, rng)
    pooled = image.reshape(3, size, supersample, size, supersample).mean(axis=(2, 4))
    return pooled.astype(np.float32)


def _paint(image: np.ndarray, obj: SceneObject, xs: np.ndarray, ys: np.ndarray, size: int,
           rng: np.random.Generator) -> np.ndarray:
    fx, fy = CENTRES[obj.position]
    cx, cy = (np.array([fx, fy]) + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2)) * size
    r = RADII[obj.size] * size * rng.uniform(0.9, 1.1)
    mask = _inside(obj.shape, xs - cx, ys - cy, r)
    colour = _jittered(RGB[obj.colour], rng)
    return np.where(mask[None], colour[:, None, None], image)
