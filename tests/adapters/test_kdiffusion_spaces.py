"""The k-diffusion adapter's spaces: equal to k-diffusion's own CFG and eps / v denoisers.

Raw eps and v networks with the adapter's scalings match k-diffusion's wrappers; the native
space is the model's own; CADS's time and the discrete timestep come from the DDPM table.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from guidekit import APG, CADS, CFG, Autoguidance, Rescale
from guidekit.adapters.kdiffusion import KDiffusionGuided, discrete_timestep

# the shared set-up lives next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kdiffusion_helpers as helpers  # noqa: E402
from _kdiffusion_helpers import B, EpsNet, alphas_cumprod  # noqa: E402

# the shared fixtures: pytest finds them by name in this module
K, setup = helpers.K, helpers.setup


@torch.no_grad()
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_plain_cfg_with_euler_equals_a_hand_written_cfg_denoiser(K, setup, dtype, tol):
    sigmas = setup["sigmas"].to(dtype)
    den = K.external.DiscreteEpsDDPMDenoiser(EpsNet(0).to(dtype), alphas_cumprod().to(dtype), False)
    x = (setup["x"] * sigmas[0]).to(dtype)
    w = 5.0

    def cfg_denoiser(x, sigma, cond, uncond):
        # the classic k-diffusion way: both halves in one call, then u + w (c - u)
        c, u = den(torch.cat([x, x]), torch.cat([sigma, sigma]),
                   cond=torch.cat([cond, uncond])).chunk(2)
        return u + w * (c - u)

    extra = {"cond": setup["cond"].to(dtype), "uncond": setup["uncond"].to(dtype)}
    ref = K.sampling.sample_euler(cfg_denoiser, x, sigmas, extra_args=extra, disable=True)
    guided = KDiffusionGuided(CFG(w), den, sigmas=sigmas)
    out = K.sampling.sample_euler(guided, x, sigmas, extra_args=extra, disable=True)
    assert out.dtype == dtype
    # relative: the samples of a random net reach |x| ~ 50, where float32's spacing is 4e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert [c.rows for c in guided.calls] == [2 * B] * 5


@torch.no_grad()
@pytest.mark.parametrize("quantize", [False, True])
def test_raw_eps_net_matches_discrete_eps_ddpm_denoiser(K, setup, quantize):
    # A raw eps network plus the adapter's scalings (c_in, DDPM timestep) must give what
    # k-diffusion's own wrapper gives; APG then runs on the same x0 either way.
    ac, sigmas = setup["ac"], setup["sigmas"]
    expr = CFG(4) + Autoguidance(0.5) | APG(eta=0.2, norm_threshold=3, momentum=-0.5)
    den = K.external.DiscreteEpsDDPMDenoiser(setup["main"], ac, quantize=quantize)
    weak = K.external.DiscreteEpsDDPMDenoiser(setup["weak"], ac, quantize=quantize)
    a = KDiffusionGuided(expr, den, models={"weak": weak}, sigmas=sigmas)
    b = KDiffusionGuided(expr, setup["main"], prediction="eps", models={"weak": setup["weak"]},
                         alphas_cumprod=ac, quantize=quantize, sigmas=sigmas)
    assert b.plan.prediction == "eps"
    extra = {"cond": setup["cond"], "uncond": setup["uncond"]}
    x = setup["x"] * sigmas[0]
    ya = K.sampling.sample_dpmpp_2m(a, x, sigmas, extra_args=extra, disable=True)
    yb = K.sampling.sample_dpmpp_2m(b, x, sigmas, extra_args=extra, disable=True)
    torch.testing.assert_close(yb, ya, rtol=0, atol=1e-9)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_raw_v_net_matches_k_diffusion_v_denoisers(K, setup, kind):
    sigmas = setup["sigmas"]
    net = setup["main"]
    if kind == "continuous":
        den = K.external.VDenoiser(net)
        raw = {"timestep": lambda s: s.atan() / math.pi * 2}
    else:
        den = K.external.DiscreteVDDPMDenoiser(net, setup["ac"], quantize=False)
        raw = {"alphas_cumprod": setup["ac"]}
    expr = CFG(3) | APG(eta=0, momentum=-0.5)
    a = KDiffusionGuided(expr, den, sigmas=sigmas)
    b = KDiffusionGuided(expr, net, prediction="v", sigmas=sigmas, **raw)
    extra = {"cond": setup["cond"], "uncond": setup["uncond"]}
    x = setup["x"] * sigmas[0]
    ya = K.sampling.sample_heun(a, x, sigmas, extra_args=extra, disable=True)
    yb = K.sampling.sample_heun(b, x, sigmas, extra_args=extra, disable=True)
    torch.testing.assert_close(yb, ya, rtol=0, atol=1e-9)


@torch.no_grad()
def test_native_space_is_the_model_s_own(K, setup):
    # Rescale acts in the model's space: eps for a raw eps net, x0 for a denoiser, so the two
    # differ -- while a linear expression gives the same either way (previous test).
    sigmas, ac = setup["sigmas"], setup["ac"]
    extra = {"cond": setup["cond"], "uncond": setup["uncond"]}
    x = setup["x"] * sigmas[0]
    runs = []
    for kwargs in ({"prediction": "eps", "alphas_cumprod": ac}, {}):
        model = setup["main"] if kwargs else setup["den"]
        guided = KDiffusionGuided(CFG(6) | Rescale(0.7), model, sigmas=sigmas, **kwargs)
        runs.append(K.sampling.sample_euler(guided, x, sigmas, extra_args=extra, disable=True))
    assert (runs[0] - runs[1]).abs().max() > 1e-3


@torch.no_grad()
def test_cads_time_comes_from_the_denoiser_schedule(K, setup):
    den = setup["den"]
    guided = KDiffusionGuided(CFG(3) | CADS(noise_scale=0.2), den, sigmas=setup["sigmas"])
    noise = guided.plan.noise
    assert noise.alphas_cumprod is not None  # read from DiscreteEpsDDPMDenoiser.sigmas
    for s in (0.05, 0.7, 3.0, 14.0):
        t = den.sigma_to_t(torch.tensor([s], dtype=torch.float64))
        assert noise.t(s) == pytest.approx(float(t) / 999, abs=1e-9)


def test_discrete_timestep_inverts_the_ddpm_table():
    ac = alphas_cumprod()
    table = ((1 - ac) / ac).sqrt()
    for i in (0, 1, 10, 500, 998, 999):
        t = discrete_timestep(table[i].view(1), ac)
        assert float(t) == pytest.approx(i, abs=1e-6)
    # halfway in log sigma between entries 10 and 11
    mid = (table[10].log() * 0.5 + table[11].log() * 0.5).exp().view(1)
    assert float(discrete_timestep(mid, ac)) == pytest.approx(10.5, abs=1e-6)
    assert discrete_timestep(mid * 1.01, ac, quantize=True).dtype == torch.int64
    assert float(discrete_timestep(torch.tensor([1e-4]), ac)) == 0.0  # clamped
    assert float(discrete_timestep(torch.tensor([1e4]), ac)) == 999.0
