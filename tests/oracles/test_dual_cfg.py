"""Oracles for dual CFG, ComfyUI's ``DualCFGGuider`` (two positives ``p``, ``m``; negative ``n``).

regular: ``n + w2 (m - n) + w1 (p - m)``; nested: ``n + w2 (m + w1 (p - m) - n)``
(``w1`` = ``cfg_conds``, ``w2`` = ``cfg_cond2_negative``).
"""

from __future__ import annotations

import numpy as np
import pytest

import guidekit
from guidekit import dual_cfg, parse
from guidekit.errors import GuidanceTypeError

from ._support import BATCH, FakeModel, branch, conditioning, np64, t64, x_at

SIGMAS = (9.0, 2.5, 0.4)


def cfg(cond: np.ndarray, uncond: np.ndarray, w: float) -> np.ndarray:
    return uncond + w * (cond - uncond)


def dual_oracle(p: np.ndarray, m: np.ndarray, n: np.ndarray, w1: float, w2: float,
                nested: bool) -> np.ndarray:
    if nested:
        return cfg(cfg(p, m, w1), n, w2)
    return cfg(m, n, w2) + w1 * (p - m)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(("w1", "w2", "negative"), [(8.0, 3.0, "uncond"), (2.5, 1.0, "neg"), (1.0, 1.0, "uncond")])
def test_dual_cfg_matches_comfyui(w1: float, w2: float, negative: str, nested: bool) -> None:
    expr = dual_cfg(w1, w2, negative=negative, nested=nested)
    assert parse(str(expr)) == expr
    main = FakeModel("main")
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    guided = guidekit.guide(
        plan, main, cond=conditioning("cond"), uncond=conditioning("uncond"),
        conds={n: conditioning(n) for n in ("cond2", "neg")},
    )
    for k, sigma in enumerate(SIGMAS):
        out = np64(guided(t64(x_at(k)), sigma))
        p, m, n = (branch("main", b, sigma) for b in ("cond", "cond2", negative))
        np.testing.assert_allclose(out, dual_oracle(p, m, n, w1, w2, nested), rtol=1e-11, atol=1e-11)
    # w2 = 1 needs no negative rows and w1 = w2 = 1 is p alone, as ComfyUI's shortcut
    want = 1 if (w1, w2) == (1.0, 1.0) else 2 if w2 == 1.0 else 3
    assert {c["rows"] for c in main.calls} == {want * BATCH}


def test_dual_cfg_refuses_non_numbers() -> None:
    with pytest.raises(GuidanceTypeError, match="cfg_conds"):
        dual_cfg("8", 3)  # type: ignore[arg-type]
