"""Sampler-step terms (CFG++): which expressions may hold one, and who may run them.

A term of kind ``"sampler"`` (:class:`~guidekit.terms.cfgpp.CFGppTerm`) changes the
sampler's step, not only the prediction: the denoised estimate comes from the expression's
guided prediction and the re-noising from the term's ``renoise`` branch. An expression
holds at most one such term, and it must be the expression's prediction (coefficient 1):
there is one re-noising per step, so the expression reads ``CFGpp(lam) + directions``,
optionally gated and piped. The directions (PAG, SEG, SLG, ``w (Cond('a') - Cond())``,
...) and post-processors shape the denoised estimate; the re-noising stays the term's
``renoise`` branch. Two CFGpp terms, or one scaled inside a difference
(``Cond() + 0.5 * (CFGpp(0.6) - Cond())``), have no CFG++ meaning and are refused by name.

``Plan.step`` evaluates such a plan only for a caller that takes the re-noising branch
(``keep=``): a :class:`Renoiser` (``guide(..., sampler="euler")`` and the sampler adapters).
Every other caller -- ``guide()`` without ``sampler=``, a bare ``plan.step`` -- gets an
error naming what is supported.

How a :class:`Renoiser` makes an unmodified sampler take CFG++ steps: it hands the
sampler a prediction ``D'`` such that the sampler's ordinary step from ``(x, sigma)`` equals the CFG++ step of
https://arxiv.org/abs/2406.08070: denoised estimate ``G`` (the expression's guided
prediction, as x0), re-noised with ``U`` (the term's ``renoise`` branch, as x0). With
``x = a x0 + b n`` (:class:`guidekit.Noise`) and ``rho = (b_next a) / (b a_next)`` (the ratio
of the two levels' noise-to-signal ratios; ``sigma_next / sigma`` in the VE convention):

* ``"euler"`` -- k-diffusion's ``sample_euler``, flow Euler (``x + (sigma_next - sigma) v``),
  diffusers' ``EulerDiscreteScheduler`` / ``FlowMatchEulerDiscreteScheduler`` /
  ``DDIMScheduler`` (``eta = 0``: an Euler step in ``x / sqrt(abar)``), in classic pipelines
  and under the modular guider. The sampler
  steps ``x_next = rho' x + ...`` onto ``a_next D' + b_next (x - a D') / b``; CFG++ wants
  ``a_next G + b_next (x - a U) / b``, so ``D' = (G - rho U) / (1 - rho)`` --
  ``U + (G - U) / (1 - rho)``: CFG with ``w = lam sigma / (sigma - sigma_next)`` (VE).
* ``"euler_ancestral"`` (VE) -- k-diffusion's ``sample_euler_ancestral(eta=...)`` steps to
  ``sigma_down`` and adds ``sigma_up`` fresh noise; CFG++ re-noises to ``sigma_down`` with
  ``U`` and adds the same noise, so ``rho = sigma_down / sigma``. ``sigma_down`` depends on
  ``eta``, which must therefore be given (no default); ``s_noise`` only scales the added
  noise, which both steps share, so any value is exact.
* ``"dpmpp_2m"`` (VE) -- k-diffusion's ``sample_dpmpp_2m``. The paper has no DPM++ 2M
  formula; its authors' code (CFGpp-diffusion/CFGpp, ``dpm++_2m_cfg++``; ComfyUI's
  ``sample_dpmpp_2m_cfg_pp`` is the same) steps ``x_next = G + rho (x - U) +
  (1 - rho) (G - U_prev) / (2 r)`` (first order at the first and last step), ``r =
  h_prev / h`` with ``h = log(sigma / sigma_next)``. The sampler's own step is affine in
  ``D'`` given the ``D'`` it was handed last, which is solved for ``D'``.

Where the CFGpp term is not active at a step (gated off by ``.between``), ``U = G``: the
sampler's ordinary step on the guided prediction. Every call must be one step on the
schedule, in order: a sampler that evaluates twice per step or off its levels (Heun, DPM-2,
churn) is refused, naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from guidekit.branch import Branch
from guidekit.errors import GuidanceValueError
from guidekit.spaces import convert

if TYPE_CHECKING:
    from guidekit.plan import Plan

#: where CFG++ runs (the error messages list it)
SUPPORTED = (
    "guide(plan, ..., sigmas=sigmas, sampler='euler') for a loop of Euler steps; "
    "k-diffusion: KDiffusionGuided(...).sample(fn, x, sigmas, ...) or KDiffusionGuided(..., "
    "sigmas=sigmas, sampler='euler' | 'euler_ancestral' (with eta=) | 'dpmpp_2m') with "
    "sample_euler (s_churn=0), sample_euler_ancestral or sample_dpmpp_2m; "
    "flow_matching: FlowGuided(..., time_grid=grid, solver='euler') with ODESolver "
    "method='euler'; diffusers: guided(pipe, ...) with EulerDiscreteScheduler, "
    "FlowMatchEulerDiscreteScheduler or DDIMScheduler (eta=0), and the modular guider "
    "GuidekitGuidance(...).attach(scheduler=...) under the same (DDIM: attach(eta=0))"
)


def is_sampler_term(node: Any) -> bool:
    """Whether ``node`` is a term that changes the sampler's step (kind ``"sampler"``)."""
    return getattr(type(node), "_kind", None) == "sampler"


def _leaves(expr: Any) -> Iterator[Any]:
    children = expr.children() if hasattr(expr, "children") else ()
    if not children:
        yield expr
    for child in children:
        yield from _leaves(child)


@lru_cache(maxsize=512)
def sampler_term(expr: Any) -> Any:
    """The expression's one sampler-step term, or ``None``; refuses what has no meaning."""
    leaves = list(_leaves(expr))
    found = [leaf for leaf in leaves if is_sampler_term(leaf)]
    if not found:
        return None
    term = found[0]
    if len(found) > 1:
        raise GuidanceValueError(
            f"{expr!r}: {' and '.join(map(repr, found))} -- an expression holds one CFGpp "
            f"term: a CFG++ step re-noises with one prediction. Write CFGpp(lam) + directions "
            f"(PAG, SEG, ...)"
        )
    coefs = [e.coef for e in expr.entries() if e.atom == term]
    if any(abs(k - 1.0) > 1e-12 for k in coefs):
        raise GuidanceValueError(
            f"{expr!r}: {term!r} enters with coefficient {coefs[0]:g}; a CFG++ step takes its "
            f"denoised estimate from CFGpp's own prediction, so the term must be the "
            f"expression's prediction (coefficient 1). Write CFGpp(lam) + directions (PAG(s), "
            f"SEG(s), w * (Cond('a') - Cond()), ...) and put the strength in lam"
        )
    return term


def refused(expr: Any, where: str) -> GuidanceValueError:
    """The error for a caller that cannot run ``expr``'s sampler-step term."""
    term = sampler_term(expr)
    return GuidanceValueError(
        f"{where}{term!r} needs the sampler's cooperation (it re-noises with the "
        f"{term.renoise.label} prediction, not the guided one), which this caller cannot give. "
        f"Supported: {SUPPORTED}. In a loop of your own, CFG(w) with "
        f"w = lam sigma / (sigma - sigma_next) per step is one CFG++ Euler step"
    )


def check_keep(expr: Any, keep: Mapping[Branch, Any] | None, where: str = "") -> None:
    """Refuse a sampler-step plan for a caller that does not take the re-noising branch."""
    if keep is None and sampler_term(expr) is not None:
        raise refused(expr, where)


#: sampler -> noise conventions it is exact for
SAMPLERS = {"euler": ("ve", "vp", "flow"), "euler_ancestral": ("ve",), "dpmpp_2m": ("ve",)}


def renoiser(
    plan: Plan, sampler: str | None, sigmas: Any, where: str, *, eta: float | None = None,
    names: Sequence[str] = tuple(SAMPLERS), arg: str = "sampler",
) -> Renoiser | None:
    """A :class:`Renoiser` for ``plan`` when it holds CFGpp (else ``None``); refuses a sampler
    or schedule it cannot step exactly, naming them.

    ``eta`` is the ancestral sampler's noise amount: required for ``"euler_ancestral"`` (it
    sets the level CFG++ re-noises to, and guidekit never sees the sampler's call, so no
    default could be right), refused for the others."""
    term = sampler_term(plan.expr)
    if term is None:
        return None
    noise = plan.noise.kind
    if sampler not in names or noise not in SAMPLERS[str(sampler)]:
        ok = [n for n in names if noise in SAMPLERS[n]]
        raise GuidanceValueError(
            f"{where}: {term!r} re-noises inside the sampler's step, which guidekit expresses "
            f"for {arg}={' | '.join(map(repr, ok))} here; got {arg}={sampler!r}. Pass the "
            f"{arg} you call (and sample with it), or use CFG. Supported: {SUPPORTED}"
        )
    if sampler == "euler_ancestral" and eta is None:
        raise GuidanceValueError(
            f"{where}: {term!r} with {arg}='euler_ancestral' needs the eta your sampler call "
            f"uses (it sets the level CFG++ re-noises to, and guidekit cannot see that call): "
            f"pass eta= explicitly (k-diffusion's sample_euler_ancestral defaults to eta=1.0), "
            f"or sample through KDiffusionGuided.sample(k_diffusion.sampling."
            f"sample_euler_ancestral, x, sigmas, eta=...), which reads it from the call"
        )
    if eta is not None and sampler != "euler_ancestral":
        raise GuidanceValueError(
            f"{where}: eta={eta:g} is the ancestral sampler's noise amount, but {arg}="
            f"{sampler!r} adds no noise: leave eta out, or pass {arg}='euler_ancestral'"
        )
    if sigmas is None:
        raise GuidanceValueError(
            f"{where}: {term!r} needs the sampler's schedule (sigmas= / time_grid=) to know "
            f"each step's next noise level"
        )
    values = sigmas.detach().flatten().tolist() if isinstance(sigmas, torch.Tensor) else list(sigmas)
    levels = [float(v) for v in values]
    if any(b >= a for a, b in zip(levels, levels[1:])) or len(levels) < 2:
        raise GuidanceValueError(
            f"{where}: {term!r} needs a decreasing schedule of at least two levels, got "
            f"{levels}"
        )
    return Renoiser(plan, term, str(sampler), levels, where, eta)


class Renoiser:
    """One sampling run's CFG++ bookkeeping: the step index and the last step's values."""

    def __init__(
        self, plan: Plan, term: Any, sampler: str, levels: list[float], where: str,
        eta: float | None,
    ) -> None:
        self.plan, self.term, self.sampler = plan, term, sampler
        self.levels, self.where, self.eta = levels, where, eta
        self.reset()

    def reset(self, sigmas: Any = ...) -> None:
        """A new run (optionally on a new schedule; ``...`` keeps it)."""
        if sigmas is not ...:
            fresh = renoiser(
                self.plan, self.sampler, sigmas, self.where, eta=self.eta, names=(self.sampler,)
            )
            assert fresh is not None
            self.levels = fresh.levels
        self.index = -1
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (D', U) as x0

    def _index_of(self, sigma: float) -> int:
        for i, level in enumerate(self.levels[:-1]):
            if math.isclose(sigma, level, rel_tol=1e-5, abs_tol=1e-9):
                if i == 0:
                    self.reset()
                if i != self.index + 1:
                    break
                return i
        else:
            raise GuidanceValueError(
                f"{self.where}: {self.term!r} with sampler={self.sampler!r}: the sampler called "
                f"the model at sigma={sigma:g}, which is not a step of the schedule "
                f"({', '.join(f'{v:g}' for v in self.levels)}). CFG++ is stepped for one model "
                f"call per step on the schedule: a sampler that churns (s_churn > 0) or "
                f"evaluates between levels (Heun, DPM-2, DPM++ SDE, RK) is not supported"
            )
        raise GuidanceValueError(
            f"{self.where}: {self.term!r} with sampler={self.sampler!r}: the sampler called the "
            f"model at sigma={sigma:g} (step {i}) after step {self.index}; CFG++ is stepped for "
            f"exactly one model call per step, in order (Heun and DPM-2 call twice per step "
            f"and are not supported). Call reset() before sampling again with another schedule"
        )

    def __call__(
        self, x: torch.Tensor, sigma: float, guided: torch.Tensor,
        keep: dict[Branch, torch.Tensor], output: str,
    ) -> torch.Tensor:
        """The prediction (in ``output`` space) to hand the sampler for this step."""
        i = self._index_of(sigma)
        nxt = self.levels[i + 1]
        plan, noise = self.plan, self.plan.noise
        # a scheduled lam is resolved per level (a CFGpp of that step's number): match the kind
        active = any(
            type(atom) is type(self.term)
            for atom, _ in plan.program(sigma, tuple(self.levels)).coefs
        )
        g0 = convert(guided, output, "x0", x, sigma, noise)
        if active:
            u0 = convert(keep[self.term.renoise], plan.prediction, "x0", x, sigma, noise)
        else:
            u0 = g0
        rho = self._rho(sigma, nxt)
        if self.sampler == "dpmpp_2m" and self.prev is not None and nxt > 0:
            d_prev, u_prev = self.prev
            r = math.log(self.levels[i - 1] / sigma) / math.log(sigma / nxt)
            f = (1.0 - rho) / (2.0 * r)
            d = (g0 - rho * u0 + f * (g0 - u_prev + d_prev)) / ((1.0 - rho) + f)
        else:
            d = (g0 - rho * u0) / (1.0 - rho)
        self.index, self.prev = i, (d, u0)
        return convert(d, "x0", output, x, sigma, noise)

    def _rho(self, sigma: float, nxt: float) -> float:
        if self.sampler == "euler_ancestral" and nxt > 0 and self.eta:
            up = min(nxt, self.eta * math.sqrt(nxt**2 * (sigma**2 - nxt**2) / sigma**2))
            nxt = math.sqrt(max(nxt**2 - up**2, 0.0))
        a, b = self.plan.noise.coefficients(sigma)
        a_next, b_next = self.plan.noise.coefficients(nxt)
        if b_next == 0.0:
            return 0.0
        return (b_next * a) / (b * a_next)


def renoised(
    renoise: Renoiser | None, step: Callable[[Any], torch.Tensor], x: torch.Tensor,
    sigma: float, output: str,
) -> torch.Tensor:
    """``step(keep)`` -- one guided prediction in ``output`` space that fills ``keep`` with
    the branch outputs -- as the sampler's CFG++ prediction (unchanged without CFGpp)."""
    if renoise is None:
        return step(None)
    keep: dict[Branch, torch.Tensor] = {}
    guided = step(keep)
    return renoise(x, sigma, guided, keep, output)


__all__ = [
    "SAMPLERS", "SUPPORTED", "Renoiser", "check_keep", "is_sampler_term", "refused",
    "renoised", "renoiser", "sampler_term",
]
