"""The k-diffusion adapter: every sampler of ``k_diffusion.sampling`` through KDiffusionGuided.

Tiny float64 eps networks wrapped by k-diffusion's own ``DiscreteEpsDDPMDenoiser``
(``_kdiffusion_helpers.py``): calls, rows and steps per sampler, with EMAG and momentum APG
too; the adapters import their library lazily; the docs' k-diffusion section runs. The
prediction spaces: test_kdiffusion_spaces.py; runs, errors and attention terms:
test_kdiffusion_run.py.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import guidekit as gk
from guidekit import APG, CFG, Autoguidance
from guidekit.adapters.kdiffusion import KDiffusionGuided
from guidekit.attention import install

# the shared set-up lives next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kdiffusion_helpers as helpers  # noqa: E402
from _kdiffusion_helpers import SHAPE, Attention, AttentionDenoiser, B  # noqa: E402

# the shared fixtures: pytest finds them by name in this module
K, setup = helpers.K, helpers.setup


ROOT = Path(__file__).resolve().parents[2]


EXPR = CFG(3) + Autoguidance(1) | APG(eta=0, momentum=-0.5)
FIXED = [  # samplers that take a schedule, and model evaluations for 5 steps
    ("euler", 5), ("euler_ancestral", 5), ("heun", 9), ("dpm_2", 9), ("dpm_2_ancestral", 9),
    ("lms", 5), ("dpmpp_2s_ancestral", 9), ("dpmpp_sde", 9), ("dpmpp_2m", 5),
    ("dpmpp_2m_sde", 5), ("dpmpp_3m_sde", 5),
]


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
