"""Oracles for ``Toward`` and Composable Diffusion, computed through the compiled plan.

Composable Diffusion, https://arxiv.org/abs/2206.01714 -- ``u + sum_i w_i (c_i - u)``;
a negative prompt next to the empty one is the case ``[w, -s]``: ``u + w (c - u) - s (c_neg - u)``.
"""

from __future__ import annotations

import numpy as np
import pytest

import guidekit
from guidekit import CFG, Cond, Toward, Uncond, composable, parse
from guidekit.errors import GuidanceTypeError, GuidanceValueError

from ._support import BATCH, FakeModel, branch, conditioning, np64, t64, tags, x_at

SIGMAS = (9.0, 2.5, 0.4)
NAMES = ("style", "neg", "neg2")


def composable_oracle(u: np.ndarray, cs: list[np.ndarray], ws: list[float]) -> np.ndarray:
    """Liu et al. 2022, eq. 10 (the official pipeline does not divide by the count)."""
    out = u.copy()
    for c, w in zip(cs, ws):
        out = out + w * (c - u)
    return out


def _run(expr: guidekit.Expr) -> tuple[list[np.ndarray], FakeModel]:
    main = FakeModel("main")
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    guided = guidekit.guide(
        plan, main, cond=conditioning("cond"), uncond=conditioning("uncond"),
        conds={n: conditioning(n) for n in NAMES},
    )
    return [np64(guided(t64(x_at(k)), s)) for k, s in enumerate(SIGMAS)], main


@pytest.mark.parametrize(
    "weights", [{"cond": 7.0}, {"cond": 3.0, "style": 2.0}, {"cond": 7.5, "neg": -2.0, "neg2": -0.5}]
)
def test_composable_matches_the_paper(weights: dict[str, float]) -> None:
    """``u + sum_i w_i (c_i - u)``, negative weights included, from one call per step."""
    expr = composable(weights)
    assert parse(str(expr)) == expr
    outs, main = _run(expr)
    for out, sigma in zip(outs, SIGMAS):
        cs = [branch("main", n, sigma) for n in weights]
        want = composable_oracle(branch("main", "uncond", sigma), cs, list(weights.values()))
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    assert [c["rows"] for c in main.calls] == [(1 + len(weights)) * BATCH] * len(SIGMAS)


def test_negative_prompt_next_to_the_empty_prompt() -> None:
    """``CFG(w) - Toward(s, 'neg')`` is ``u + w (c - u) - s (c_neg - u)``; rows c, u, neg."""
    w, s = 7.0, 2.5
    outs, main = _run(CFG(w) - Toward(s, "neg"))
    for out, sigma in zip(outs, SIGMAS):
        c, u, n = (branch("main", k, sigma) for k in ("cond", "uncond", "neg"))
        np.testing.assert_allclose(out, u + w * (c - u) - s * (n - u), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out, composable_oracle(u, [c, n], [w, -s]), rtol=1e-12)
    order = np.concatenate([tags(k) for k in ("cond", "uncond", "neg")]).tolist()
    assert main.row_tags() == [order] * len(SIGMAS)


def test_toward_from_another_base() -> None:
    """``Toward(s, 'style', negative='neg')`` is ``s (c_style - c_neg)``: a direction."""
    d = Toward(1.5, "style", negative="neg")
    assert d.weight == 0 and parse(str(d)) == d and str(d) == "Toward(1.5, 'style', negative='neg')"
    outs, _ = _run(Cond() + d)
    for out, sigma in zip(outs, SIGMAS):
        c, st, n = (branch("main", k, sigma) for k in ("cond", "style", "neg"))
        np.testing.assert_allclose(out, c + 1.5 * (st - n), rtol=1e-12, atol=1e-12)


def test_toward_default_is_cfg_direction() -> None:
    assert Uncond() + Toward(7) == Uncond() + Toward(7, "cond")
    outs, _ = _run(Uncond() + Toward(7))
    for out, sigma in zip(outs, SIGMAS):
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        np.testing.assert_allclose(out, u + 7 * (c - u), rtol=1e-12, atol=1e-12)


def test_bad_arguments_are_refused_by_name() -> None:
    with pytest.raises(GuidanceValueError, match="the same"):
        Toward(2, "neg", negative="neg")
    with pytest.raises(GuidanceTypeError, match="mapping"):
        composable({})
    with pytest.raises(GuidanceTypeError, match="'neg'"):
        composable({"cond": 7, "neg": "x"})  # type: ignore[dict-item]
