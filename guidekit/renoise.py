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
(``keep=``): the adapters that step the sampler (``adapters/_renoise.py``). Every other
caller -- ``guide()``, a bare ``plan.step``, the modular diffusers guider -- gets an error
naming what is supported.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

from guidekit.branch import Branch
from guidekit.errors import GuidanceValueError

#: where CFG++ runs (the error messages list it)
SUPPORTED = (
    "k-diffusion: KDiffusionGuided(..., sigmas=sigmas, sampler='euler' | 'euler_ancestral' | "
    "'dpmpp_2m') with sample_euler (s_churn=0), sample_euler_ancestral or sample_dpmpp_2m; "
    "flow_matching: FlowGuided(..., time_grid=grid, solver='euler') with ODESolver "
    "method='euler'; diffusers: guided(pipe, ...) with EulerDiscreteScheduler or "
    "FlowMatchEulerDiscreteScheduler"
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


__all__ = ["SUPPORTED", "check_keep", "is_sampler_term", "refused", "sampler_term"]
