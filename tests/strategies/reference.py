"""The reference evaluator's terms: each term's value and linear form, from the tree.

Each formula comes from the papers (``methods.md``), written here independently of
``Plan.step``; a linear or direction term needs nothing here (its ``coefficients()`` are
read, and its own oracle test checks them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import torch

from guidekit import (
    AutoguidanceTerm,
    CFGRescale,
    CFGTerm,
    CFGZeroStarTerm,
    CondTerm,
    Gated,
    Piped,
    Scaled,
    Sum,
    TCFGTerm,
    UncondTerm,
)
from guidekit.branch import COND, MAIN, UNCOND, Branch
from guidekit.expr import Expr
from guidekit.schedules import Level, resolve
from guidekit.terms import BetaCFGTerm, CFGppTerm, FDGTerm, PerpNegTerm
from guidekit.terms.base import DirectionTerm, LinearTerm

from .worlds import World, branch_output, modified

# -- the reference evaluator ---------------------------------------------------------------------


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.ndim))


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product, kept as ``[B, 1, ...]`` for broadcasting."""
    return (a * b).sum(_dims(a), keepdim=True)


def _ab(noise: str, sigma: float) -> tuple[float, float]:
    """``x = a x0 + b n`` for the noise convention (the library's ``Noise`` docstring)."""
    if noise == "ve":
        return 1.0, sigma
    if noise == "flow":
        return 1.0 - sigma, sigma
    raise ValueError(noise)


def to_x0(pred: torch.Tensor, space: str, x: torch.Tensor, noise: str, sigma: float) -> torch.Tensor:
    """x0 from a prediction; VE: eps as k-diffusion, v as its ``VDenoiser`` (sigma_data 1);
    flow: diffusers' ``x0 = x - sigma v``."""
    if space == "x0":
        return pred
    if space == "eps":
        a, b = _ab(noise, sigma)
        return (x - b * pred) / a
    if space == "v" and noise == "ve":
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / math.sqrt(sigma**2 + 1.0)
        return c_skip * x + c_out * pred
    if space == "flow" and noise == "flow":
        return x - sigma * pred
    raise ValueError((space, noise))


def from_x0(x0: torch.Tensor, space: str, x: torch.Tensor, noise: str, sigma: float) -> torch.Tensor:
    """The inverse of :func:`to_x0` (solve its affine map for the prediction)."""
    if space == "x0":
        return x0
    if space == "eps":
        a, b = _ab(noise, sigma)
        return (x - a * x0) / b
    if space == "v" and noise == "ve":
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / math.sqrt(sigma**2 + 1.0)
        return (x0 - c_skip * x) / c_out
    if space == "flow" and noise == "flow":
        return (x - x0) / sigma
    raise ValueError((space, noise))


@attrs.define
class Env:
    """One step of the reference: the world, the step, and the branch outputs (native)."""

    world: World
    step: int
    sigma: float
    x: torch.Tensor
    #: set when an APG coefficient is a rounding residue next to 0 or 1, where the library's
    #: exact ``== 0`` tests and this reference may legitimately disagree
    ambiguous: bool = False
    #: the expression's attention modifiers, in pipe order (see :func:`modified`)
    modifiers: tuple[Any, ...] = ()

    def value(self, branch: Branch) -> torch.Tensor:
        return branch_output(self.world, modified(branch, self.modifiers), self.step)

    def to_x0(self, y: torch.Tensor) -> torch.Tensor:
        return to_x0(y, self.world.prediction, self.x, self.world.noise, self.sigma)

    def from_x0(self, y: torch.Tensor) -> torch.Tensor:
        return from_x0(y, self.world.prediction, self.x, self.world.noise, self.sigma)


def cond_of(model: str = MAIN) -> Branch:
    """The conditional branch of ``model``."""
    return Branch(model, COND)


def uncond_of(model: str = MAIN) -> Branch:
    """The unconditional branch of ``model``."""
    return Branch(model, UNCOND)


def _cfg_zero_star(t: CFGZeroStarTerm, env: Env) -> torch.Tensor:
    """CFG-Zero* (arXiv 2503.18886): ``a = <c,u> / ||u||^2``; ``a u + w (c - a u)``; zero
    for the first ``k`` steps. The 1e-8 in the norm follows the official code."""
    c, u = env.value(cond_of()), env.value(uncond_of())
    if env.step < t.zero_init_steps:
        return torch.zeros_like(c)
    a = dot(c, u) / (dot(u, u) + 1e-8)
    return a * u + t.scale * (c - a * u)


def _tcfg(t: TCFGTerm, env: Env) -> torch.Tensor:
    """TCFG (arXiv 2503.18137): project ``u`` on the top right singular vector of the
    per-sample 2 x D matrix ``M = [c; u]``; ``u' + w (c - u')``.

    Computed from the eigenvectors of the 2 x 2 Gram matrix ``M M^T`` (not an SVD): the top
    right singular vector is ``M^T e / ||M^T e||`` for the top eigenvector ``e``.
    """
    c, u = env.value(cond_of()), env.value(uncond_of())
    out = []
    for cb, ub in zip(c, u):
        m = torch.stack([cb.flatten(), ub.flatten()])  # [2, D]
        _, vecs = torch.linalg.eigh(m @ m.T)  # ascending eigenvalues
        v = m.T @ vecs[:, -1]
        v = v / v.norm()
        u_proj = (ub.flatten() @ v) * v
        out.append((u_proj + t.scale * (cb.flatten() - u_proj)).reshape(cb.shape))
    return torch.stack(out)


def _fdg_matrices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-d ``down`` (``[ceil(n/2), n]``) and ``up`` (``[n, ceil(n/2)]``) of a Burt-Adelson
    pyramid as matrices: binomial 1 4 6 4 1 / 16 with mirrored borders, every second sample."""
    blur = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for k, weight in enumerate((1, 4, 6, 4, 1)):
            j = i + k - 2
            j = -j if j < 0 else (2 * (n - 1) - j if j >= n else j)
            blur[i, j] += weight / 16
    keep = torch.eye(n, dtype=torch.float64)[::2]
    return keep @ blur, 2 * blur @ keep.T


def _fdg(t: FDGTerm, env: Env) -> torch.Tensor:
    """FDG (arXiv 2506.19713) in x0 space: Laplacian bands of ``c`` and ``u``; band ``l`` is
    ``c_l + (w_l - 1)(eta d_par + d_perp)``, ``d = c_l - u_l``, ``d_par`` along ``c_l`` per
    sample; the coarsest band takes ``low``, the others ``high``; the bands summed back."""
    c, u = env.to_x0(env.value(cond_of())), env.to_x0(env.value(uncond_of()))

    def bands(img: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for _ in range(t.levels - 1):
            (dh, uh), (dw, uw) = _fdg_matrices(img.shape[-2]), _fdg_matrices(img.shape[-1])
            low = dh @ img @ dw.T
            out.append(img - uh @ low @ uw.T)
            img = low
        return [*out, img]

    guided = []
    for level, (bc, bu) in enumerate(zip(bands(c), bands(u))):
        w = t.low if level == t.levels - 1 else t.high
        d = bc - bu
        par = dot(d, bc) / dot(bc, bc) * bc
        guided.append(bc + (w - 1) * (t.eta * par + (d - par)))
    img = guided[-1]
    for band in reversed(guided[:-1]):
        _, uh = _fdg_matrices(band.shape[-2])
        _, uw = _fdg_matrices(band.shape[-1])
        img = band + uh @ img @ uw.T
    return env.from_x0(img)


def _perpneg(t: PerpNegTerm, env: Env) -> torch.Tensor:
    """Perp-Neg (arXiv 2304.04968, Alg. 1): ``u + w [d - sum_i w_i (d_i - (<d_i,d>/<d,d>) d)]``
    with ``d = c - u``, ``d_i = c_neg_i - u``, per sample; one ``neg_scale`` weighs all."""
    c, u = env.value(Branch(MAIN, t.cond)), env.value(uncond_of())
    d = c - u
    ws = t.neg_scale if len(t.neg_scale) == len(t.negative) else t.neg_scale * len(t.negative)
    total = d
    for n, w in zip(t.negative, ws):
        dn = env.value(Branch(MAIN, n)) - u
        total = total - w * (dn - dot(dn, d) / dot(d, d) * d)
    return u + t.scale * total
def _betacfg(t: BetaCFGTerm, env: Env) -> torch.Tensor:
    """beta-CFG (arXiv 2502.10574): ``u + w pdf(r) (c - u) / ||c - u||^gamma``, ``r`` by log
    sigma between the term's bounds, the Beta density from ``math.lgamma``."""
    c, u = env.value(cond_of()), env.value(uncond_of())
    assert t.sigma_max is not None and t.sigma_min is not None
    s = min(max(env.sigma, t.sigma_min), t.sigma_max)
    r = math.log(t.sigma_max / s) / math.log(t.sigma_max / t.sigma_min)
    log_b = math.lgamma(t.a) + math.lgamma(t.b) - math.lgamma(t.a + t.b)
    pdf = 0.0 if (r == 0 and t.a > 1) or (r == 1 and t.b > 1) else math.exp(
        (t.a - 1) * math.log(r) if r > 0 else 0.0) * math.exp(
        (t.b - 1) * math.log1p(-r) if r < 1 else 0.0) / math.exp(log_b)
    d = c - u
    return u + t.scale * pdf * d / dot(d, d).sqrt().clamp_min(1e-12) ** t.gamma


def _direction(t: Any, env: Env) -> torch.Tensor:
    """PAG / SEG / SLG (methods.md): ``s (c - n)``, ``n`` the term's negative branch."""
    return t.scale * (env.value(t.positive()) - env.value(t.negative()))


#: term class -> its value from branch outputs (formulas from methods.md).
TERM_REFERENCE: dict[type, Callable[[Any, Env], torch.Tensor]] = {
    CondTerm: lambda t, env: env.value(Branch(t.model, t.cond)),
    UncondTerm: lambda t, env: env.value(uncond_of(t.model)),
    CFGTerm: lambda t, env: env.value(Branch(MAIN, t.negative))
    + t.scale * (env.value(Branch(MAIN, t.cond)) - env.value(Branch(MAIN, t.negative))),
    AutoguidanceTerm: lambda t, env: t.scale * (env.value(cond_of()) - env.value(cond_of(t.model))),
    CFGZeroStarTerm: _cfg_zero_star,
    TCFGTerm: _tcfg,
    FDGTerm: _fdg,
    PerpNegTerm: _perpneg,
    BetaCFGTerm: _betacfg,
}

def _perpneg_form(t: PerpNegTerm) -> list[tuple[Any, float]]:
    """Perp-Neg at a scale of 0 is ``u``; with every weight 0 it is ``CFG(w)`` toward ``cond``."""
    ws = t.neg_scale * (len(t.negative) // len(t.neg_scale))
    if t.scale == 0:
        return [(uncond_of(), 1.0)]
    if all(w == 0 for w in ws):
        return [(Branch(MAIN, t.cond), t.scale), (uncond_of(), 1.0 - t.scale)]
    return [(t, 1.0)]


#: term class -> its linear form as (atom, coefficient) pairs; a nonlinear term is its own
#: atom with coefficient 1.
TERM_COEFFICIENTS: dict[type, Callable[[Any], list[tuple[Any, float]]]] = {
    CondTerm: lambda t: [(Branch(t.model, t.cond), 1.0)],
    UncondTerm: lambda t: [(uncond_of(t.model), 1.0)],
    CFGTerm: lambda t: [(Branch(MAIN, t.cond), t.scale), (Branch(MAIN, t.negative), 1.0 - t.scale)],
    AutoguidanceTerm: lambda t: [(cond_of(), t.scale), (cond_of(t.model), -t.scale)],
    CFGZeroStarTerm: lambda t: [(t, 1.0)],
    TCFGTerm: lambda t: [(t, 1.0)],
    FDGTerm: lambda t: [(t, 1.0)],
    PerpNegTerm: lambda t: _perpneg_form(t),
    BetaCFGTerm: lambda t: [(t, 1.0)],
}


# CFG++ (kind "sampler"): the prediction its denoised estimate comes from, n + lam (c - n).
# The expression strategies never draw it (only a sampler adapter runs it; its oracle tests
# are tests/oracles/test_cfgpp_*.py), but every registered class has a reference.
TERM_REFERENCE[CFGppTerm] = lambda t, env: env.value(Branch(MAIN, t.negative)) + t.scale * (
    env.value(Branch(MAIN, t.cond)) - env.value(Branch(MAIN, t.negative))
)
TERM_COEFFICIENTS[CFGppTerm] = lambda t: [(t, 1.0)]


def _linear(t: Any) -> list[tuple[Any, float]]:
    """Any other linear term's own ``coefficients()`` (its oracle test checks them)."""
    return list(t.coefficients().items())


def _from_coefficients(t: Any, env: Env) -> torch.Tensor:
    pairs = _linear(t)
    total = pairs[0][1] * env.value(pairs[0][0])
    for branch, coef in pairs[1:]:
        total = total + coef * env.value(branch)
    return total


def term_reference(node: Any) -> Callable[[Any, Env], torch.Tensor]:
    """The reference value of a term: its formula here, or from its coefficients."""
    if type(node) in TERM_REFERENCE:
        return TERM_REFERENCE[type(node)]
    if isinstance(node, DirectionTerm):
        return _direction
    if isinstance(node, LinearTerm):
        return _from_coefficients
    raise KeyError(
        f"tests/strategies/reference.py has no reference formula for the nonlinear term "
        f"{type(node).__name__}: add one to TERM_REFERENCE and atom_branches()"
    )


def term_coefficients(node: Any) -> list[tuple[Any, float]]:
    """A term's linear form as (atom, coefficient) pairs."""
    if type(node) in TERM_COEFFICIENTS:
        return TERM_COEFFICIENTS[type(node)](node)
    if isinstance(node, DirectionTerm):  # PAG, SEG, SLG, SAG, EMAG: s (positive - negative)
        return [(node.positive(), node.scale), (node.negative(), -node.scale)]
    if isinstance(node, LinearTerm):
        return _linear(node)
    return [(node, 1.0)]  # a nonlinear term is its own atom


def active(gate: Gated, sigma: float) -> bool:
    """The guidance-interval rule: a gate is on for ``lo < sigma <= hi``."""
    return gate.lo < sigma <= gate.hi


def reference_value(expr: Expr, env: Env) -> torch.Tensor:
    """The value of an (unpiped) expression at ``env``'s step, straight from the tree."""
    if isinstance(expr, Sum):
        total = reference_value(expr.terms[0], env)
        for term in expr.terms[1:]:
            total = total + reference_value(term, env)
        return total
    if isinstance(expr, Scaled):
        return expr.factor * reference_value(expr.expr, env)
    if isinstance(expr, Gated):
        if active(expr, env.sigma):
            return reference_value(expr.expr, env)
        # outside: a direction is zero, a prediction falls back to plain c (arXiv 2404.07724)
        c = env.value(cond_of())
        return c if expr.expr.weight == 1 else torch.zeros_like(c)
    expr = resolve(expr, Level(env.sigma))  # a scheduled scale: its value at this level
    return term_reference(expr)(expr, env)


def contributions(expr: Expr, sigma: float) -> dict[Any, list[float]]:
    """Each atom's coefficient contributions at ``sigma``, in tree order (before summing)."""
    out: dict[Any, list[float]] = {}

    def walk(node: Expr, factor: float) -> None:
        if isinstance(node, Piped):
            walk(node.expr, factor)
        elif isinstance(node, Sum):
            for term in node.terms:
                walk(term, factor)
        elif isinstance(node, Scaled):
            walk(node.expr, factor * node.factor)
        elif isinstance(node, Gated):
            if active(node, sigma):
                walk(node.expr, factor)
            elif node.expr.weight == 1:
                out.setdefault(cond_of(), []).append(factor)
        else:
            for atom, coef in term_coefficients(resolve(node, Level(sigma))):
                out.setdefault(atom, []).append(factor * coef)

    walk(expr, 1.0)
    return out


def coefficients(expr: Expr, sigma: float) -> dict[Any, float]:
    """Each atom's total coefficient at ``sigma`` (zeros kept)."""
    return {a: math.fsum(cs) for a, cs in contributions(expr, sigma).items()}


def atom_branches(atom: Any) -> tuple[Branch, ...]:
    """The branches an atom reads: itself, or both main branches for a nonlinear term."""
    if isinstance(atom, Branch):
        return (atom,)
    if isinstance(atom, (CFGZeroStarTerm, TCFGTerm, FDGTerm, BetaCFGTerm)):
        return (cond_of(), uncond_of())
    if isinstance(atom, CFGppTerm):
        return (Branch(MAIN, atom.cond), Branch(MAIN, atom.negative))
    if isinstance(atom, PerpNegTerm):  # a negative of weight 0 is not read
        ws = atom.neg_scale * (len(atom.negative) // len(atom.neg_scale))
        return (Branch(MAIN, atom.cond), uncond_of(),
                *(Branch(MAIN, n) for n, w in zip(atom.negative, ws) if w != 0))
    raise KeyError(f"tests/strategies/reference.py does not know which branches {atom!r} reads")


def needed_branches(expr: Expr, sigma: float, tol: float = 0.0) -> set[Branch]:
    """Branches whose atoms have a coefficient above ``tol`` in size at ``sigma``, plus
    those a post-processor reads (CFG rescale reads ``c`` when ``phi != 0``).

    ``tol=0`` with :func:`structural_branches` brackets what a plan may run when rounding
    leaves a tiny residue where the exact coefficient is zero.
    """
    found: set[Branch] = set()
    for atom, coef in coefficients(expr, sigma).items():
        if abs(coef) > tol:
            found.update(atom_branches(atom))
    found.update(_processor_reads(expr))
    return found


def structural_branches(expr: Expr, sigma: float) -> set[Branch]:
    """Branches of every atom with a nonzero contribution at ``sigma``, cancelled or not."""
    found: set[Branch] = set()
    for atom, cs in contributions(expr, sigma).items():
        if any(c != 0 for c in cs):
            found.update(atom_branches(atom))
    found.update(_processor_reads(expr))
    return found


def _processor_reads(expr: Expr) -> set[Branch]:
    if not isinstance(expr, Piped):
        return set()
    return {cond_of() for s in expr.steps if isinstance(s, CFGRescale) and s.phi != 0}
