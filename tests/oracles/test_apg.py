"""Oracle for adaptive projected guidance (APG), https://arxiv.org/abs/2410.02416, Algorithm 1.

The oracle is a numpy float64 transcription of Algorithm 1 as written in
/work/shared/reference/methods.md, run in x0 space: it converts the model's eps / flow
predictions to x0 itself, applies APG with momentum carried across the steps of one run,
and converts the result back to the model's space to compare with what guidekit returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

import guidekit
from guidekit import APG, CFG, Autoguidance, Cond

from ._support import FakeModel, branch, conditioning, noise_coefficients, np64, t64, x_at

VE_SIGMAS = (14.0, 6.0, 2.5, 1.0, 0.4, 0.1)
FLOW_SIGMAS = (0.95, 0.8, 0.6, 0.4, 0.2, 0.05)
W = 4.0
BETA = -0.5


# -- the oracle ----------------------------------------------------------------------------------


def to_x0(pred: np.ndarray, space: str, x: np.ndarray, sigma: float, noise: str) -> np.ndarray:
    """x0 from a prediction in ``space`` (x = a x0 + b n)."""
    if space == "x0":
        return pred
    if space == "eps" and noise == "ve":  # x = x0 + sigma eps
        return x - sigma * pred
    if space == "eps" and noise == "vp":  # x = a x0 + b eps, a = 1/sqrt(1+s^2), b = s a
        a, b = noise_coefficients("vp", sigma)
        return (x - b * pred) / a
    if space == "flow" and noise == "flow":  # x = (1-s) x0 + s n, v = n - x0
        return x - sigma * pred
    raise AssertionError((space, noise))


def from_x0(x0: np.ndarray, space: str, x: np.ndarray, sigma: float, noise: str) -> np.ndarray:
    """Inverse of :func:`to_x0` at the same ``x`` and ``sigma``."""
    if space == "x0":
        return x0
    if space == "eps" and noise == "ve":
        return (x - x0) / sigma
    if space == "eps" and noise == "vp":
        a, b = noise_coefficients("vp", sigma)
        return (x - a * x0) / b
    if space == "flow" and noise == "flow":
        return (x - x0) / sigma
    raise AssertionError((space, noise))


def per_sample_norm(d: np.ndarray) -> np.ndarray:
    """L2 norm over all non-batch dims, shaped to broadcast against ``d``."""
    return np.sqrt((d.reshape(len(d), -1) ** 2).sum(1)).reshape(-1, *([1] * (d.ndim - 1)))


def apg_step(
    c: np.ndarray,
    u: np.ndarray,
    w: float,
    eta: float,
    r: float | None,
    beta: float,
    m_prev: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 in x0 space; returns ``(out, new momentum)``. ``m_prev=None``: no history."""
    d = c - u  # 1
    m = d if m_prev is None else d + beta * m_prev  # 2: m <- D + beta m
    d = m
    if r is not None:  # 3: D <- D min(1, r / ||D||)
        d = d * np.minimum(1.0, r / per_sample_norm(d))
    axes = tuple(range(1, c.ndim))
    cc = (c * c).sum(axes, keepdims=True)
    coef = np.where(cc > 0, (d * c).sum(axes, keepdims=True) / np.where(cc > 0, cc, 1.0), 0.0)
    d_par = coef * c  # 4
    d_perp = d - d_par
    return c + (w - 1.0) * (d_perp + eta * d_par), m  # 5


# -- helpers --------------------------------------------------------------------------------------


def _guide(expr: guidekit.Expr, prediction: str, noise: str, sigmas: Sequence[float] | None,
           **models: FakeModel) -> guidekit.Guided:
    plan = guidekit.compile(expr, prediction=prediction, noise=noise)
    return guidekit.guide(
        plan, FakeModel("main"), cond=conditioning("cond"), uncond=conditioning("uncond"),
        models=models, sigmas=sigmas,
    )


def _x0_branches(sigma: float, x: np.ndarray, prediction: str, noise: str,
                 models: Sequence[str] = ("main",)) -> dict[str, np.ndarray]:
    out = {
        "c": to_x0(branch("main", "cond", sigma), prediction, x, sigma, noise),
        "u": to_x0(branch("main", "uncond", sigma), prediction, x, sigma, noise),
    }
    if "weak" in models:
        out["cw"] = to_x0(branch("weak", "cond", sigma), prediction, x, sigma, noise)
    return out


def _median_momentum_norm(sigmas: Sequence[float], prediction: str, noise: str) -> float:
    """A threshold that clamps some (sample, step) pairs and not others: momentum is stored
    before clamping, so these norms do not depend on the threshold itself."""
    m: np.ndarray | None = None
    norms: list[float] = []
    for k, sigma in enumerate(sigmas):
        b = _x0_branches(sigma, x_at(k), prediction, noise)
        d = b["c"] - b["u"]
        m = d if m is None else d + BETA * m
        norms.extend(per_sample_norm(m).ravel())
    return float(np.median(norms))


SPACES = [
    ("eps", "ve", VE_SIGMAS),
    ("eps", "vp", VE_SIGMAS),
    ("flow", "flow", FLOW_SIGMAS),
    ("x0", "ve", VE_SIGMAS),
]


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.3])
@pytest.mark.parametrize(("prediction", "noise", "sigmas"), SPACES)
def test_apg_multistep_matches_algorithm_1(
    prediction: str, noise: str, sigmas: tuple[float, ...], eta: float
) -> None:
    """Six steps of ``CFG(4) | APG(eta, r, momentum=-0.5)`` against Algorithm 1 in float64."""
    r = _median_momentum_norm(sigmas, prediction, noise)
    guided = _guide(CFG(W) | APG(eta=eta, norm_threshold=r, momentum=BETA), prediction, noise,
                    sigmas)
    m = None
    clamped: list[bool] = []
    for k, sigma in enumerate(sigmas):
        x = x_at(k)
        out = np64(guided(t64(x), sigma))
        b = _x0_branches(sigma, x, prediction, noise)
        want_x0, m_new = apg_step(b["c"], b["u"], W, eta, r, BETA, m)
        clamped.extend((per_sample_norm(m_new) > r).ravel())
        m = m_new
        want = from_x0(want_x0, prediction, x, sigma, noise)
        np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-9, err_msg=f"step {k}")
    assert guided.steps == len(sigmas)
    assert any(clamped) and not all(clamped)  # both sides of min(1, r / ||D||) were exercised


@pytest.mark.parametrize(("prediction", "noise", "sigmas"), SPACES[:3])
def test_apg_without_threshold_or_momentum(
    prediction: str, noise: str, sigmas: tuple[float, ...]
) -> None:
    """Defaults (no threshold, no momentum, eta 0): each step is the stateless projection."""
    guided = _guide(CFG(W) | APG(), prediction, noise, sigmas)
    for k, sigma in enumerate(sigmas):
        x = x_at(k)
        out = np64(guided(t64(x), sigma))
        b = _x0_branches(sigma, x, prediction, noise)
        want_x0, _ = apg_step(b["c"], b["u"], W, 0.0, None, 0.0, None)
        np.testing.assert_allclose(out, from_x0(want_x0, prediction, x, sigma, noise),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("eta", [0.0, 0.3])
@pytest.mark.parametrize(("prediction", "noise", "sigmas"), [SPACES[0], SPACES[2]])
def test_apg_on_autoguided_cfg_is_emag_composition(
    prediction: str, noise: str, sigmas: tuple[float, ...], eta: float
) -> None:
    """``CFG(w) + Autoguidance(s) | APG`` is APG on ``c' = c + (s/w)(c - c_weak)`` vs ``u``.

    This is how the EMAG paper composes its guided conditional with APG (documented in
    guidekit/combinators/apg.py): ``u + w (c' - u) = u + w (c - u) + s (c - c_weak)``.
    """
    s, r = 1.5, 3.0
    guided = _guide(CFG(W) + Autoguidance(s) | APG(eta=eta, norm_threshold=r, momentum=BETA),
                    prediction, noise, sigmas, weak=FakeModel("weak"))
    m = None
    for k, sigma in enumerate(sigmas):
        x = x_at(k)
        out = np64(guided(t64(x), sigma))
        b = _x0_branches(sigma, x, prediction, noise, models=("main", "weak"))
        c_prime = b["c"] + (s / W) * (b["c"] - b["cw"])
        want_x0, m = apg_step(c_prime, b["u"], W, eta, r, BETA, m)
        np.testing.assert_allclose(out, from_x0(want_x0, prediction, x, sigma, noise),
                                   rtol=1e-9, atol=1e-9, err_msg=f"step {k}")


def test_gated_off_step_leaves_momentum_unchanged() -> None:
    """While the CFG update is gated off the output is ``c`` and the momentum is untouched.

    The guidance is active for sigma in (5, inf] (steps 0-1) and (0, 0.5] (steps 4-5); steps
    2-3 are plain ``c``, and step 4 continues from the momentum left by step 1.
    """
    direction = CFG(W) - Cond()
    expr = Cond() + direction.between(5, float("inf")) + direction.between(0, 0.5)
    r = 6.0
    guided = _guide(expr | APG(eta=0.3, norm_threshold=r, momentum=BETA), "eps", "ve", VE_SIGMAS)
    m = None
    momenta = []
    for k, sigma in enumerate(VE_SIGMAS):
        x = x_at(k)
        out = np64(guided(t64(x), sigma))
        b = _x0_branches(sigma, x, "eps", "ve")
        if 0.5 < sigma <= 5:  # gated off: no CFG update, no momentum update
            np.testing.assert_allclose(out, branch("main", "cond", sigma), rtol=1e-9, atol=1e-9)
        else:
            want_x0, m = apg_step(b["c"], b["u"], W, 0.3, r, BETA, m)
            np.testing.assert_allclose(out, from_x0(want_x0, "eps", x, sigma, "ve"),
                                       rtol=1e-9, atol=1e-9, err_msg=f"step {k}")
        (apg_state,) = guided.state.named().values()
        momenta.append(apg_state.momentum)
    assert momenta[2] is not None
    assert momenta[1].equal(momenta[2]) and momenta[2].equal(momenta[3])
    assert not momenta[3].equal(momenta[4])
    # the uncond branch is not even computed while gated off
    assert [c.rows for c in guided.calls] == [6, 6, 3, 3, 6, 6]


def test_heun_repeated_level_does_not_double_advance_momentum() -> None:
    """Heun evaluates each inner level twice (its corrector, then the next step's predictor).

    Both calls at level k compute from the momentum committed at level k-1, and the last one
    is what level k commits; the momentum advances once per schedule level, not per call.
    """
    schedule = (*VE_SIGMAS, 0.0)
    r = 8.0
    guided = _guide(CFG(W) | APG(eta=0.3, norm_threshold=r, momentum=BETA), "eps", "ve", schedule)
    # (level, sigma, x): level 0 once, then levels 1..5 twice with different x
    calls = [(0, VE_SIGMAS[0], x_at(0))]
    for k in range(1, len(VE_SIGMAS)):
        calls += [(k, VE_SIGMAS[k], x_at(100 + k)), (k, VE_SIGMAS[k], x_at(k))]
    committed: dict[int, np.ndarray] = {}
    m_naive = None
    differs_from_naive = False
    for level, sigma, x in calls:
        out = np64(guided(t64(x), sigma))
        b = _x0_branches(sigma, x, "eps", "ve")
        want_x0, committed[level] = apg_step(b["c"], b["u"], W, 0.3, r, BETA,
                                             committed.get(level - 1))
        np.testing.assert_allclose(out, from_x0(want_x0, "eps", x, sigma, "ve"),
                                   rtol=1e-9, atol=1e-9, err_msg=f"level {level}")
        # a per-call momentum would give something else: the test can tell the two apart
        naive_x0, m_naive = apg_step(b["c"], b["u"], W, 0.3, r, BETA, m_naive)
        differs_from_naive |= not np.allclose(naive_x0, want_x0, rtol=1e-6, atol=1e-6)
    assert differs_from_naive
    assert guided.steps == len(VE_SIGMAS)
    assert [rec.step for rec in guided.calls] == [lvl for lvl, _, _ in calls]


def test_midpoint_call_reads_momentum_without_committing() -> None:
    """A call between schedule levels (DPM-2's midpoint) is part of the current step: it
    builds on that step's momentum and leaves nothing behind for the next step."""
    r = 8.0
    guided = _guide(CFG(W) | APG(eta=0.0, norm_threshold=r, momentum=BETA), "eps", "ve",
                    VE_SIGMAS)
    m = None
    for k, sigma in enumerate(VE_SIGMAS):
        x = x_at(k)
        out = np64(guided(t64(x), sigma))
        b = _x0_branches(sigma, x, "eps", "ve")
        want_x0, m = apg_step(b["c"], b["u"], W, 0.0, r, BETA, m)
        np.testing.assert_allclose(out, from_x0(want_x0, "eps", x, sigma, "ve"),
                                   rtol=1e-9, atol=1e-9)
        if k + 1 < len(VE_SIGMAS):
            mid = float(np.sqrt(sigma * VE_SIGMAS[k + 1]))
            xm = x_at(200 + k)
            out_mid = np64(guided(t64(xm), mid))
            bm = _x0_branches(mid, xm, "eps", "ve")
            mid_x0, _ = apg_step(bm["c"], bm["u"], W, 0.0, r, BETA, m)  # not committed
            np.testing.assert_allclose(out_mid, from_x0(mid_x0, "eps", xm, mid, "ve"),
                                       rtol=1e-9, atol=1e-9, err_msg=f"midpoint after {k}")
    assert guided.steps == len(VE_SIGMAS)


def test_apg_zero_guided_conditional_has_no_parallel_part() -> None:
    """A sample whose guided conditional is exactly zero: D_par = 0 there (not NaN), the other
    sample exactly as Algorithm 1."""
    import torch

    class ZeroCond:
        def __call__(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = torch.ones_like(x) * (1.0 + y.view(-1, *([1] * (x.ndim - 1))))
            out[0] = torch.where(y[0] > 0, 0.0, out[0])  # sample 0's conditional is zero
            return out

    plan = guidekit.compile(CFG(W) | APG(eta=0.3), prediction="x0", noise="ve")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    g = guidekit.guide(plan, ZeroCond(), cond={"y": torch.tensor([1.0, 1.0])},
                       uncond={"y": torch.tensor([0.0, 0.0])}, sigmas=[2.0, 1.0])
    out = g(x, 2.0).numpy()
    assert np.isfinite(out).all()
    c = np.stack([np.zeros((3, 4, 4)), np.full((3, 4, 4), 2.0)])
    u = np.ones((2, 3, 4, 4))
    want, _ = apg_step(c, u, W, 0.3, None, 0.0, None)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out[0], c[0] + (W - 1.0) * (c[0] - u[0]))  # all of D is D_perp
