"""SEG (arXiv 2408.00760): the term, its kernel, the token grid and the query blur.

The blur is checked against an independent NumPy reference (``_seg_reference.py``); SEG on
real models: test_seg_models.py; on SD3's joint attention and Flux: test_seg_joint.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from guidekit import CFG, SEG, Cond, GuidanceTypeError, GuidanceValueError, parse
from guidekit.attention.seg import (
    BlurredQueryAttention,
    blur_queries,
    gaussian_blur,
    kernel_size,
    token_grid,
)
from guidekit.branch import Branch

from ._seg_reference import np_blur

# -- the term ------------------------------------------------------------------------------------


def test_term_normalises_and_round_trips() -> None:
    assert repr(SEG(3)) == "SEG(3)"  # infinite blur is the default
    assert SEG(3).blur_sigma == math.inf
    assert repr(SEG(3, blur_sigma=10, layers=[7, 8])) == "SEG(3, blur_sigma=10, layers=(7, 8))"
    assert SEG(2, blur_sigma=2) == SEG(2.0, blur_sigma=2.0)
    for expr in (SEG(3), CFG(3) + SEG(2, blur_sigma=0.5, layers=-1),
                 Cond() + SEG(1, blur_sigma=1e5, layers="mid_block"),
                 (CFG(2) + SEG(1, blur_sigma=4)).between(0.5, 3)):
        assert parse(repr(expr)) == expr
        assert repr(parse(repr(expr))) == repr(expr)
    assert parse("SEG(3, blur_sigma=inf)") == SEG(3)
    term = SEG(2, blur_sigma=4, layers=(1,))
    assert term.negative() == Branch("main", "cond", BlurredQueryAttention((1,), 4.0))
    assert SEG(1, blur_sigma=4).perturbation != SEG(1, blur_sigma=8).perturbation


@pytest.mark.parametrize(
    "kw, error, match",
    [({"blur_sigma": 0}, GuidanceValueError, "SEG\\(blur_sigma=...\\) must be a number > 0"),
     ({"blur_sigma": -1}, GuidanceValueError, "> 0"),
     ({"blur_sigma": float("nan")}, GuidanceValueError, "> 0"),
     ({"blur_sigma": True}, GuidanceValueError, "> 0"),
     ({"blur_sigma": "big"}, GuidanceValueError, "> 0"),
     ({"layers": 1.5}, GuidanceTypeError, "SEG\\(layers=...\\)"),
     ({"layers": ()}, GuidanceValueError, "SEG\\(layers=...\\)")],
)
def test_bad_values_name_the_term(kw: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SEG(2, **kw)


def test_kernel_sizes_follow_the_paper() -> None:
    # ceil(6 sigma) + 1, made odd
    assert [kernel_size(s) for s in (0.01, 0.3, 0.5, 1.0, 1.5, 2.0, 10.0)] == [
        1, 3, 3, 7, 9, 13, 61]


def test_token_grid_from_the_model_input() -> None:
    assert token_grid(96, (8, 12)) == (8, 12)
    assert token_grid(24, (8, 12)) == (4, 6)
    assert token_grid(6, (8, 12)) == (2, 3)
    assert token_grid(15, (9, 5)) == (5, 3)  # a stride-2 conv rounds odd sizes up
    with pytest.raises(GuidanceValueError, match=r"grid=\(H, W\)"):
        token_grid(7, (8, 12))


@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 5, 7), (1, 8, 8), (2, 2, 3), (1, 1, 5)])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0, 9999.0, 1e4, math.inf])
def test_blur_equals_the_numpy_reference(shape: tuple[int, ...], sigma: float) -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, *shape, dtype=torch.float64, generator=g)
    ref = np.stack([np_blur(i.numpy(), sigma) for i in img])
    if sigma > 9999:
        ours = img.mean(dim=(-2, -1), keepdim=True).expand_as(img)
    else:
        ours = gaussian_blur(img, sigma)
    assert np.abs(ours.numpy() - ref).max() < 1e-12
    # and through the query layout [rows, heads, tokens, dim]
    c, h, w = shape
    q = img.reshape(2, 1, c, h * w).transpose(-1, -2)  # one head, dim = channels
    out = blur_queries(q, sigma, (h, w))
    assert np.abs(out.transpose(-1, -2).reshape(2, c, h, w).numpy() - ref).max() < 1e-12


def test_blur_direction_matches_the_paper() -> None:
    """Defect 4 of diffusers' guider: larger sigma must mean MORE blur (queries closer to
    their mean), and above 9999 the queries ARE the mean."""
    # (kernels shorter than the grid: once clipped to it, the reflected kernel is no longer
    # Gaussian and the distance need not keep shrinking; the paper's code does the same)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 32 * 48, 4, dtype=torch.float64, generator=g)
    mean = q.mean(dim=-2, keepdim=True)
    dist = [float((blur_queries(q, s, (32, 48)) - mean).norm()) for s in (0.1, 0.5, 1, 2, 4)]
    assert dist[0] == pytest.approx(float((q - mean).norm()))  # a 1-tap kernel: unchanged
    assert all(a > b for a, b in zip(dist, dist[1:])), dist
    for s in (1e4, math.inf):
        assert torch.equal(blur_queries(q, s, None), mean.expand_as(q))
    assert not torch.equal(blur_queries(q, 9999, (32, 48)), mean.expand_as(q))  # still finite
