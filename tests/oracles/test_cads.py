"""Oracle for the condition-annealed diffusion sampler (CADS), https://arxiv.org/abs/2310.17347.

With ``t`` from 1 (noise) to 0 (data):
``gamma(t) = 1`` for ``t <= tau1``, ``(tau2 - t) / (tau2 - tau1)`` between, ``0`` for ``t >= tau2``;
``y_hat = sqrt(gamma) y + s sqrt(1 - gamma) n``; optional rescale
``y_r = (y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y)``, ``y_out = psi y_r + (1 - psi) y_hat``.

The Gaussian ``n`` is taken from ``CADSAnnealing.noise_for`` (the noise source is not the
formula under test); everything else is recomputed here in numpy float64 and compared with
the conditioning the fake model actually received. guidekit's rescale statistics are per
sample (over the non-batch dims); some peers use whole-tensor statistics, which agree for a
batch of one.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import guidekit
from guidekit import CADS, CFG, GuidanceTypeError, Noise

from ._support import BATCH, FakeModel, conditioning, np64, t64, x_at

TAU1, TAU2, S = 0.3, 0.7, 0.25
EMB_SHAPE = (BATCH, 5, 6)


def gamma_oracle(t: float, tau1: float = TAU1, tau2: float = TAU2) -> float:
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def anneal_oracle(y: np.ndarray, n: np.ndarray, gamma: float, s: float, psi: float) -> np.ndarray:
    y_hat = np.sqrt(gamma) * y + s * np.sqrt(1.0 - gamma) * n
    axes = tuple(range(1, y.ndim))

    def mean(a: np.ndarray) -> np.ndarray:
        return a.mean(axis=axes, keepdims=True)

    def std(a: np.ndarray) -> np.ndarray:
        return a.std(axis=axes, keepdims=True)  # ddof cancels in the ratio below

    y_r = (y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y)
    return psi * y_r + (1.0 - psi) * y_hat


def embedding(name: str) -> np.ndarray:
    rng = np.random.default_rng({"cond": 1, "uncond": 2}[name])
    return rng.standard_normal(EMB_SHAPE) * 1.5 + 0.3


def noise(cads: guidekit.CADSAnnealing, seed: int, level: int, cname: str, key: str = "emb",
          shape: tuple[int, ...] = EMB_SHAPE) -> np.ndarray:
    """The Gaussian CADS draws for ``(seed, step, conditioning, key)``."""
    ctx: Any = SimpleNamespace(seed=seed, level=level)
    return np64(cads.noise_for(ctx, cname, key, torch.zeros(shape, dtype=torch.float64)))


def _guided(cads: guidekit.CADSAnnealing, noise_kind: Any = "flow", seed: int = 0,
            sigmas: Any = None, **extra: np.ndarray) -> tuple[guidekit.Guided, FakeModel]:
    model = FakeModel()
    plan = guidekit.compile(CFG(5) | cads, prediction="eps" if noise_kind != "flow" else "flow",
                            noise=noise_kind)
    conds = {
        n: {**conditioning(n, emb=t64(embedding(n))), **{k: t64(v) for k, v in extra.items()}}
        for n in ("cond", "uncond")
    }
    guided = guidekit.guide(plan, model, cond=conds["cond"], uncond=conds["uncond"], seed=seed,
                            sigmas=sigmas)
    return guided, model


def _received(model: FakeModel, call: int, key: str = "emb") -> dict[str, np.ndarray]:
    """The conditioning rows of one call, split back into cond (first B) and uncond."""
    rows = model.calls[call][key].numpy()
    return {"cond": rows[:BATCH], "uncond": rows[BATCH:]}


def test_gamma_values() -> None:
    """The schedule at, below, between and above the thresholds."""
    cads = CADS(tau1=TAU1, tau2=TAU2)
    for t in (0.0, 0.1, TAU1, 0.31, 0.4, 0.5, 0.69, TAU2, 0.8, 1.0):
        assert cads.gamma(t) == pytest.approx(gamma_oracle(t), abs=1e-12)
    assert cads.gamma(0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("psi", [0.0, 0.5, 1.0])
def test_annealed_conditioning_reaches_the_model(psi: float) -> None:
    """For flow noise ``t = sigma``: every call's cond and uncond embeddings match the oracle
    across the three regions of the schedule (including both boundaries)."""
    cads = CADS(tau1=TAU1, tau2=TAU2, noise_scale=S, psi=psi)
    guided, model = _guided(cads, seed=3)
    sigmas = [0.9, 0.7, 0.55, 0.4, 0.3, 0.1]
    for k, sigma in enumerate(sigmas):
        guided(t64(x_at(k)), sigma)
        got = _received(model, k)
        g = gamma_oracle(sigma)
        for cname in ("cond", "uncond"):
            y = embedding(cname)
            if g == 1.0:  # gamma = 1 leaves the conditioning untouched, whatever psi
                np.testing.assert_array_equal(got[cname], y)
                continue
            want = anneal_oracle(y, noise(cads, 3, k, cname), g, S, psi)
            np.testing.assert_allclose(got[cname], want, rtol=1e-9, atol=1e-9,
                                       err_msg=f"{cname} at sigma {sigma}")
        # the integer branch tags are not embeddings: never annealed
        assert model.calls[k]["tag"].tolist() == [1000, 1001, 1002, 2000, 2001, 2002]
    assert not np.allclose(_received(model, 2)["cond"], embedding("cond"))


def test_full_noise_is_pure_scaled_noise() -> None:
    """At ``gamma = 0`` without rescale the embedding is replaced by ``s n``."""
    cads = CADS(tau1=TAU1, tau2=TAU2, noise_scale=S, psi=0.0)
    guided, model = _guided(cads, seed=5)
    guided(t64(x_at(0)), 0.95)
    np.testing.assert_allclose(_received(model, 0)["cond"], S * noise(cads, 5, 0, "cond"),
                               rtol=1e-12, atol=1e-12)


def test_full_noise_without_noise_keeps_each_samples_mean() -> None:
    """``noise_scale=0`` at ``gamma = 0`` zeroes ``y_hat``: no spread to rescale, so each
    sample's rescaled conditioning is its own mean (the limit), never 0 / 0 = NaN."""
    cads = CADS(tau1=TAU1, tau2=TAU2, noise_scale=0.0, psi=0.5)
    guided, model = _guided(cads, seed=5)
    guided(t64(x_at(0)), 0.95)
    got = _received(model, 0)["cond"]
    mean = embedding("cond").mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(got, 0.5 * np.broadcast_to(mean, got.shape), rtol=1e-12, atol=1e-12)


def _ddpm_sigmas(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    abar = np.cumprod(1.0 - betas)
    return abar, np.sqrt((1.0 - abar) / abar)


@pytest.mark.parametrize("kind", ["ve", "vp"])
@pytest.mark.parametrize("schedule", ["default", "scaled_linear"])
def test_ddpm_time_mapping(kind: str, schedule: str) -> None:
    """For VE/VP, ``t`` is the DDPM time ``i / (N - 1)`` of the schedule level ``sigma_i``.

    ``default`` is the DDPM linear schedule (betas 1e-4 .. 0.02, 1000 steps) guidekit uses
    without ``alphas_cumprod``; ``scaled_linear`` (Stable Diffusion's) is passed explicitly.
    """
    n = 1000
    if schedule == "default":
        abar, table = _ddpm_sigmas(np.linspace(1e-4, 0.02, n))
        noise_kind: Any = kind
    else:
        abar, table = _ddpm_sigmas(np.linspace(0.00085**0.5, 0.012**0.5, n) ** 2)
        noise_kind = Noise(kind, alphas_cumprod=torch.from_numpy(abar))
    cads = CADS(tau1=TAU1, tau2=TAU2, noise_scale=S, psi=0.0)
    guided, model = _guided(cads, noise_kind=noise_kind, seed=1)
    for k, i in enumerate([900, 800, 500, 350, 200]):  # t = i / 999 spans all three regions
        guided(t64(x_at(k)), float(table[i]))
        g = gamma_oracle(i / (n - 1))
        want = anneal_oracle(embedding("cond"), noise(cads, 1, k, "cond"), g, S, 0.0)
        np.testing.assert_allclose(_received(model, k)["cond"], want, rtol=1e-7, atol=1e-7,
                                   err_msg=f"DDPM step {i}")


def test_noise_is_seeded() -> None:
    """Same seed, same conditioning; another seed, other noise."""
    cads = CADS(tau1=TAU1, tau2=TAU2, noise_scale=S, psi=1.0)
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        guided, model = _guided(cads, seed=seed)
        for k, sigma in enumerate((0.9, 0.5)):
            guided(t64(x_at(k)), sigma)
        runs[name] = [_received(model, k)["cond"] for k in range(2)]
    for k in range(2):
        np.testing.assert_array_equal(runs["a"][k], runs["b"][k])
        assert not np.allclose(runs["a"][k], runs["c"][k])
    # and the noise changes from one step to the next, and between cond and uncond
    assert not np.allclose(noise(cads, 7, 0, "cond"), noise(cads, 7, 1, "cond"))
    assert not np.allclose(noise(cads, 7, 0, "cond"), noise(cads, 7, 0, "uncond"))


def test_calls_within_a_step_share_noise() -> None:
    """A repeated call at a level and a midpoint call both use the current step's noise;
    the next schedule level draws new noise."""
    cads = CADS(tau1=TAU1, tau2=TAU2, noise_scale=S, psi=0.0)
    schedule = (0.9, 0.6, 0.5)
    guided, model = _guided(cads, seed=2, sigmas=schedule)
    plan_calls = [(0, 0.9), (1, 0.6), (1, 0.6), (1, 0.55), (2, 0.5)]
    for j, (level, sigma) in enumerate(plan_calls):
        guided(t64(x_at(j)), sigma)
        want = anneal_oracle(embedding("uncond"), noise(cads, 2, level, "uncond"),
                             gamma_oracle(sigma), S, 0.0)
        np.testing.assert_allclose(_received(model, j)["uncond"], want, rtol=1e-9, atol=1e-9,
                                   err_msg=f"call {j} at sigma {sigma}")
    np.testing.assert_array_equal(_received(model, 1)["uncond"], _received(model, 2)["uncond"])
    assert [r.step for r in guided.calls] == [lvl for lvl, _ in plan_calls]


def test_keys_and_conds_select_what_is_annealed() -> None:
    """``keys`` limits the tensors (a pooled embedding can be left alone), ``conds`` the
    conditionings; with neither, every floating-point tensor of every conditioning."""
    pooled = np.linspace(-1, 1, BATCH * 4).reshape(BATCH, 4)
    sigma, g = 0.5, gamma_oracle(0.5)

    cads = CADS(tau1=TAU1, tau2=TAU2, noise_scale=S, psi=0.0, keys=("emb",), conds=("cond",))
    guided, model = _guided(cads, pooled=pooled)
    guided(t64(x_at(0)), sigma)
    got = _received(model, 0)
    np.testing.assert_allclose(got["cond"], anneal_oracle(embedding("cond"),
                               noise(cads, 0, 0, "cond"), g, S, 0.0), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(got["uncond"], embedding("uncond"))
    np.testing.assert_array_equal(model.calls[0]["pooled"].numpy(), np.concatenate([pooled] * 2))

    cads_all = CADS(tau1=TAU1, tau2=TAU2, noise_scale=S, psi=0.0)
    guided, model = _guided(cads_all, pooled=pooled)
    guided(t64(x_at(0)), sigma)
    got_pooled = _received(model, 0, "pooled")
    for cname in ("cond", "uncond"):
        want = anneal_oracle(pooled, noise(cads_all, 0, 0, cname, "pooled", pooled.shape), g, S,
                             0.0)
        np.testing.assert_allclose(got_pooled[cname], want, rtol=1e-9, atol=1e-9)


def test_integer_labels_raise_a_clear_error() -> None:
    """CADS adds noise to embeddings; integer class labels cannot be annealed."""
    plan = guidekit.compile(CFG(5) | CADS(tau1=TAU1, tau2=TAU2), prediction="flow", noise="flow")
    guided = guidekit.guide(plan, FakeModel(), cond=conditioning("cond"),
                            uncond=conditioning("uncond"))
    with pytest.raises(GuidanceTypeError) as err:
        guided(t64(x_at(0)), 0.8)
    message = str(err.value)
    assert "CADS(" in message and "'cond'" in message
    assert "floating-point" in message and "embedding" in message

    explicit = CADS(tau1=TAU1, tau2=TAU2, keys=("tag",))
    plan = guidekit.compile(CFG(5) | explicit, prediction="flow", noise="flow")
    guided = guidekit.guide(plan, FakeModel(), cond=conditioning("cond", emb=t64(embedding("cond"))),
                            uncond=conditioning("uncond", emb=t64(embedding("uncond"))))
    with pytest.raises(GuidanceTypeError, match=r"key 'tag' is torch\.int64.*floating-point"):
        guided(t64(x_at(0)), 0.8)
