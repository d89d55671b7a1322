"""The flow-matching adapter: Meta's flow_matching ``ODESolver`` and torchdiffeq ``odeint``.

flow_matching's time ``t`` runs 0 (noise) -> 1 (data) with velocity ``u = x1 - x0``;
guidekit's flow convention (diffusers') has ``sigma = 1 - t`` and ``v = noise - data = -u``.
Every guided run is compared with the same guidance done by ``guidekit.guide`` in a
hand-written Euler loop on the diffusers convention, or with a hand-written CFG velocity.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

import guidekit as gk
from guidekit import APG, CADS, CFG, PAG, Autoguidance, GuidanceValueError
from guidekit.adapters.flow import FlowGuided, sigmas_from_time_grid
from guidekit.attention import install

# the two-head SDPA attention module the k-diffusion tests use too
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kdiffusion_helpers import Attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
B = 2
SHAPE = (2, 4, 4)
EXPR = CFG(3) + Autoguidance(1) | APG(eta=0, momentum=-0.5)
F64 = torch.float64


class Velocity(torch.nn.Module):
    """``u(x, t, cond=[B, 8])`` in flow_matching's convention; ``t`` 0-d or one per row."""

    def __init__(self, seed: int, hidden: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(41, hidden, generator=g, dtype=F64) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(hidden, 32, generator=g, dtype=F64) * 0.3)
        self.times: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.times.append(torch.as_tensor(t))
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        h = torch.cat([x.flatten(1), cond, t], 1)
        return (torch.tanh(h @ self.a) @ self.b).view_as(x)


@pytest.fixture(scope="module")
def fm():
    """flow_matching's solver module (a plain import: the environment must provide it)."""
    return importlib.import_module("flow_matching.solver")


@pytest.fixture(scope="module")
def odeint():
    return importlib.import_module("torchdiffeq").odeint


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(7)
    return {
        "main": Velocity(0), "weak": Velocity(1, hidden=4),
        "cond": torch.randn(B, 8, generator=g, dtype=F64),
        "uncond": torch.zeros(B, 8, dtype=F64),
        "noise": torch.randn(B, *SHAPE, generator=g, dtype=F64),
        "grid": torch.linspace(0, 1, 9, dtype=F64),
    }


def diffusers_euler(expr, data, sigmas, **kwargs):
    """The reference: guidekit.guide in a hand-written Euler loop, sigma 1 -> 0, v = -u."""
    main, weak = data["main"], data["weak"]
    plan = gk.compile(expr, prediction="flow", noise="flow")
    guided = gk.guide(
        plan, lambda x, s, cond: -main(x=x, t=1 - s, cond=cond),
        cond={"cond": data["cond"]}, uncond={"cond": data["uncond"]},
        models={"weak": lambda x, s, cond: -weak(x=x, t=1 - s, cond=cond)}, sigmas=sigmas,
        **kwargs,
    )
    x = data["noise"].clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * guided(x, s)
    return x, guided


@torch.no_grad()
def test_ode_solver_euler_equals_the_diffusers_convention_loop(fm, data):
    grid = data["grid"]
    guided = FlowGuided(EXPR, data["main"], models={"weak": data["weak"]},
                        uncond=data["uncond"], time_grid=grid)
    solver = fm.ODESolver(velocity_model=guided.model_wrapper())
    out = solver.sample(x_init=data["noise"], step_size=None, method="euler", time_grid=grid,
                        cond=data["cond"])
    # the model got flow_matching's own 0-d time, not a per-row tensor
    assert len(data["main"].times) == 8 and all(t.ndim == 0 for t in data["main"].times)
    ref, reference = diffusers_euler(EXPR, data, 1 - grid)
    assert (out - ref).abs().max() < 1e-6
    assert guided.steps == reference.steps == 8
    assert [(c.model, c.rows) for c in guided.calls] == [("main", 2 * B), ("weak", B)] * 8
    assert [c.sigma for c in guided.calls[::2]] == pytest.approx((1 - grid[:-1]).tolist())


@torch.no_grad()
def test_midpoint_advances_state_once_per_grid_step(fm, data):
    grid = data["grid"]
    guided = FlowGuided(EXPR, data["main"], models={"weak": data["weak"]},
                        cond=data["cond"], uncond=data["uncond"], time_grid=grid)
    solver = fm.ODESolver(velocity_model=guided)  # the plain callable works too
    out = solver.sample(x_init=data["noise"], step_size=None, method="midpoint", time_grid=grid)
    assert torch.isfinite(out).all()
    assert len(guided.calls) == 2 * 2 * 8  # two evaluations per step, two groups each
    assert guided.steps == 8
    assert [c.step for c in guided.calls[::2]] == [i for i in range(8) for _ in range(2)]


@torch.no_grad()
def test_plain_cfg_equals_a_hand_written_two_forward_cfg_velocity(fm, data):
    from flow_matching.utils import ModelWrapper

    main, w = data["main"], 4.0

    class CFGVelocity(ModelWrapper):
        # the flow_matching-example way: two forwards, then combine the velocities
        def forward(self, x, t, cond, uncond):
            c = self.model(x=x, t=t, cond=cond)
            u = self.model(x=x, t=t, cond=uncond)
            return u + w * (c - u)

    grid = torch.linspace(0, 1, 6, dtype=F64)
    kwargs = {"x_init": data["noise"], "step_size": None, "method": "midpoint", "time_grid": grid}
    ref = fm.ODESolver(CFGVelocity(main)).sample(cond=data["cond"], uncond=data["uncond"],
                                                 **kwargs)
    guided = FlowGuided(CFG(w), main, time_grid=grid)
    out = fm.ODESolver(guided.model_wrapper()).sample(cond=data["cond"], uncond=data["uncond"],
                                                      **kwargs)
    assert (out - ref).abs().max() < 1e-6
    assert [c.rows for c in guided.calls] == [2 * B] * 10  # one batched call per evaluation


@torch.no_grad()
@pytest.mark.parametrize("time", ["t", "sigma"])
def test_torchdiffeq_odeint_in_either_time(odeint, data, time):
    grid = data["grid"]
    sigmas = 1 - grid
    guided = FlowGuided(EXPR, data["main"], models={"weak": data["weak"]},
                        uncond=data["uncond"], sigmas=sigmas)
    func = guided.odeint_func(time, cond=data["cond"])
    points = grid if time == "t" else sigmas
    out = odeint(func, data["noise"], points, method="euler")[-1]
    ref, _ = diffusers_euler(EXPR, data, sigmas)
    assert (out - ref).abs().max() < 1e-6
    assert guided.steps == 8


@torch.no_grad()
def test_a_diffusers_style_model_gives_the_same_run(fm, data):
    main, weak = data["main"], data["weak"]
    grid = data["grid"]
    kwargs = {"uncond": data["uncond"], "time_grid": grid}
    a = FlowGuided(EXPR, main, models={"weak": weak}, **kwargs)
    b = FlowGuided(EXPR, lambda x, s, cond: -main(x=x, t=1 - s, cond=cond), model_time="sigma",
                   models={"weak": lambda x, s, cond: -weak(x=x, t=1 - s, cond=cond)}, **kwargs)
    outs = [
        fm.ODESolver(g).sample(x_init=data["noise"], step_size=None, time_grid=grid,
                               cond=data["cond"])
        for g in (a, b)
    ]
    assert (outs[0] - outs[1]).abs().max() < 1e-6


@torch.no_grad()
def test_interval_bounds_are_sigma_under_flow_time(fm, data):
    # .between(0.25, 0.65) is in sigma = 1 - t: active for t in {0.4, 0.5, 0.6, 0.7}
    grid = torch.linspace(0, 1, 11, dtype=F64)
    expr = CFG(4).between(0.25, 0.65)
    guided = FlowGuided(expr, data["main"], uncond=data["uncond"], time_grid=grid)
    out = fm.ODESolver(guided).sample(x_init=data["noise"], step_size=None, time_grid=grid,
                                      cond=data["cond"])
    rows = {round(1 - c.sigma, 6): c.rows for c in guided.calls}
    inside = {0.4, 0.5, 0.6, 0.7}
    assert rows == {round(t, 6): (2 * B if round(t, 6) in inside else B)
                    for t in grid[:-1].tolist()}
    ref, _ = diffusers_euler(expr, data, 1 - grid)
    assert (out - ref).abs().max() < 1e-6


class Recorder(torch.nn.Module):
    """A velocity model that records the conditioning rows it receives, per call."""

    def __init__(self, base: Velocity) -> None:
        super().__init__()
        self.base, self.seen = base, []

    def forward(self, x, t, emb):
        self.seen.append((float(t), emb.clone()))
        return self.base(x=x, t=t, cond=emb)


@torch.no_grad()
def test_cads_gamma_uses_sigma_as_its_time(fm, data):
    # CADS's t runs 1 (noise) -> 0: for flow that is sigma = 1 - t_flow. With psi = 0,
    # y_hat = sqrt(gamma) y + s sqrt(1 - gamma) n, and n depends only on the seed and step,
    # so two runs that differ in y only reveal gamma: y_hat1 - y_hat2 = sqrt(gamma) (y1 - y2).
    tau1, tau2 = 0.3, 0.8
    grid = torch.linspace(0, 1, 11, dtype=F64)
    expr = CFG(3) | CADS(tau1=tau1, tau2=tau2, noise_scale=0.5, psi=0)
    y1, y2 = data["cond"], data["cond"] * -2 + 1
    seen = []
    for y in (y1, y2):
        model = Recorder(data["main"])
        guided = FlowGuided(expr, model, cond={"emb": y}, uncond={"emb": data["uncond"]},
                            time_grid=grid, seed=5)
        fm.ODESolver(guided).sample(x_init=data["noise"], step_size=None, time_grid=grid)
        seen.append(model.seen)
    assert len(seen[0]) == 10
    for (t, rows1), (_, rows2) in zip(*seen):
        sigma = 1 - t
        expected = 1.0 if sigma <= tau1 else 0.0 if sigma >= tau2 else (tau2 - sigma) / (tau2 - tau1)
        delta = (rows1 - rows2)[:B]  # the conditional rows
        gamma = (((delta * (y1 - y2)).sum() / ((y1 - y2) ** 2).sum()) ** 2).item()
        assert gamma == pytest.approx(expected, abs=1e-9), t


@torch.no_grad()
def test_adaptive_solver_without_grid(odeint, data):
    # dopri5 steps past t = 1 and back: the adapter clamps the level guidekit sees to
    # [0, 1], undoes rejected trials, and the result matches a tight fixed-step solve.
    guided = FlowGuided(CFG(3) + Autoguidance(1), data["main"], models={"weak": data["weak"]},
                        cond=data["cond"], uncond=data["uncond"])
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    out = odeint(guided.odeint_func(), data["noise"], ends, method="dopri5", rtol=1e-8,
                 atol=1e-8)[-1]
    assert any(t > 1 for t in data["main"].times)  # the overshoot really happened
    assert 0 < guided.steps <= len(guided.calls) // 2
    fine = FlowGuided(CFG(3) + Autoguidance(1), data["main"], models={"weak": data["weak"]},
                      cond=data["cond"], uncond=data["uncond"])
    ref = odeint(fine.odeint_func(), data["noise"], ends, method="rk4",
                 options={"step_size": 1 / 200})[-1]
    assert (out - ref).abs().max() < 1e-6


@torch.no_grad()
def test_x0_space_processor_at_sigma_zero(odeint, data):
    # rk4 evaluates its last stage at t = 1 (sigma = 0), where every branch's x0 is x and x0
    # cannot be turned back into a velocity: APG acts there as its limit as sigma -> 0
    # (tests/oracles/test_apg_noiseless.py), so the field the solver sees is continuous
    # at t = 1 (before: plain CFG there, a jump of about 1.3 on this model's scale)
    grid = torch.linspace(0, 1, 5, dtype=F64)
    guided = FlowGuided(CFG(3) | APG(eta=0), data["main"], cond=data["cond"],
                        uncond=data["uncond"], time_grid=grid)
    out = odeint(guided.odeint_func(), data["noise"], grid, method="rk4")[-1]
    assert torch.isfinite(out).all()

    def field(expr, sigma):
        g = FlowGuided(expr, data["main"], cond=data["cond"], uncond=data["uncond"])
        return g.velocity(data["noise"], sigma)

    at_end = field(CFG(3) | APG(eta=0), 0.0)
    torch.testing.assert_close(at_end, field(CFG(3) | APG(eta=0), 1e-7), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(at_end, field(CFG(3), 0.0), atol=1e-3)


@torch.no_grad()
def test_x0_space_processor_with_dopri5(odeint, data):
    # dopri5 evaluates at t = 1 and past it (clamped to sigma = 0): APG acts as its limit
    # there, as docs/adapters.md says, and the run stays finite.
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    guided = FlowGuided(CFG(3) | APG(eta=0), data["main"], cond=data["cond"],
                        uncond=data["uncond"])
    out = odeint(guided.odeint_func(), data["noise"], ends, method="dopri5", rtol=1e-6,
                 atol=1e-6)[-1]
    assert any(t >= 1 for t in data["main"].times)
    assert torch.isfinite(out).all()

class AttentionVelocity(torch.nn.Module):
    """``u(x [B, 2, 4, 4], t, cond [B, 8])`` attending over the 16 pixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.inp = torch.nn.Linear(3, 8, dtype=F64)
        self.attn = Attention()
        self.out = torch.nn.Linear(8, 2, dtype=F64)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1).expand(x.shape[0], 16, 1)
        h = self.inp(torch.cat([tokens, t], -1)) + cond[:, None]
        h = h + self.attn(h)
        return self.out(h).transpose(1, 2).reshape(x.shape)


@torch.no_grad()
def test_attention_terms_run_through_the_adapter(fm, data):
    net, grid = AttentionVelocity(), data["grid"]
    plan = gk.compile(CFG(3) + PAG(2, layers=-1), prediction="flow", noise="flow")
    with install(net, plan, attention_class=Attention) as around_call:
        guided = FlowGuided(plan, net, uncond=data["uncond"], time_grid=grid,
                            around_call=around_call)
        out = fm.ODESolver(guided).sample(x_init=data["noise"], step_size=None, time_grid=grid,
                                          cond=data["cond"])
        ref = gk.guide(plan, lambda x, s, cond: -net(x=x, t=1 - s, cond=cond),
                       cond={"cond": data["cond"]}, uncond={"cond": data["uncond"]},
                       sigmas=1 - grid, around_call=around_call)
        x = data["noise"].clone()
        for s, s_next in zip(1 - grid[:-1], 1 - grid[1:]):
            x = x + (s_next - s) * ref(x, s)
    assert (out - x).abs().max() < 1e-6
    assert [(c.rows, len(c.branches)) for c in guided.calls] == [(3 * B, 3)] * 8
    plain = FlowGuided(CFG(3), net, uncond=data["uncond"], time_grid=grid)
    y = fm.ODESolver(plain).sample(x_init=data["noise"], step_size=None, time_grid=grid,
                                   cond=data["cond"])
    assert (out - y).abs().max() > 1e-3  # the perturbed branch really differed from c


def test_grid_to_sigmas_and_errors():
    assert sigmas_from_time_grid(torch.tensor([0.0, 0.25, 1.0])) == [1.0, 0.75, 0.0]
    main = Velocity(0)
    with pytest.raises(GuidanceValueError, match="time_grid=.*or"):
        FlowGuided(CFG(3), main, time_grid=[0, 1], sigmas=[1, 0])
    with pytest.raises(GuidanceValueError, match="model_time"):
        FlowGuided(CFG(3), main, model_time="timestep")
    with pytest.raises(GuidanceValueError, match="prediction='flow'"):
        FlowGuided(gk.compile(CFG(3), prediction="eps"), main)
    guided = FlowGuided(CFG(3), main, uncond=torch.zeros(B, 8, dtype=F64))
    with pytest.raises(GuidanceValueError, match="odeint_func"):
        guided.odeint_func("s")
    x = torch.zeros(B, *SHAPE, dtype=F64)
    with pytest.raises(GuidanceValueError, match="needs the conditioning"):
        guided(x, torch.tensor(0.5))
    with pytest.raises(GuidanceValueError, match="different values"):
        guided(x, torch.tensor([0.5, 0.6]), cond=torch.zeros(B, 8, dtype=F64))


def section_blocks(title: str) -> list[str]:
    """The python blocks of one ``## title`` section of docs/adapters.md."""
    text = (ROOT / "docs" / "adapters.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:] if end < 0 else text[start:end]
    return re.findall(r"^```python\n(.*?)^```", section, re.DOTALL | re.MULTILINE)


def test_docs_flow_matching_section_runs(fm, odeint):
    blocks = section_blocks("Flow matching")
    assert blocks
    namespace: dict[str, object] = {"__name__": "doc:adapters:flow"}
    for code in blocks:
        exec(compile(code, "docs/adapters.md#flow-matching", "exec"), namespace)
