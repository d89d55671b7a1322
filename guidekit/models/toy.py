"""A self-contained demo: guidekit inside a hand-written Euler sampler around a tiny model.

``python -m guidekit demo --toy`` and ``examples/custom_sampler.py`` both run
:func:`run_demo`. The model is a small ``torch.nn.Module`` that predicts the noise ``eps`` of
a toy class-conditional data set exactly (each class is a Gaussian blob), so the demo
samples something meaningful in well under a second on a CPU, with no download. The demo
with the bundled diffusion models (``python -m guidekit demo``) is
:mod:`guidekit.models.demo`.

What it shows:

* ``print(plan)`` and ``plan.explain(sigmas, batch=B)``: branches, rows, calls and the
  combine formula per noise interval;
* the model calls actually made, read from ``guided.calls``: exactly one call per forward
  group per step, each of ``active_branches x B`` rows (checked, not just printed).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import guidekit
from guidekit import APG, CFG, Autoguidance
from guidekit.combinators import InputModifier
from guidekit.errors import GuidanceValueError
from guidekit.expr import Expr
from guidekit.finite import terms_using
from guidekit.plan import CallRecord, Plan


def default_guidance() -> Expr:
    """The demo's guidance: CFG, Autoguidance on a noise interval, then APG with momentum."""
    return CFG(3) + Autoguidance(1).between(0.3, 5) | APG(eta=0, momentum=-0.5)


class ToyDenoiser(torch.nn.Module):
    """``model(x, sigma, y) -> eps``: the exact noise prediction for Gaussian class blobs.

    Class ``k`` has data ``N(mean_k, std_k^2 I)``; the extra last class (index ``classes``)
    is the *null* class used for the unconditional branch, a wide blob around the mean of
    all classes. ``y`` is either integer labels ``[B]`` or float class weights
    ``[B, classes + 1]`` (a one-hot "embedding", which is what CADS adds noise to). The
    noise convention is k-diffusion's VE: ``x = x0 + sigma n``.
    """

    def __init__(self, classes: int = 4, shape: tuple[int, ...] = (2, 8, 8), seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        means = 2.0 * torch.randn(classes, *shape, generator=gen)
        null = means.mean(0, keepdim=True)
        spread = (means - null).square().mean().sqrt()
        self.classes = classes
        self.means = torch.nn.Parameter(torch.cat([means, null]))
        stds = torch.full((classes + 1,), 0.5)
        stds[-1] = float((0.25 + spread**2).sqrt())
        self.stds = torch.nn.Parameter(stds)

    @property
    def null_class(self) -> int:
        return self.classes

    def weaker(self, shrink: float = 0.6, blur: float = 1.5) -> ToyDenoiser:
        """A degraded copy (class means pulled together, blobs wider): Autoguidance's weak
        model, standing in for a smaller or less-trained network."""
        weak = copy.deepcopy(self)
        with torch.no_grad():
            null = weak.means[-1:]
            weak.means[:-1] = null + shrink * (weak.means[:-1] - null)
            weak.stds[:-1] *= blur
        return weak

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not y.is_floating_point():
            y = torch.nn.functional.one_hot(y, self.classes + 1).to(x.dtype)
        view = (-1,) + (1,) * (x.ndim - 1)
        y = y.to(x.dtype)
        mean = (y @ self.means.to(x.dtype).flatten(1)).view_as(x)
        var = (y @ self.stds.to(x.dtype)).clamp_min(1e-3).square().view(view)
        sig2 = sigma.to(x.dtype).square().view(view)
        # Posterior mean of x0 for a Gaussian prior: the optimal denoiser of this data.
        x0 = (var * x + sig2 * mean) / (var + sig2)
        return (x - x0) / sigma.to(x.dtype).view(view)


def karras_sigmas(steps: int, sigma_min: float = 0.02, sigma_max: float = 20.0,
                  rho: float = 7.0) -> torch.Tensor:
    """The EDM (Karras et al.) noise schedule, noisiest first, with a final 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def euler(guided: Callable[[torch.Tensor, Any], torch.Tensor], x: torch.Tensor,
          sigmas: torch.Tensor) -> torch.Tensor:
    """A plain Euler sampler for an eps-prediction VE model: ``dx / dsigma = eps``."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        eps = guided(x, sigma)
        x = x + (sigma_next - sigma) * eps
    return x


@dataclass(frozen=True)
class StepCalls:
    """The model calls of one sampler step, with what the plan says they should be."""

    step: int
    sigma: float
    calls: tuple[CallRecord, ...]
    expected: tuple[tuple[str, int], ...]  # (model, rows) per forward group

    @property
    def ok(self) -> bool:
        return tuple((c.model, c.rows) for c in self.calls) == self.expected


@dataclass(frozen=True)
class DemoReport:
    """What :func:`run_demo` did: the plan, the per-step calls and the samples."""

    plan: Plan
    batch: int
    sigmas: torch.Tensor
    labels: torch.Tensor
    samples: torch.Tensor
    steps: tuple[StepCalls, ...]
    accuracy: float  # fraction of samples nearest to their own class mean

    @property
    def model_calls(self) -> int:
        return sum(len(s.calls) for s in self.steps)

    @property
    def rows(self) -> int:
        return sum(c.rows for s in self.steps for c in s.calls)


def as_expr(guidance: str | Expr | None) -> Any:
    """The demo's expression: ``None`` for the default, text through ``guidekit.parse``.

    Text that is not a prediction (``"APG()"``) comes back as is; ``compile`` says why.
    """
    if guidance is None:
        return default_guidance()
    if isinstance(guidance, str):
        from guidekit.parse import parse  # lazy: the parser is only needed for text

        return parse(guidance)
    return guidance


def calls_by_step(plan: Plan, calls: list[CallRecord], sigmas: torch.Tensor,
                  batch: int) -> tuple[StepCalls, ...]:
    """Group ``guided.calls`` by step and pair them with the plan's forward groups."""
    out = []
    levels = tuple(float(s) for s in sigmas)
    for i, sigma in enumerate(levels[:-1]):
        made = tuple(c for c in calls if c.step == i)
        groups = plan.program(sigma, levels).groups
        expected = tuple((g.model, len(g.branches) * batch) for g in groups)
        out.append(StepCalls(i, sigma, made, expected))
    return tuple(out)


def check_toy(plan: Plan) -> None:
    """Refuse terms that work inside attention: the toy denoiser has no attention layers."""
    inside = [b for b in plan.branches if b.perturbation is not None]
    names = [t for b in inside for t in terms_using(plan.expr, b)]
    names += [repr(m) for m in plan.attention]
    if names:
        raise GuidanceValueError(
            f"the toy demo's denoiser has no attention layers, so "
            f"{', '.join(dict.fromkeys(names))} cannot run on it: run the expression on a "
            f"bundled model (guidekit demo --guidance {str(plan.expr)!r}), or give --toy a "
            f"prediction-space expression (CFG, Autoguidance, APG, CADS, Rescale, ...)"
        )


def run_demo(guidance: str | Expr | None = None, *, steps: int = 12, batch: int = 4,
             seed: int = 0, max_rows: int | str | None = None,
             echo: Callable[[str], None] | None = print) -> DemoReport:
    """Sample ``batch`` toy images with ``guidance`` in a hand-written Euler loop.

    Args:
        guidance: an expression, its text (read by ``guidekit.parse``) or ``None`` for
            :func:`default_guidance`.
        steps: Euler steps (noise levels of the Karras schedule).
        batch: the sampler's batch ``B``.
        seed: seeds the labels, the initial noise and CADS.
        max_rows: the plan's row budget (``None``: one call per forward group).
        echo: where the report goes (``None``: silent).

    Returns:
        A :class:`DemoReport`; raises ``AssertionError`` if any step did not run exactly one
        call per forward group with ``active_branches x B`` rows (without a row budget).
    """
    say = echo or (lambda _: None)
    expr = as_expr(guidance)
    plan = guidekit.compile(expr, prediction="eps", noise="ve", max_rows=max_rows)
    check_toy(plan)
    torch.manual_seed(seed)
    model = ToyDenoiser(seed=seed)
    weak = model.weaker()
    sigmas = karras_sigmas(steps).float()
    labels = torch.randint(0, model.classes, (batch,))
    null = torch.full_like(labels, model.null_class)
    if any(isinstance(m, InputModifier) for m in plan.modifiers):
        # CADS adds noise to an embedding, not to integer labels: pass one-hot weights.
        cond = torch.nn.functional.one_hot(labels, model.classes + 1).float()
        uncond = torch.nn.functional.one_hot(null, model.classes + 1).float()
    else:
        cond, uncond = labels, null

    guided = guidekit.guide(plan, model, cond={"y": cond}, uncond={"y": uncond},
                            models={"weak": weak}, sigmas=sigmas, seed=seed)
    x = sigmas[0] * torch.randn(batch, 2, 8, 8)
    with torch.no_grad():
        x = euler(guided, x, sigmas)

    per_step = calls_by_step(plan, guided.calls, sigmas, batch)
    dist = (x.flatten(1)[:, None, :] - model.means[:-1].detach().flatten(1)[None]).norm(dim=-1)
    accuracy = float((dist.argmin(1) == labels).double().mean())
    report = DemoReport(plan, batch, sigmas, labels, x, per_step, accuracy)

    say(str(plan))
    say("")
    say(plan.explain(sigmas, batch=batch))
    say("")
    say(f"model calls made (from guided.calls), B = {batch}:")
    say(f"  {'step':>4}  {'sigma':>8}  calls  rows per call")
    for s in per_step:
        rows = ", ".join(f"{c.model}[{' '.join(c.branches)}] {c.rows}" for c in s.calls)
        say(f"  {s.step:>4}  {s.sigma:>8.4g}  {len(s.calls):>5}  {rows}")
    say(f"total: {report.model_calls} model calls, {report.rows} rows over {steps} steps")
    say(f"samples nearest their own class mean: {accuracy:.0%}")
    if max_rows is None:
        bad = [s for s in per_step if not s.ok]
        if bad:
            raise AssertionError(
                f"step {bad[0].step}: made {[(c.model, c.rows) for c in bad[0].calls]}, "
                f"expected one call per forward group {list(bad[0].expected)}"
            )
        say("check: exactly one model call per forward group per step, "
            "rows = active branches x B")
    return report


if __name__ == "__main__":  # pragma: no cover - `python -m guidekit demo --toy` is the entry point
    run_demo(sys.argv[1] if len(sys.argv) > 1 else None)
