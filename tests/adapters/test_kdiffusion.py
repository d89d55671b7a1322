"""The k-diffusion adapter: every sampler of ``k_diffusion.sampling`` through KDiffusionGuided.

Tiny float64 eps networks wrapped by k-diffusion's own ``DiscreteEpsDDPMDenoiser`` (and raw,
with the adapter's scalings). k-diffusion is imported for real, inside the ``K`` fixture, so
the tests that need no k-diffusion (the adapter itself never imports it) run without it.
"""

from __future__ import annotations

import importlib
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import guidekit as gk
from guidekit import APG, CADS, CFG, PAG, Autoguidance, GuidanceValueError, Rescale
from guidekit.adapters.kdiffusion import KDiffusionGuided, discrete_timestep
from guidekit.attention import install

ROOT = Path(__file__).resolve().parents[2]
B = 2
SHAPE = (2, 4, 4)
EXPR = CFG(3) + Autoguidance(1) | APG(eta=0, momentum=-0.5)
FIXED = [  # samplers that take a schedule, and model evaluations for 5 steps
    ("euler", 5), ("euler_ancestral", 5), ("heun", 9), ("dpm_2", 9), ("dpm_2_ancestral", 9),
    ("lms", 5), ("dpmpp_2s_ancestral", 9), ("dpmpp_sde", 9), ("dpmpp_2m", 5),
    ("dpmpp_2m_sde", 5), ("dpmpp_3m_sde", 5),
]


class EpsNet(torch.nn.Module):
    """``net(x_in, t, cond=[B, 8]) -> eps`` for ``[B, 2, 4, 4]`` inputs; ``t`` any shape."""

    def __init__(self, seed: int, hidden: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(41, hidden, generator=g, dtype=torch.float64) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(hidden, 32, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        h = torch.cat([x.flatten(1), cond, t / 1000], 1)
        return (torch.tanh(h @ self.a) @ self.b).view_as(x)


def alphas_cumprod() -> torch.Tensor:
    # Stable Diffusion's "scaled_linear" DDPM schedule: sigma from 0.029 to 14.6
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.fixture(scope="module")
def K():
    """k-diffusion itself (a plain import: the environment must provide it)."""
    return importlib.import_module("k_diffusion")


@pytest.fixture(scope="module")
def setup(K):
    ac = alphas_cumprod()
    main, weak = EpsNet(0), EpsNet(1, hidden=4)
    return {
        "ac": ac, "main": main, "weak": weak,
        "den": K.external.DiscreteEpsDDPMDenoiser(main, ac, quantize=False),
        "weak_den": K.external.DiscreteEpsDDPMDenoiser(weak, ac, quantize=False),
        "sigmas": K.sampling.get_sigmas_karras(5, 0.03, 14.6, rho=7).double(),
        "cond": torch.randn(B, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
        "uncond": torch.zeros(B, 8, dtype=torch.float64),
        "x": torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
    }


class Counted:
    """Passes calls on to a denoiser and records each evaluation's sigma."""

    def __init__(self, den):
        self.den, self.sigmas = den, []

    def __call__(self, x, sigma, **extra):
        self.sigmas.append(float(sigma[0]))
        return self.den(x, sigma, **extra)


def schedule_index(levels: list[float], sigma: float) -> int:
    """The step a call at ``sigma`` belongs to: the last schedule level at or above it."""
    close = [i for i, s in enumerate(levels) if math.isclose(s, sigma, rel_tol=1e-5)]
    if close:
        return close[0]
    return max(i for i, s in enumerate(levels) if s > sigma)


def check_calls(guided: KDiffusionGuided, evals: list[float]) -> None:
    """One main call [c u] (2B rows) and one weak call [c@weak] (B rows) per evaluation."""
    assert len(guided.calls) == 2 * len(evals)
    for i, sigma in enumerate(evals):
        main, weak = guided.calls[2 * i], guided.calls[2 * i + 1]
        assert (main.model, main.rows, main.branches) == ("main", 2 * B, ("c", "u"))
        assert (weak.model, weak.rows, weak.branches) == ("weak", B, ("c@weak",))
        assert main.sigma == weak.sigma == pytest.approx(sigma, rel=1e-12)
        assert main.step == weak.step


@torch.no_grad()
@pytest.mark.parametrize(("name", "evaluations"), FIXED, ids=[n for n, _ in FIXED])
def test_every_scheduled_sampler_counts_calls_rows_and_steps(K, setup, name, evaluations):
    sigmas = setup["sigmas"]
    guided = KDiffusionGuided(
        EXPR, setup["den"], models={"weak": setup["weak_den"]}, uncond=setup["uncond"],
        sigmas=sigmas,
    )
    counted = Counted(guided)
    sampler = getattr(K.sampling, f"sample_{name}")
    out = sampler(counted, setup["x"] * sigmas[0], sigmas, extra_args={"cond": setup["cond"]},
                  disable=True)
    assert out.shape == (B, *SHAPE) and torch.isfinite(out).all()
    assert len(counted.sigmas) == evaluations
    check_calls(guided, counted.sigmas)
    # state advanced once per step of the schedule, however many evaluations each step made
    levels = sigmas[:-1].tolist()
    assert guided.steps == len(levels) == 5
    assert [c.step for c in guided.calls[::2]] == [schedule_index(levels, s) for s in counted.sigmas]
    momentum = guided.state.named()
    assert any(getattr(v, "momentum", None) is not None for v in momentum.values())


@torch.no_grad()
def test_dpm_fast_every_evaluation_is_a_step(K, setup):
    guided = KDiffusionGuided(EXPR, setup["den"], models={"weak": setup["weak_den"]},
                              cond=setup["cond"], uncond=setup["uncond"])
    counted = Counted(guided)
    out = K.sampling.sample_dpm_fast(counted, setup["x"] * 14.6, 0.03, 14.6, 7, disable=True)
    assert torch.isfinite(out).all()
    assert len(counted.sigmas) == 7  # n is its budget of model evaluations
    assert counted.sigmas == sorted(counted.sigmas, reverse=True)
    check_calls(guided, counted.sigmas)
    assert guided.steps == 7
    assert [c.step for c in guided.calls[::2]] == list(range(7))


@torch.no_grad()
def test_dpm_adaptive_rejected_trials_are_undone(K, setup):
    guided = KDiffusionGuided(EXPR, setup["den"], models={"weak": setup["weak_den"]},
                              uncond=setup["uncond"])
    counted = Counted(guided)
    out, info = K.sampling.sample_dpm_adaptive(
        counted, setup["x"] * 14.6, 0.03, 14.6, extra_args={"cond": setup["cond"]},
        rtol=0.01, atol=0.001, h_init=0.5, return_info=True, disable=True,
    )
    assert torch.isfinite(out).all()
    assert info["n_reject"] > 0  # the retreat path is exercised
    assert len(counted.sigmas) == info["nfe"]
    check_calls(guided, counted.sigmas)
    # each accepted order-3 trial evaluates at its start and two points inside: 3 steps
    assert guided.steps == 3 * info["n_accept"]


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


def _den(x, sigma, cond):
    # a fixed, nonlinear x0 denoiser
    return torch.tanh(x + cond.view(-1, 1)) / (1 + sigma.view(-1, 1))


@torch.no_grad()
def test_without_schedule_a_retreat_undoes_the_steps_below():
    # What dpm_adaptive does on a rejection: back to a level it already evaluated.
    cond, uncond = torch.tensor([0.5, -1.0]), torch.zeros(2)
    expr = CFG(3) | APG(eta=0, momentum=-0.5)
    x = torch.linspace(-1, 1, 6).view(2, 3)
    guided = KDiffusionGuided(expr, _den, cond=cond, uncond=uncond)
    first = guided(x, torch.full((2,), 5.0))
    guided(x, torch.full((2,), 4.0))
    guided(x, torch.full((2,), 3.0))
    assert guided.steps == 3
    again = guided(x, torch.full((2,), 5.0))  # retreat to the first level: fresh state
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert guided.steps == 1
    y45 = guided(x + 1, torch.full((2,), 4.5))
    fresh = KDiffusionGuided(expr, _den, cond=cond, uncond=uncond)
    fresh(x, torch.full((2,), 5.0))
    torch.testing.assert_close(y45, fresh(x + 1, torch.full((2,), 4.5)), rtol=0, atol=0)
    assert guided.steps == 2
    # a retreat between levels undoes only the steps below it
    guided(x, torch.full((2,), 2.0))
    y3 = guided(x, torch.full((2,), 3.0))
    torch.testing.assert_close(y3, fresh(x, torch.full((2,), 3.0)), rtol=0, atol=0)
    assert guided.steps == 3
    with pytest.raises(GuidanceValueError, match="new sampling run"):
        guided(x, torch.full((2,), 6.0))  # above the run's first level: reset() first
    guided.reset()
    guided(x, torch.full((2,), 6.0))
    assert guided.steps == 1 and len(guided.calls) == 1


@torch.no_grad()
def test_extra_args_replace_construction_conditionings():
    x = torch.linspace(-1, 1, 6).view(2, 3)
    a, b, u = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.1]), torch.zeros(2)
    built = KDiffusionGuided(CFG(3), _den, cond=a, uncond=u)
    other = KDiffusionGuided(CFG(3), _den, cond=b, uncond=u)
    sigma = torch.full((2,), 1.5)
    torch.testing.assert_close(built(x, sigma, cond=b), other(x, sigma))
    assert not torch.allclose(built(x, sigma, cond=b), built(x, sigma))
    # dicts name the model's keywords; bare tensors go to cond_key
    torch.testing.assert_close(built(x, sigma, cond={"cond": b}, uncond={"cond": u}),
                               other(x, sigma))


def test_errors_name_the_fix():
    u = torch.zeros(2)
    with pytest.raises(GuidanceValueError, match="models=.*weak"):
        KDiffusionGuided(CFG(3) + Autoguidance(1), _den, uncond=u)
    guided = KDiffusionGuided(CFG(3), _den, uncond=u)
    x, sigma = torch.zeros(2, 3), torch.ones(2)
    with pytest.raises(GuidanceValueError, match="needs the conditioning"):
        guided(x, sigma)
    with pytest.raises(GuidanceValueError, match="cond_scale.*not a conditioning"):
        guided(x, sigma, cond=u, cond_scale=7)
    with pytest.raises(GuidanceValueError, match="prediction='eps'"):
        KDiffusionGuided(CFG(3), _den, timestep=lambda s: s)
    with pytest.raises(GuidanceValueError, match="prediction='flow'.*noise='flow'"):
        KDiffusionGuided(gk.compile(CFG(3), prediction="flow", noise="flow"), _den)
    with pytest.raises(GuidanceValueError, match="'x0'"):
        KDiffusionGuided(CFG(3), _den, prediction="sample")
    # guidance text and compiled plans are accepted
    assert KDiffusionGuided("CFG(3) | APG(eta=0)", _den).plan.expr == (CFG(3) | APG(eta=0))
    plan = gk.compile(CFG(2), prediction="x0")
    assert KDiffusionGuided(plan, _den).plan is plan


class Attention(torch.nn.Module):
    """Two-head self-attention through ``F.scaled_dot_product_attention`` ([B, H, L, D])."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=torch.float64)
        with torch.no_grad():
            self.qkv.weight[: 2 * dim].mul_(4.0)  # peaked maps, so PAG's identity map matters

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = (t.view(b, n, 2, d // 2).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class AttentionDenoiser(torch.nn.Module):
    """An x0 denoiser ``(x [B, 2, 4, 4], sigma [B], cond [B, 8])`` attending over 16 pixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.inp = torch.nn.Linear(2, 8, dtype=torch.float64)
        self.attn = Attention()
        self.out = torch.nn.Linear(8, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c_in = (sigma**2 + 1).rsqrt().view(-1, 1, 1)
        h = self.inp(x.flatten(2).transpose(1, 2) * c_in) + cond[:, None]
        h = h + self.attn(h)
        return (x.flatten(2) * c_in**2 + self.out(h).transpose(1, 2)).view_as(x)


@torch.no_grad()
def test_attention_terms_run_through_the_adapter(K, setup):
    net, sigmas = AttentionDenoiser(), setup["sigmas"]
    conds = {"cond": setup["cond"], "uncond": setup["uncond"]}
    x = setup["x"] * sigmas[0]
    plan = gk.compile(CFG(3) + PAG(2, layers=-1), prediction="x0")
    with pytest.raises(GuidanceValueError, match="around_call"):
        KDiffusionGuided(plan, net, sigmas=sigmas, **conds)(x, sigmas[:1].expand(B))
    with install(net, plan, attention_class=Attention) as around_call:
        den = KDiffusionGuided(plan, net, sigmas=sigmas, around_call=around_call, **conds)
        out = K.sampling.sample_heun(den, x, sigmas, disable=True)
        ref = gk.guide(plan, net, cond={"cond": conds["cond"]}, uncond={"cond": conds["uncond"]},
                       sigmas=sigmas, around_call=around_call)
        expected = K.sampling.sample_heun(lambda x, s: ref(x, s), x, sigmas, disable=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert [(c.rows, c.branches[:2], len(c.branches)) for c in den.calls] == [
        (3 * B, ("c", "u"), 3)
    ] * 9
    cfg = KDiffusionGuided(CFG(3), net, sigmas=sigmas, **conds)
    plain = K.sampling.sample_heun(cfg, x, sigmas, disable=True)
    assert (out - plain).abs().max() > 1e-3  # the perturbed branch really differed from c


@pytest.mark.slow
def test_adapters_import_their_library_lazily_and_core_imports_none():
    code = (
        "import sys, guidekit\n"
        "assert not [m for m in sys.modules if m.startswith('guidekit.adapters')]\n"
        "import guidekit.adapters.kdiffusion, guidekit.adapters.flow\n"
        "bad = [m for m in ('k_diffusion', 'flow_matching', 'torchdiffeq', 'torchvision')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def section_blocks(title: str) -> list[str]:
    """The python blocks of one ``## title`` section of docs/adapters.md."""
    text = (ROOT / "docs" / "adapters.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:] if end < 0 else text[start:end]
    return re.findall(r"^```python\n(.*?)^```", section, re.DOTALL | re.MULTILINE)


def test_docs_k_diffusion_section_runs(K):
    blocks = section_blocks("k-diffusion")
    assert blocks
    namespace: dict[str, object] = {"__name__": "doc:adapters:k-diffusion"}
    for code in blocks:
        exec(compile(code, "docs/adapters.md#k-diffusion", "exec"), namespace)


EMAG_EXPR = "CFG(3) + EMAG(1, layers=0, beta=0.9) | APG(eta=0, momentum=-0.5)"


@torch.no_grad()
@pytest.mark.parametrize("name", [n for n, _ in FIXED] + ["dpm_fast", "dpm_adaptive"])
def test_every_sampler_with_emag_and_momentum_apg(K, setup, name):
    """EMAG's averages and APG's momentum advance once per sampler step, whatever the
    sampler's evaluations per step; every evaluation is ONE call of c, u and e rows."""
    net, sigmas = AttentionDenoiser(), setup["sigmas"]
    plan = gk.compile(gk.parse(EMAG_EXPR), prediction="x0")
    conds = {"cond": setup["cond"], "uncond": setup["uncond"]}
    with install(net, plan, attention_class=Attention) as around_call:
        if name in ("dpm_fast", "dpm_adaptive"):
            den = KDiffusionGuided(plan, net, around_call=around_call, **conds)
            counted = Counted(den)
            x = setup["x"] * 14.6
            if name == "dpm_fast":
                out = K.sampling.sample_dpm_fast(counted, x, 0.03, 14.6, 6, disable=True)
            else:
                out = K.sampling.sample_dpm_adaptive(counted, x, 0.03, 14.6, rtol=0.05,
                                                     atol=0.01, disable=True)
        else:
            den = KDiffusionGuided(plan, net, sigmas=sigmas, around_call=around_call, **conds)
            counted = Counted(den)
            sampler = getattr(K.sampling, f"sample_{name}")
            out = sampler(counted, setup["x"] * sigmas[0], sigmas, disable=True)
    assert torch.isfinite(out).all()
    assert len(den.calls) == len(counted.sigmas)  # one model call per evaluation
    assert all(c.rows == 3 * B and c.branches[:2] == ("c", "u") for c in den.calls)
    state = den.state.named()
    emag = next(v for v in state.values() if hasattr(v, "ema"))
    apg = next(v for v in state.values() if getattr(v, "momentum", None) is not None)
    assert emag.steps == den.steps  # the averages advanced once per step, not per call
    assert apg is not None
    if name in dict(FIXED):
        assert den.steps == 5
