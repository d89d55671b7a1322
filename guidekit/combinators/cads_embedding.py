"""CADS on an embedding computed inside the model: the class-label embedding of DiT-style models.

CADS (https://arxiv.org/abs/2310.17347) adds noise to the *conditioning embedding*. For a
class-conditional model the conditioning is an integer label, so the annealed tensor is its
embedding, computed inside the forward. :class:`ClassEmbeddingCADS` hooks the model's
label-embedding modules for a run (a forward hook, removed again) and, around each model call
of a plan, replaces each branch's embedding rows by their annealed values: a branch's rows get
the noise of its conditioning. :func:`adapt` splits a plan's CADS into what ``Plan.step``
anneals (conditioning tensors) and what the hook anneals (``class_embedding``).

Nothing here knows a library: label embedders are found by class name (``LabelEmbedding``,
diffusers' and the bundled DiT's), or given. The diffusers adapter and
:mod:`guidekit.models` both use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import torch

from guidekit.combinators.cads import CADSAnnealing
from guidekit.errors import GuidanceValueError
from guidekit.plan import Plan, RowLayout
from guidekit.processor import Piped

#: The key under which a class-label embedding is annealed (CADS's noise is seeded by it).
CLASS_EMBEDDING = "class_embedding"


def label_embedders(module: Any) -> list[tuple[str, torch.nn.Module]]:
    """``(path, module)`` of every ``LabelEmbedding`` in ``module`` (diffusers' and the
    bundled DiT's class embedders), found by class name: no library is imported."""
    if not isinstance(module, torch.nn.Module):
        return []
    return [
        (path, m) for path, m in module.named_modules()
        if any(c.__name__ == "LabelEmbedding" for c in type(m).__mro__)
    ]


def with_modifiers(plan: Plan, modifiers: list[Any]) -> Plan:
    """``plan`` with each of its modifiers replaced by ``modifiers[i]`` (``None``: dropped).

    The expression is rewritten to match, so ``print(plan)`` shows what runs.
    """
    expr = plan.expr
    if isinstance(expr, Piped):
        steps, i = [], 0
        for step in expr.steps:
            if i < len(plan.modifiers) and step is plan.modifiers[i]:
                step = modifiers[i]
                i += 1
            if step is not None:
                steps.append(step)
        expr = attrs.evolve(expr, steps=tuple(steps)) if steps else expr.expr
    kept = tuple(m for m in modifiers if m is not None)
    return attrs.evolve(plan, expr=expr, modifiers=kept, programs={})


def _keys(
    cads: CADSAnnealing, default: tuple[str, ...] | None, class_labels: bool,
    aliases: Mapping[str, str],
) -> tuple[str, ...] | None:
    keys = default if cads.keys is None else cads.keys
    if keys is None:
        return None
    if class_labels:
        aliases = {**aliases, "class_labels": CLASS_EMBEDDING}
    return tuple(dict.fromkeys(aliases.get(k, k) for k in keys))


def adapt(
    plan: Plan, class_labels: bool, *, token_keys: tuple[str, ...] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> tuple[Plan, Plan, Plan | None]:
    """Split ``plan``'s CADS modifiers for a pipeline: ``(shown, step, embedding)``.

    ``shown`` is the plan with every CADS's keys made explicit (what the run does);
    ``step`` the plan ``Plan.step`` runs (CADS on the conditioning tensors only);
    ``embedding`` a plan whose modifiers anneal ``class_embedding`` (``None``: no CADS acts
    on the class embedding). ``class_labels``: the denoiser embeds integer class labels, so
    ``CADS()`` means the class embedding; otherwise it means ``token_keys`` (``None``: every
    floating-point conditioning tensor, CADS's own default). ``aliases`` maps other names
    for a key (a pipeline's) to the model's.
    """
    if not any(isinstance(m, CADSAnnealing) for m in plan.modifiers):
        return plan, plan, None
    default = (CLASS_EMBEDDING,) if class_labels else token_keys
    shown: list[Any] = []
    step: list[Any] = []
    embed: list[Any] = []
    for m in plan.modifiers:
        if not isinstance(m, CADSAnnealing):
            shown.append(m)
            step.append(m)
            embed.append(None)
            continue
        keys = _keys(m, default, class_labels, aliases or {})
        shown.append(attrs.evolve(m, keys=keys))
        if keys is None:  # CADS's own default: the step plan anneals every tensor
            step.append(m)
            embed.append(None)
            continue
        rest = tuple(k for k in keys if k != CLASS_EMBEDDING)
        step.append(attrs.evolve(m, keys=rest) if rest else None)
        embed.append(attrs.evolve(m, keys=(CLASS_EMBEDDING,)) if CLASS_EMBEDDING in keys else None)
    shown_plan = with_modifiers(plan, shown)
    step_plan = with_modifiers(plan, step) if step != shown else shown_plan
    if all(m is None for m in embed):
        return shown_plan, step_plan, None
    return shown_plan, step_plan, with_modifiers(plan, embed)


class ClassEmbeddingCADS:
    """Anneals the class-label embedding rows of each model call (see the module docstring).

    ``plan`` is the embedding plan from :func:`adapt`; ``models`` maps each model name of
    the plan to its module, whose embedders ``find`` lists (default: :func:`label_embedders`).
    :meth:`install` hooks those embedders, :meth:`remove` takes the hooks out again. While :meth:`call` is active (entered around one model call
    with its row layout and the step's ``(state, x, sigma)``) every label embedder's output
    rows are replaced by their annealed values, per branch: a branch's rows get the noise
    of its conditioning.
    """

    def __init__(
        self, plan: Plan, models: Mapping[str, Any],
        find: Callable[[Any], list[tuple[str, torch.nn.Module]]] = label_embedders,
    ) -> None:
        self.plan = plan
        self.embedders = {name: find(m) for name, m in models.items()}
        missing = [name for name, found in self.embedders.items() if not found]
        if missing:
            name = missing[0]
            what = type(models[name]).__name__
            raise GuidanceValueError(
                f"{plan.expr!r} anneals the class-label embedding, but model {name!r} ({what}) "
                f"has no LabelEmbedding module (diffusers' class embedder) to hook: pass the "
                f"transformer module itself (not a function around it), or name the "
                f"embedding tensors with CADS(keys=...)"
            )
        self._handles: list[Any] = []
        self._layout: RowLayout | None = None
        self._at: tuple[Any, torch.Tensor, float] | None = None
        self._fired = 0

    def install(self) -> None:
        """Hook every label embedder (a forward hook; inactive outside :meth:`call`)."""
        for found in self.embedders.values():
            for _, module in found:
                self._handles.append(module.register_forward_hook(self._hook))

    def remove(self) -> None:
        """Take every hook out (safe to call twice)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self._layout = self._at = None

    @contextlib.contextmanager
    def call(self, layout: RowLayout, at: tuple[Any, torch.Tensor, float]) -> Iterator[None]:
        """Anneal the embedding rows of the model call ``layout`` describes."""
        previous = (self._layout, self._at, self._fired)
        self._layout, self._at, self._fired = layout, at, 0
        try:
            yield
            if self._fired == 0 and self.embedders.get(layout.model):
                raise GuidanceValueError(
                    f"model {layout.model!r} ran without calling its label embedder, so CADS "
                    f"did not reach its class embedding: call it with class_labels"
                )
        finally:
            self._layout, self._at, self._fired = previous

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        layout, at = self._layout, self._at
        if layout is None or at is None or not isinstance(output, torch.Tensor):
            return None  # called outside a guided model call: leave it alone
        if output.shape[0] != layout.rows:
            raise GuidanceValueError(
                f"a label embedder returned {output.shape[0]} rows in a model call of "
                f"{layout.rows}; CADS needs one embedding per row"
            )
        self._fired += 1
        return self.anneal(output, layout, at)

    def anneal(
        self, emb: torch.Tensor, layout: RowLayout, at: tuple[Any, torch.Tensor, float]
    ) -> torch.Tensor:
        """``emb`` (one embedding per row of the call) with each branch's rows annealed."""
        state, x, sigma = at
        batch = layout.batch or int(x.shape[0])
        # each conditioning's B rows (CADS's noise and statistics are per sample); a call
        # split by a row budget may hold part of a block: the other samples stay zero there
        full: dict[str, torch.Tensor] = {}
        for branch, a, b in layout.blocks:
            if branch.cond not in full:
                full[branch.cond] = emb.new_zeros((batch, *emb.shape[1:]))
            full[branch.cond][[layout.sample(r) for r in range(a, b)]] = emb[a:b]
        annealed = self.plan.modify(
            state, x, sigma, {c: {CLASS_EMBEDDING: t} for c, t in full.items()}
        )
        out = emb.clone()
        for branch, a, b in layout.blocks:
            samples = [layout.sample(r) for r in range(a, b)]
            out[a:b] = annealed[branch.cond][CLASS_EMBEDDING][samples]
        return out
