"""Named conditionings through the sampler adapters: ``conds={"neg": ...}`` (or the sampler's
own per-call extras named ``neg``) on real k-diffusion samplers and flow_matching's
``ODESolver``; a negative prompt and a three-conditioning expression each run as ONE batched
call per evaluation, rows ``c, u, neg`` in layout order, and equal their formula computed
with one plain model call per conditioning."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from guidekit import CFG, Cond, Uncond
from guidekit.adapters.flow import FlowGuided
from guidekit.adapters.kdiffusion import KDiffusionGuided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kdiffusion_helpers as helpers  # noqa: E402
from _kdiffusion_helpers import SHAPE, B  # noqa: E402

K, setup = helpers.K, helpers.setup  # the shared fixtures, found by name
F64 = torch.float64
NEGATIVE = CFG(7, negative="neg")
THREE = CFG(5) - 2 * (Cond("neg") - Uncond())


def _neg(seed: int = 8) -> torch.Tensor:
    return torch.randn(B, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _formula(expr: object, c: torch.Tensor, u: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return n + 7 * (c - n) if expr is NEGATIVE else u + 5 * (c - u) - 2 * (n - u)


@torch.no_grad()
@pytest.mark.parametrize(("expr", "rows"), [(NEGATIVE, ("c", "neg")), (THREE, ("c", "u", "neg"))])
def test_kdiffusion_named_conditionings_run_as_one_call(K, setup, expr, rows):
    den, sigmas, x = setup["den"], setup["sigmas"], setup["x"] * setup["sigmas"][0]
    cond, uncond, neg = setup["cond"], setup["uncond"], _neg()
    guided = KDiffusionGuided(expr, den, cond=cond, uncond=uncond, conds={"neg": neg},
                              sigmas=sigmas)
    out = K.sampling.sample_euler(guided, x, sigmas, disable=True)

    def reference(x, sigma):
        return _formula(expr, den(x, sigma, cond=cond), den(x, sigma, cond=uncond),
                        den(x, sigma, cond=neg))

    ref = K.sampling.sample_euler(reference, x, sigmas, disable=True)
    assert (out - ref).abs().max() < 1e-10
    steps = len(sigmas) - 1
    assert [(c.rows, c.branches) for c in guided.calls] == [(len(rows) * B, rows)] * steps


@torch.no_grad()
def test_kdiffusion_extra_args_name_the_negative_per_call(K, setup):
    den, sigmas, x = setup["den"], setup["sigmas"], setup["x"] * setup["sigmas"][0]
    first, second = _neg(8), _neg(9)
    guided = KDiffusionGuided(NEGATIVE, den, conds={"neg": first}, sigmas=sigmas)
    out = K.sampling.sample_euler(guided, x, sigmas, disable=True,
                                  extra_args={"cond": setup["cond"], "neg": second})
    guided_init = KDiffusionGuided(NEGATIVE, den, cond=setup["cond"], conds={"neg": second},
                                   sigmas=sigmas)
    ref = K.sampling.sample_euler(guided_init, x, sigmas, disable=True)
    assert (out - ref).abs().max() == 0


@pytest.fixture(scope="module")
def fm():
    return importlib.import_module("flow_matching.solver")


class Velocity(torch.nn.Module):
    """``u(x, t, cond=[B, 8])`` in flow_matching's convention."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(41, 16, generator=g, dtype=F64) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(16, 32, generator=g, dtype=F64) * 0.3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        h = torch.cat([x.flatten(1), cond, t], 1)
        return (torch.tanh(h @ self.a) @ self.b).view_as(x)


@torch.no_grad()
@pytest.mark.parametrize(("expr", "rows"), [(NEGATIVE, ("c", "neg")), (THREE, ("c", "u", "neg"))])
def test_flow_matching_named_conditionings_run_as_one_call(fm, expr, rows):
    from flow_matching.utils import ModelWrapper

    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(B, 8, generator=g, dtype=F64), torch.zeros(B, 8, dtype=F64)
    noise, neg = torch.randn(B, *SHAPE, generator=g, dtype=F64), _neg()
    main, grid = Velocity(), torch.linspace(0, 1, 7, dtype=F64)

    class Reference(ModelWrapper):
        # one forward per conditioning, combined in flow_matching's velocity (u = -v: the
        # combine is linear, so it reads the same)
        def forward(self, x, t, **extras):
            c, u, n = (self.model(x=x, t=t, cond=v) for v in (cond, uncond, neg))
            return _formula(expr, c, u, n)

    kwargs = {"x_init": noise, "step_size": None, "method": "euler", "time_grid": grid}
    ref = fm.ODESolver(Reference(main)).sample(**kwargs)
    guided = FlowGuided(expr, main, cond=cond, uncond=uncond, time_grid=grid)
    # the negative comes in through the solver's own extras, named like the conditioning
    out = fm.ODESolver(guided.model_wrapper()).sample(neg=neg, **kwargs)
    assert (out - ref).abs().max() < 1e-10
    assert [(c.rows, c.branches) for c in guided.calls] == [(len(rows) * B, rows)] * 6


@torch.no_grad()
def test_the_adapters_pad_prompts_of_different_lengths_under_a_declared_mask(K, setup):
    from guidekit import Tokens

    g = torch.Generator().manual_seed(5)
    proj = torch.randn(3, 32, generator=g, dtype=F64)

    def den(x, sigma, text, mask=None):
        # x0 from a masked mean of the prompt's tokens: padding is exact under the mask
        m = torch.ones(text.shape[:2], dtype=F64) if mask is None else mask
        pooled = (text * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return x / (1 + sigma.view(-1, 1, 1, 1)) + (pooled @ proj).view_as(x)

    c, neg = torch.randn(B, 7, 3, generator=g, dtype=F64), torch.randn(B, 4, 3, generator=g,
                                                                      dtype=F64)
    sigmas, x = setup["sigmas"], setup["x"] * setup["sigmas"][0]
    padded = KDiffusionGuided(NEGATIVE, den, cond={"text": c}, conds={"neg": {"text": neg}},
                              sigmas=sigmas, tokens=Tokens("text", mask="mask"))
    separate = KDiffusionGuided(NEGATIVE, den, cond={"text": c}, conds={"neg": {"text": neg}},
                                sigmas=sigmas)
    a = K.sampling.sample_euler(padded, x, sigmas, disable=True)
    b = K.sampling.sample_euler(separate, x, sigmas, disable=True)
    assert (a - b).abs().max() < 1e-12
    assert [c.rows for c in padded.calls] == [2 * B] * (len(sigmas) - 1)
    assert [c.rows for c in separate.calls] == [B, B] * (len(sigmas) - 1)
    assert padded.calls[0].tokens == "padded 'text' to 7 tokens under 'mask' (cond 7, neg 4)"
