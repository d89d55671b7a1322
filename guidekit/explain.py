"""Reading a plan: ``print(plan)`` and ``plan.explain(sigmas, batch)`` in words."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from guidekit.branch import COND, UNCOND
from guidekit.forward import group_key
from guidekit.pools import pool_names
from guidekit.renoise import sampler_term
from guidekit.split import AutoSplit, FixedSplit, PerBranch, calls_for, planned_chunk, split_label
from guidekit.text import fmt_number

if TYPE_CHECKING:
    from guidekit.plan import Plan


def budget(plan: Plan) -> str:
    """The split policy in words."""
    policy = plan.policy
    if isinstance(policy, AutoSplit):
        cap = "" if policy.max_rows is None else f", at most {policy.max_rows} rows a call"
        mem = "" if policy.memory is None else ", memory-capped"
        return f"auto (one call, or per branch or smaller calls where measured faster{cap}{mem})"
    if isinstance(policy, PerBranch):
        return "one call per branch"
    if isinstance(policy, FixedSplit) and policy.max_rows is None:
        return "one call per forward group"
    return f"at most {plan.max_rows} rows per call"


def decisions(plan: Plan) -> list[str]:
    """The auto split's decisions so far, one line per forward group, rows and batch."""
    policy = plan.policy
    if not isinstance(policy, AutoSplit):
        return []
    lines = []
    for (group, rows, batch), seen in sorted(policy.timings.items()):
        chunk = policy.chosen.get((group, rows, batch))
        how = "deciding" if chunk is None else split_label(rows, batch, chunk)
        times = ", ".join(
            f"{split_label(rows, batch, c)} {min(ts) * 1e3:.3g} ms" for c, ts in seen.items() if ts
        )
        lines.append(f"  split {group} at {rows // batch}x{batch} rows: {how} ({times})")
    return lines

def renoising(plan: Plan) -> list[str]:
    """For a CFG++ plan: the branch the sampler re-noises with, and who can step it."""
    term = sampler_term(plan.expr)
    if term is None:
        return []
    branch = term.renoise
    named = {UNCOND: "Uncond()", COND: "Cond()"}.get(branch.cond, f"Cond({branch.cond!r})")
    return [
        f"  re-noise: with {branch.label} ({named}) -- CFG++ needs the sampler's cooperation: "
        f"x0 comes from the guided prediction, the step re-noises with {branch.label}; runs "
        f"under guide(..., sampler=...), KDiffusionGuided.sample(fn, ...) or sampler=, "
        f"FlowGuided(solver='euler'), diffusers Euler / FlowMatchEuler / DDIM (eta=0) "
        f"schedulers (classic pipelines and GuidekitGuidance); where it is gated off, the "
        f"sampler's own step"
    ]


def describe(plan: Plan) -> str:
    """``print(plan)``: groups, and per interval of sigma the calls, NFE and combine."""
    lines = [
        f"Plan for {plan.expr!r}",
        f"  model predicts {plan.prediction} (noise {plan.noise.kind}); "
        f"split: {budget(plan)}",
        "  forward groups: "
        + "; ".join(g.title for g in plan.groups),
    ]
    if plan.scheduled:
        shown = ", ".join(dict.fromkeys(repr(s) for _, s in plan.scheduled))
        lines.append(
            f"  scales by noise level: {shown}; below at one level per interval (a progress "
            f"shape at r = 1/2): plan.explain(sigmas) shows each step"
        )
    pools = pool_names(plan.left)
    if pools:
        lines.append(
            f"  pooled conditionings: {', '.join(pools)} (P candidates each; every sample "
            f"draws one per step, seeded by the run's seed)"
        )
    for lo, hi, prog in plan.regions():
        where = "all sigma" if not plan.breakpoints else (
            f"sigma in ({fmt_number(lo)}, {fmt_number(hi)}]"
        )
        calls = "; ".join(f"{g.title} {len(g.branches)}xB rows" for g in prog.groups)
        nfe = f"NFE {len(prog.groups)}" + (
            " before the row budget"
            if isinstance(plan.policy, FixedSplit) and plan.policy.max_rows is not None else ""
        )
        lines.append(f"  {where}: {calls}; {nfe}; {prog.formula}")
    shared = [f"  tokens {title}: {how} (last step)" for title, how in plan.shared.items()]
    return "\n".join(lines + renoising(plan) + decisions(plan) + shared)

def explain(plan: Plan, sigmas: Sequence[float] | torch.Tensor, batch: int = 1) -> str:
    """Per step (consecutive equal steps merged): branches, rows, calls, NFE, combine."""
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.detach().flatten().tolist()
    levels = [float(s) for s in sigmas if float(s) > 0]
    run = tuple(float(s) for s in sigmas) if plan.scheduled else None
    rows_total = calls_total = 0
    lines = [describe(plan).splitlines()[0], f"  batch B = {batch}; {budget(plan)}"]
    header = f"  {'steps':<9} {'sigma':<18} {'model calls (rows)':<44} {'NFE':>3}  combine"
    lines.append(header)
    i = 0
    while i < len(levels):
        prog = plan.program(levels[i], run)
        j = i
        while j + 1 < len(levels) and plan.program(levels[j + 1], run) is prog:
            j += 1
        calls = []
        nfe = 0
        for g in prog.groups:
            r = len(g.branches) * batch
            n = calls_for(r, planned_chunk(plan.policy, group_key(g), r, batch))
            nfe += n
            tag = f"{g.model}{' (2nd call)' if g.stage else ''}[{g.labels}]"
            calls.append(f"{tag} {n}x ({len(g.branches)}x{batch}={r})")
            rows_total += r * (j - i + 1)
        calls_total += nfe * (j - i + 1)
        steps = f"{i}" if i == j else f"{i}-{j}"
        sig = fmt_number(round(levels[i], 4)) if i == j else (
            f"{round(levels[i], 4):g} .. {round(levels[j], 4):g}"
        )
        lines.append(f"  {steps:<9} {sig:<18} {'; '.join(calls):<44} {nfe:>3}  {prog.formula}")
        i = j + 1
    lines.append(
        f"  total: {len(levels)} steps, {calls_total} model calls, {rows_total} rows"

    )
    if isinstance(plan.policy, AutoSplit):
        lines.append(
            "  (auto split: its calls as decided so far, one call where undecided; the steps "
            "that time it may differ)"
        )
    return "\n".join(lines)
