"""The custom-sampler API: a hand-written Euler loop around a tiny torch model."""

import torch

import guidekit as gk
from guidekit import APG, CFG, Autoguidance


class Tiny(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.3)
        self.emb = torch.nn.Parameter(torch.randn(11, 4, generator=g))

    def forward(self, x, sigma, y):
        h = x / (sigma.view(-1, 1) ** 2 + 1).sqrt()
        return torch.tanh(h @ self.w + self.emb[y])


@torch.no_grad()
def test_euler_loop_counts_calls_and_rows_per_step():
    main, weak = Tiny(0), Tiny(1)
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.4, 0.0])
    expr = CFG(3) + Autoguidance(1).between(0.5, 4) | APG(eta=0, momentum=-0.5)
    plan = gk.compile(expr, prediction="eps", noise="ve")
    batch = 5
    labels = torch.arange(batch) % 10
    guided = gk.guide(
        plan, main, cond={"y": labels}, uncond={"y": torch.full((batch,), 10)},
        models={"weak": weak}, sigmas=sigmas, output="x0",
    )
    x = torch.randn(batch, 4) * sigmas[0]
    for i in range(len(sigmas) - 1):
        before = len(guided.calls)
        x0 = guided(x, sigmas[i])
        calls = guided.calls[before:]
        active = plan.program(float(sigmas[i])).groups
        assert [(c.model, c.rows) for c in calls] == [
            (g.model, len(g.branches) * batch) for g in active
        ]
        d = (x - x0) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    assert torch.isfinite(x).all()
    assert guided.steps == 5
    assert sum(c.model == "weak" for c in guided.calls) == 2  # sigma 2 and 1 only
