"""Oracles for Perp-Neg, computed through the compiled plan.

https://arxiv.org/abs/2304.04968, App. A.1, Alg. 1 --
``u + w [ (c - u) - sum_i w_i perp(c_neg_i - u, c - u) ]``, ``perp(a, b) = a - (<a,b>/<b,b>) b``
per sample.
"""

from __future__ import annotations

import numpy as np
import pytest

import guidekit
from guidekit import PerpNeg, parse
from guidekit.errors import GuidanceValueError

from ._support import FakeModel, branch, conditioning, np64, t64, x_at

SIGMAS = (9.0, 2.5, 0.4)


def perp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The part of vector ``a`` perpendicular to vector ``b`` (both flat)."""
    return a - (a @ b) / (b @ b) * b


def perpneg_oracle(
    c: np.ndarray, u: np.ndarray, negs: list[np.ndarray], w: float, ws: list[float]
) -> np.ndarray:
    """Alg. 1, one sample at a time."""
    out = []
    for i in range(c.shape[0]):
        pos = (c[i] - u[i]).ravel()
        total = pos.copy()
        for n, wn in zip(negs, ws):
            total -= wn * perp((n[i] - u[i]).ravel(), pos)
        out.append(u[i] + w * total.reshape(c[i].shape))
    return np.stack(out)


def _run(expr: guidekit.Expr, prediction: str = "eps") -> list[np.ndarray]:
    plan = guidekit.compile(expr, prediction=prediction, noise="ve")
    guided = guidekit.guide(
        plan, FakeModel("main"), cond=conditioning("cond"), uncond=conditioning("uncond"),
        conds={n: conditioning(n) for n in ("style", "neg", "neg2")},
    )
    return [np64(guided(t64(x_at(k)), s)) for k, s in enumerate(SIGMAS)]


@pytest.mark.parametrize(
    ("expr", "negs", "ws"),
    [
        (PerpNeg(7.5), ["neg"], [1.0]),
        (PerpNeg(5, negative="neg", neg_scale=2.5), ["neg"], [2.5]),
        (PerpNeg(4, negative=("neg", "neg2"), neg_scale=(1.0, -0.5)), ["neg", "neg2"], [1.0, -0.5]),
        (PerpNeg(4, negative=("neg", "neg2"), neg_scale=0.5), ["neg", "neg2"], [0.5, 0.5]),
    ],
)
def test_perpneg_matches_algorithm_1(expr: guidekit.Expr, negs: list[str], ws: list[float]) -> None:
    assert parse(str(expr)) == expr
    for out, sigma in zip(_run(expr), SIGMAS):
        c, u = branch("main", "cond", sigma), branch("main", "uncond", sigma)
        want = perpneg_oracle(c, u, [branch("main", n, sigma) for n in negs], expr.scale, ws)
        np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)


def test_perpneg_is_per_sample_not_per_batch() -> None:
    """Projecting over the whole batch (ComfyUI) gives another answer when B > 1."""
    sigma = SIGMAS[0]
    out = _run(PerpNeg(3))[0]
    c, u, n = (branch("main", k, sigma) for k in ("cond", "uncond", "neg"))
    pos, neg = (c - u).ravel(), (n - u).ravel()
    batchwide = u + 3 * (c - u - perp(neg, pos).reshape(c.shape))
    assert not np.allclose(out, batchwide, rtol=1e-6, atol=1e-6)


def test_perpneg_is_the_same_in_every_prediction_space() -> None:
    """Run in x0 and in eps, the same branch outputs give results that convert into each other."""
    expr = PerpNeg(6, negative=("neg", "neg2"), neg_scale=(1.0, 0.7), cond="style")
    plan = guidekit.compile(expr, prediction="eps", noise="ve")
    guided = guidekit.guide(
        plan, FakeModel("main"), cond=conditioning("cond"), uncond=conditioning("uncond"),
        conds={n: conditioning(n) for n in ("style", "neg", "neg2")}, output="x0",
    )
    for k, sigma in enumerate(SIGMAS):
        x = x_at(k)
        got = np64(guided(t64(x), sigma))
        # every branch in x0 (VE eps: x0 = x - sigma eps), then Alg. 1 there
        st, u, n1, n2 = (x - sigma * branch("main", b, sigma) for b in ("style", "uncond", "neg", "neg2"))
        want = perpneg_oracle(st, u, [n1, n2], 6, [1.0, 0.7])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_bad_arguments_are_refused_by_name() -> None:
    with pytest.raises(GuidanceValueError, match="neg_scale has 2 weights for 1"):
        PerpNeg(7, negative="neg", neg_scale=(1, 2))
    with pytest.raises(GuidanceValueError, match="unconditional"):
        PerpNeg(7, negative="uncond")
    with pytest.raises(GuidanceValueError, match="twice"):
        PerpNeg(7, negative=("neg", "neg"))


def test_one_negative_prints_bare_and_parses_back() -> None:
    e = PerpNeg(7, negative="x", neg_scale=0.5)
    assert str(e) == "PerpNeg(7, negative='x', neg_scale=0.5)" and parse(str(e)) == e
    assert e == PerpNeg(7, negative=("x",), neg_scale=(0.5,))
    two = PerpNeg(7, negative=("a", "b"), neg_scale=(1, 2))
    assert str(two) == "PerpNeg(7, negative=('a', 'b'), neg_scale=(1, 2))" and parse(str(two)) == two
