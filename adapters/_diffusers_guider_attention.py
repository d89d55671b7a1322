"""Attention-space terms in the modular guider: the engine on the denoiser each batch runs on.

A modular pipeline calls its denoiser itself, once per guider batch. For a batch with a
perturbed branch (PAG, SEG, SLG, ...) or under an attention modifier, the guider installs
guidekit's attention engine on the module that ``prepare_models`` is handed (or on the
extra model the batch is redirected to), routes the batch's rows with its row layout, and
takes the engine out again in ``cleanup_models``. Terms that a guider cannot honour, because
it only receives finished predictions, are refused when the guider is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from guidekit import GuidanceValueError
from guidekit.branch import MAIN
from guidekit.plan import Plan, RowLayout


def attention_models(plan: Plan) -> frozenset[str]:
    """The models whose forward the plan changes: perturbed branches, attention modifiers."""
    names = {b.model for b in plan.branches if b.perturbation is not None}
    if plan.attention:
        names.add(MAIN)
    return frozenset(names)


def refuse_unsupported(plan: Plan) -> None:
    """Raise for terms a guider fed with finished predictions cannot run."""
    for _lo, _hi, program in plan.regions():
        dependent = [g for g in program.groups if g.stage]
        if dependent:
            raise GuidanceValueError(
                f"{plan.expr!r} needs a second call built from this step's predictions "
                f"({dependent[0].title}), but a modular pipeline prepares every guider batch "
                f"before it runs any; use guided(pipe, ...) on a classic pipeline"
            )


def engine_for(plan: Plan, model: str, target: Any) -> Any:
    """A (not yet installed) attention engine for ``model`` on the module ``target``."""
    if not isinstance(target, torch.nn.Module):
        raise GuidanceValueError(
            f"{plan.expr!r} changes the attention inside model {model!r}, which needs the module "
            f"itself (got {type(target).__name__}): attach the transformer, or pass around_call="
        )
    from guidekit.attention import install

    return install(target, plan, model_name=model)


def enter_engine(engine: Any, layout: RowLayout) -> Callable[[], None]:
    """Install ``engine`` and route one call's rows by ``layout``; return the undo."""
    around_call = engine.__enter__()
    try:
        routed = around_call(layout)
        routed.__enter__()
    except BaseException:
        engine.__exit__(None, None, None)
        raise

    def undo() -> None:
        try:
            routed.__exit__(None, None, None)
        finally:
            engine.__exit__(None, None, None)

    return undo
