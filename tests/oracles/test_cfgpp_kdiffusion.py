"""CFG++ (arXiv 2406.08070) through k-diffusion's own samplers against hand-written CFG++ loops.

The oracle loops below are the algorithm as written in the paper (Euler form: the denoised
estimate from ``u + lam (c - u)``, re-noised with the unconditional noise) and, for DPM++ 2M,
as its authors' code steps it (the paper gives no 2M formula); they call the tiny real
k-diffusion denoiser twice per step and never touch guidekit. The adapter must make
k-diffusion's unmodified ``sample_euler`` / ``sample_euler_ancestral`` / ``sample_dpmpp_2m``
land on the same trajectory with one batched call per step.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import guidekit as gk
from guidekit import CFG, PAG, CFGpp, Cond
from guidekit.adapters.kdiffusion import KDiffusionGuided
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.schedules import Linear
from guidekit.schedules.steps import level_at

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
import _kdiffusion_helpers as helpers  # noqa: E402

K, setup = helpers.K, helpers.setup
LAM = 0.6
PP = CFGpp(LAM)


def _two(setup, x, s):
    sig = torch.full((x.shape[0],), float(s), dtype=x.dtype)
    den = setup["den"]
    return den(x, sig, cond=setup["cond"]), den(x, sig, cond=setup["uncond"])


def oracle_euler_ancestral(setup, lam, eta, noises):
    """The paper's CFG++ step in k-diffusion's VE form, with ancestral noise (eta = 0: Euler)."""
    x, sigmas = setup["x"] * setup["sigmas"][0], setup["sigmas"].tolist()
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        c0, u0 = _two(setup, x, s)
        w = lam[i] if isinstance(lam, list) else lam  # a list: lam per step
        x0 = u0 + w * (c0 - u0)              # x0 = x - s (eps_u + lam (eps_c - eps_u))
        eps_u = (x - u0) / s
        if sn == 0:
            x = x0
            continue
        up = min(sn, eta * math.sqrt(sn**2 * (s**2 - sn**2) / s**2))
        down = math.sqrt(sn**2 - up**2)
        x = x0 + down * eps_u + (up * noises[i] if up else 0.0)
    return x


def oracle_dpmpp_2m(setup, lam):
    """DPM++ 2M CFG++ as the authors' code steps it (first order at the first and last step)."""
    x, sigmas = setup["x"] * setup["sigmas"][0], setup["sigmas"].tolist()
    u_prev = None
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        c0, u0 = _two(setup, x, s)
        g0 = u0 + lam * (c0 - u0)
        if u_prev is None or sn == 0:
            x = g0 + sn * (x - u0) / s
        else:
            h, h_last = math.log(s / sn), math.log(sigmas[i - 1] / s)
            r = h_last / h
            x = g0 + math.exp(-h) * (x - u0) - math.expm1(-h) * (g0 - u_prev) / (2 * r)
        u_prev = u0
    return x


class Noises:
    """k-diffusion's ``noise_sampler`` contract, handing out fixed noises in order."""

    def __init__(self, noises):
        self.noises, self.i = noises, 0

    def __call__(self, sigma, sigma_next):
        self.i += 1
        return self.noises[self.i - 1]


def _guided(setup, expr=PP, **kw):
    return KDiffusionGuided(
        expr, setup["den"], cond=setup["cond"], uncond=setup["uncond"], sigmas=setup["sigmas"],
        **kw,
    )


def test_euler_matches_the_paper_loop(K, setup):
    guided = _guided(setup, sampler="euler")
    x = K.sampling.sample_euler(guided, setup["x"] * setup["sigmas"][0], setup["sigmas"], disable=True)
    ref = oracle_euler_ancestral(setup, LAM, 0.0, None)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    assert len(guided.calls) == 5 and all(c.rows == 2 * helpers.B for c in guided.calls)
    # not the CFG trajectory at the same scale: the re-noising matters
    cfg = K.sampling.sample_euler(
        _guided(setup, CFG(LAM)), setup["x"] * setup["sigmas"][0], setup["sigmas"], disable=True
    )
    assert (cfg - ref).abs().max() > 1e-3


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_euler_ancestral_matches_the_paper_loop(K, setup, eta):
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(setup["x"].shape, generator=g, dtype=torch.float64) for _ in range(5)]
    guided = _guided(setup, sampler="euler_ancestral", eta=eta)  # eta= required: see below
    x = K.sampling.sample_euler_ancestral(
        guided, setup["x"] * setup["sigmas"][0], setup["sigmas"], eta=eta,
        noise_sampler=Noises(noises), disable=True,
    )
    torch.testing.assert_close(x, oracle_euler_ancestral(setup, LAM, eta, noises), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0])
def test_dpmpp_2m_matches_the_authors_loop(K, setup, lam):
    guided = _guided(setup, CFGpp(lam), sampler="dpmpp_2m")
    x = K.sampling.sample_dpmpp_2m(guided, setup["x"] * setup["sigmas"][0], setup["sigmas"], disable=True)
    torch.testing.assert_close(x, oracle_dpmpp_2m(setup, lam), rtol=1e-10, atol=1e-10)
    # lam = 1 still computes u (the sampler re-noises with it)
    assert all(c.branches == ("c", "u") for c in guided.calls)


def test_one_euler_step_is_cfg_at_the_effective_scale(K, setup):
    """methods.md: a CFG++ Euler step is a CFG Euler step with w = lam s / (s - s_next)."""
    s, sn = setup["sigmas"][:2].tolist()
    x = setup["x"] * s
    pp = K.sampling.sample_euler(_guided(setup, sampler="euler"), x, setup["sigmas"][:2].clone(), disable=True)
    w = LAM * s / (s - sn)
    cfg = K.sampling.sample_euler(
        _guided(setup, CFG(w)), x, setup["sigmas"][:2].clone(), disable=True
    )
    torch.testing.assert_close(pp, cfg, rtol=1e-10, atol=1e-10)


def test_a_second_run_and_reset_start_over(K, setup):
    guided = _guided(setup, sampler="euler")
    start = setup["x"] * setup["sigmas"][0]
    first = K.sampling.sample_euler(guided, start, setup["sigmas"], disable=True)
    guided.reset()
    again = K.sampling.sample_euler(guided, start, setup["sigmas"], disable=True)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_directions_add_to_the_denoised_estimate(K, setup):
    """CFGpp(lam) + w (Cond('a') - Cond()): x0 from the whole expression, re-noised with u."""
    other = torch.randn(helpers.B, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expr = CFGpp(LAM) + 0.5 * (Cond("a") - Cond())
    guided = _guided(setup, expr, sampler="euler", conds={"a": other})
    x = K.sampling.sample_euler(guided, setup["x"] * setup["sigmas"][0], setup["sigmas"], disable=True)
    ref, sigmas = setup["x"] * setup["sigmas"][0], setup["sigmas"].tolist()
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        c0, u0 = _two(setup, ref, s)
        a0 = setup["den"](ref, torch.full((helpers.B,), s, dtype=torch.float64), cond=other)
        x0 = u0 + LAM * (c0 - u0) + 0.5 * (a0 - c0)
        ref = x0 + sn * (ref - u0) / s
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)


def test_a_scheduled_lam_is_the_paper_step_at_each_steps_value(K, setup):
    """``CFGpp(Linear(0.5))``: lam from 0 at the noisiest step to 1 at the cleanest, each step
    the paper's CFG++ step at that value; a schedule leaving [0, 1] is refused by name."""
    sched = Linear(0.5)
    expr = CFGpp(sched)
    assert gk.parse(str(expr)) == expr
    sigmas = setup["sigmas"].tolist()
    lams = [sched.at(level_at(s, sigmas)) for s in sigmas[:-1]]
    assert lams[0] == 0 and lams[-1] == 1
    for name in ("euler", "euler_ancestral"):
        kw = {"eta": 0.0} if name == "euler_ancestral" else {}
        guided = _guided(setup, expr, sampler=name, **kw)
        fn = getattr(K.sampling, f"sample_{name}")
        x = fn(guided, setup["x"] * setup["sigmas"][0], setup["sigmas"], disable=True, **kw)
        torch.testing.assert_close(x, oracle_euler_ancestral(setup, lams, 0.0, None), rtol=1e-10, atol=1e-10)
    with pytest.raises(GuidanceValueError, match=r"CFGpp.*\[0, 1\]"):
        CFGpp(Linear(1))


def test_a_hand_written_euler_loop_through_guide(setup):
    """The custom-sampler API: guide(..., sampler="euler") in a plain Euler loop."""
    plan = gk.compile(CFGpp(LAM), prediction="x0", noise="ve")
    guided = gk.guide(
        plan, setup["den"], cond={"cond": setup["cond"]}, uncond={"cond": setup["uncond"]},
        sigmas=setup["sigmas"], sampler="euler",
    )
    for _ in range(2):  # reset() starts a second run
        guided.reset()
        x, sigmas = setup["x"] * setup["sigmas"][0], setup["sigmas"].tolist()
        for s, sn in zip(sigmas[:-1], sigmas[1:]):
            x = x + (sn - s) * (x - guided(x, s)) / s
        torch.testing.assert_close(x, oracle_euler_ancestral(setup, LAM, 0.0, None), rtol=1e-10, atol=1e-10)


def test_a_hand_written_ancestral_loop_through_guide(setup):
    """guide(..., sampler="euler_ancestral", eta=0.5): the loop's own ancestral step."""
    plan = gk.compile(CFGpp(LAM), prediction="x0", noise="ve")
    eta = 0.5
    guided = gk.guide(
        plan, setup["den"], cond={"cond": setup["cond"]}, uncond={"cond": setup["uncond"]},
        sigmas=setup["sigmas"], sampler="euler_ancestral", eta=eta,
    )
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(setup["x"].shape, generator=g, dtype=torch.float64) for _ in range(5)]
    x, sigmas = setup["x"] * setup["sigmas"][0], setup["sigmas"].tolist()
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        up = min(sn, eta * math.sqrt(sn**2 * (s**2 - sn**2) / s**2)) if sn else 0.0
        down = math.sqrt(sn**2 - up**2)
        x = x + (down - s) * (x - guided(x, s)) / s + up * noises[i]
    torch.testing.assert_close(x, oracle_euler_ancestral(setup, LAM, eta, noises), rtol=1e-10, atol=1e-10)


def test_gated_and_named_negative(K, setup):
    """Outside .between the step is the sampler's own on c; negative= re-noises with neg."""
    neg = torch.randn(helpers.B, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expr = CFGpp(LAM, negative="neg").between(1.0, 100.0)
    guided = _guided(setup, expr, sampler="euler", conds={"neg": neg})
    x = K.sampling.sample_euler(guided, setup["x"] * setup["sigmas"][0], setup["sigmas"], disable=True)
    ref, sigmas = setup["x"] * setup["sigmas"][0], setup["sigmas"].tolist()
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        sig = torch.full((helpers.B,), s, dtype=torch.float64)
        c0 = setup["den"](ref, sig, cond=setup["cond"])
        n0 = setup["den"](ref, sig, cond=neg) if s > 1.0 else c0
        x0 = n0 + LAM * (c0 - n0)
        ref = x0 + sn * (ref - n0) / s
    assert any(s <= 1.0 for s in sigmas[:-1]) and any(s > 1.0 for s in sigmas[:-1])
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)


# -- guided.sample(fn, ...): the sampler and its eta read from the call ------------------------


@pytest.mark.parametrize("eta", [0.5, None])  # None: sample_euler_ancestral's own default, 1
def test_sample_reads_eta_from_the_call(K, setup, eta):
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(setup["x"].shape, generator=g, dtype=torch.float64) for _ in range(5)]
    guided = KDiffusionGuided(PP, setup["den"], cond=setup["cond"], uncond=setup["uncond"])
    kw = {} if eta is None else {"eta": eta}
    x = guided.sample(
        K.sampling.sample_euler_ancestral, setup["x"] * setup["sigmas"][0], setup["sigmas"],
        noise_sampler=Noises(noises), disable=True, s_noise=1.0, **kw,
    )
    ref = oracle_euler_ancestral(setup, LAM, 1.0 if eta is None else eta, noises)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    assert len(guided.calls) == 5


def test_sample_reads_a_partial_and_steps_euler_and_dpmpp_2m(K, setup):
    import functools

    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(setup["x"].shape, generator=g, dtype=torch.float64) for _ in range(5)]
    guided = KDiffusionGuided(PP, setup["den"], cond=setup["cond"], uncond=setup["uncond"])
    start = setup["x"] * setup["sigmas"][0]
    fn = functools.partial(K.sampling.sample_euler_ancestral, eta=0.3, noise_sampler=Noises(noises))
    x = guided.sample(fn, start, setup["sigmas"], disable=True)
    torch.testing.assert_close(x, oracle_euler_ancestral(setup, LAM, 0.3, noises), rtol=1e-10, atol=1e-10)
    x = guided.sample(K.sampling.sample_euler, start, setup["sigmas"], disable=True)
    torch.testing.assert_close(x, oracle_euler_ancestral(setup, LAM, 0.0, None), rtol=1e-10, atol=1e-10)
    x = guided.sample(K.sampling.sample_dpmpp_2m, start, setup["sigmas"], disable=True)
    torch.testing.assert_close(x, oracle_dpmpp_2m(setup, LAM), rtol=1e-10, atol=1e-10)


def test_sample_without_cfgpp_runs_any_sampler(K, setup):
    start = setup["x"] * setup["sigmas"][0]
    ours = _guided(setup, CFG(3)).sample(K.sampling.sample_heun, start, setup["sigmas"], disable=True)
    direct = K.sampling.sample_heun(_guided(setup, CFG(3)), start, setup["sigmas"], disable=True)
    torch.testing.assert_close(ours, direct, rtol=0, atol=0)


def test_ancestral_eta_is_required_for_a_direct_call(setup):
    """sample_euler_ancestral's eta is invisible to the denoiser: no default may stand in."""
    with pytest.raises(GuidanceValueError, match=r"needs the eta.*pass eta=.*guided\.sample|needs the eta.*KDiffusionGuided\.sample"):
        _guided(setup, sampler="euler_ancestral")
    plan = gk.compile(CFGpp(LAM), prediction="x0", noise="ve")
    with pytest.raises(GuidanceValueError, match=r"guide\(\): .*needs the eta.*pass eta="):
        gk.guide(plan, setup["den"], cond={"cond": setup["cond"]}, uncond={"cond": setup["uncond"]},
                 sigmas=setup["sigmas"], sampler="euler_ancestral")


def test_a_direct_call_without_sampler_is_refused(K, setup):
    guided = KDiffusionGuided(PP, setup["den"], cond=setup["cond"], uncond=setup["uncond"])
    with pytest.raises(GuidanceValueError, match=r"guided\.sample\(k_diffusion\.sampling.*or pass sampler="):
        K.sampling.sample_euler(guided, setup["x"] * setup["sigmas"][0], setup["sigmas"], disable=True)


@pytest.mark.parametrize("name, kw, match", [
    ("sample_heun", {}, "k_diffusion.sampling.sample_heun is none of them"),
    ("sample_dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde is none of them"),
    ("sample_euler", {"s_churn": 1.0}, "s_churn=1 raises each step's level"),
])
def test_sample_refuses_what_is_no_cfgpp_step(K, setup, name, kw, match):
    guided = KDiffusionGuided(PP, setup["den"], cond=setup["cond"], uncond=setup["uncond"])
    with pytest.raises(GuidanceValueError, match=match):
        guided.sample(getattr(K.sampling, name), setup["x"] * setup["sigmas"][0], setup["sigmas"], **kw)
    assert guided.calls == []  # refused before the sampler ran


def test_sample_refuses_a_call_that_contradicts_the_adapter(K, setup):
    guided = _guided(setup, sampler="euler_ancestral", eta=1.0)
    with pytest.raises(GuidanceValueError, match=r"built with sampler='euler_ancestral', eta=1.0.*eta=0.5"):
        guided.sample(K.sampling.sample_euler_ancestral, setup["x"] * setup["sigmas"][0], setup["sigmas"], eta=0.5)
    with pytest.raises(GuidanceTypeError, match="sample_euler"):
        guided.sample(K.sampling.sample_euler, setup["x"], setup["sigmas"], bogus=1)


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_sde", "dpm_2"])
def test_other_samplers_are_refused_by_name(setup, sampler):
    with pytest.raises(GuidanceValueError, match=r"sampler='euler' \| 'euler_ancestral' \| 'dpmpp_2m'"):
        _guided(setup, sampler=sampler)


def test_eta_belongs_to_the_ancestral_sampler(setup):
    with pytest.raises(GuidanceValueError, match="eta=0.5 is the ancestral sampler's"):
        _guided(setup, sampler="euler", eta=0.5)


def test_a_schedule_is_required(setup):
    with pytest.raises(GuidanceValueError, match="needs the sampler's schedule"):
        KDiffusionGuided(CFGpp(LAM), setup["den"], cond=setup["cond"], uncond=setup["uncond"], sampler="euler")


def test_a_sampler_other_than_the_declared_one_is_caught(K, setup):
    """Declared euler, called heun: the second call of a step is refused, not stepped wrongly."""
    guided = _guided(setup, sampler="euler")
    with pytest.raises(GuidanceValueError, match="exactly one model call per step"):
        K.sampling.sample_heun(guided, setup["x"] * setup["sigmas"][0], setup["sigmas"], disable=True)


def test_churn_is_caught(K, setup):
    guided = _guided(setup, sampler="euler")
    with pytest.raises(GuidanceValueError, match="s_churn|not a step of the schedule"):
        K.sampling.sample_euler(
            guided, setup["x"] * setup["sigmas"][0], setup["sigmas"], s_churn=1.0, disable=True
        )


@pytest.mark.parametrize(
    "text, match",
    [
        ("CFGpp(0.5) + (CFGpp(0.6) - Cond())", "holds one CFGpp term"),
        ("Cond() + 0.5 * (CFGpp(0.6) - Cond())", "coefficient 0.5"),
    ],
)
def test_meaningless_combinations_are_refused(text, match):
    with pytest.raises(GuidanceValueError, match=match):
        gk.compile(gk.parse(text))


def test_callers_that_cannot_step_refuse(setup):
    plan = gk.compile(CFGpp(LAM) + PAG(1), prediction="x0")
    x = setup["x"]
    with pytest.raises(GuidanceValueError, match="needs the sampler's cooperation"):
        plan.step(plan.init(), x, 1.0, {"cond": {}, "uncond": {}}, {})
    with pytest.raises(GuidanceValueError, match="guide\\(\\): CFGpp.*got sampler=None.*Supported"):
        gk.guide(gk.compile(CFGpp(LAM)), lambda x, s, **c: x, cond={}, uncond={})
    with pytest.raises(GuidanceValueError, match="must lie in"):
        CFGpp(1.5)  # the paper's lam lies in [0, 1]
