"""The guider's batches: what each model call of a modular loop step gets, and what it gave.

``prepare_inputs`` receives each model input as ``(cond_value, uncond_value)`` (or one value
for both). The guider reads guidekit's conditionings from them, and makes one batch per
branch the plan runs at this step, or, with ``batched=True``, one per forward group with the
branches' rows concatenated. After the loop has run them, :func:`predictions` gives each
branch its rows of the batches' ``noise_pred``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from guidekit import GuidanceTypeError, GuidanceValueError
from guidekit.branch import COND, MAIN, UNCOND, Branch
from guidekit.plan import ForwardGroup, Plan
from guidekit.pools import pool_size
from guidekit.state import State

from ._diffusers_guider_rows import concat_values
from ._diffusers_pools import pooled_rows

LATENT_KEYS = ("hidden_states", "latents", "sample", "x")

#: one batch's model and the branches whose rows it holds, in order
Unit = tuple[str, tuple[Branch, ...]]
Getter = Callable[[str, int], Any]


def identifier(branch: Branch) -> str:
    """The batch's ``__guidance_identifier__``: diffusers' own names where they exist."""
    if branch.model == MAIN and branch.perturbation is None and branch.cond in (COND, UNCOND):
        return f"pred_{branch.cond}"
    return f"pred_{branch.label}"


def pick(value: Any, index: int) -> Any:
    """The value of conditioning ``index`` (0 cond, 1 uncond) of one guider input."""
    if isinstance(value, tuple):
        return value[index] if index < len(value) else None
    return value


def read_conds(
    text: str, groups: Sequence[ForwardGroup], get: Getter, keys: Sequence[str], skip: str | None,
    named: Mapping[str, Mapping[str, Any]] | None = None, pools: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """guidekit's conditionings the step needs: ``cond`` / ``uncond`` from each input's pair,
    the named ones from ``named`` (``guider.attach(conds=...)``); ``pools`` are ICG's, given
    as ``P`` stacked candidates."""
    needed = {b.cond for g in groups for b in g.branches}
    named = named or {}
    missing = sorted(needed - {COND, UNCOND} - named.keys())
    if missing and missing[0] in pools:
        raise GuidanceValueError(
            f"{text} draws {missing[0]!r} from a pool of real conditions: give ICG's pool "
            f"with guider.attach(conds={{{missing[0]!r}: {{input: tensor, ...}}}}), each "
            f"tensor the P candidates stacked along the first axis, keyed by the loop's guider "
            f"inputs ({', '.join(k for k in keys if k != skip)})"
        )
    if missing:
        raise GuidanceValueError(
            f"{text} uses conditioning(s) {missing}; a diffusers guider receives only (cond, "
            f"uncond) pairs: give the others with guider.attach(conds={{{missing[0]!r}: "
            f"{{input: tensor, ...}}}}), keyed by the loop's guider inputs "
            f"({', '.join(k for k in keys if k != skip)})"
        )
    conds = {
        name: {k: get(k, index) for k in keys if k != skip}
        for name, index in ((COND, 0), (UNCOND, 1)) if name in needed
    }
    if UNCOND in conds and all(v is None for v in conds[UNCOND].values()):
        raise GuidanceValueError(
            f"{text} needs the unconditional inputs, but the pipeline passed none (give it a "
            f"negative prompt or negative embeddings)"
        )
    for name in sorted(needed - {COND, UNCOND}):
        size = pool_size(name, named[name]) if name in pools else None
        conds[name] = _named(name, named[name], get, [k for k in keys if k != skip], size)
    return conds


def _named(
    name: str, given: Mapping[str, Any], get: Getter, keys: Sequence[str], size: int | None
) -> dict[str, Any]:
    """One named conditioning's inputs: the given ones, and the inputs the loop passes alike
    for ``cond`` and ``uncond`` (the time ids, say), ``size`` times for a pool of ``size``
    candidates; any other is refused by name."""
    unknown = sorted(given.keys() - set(keys))
    if unknown:
        raise GuidanceValueError(
            f"guider.attach(conds={{{name!r}: ...}}) gives {unknown}, which the loop does not "
            f"pass to the guider (its inputs: {', '.join(keys)})"
        )
    out: dict[str, Any] = {}
    for key in keys:
        if key in given:
            out[key] = given[key]
            continue
        c, u = get(key, 0), get(key, 1)
        if not _alike(c, u):
            raise GuidanceValueError(
                f"guider.attach(conds={{{name!r}: ...}}) lacks the guider input {key!r}, which "
                f"differs between the pipeline's conditional and unconditional inputs: give "
                f"{name!r} its own {key!r}"
            )
        if size is not None and isinstance(c, torch.Tensor):
            c = pooled_rows(name, key, c, size)
        out[key] = c
    return out


def _alike(a: Any, b: Any) -> bool:
    if a is b or b is None:  # one value for both, or no unconditional counterpart
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.equal(a, b)
        )
    try:
        return bool(a == b)
    except Exception:  # not comparable: treated as different
        return False


def check_named(
    conds: Any, reads: set[str], text: str, pools: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """``guider.attach(conds=...)``: named conditionings, each a dict of guider inputs, each
    one that the expression ``text`` ``reads``; a pool's tensors lead with its candidates."""
    if not isinstance(conds, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Mapping) and all(isinstance(i, str) for i in v)
        for k, v in conds.items()
    ):
        raise GuidanceTypeError(
            f"guider.attach(conds=...) maps conditioning names to dicts of guider inputs, e.g. "
            f"conds={{'neg': {{'encoder_hidden_states': neg_embeds}}}}, got {conds!r:.80}"
        )
    for name in conds:
        if name in (COND, UNCOND):
            raise GuidanceValueError(
                f"guider.attach(conds={{{name!r}: ...}}): {name!r} comes from the pipeline's "
                f"own (cond, uncond) inputs; name another conditioning"
            )
        if name not in reads:
            raise GuidanceValueError(
                f"guider.attach(conds={{{name!r}: ...}}): {text} does not read {name!r} (it "
                f"reads {', '.join(map(repr, sorted(reads))) or 'none'}): write Cond({name!r}) "
                f"or CFG(w, negative={name!r}) in the expression"
            )
        if name in pools:
            pool_size(name, conds[name])
    return {k: dict(v) for k, v in conds.items()}


def units(groups: Sequence[ForwardGroup], batched: bool) -> list[Unit]:
    """The batches of a step: one per branch, or one per forward group when ``batched``."""
    if batched:
        return [(g.model, g.branches) for g in groups]
    return [(g.model, (b,)) for g in groups for b in g.branches]


def make_batches(
    step_units: Sequence[Unit], keys: Sequence[str], latent_key: str | None,
    x: torch.Tensor | None, conds: Mapping[str, Mapping[str, Any]], identifier_key: str,
) -> list[Any]:
    """One diffusers ``BlockState`` per unit: its branches' inputs, rows concatenated."""
    from diffusers.modular_pipelines.modular_pipeline import BlockState

    batches = []
    for model, branches in step_units:
        fields: dict[str, Any] = {}
        for key in keys:
            if key == latent_key:
                value = x
                if value is not None and len(branches) > 1:
                    value = torch.cat([value] * len(branches))
            else:
                value = concat_values(key, [conds[b.cond][key] for b in branches])
            fields[key] = value
        ident = identifier(branches[0]) if len(branches) == 1 else f"pred_{model}"
        fields[identifier_key] = ident
        batches.append(BlockState(**fields))
    return batches


def batch_tensors(conds: Mapping[str, Mapping[str, Any]], batch: int) -> dict[str, dict[str, Any]]:
    """Each conditioning's tensors with a leading batch axis of ``batch`` (what CADS anneals)."""
    return {
        c: {
            k: v for k, v in d.items()
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch
        }
        for c, d in conds.items()
    }


def model_conds(
    plan: Plan, state: State, x: torch.Tensor | None, sigma: float,
    conds: dict[str, dict[str, Any]], pools: Sequence[str],
) -> Mapping[str, Mapping[str, Any]]:
    """The conditionings as the model sees them, as ``Plan.step`` makes them: each pool's
    rows drawn for this step (:mod:`guidekit.pools`), then the plan's input modifiers."""
    batch = batch_size(conds, x, pools)
    tensors = batch_tensors({c: d for c, d in conds.items() if c not in pools}, batch)
    for c in pools:
        if c in conds:  # P candidates: the plan draws B rows of them
            tensors[c] = {k: v for k, v in conds[c].items() if isinstance(v, torch.Tensor) and v.ndim}
    modified = plan.modify(state, x if x is not None else torch.zeros(batch), sigma, tensors)
    return {c: {**conds[c], **modified[c]} for c in conds}


def batch_size(
    conds: Mapping[str, Mapping[str, Any]], x: torch.Tensor | None, pools: Sequence[str] = ()
) -> int:
    """The loop's batch ``B``: the leading size of the first conditioning tensor (or ``x``),
    a pool's ``P`` candidates aside."""
    for name, d in conds.items():
        if name in pools:
            continue
        for v in d.values():
            if isinstance(v, torch.Tensor) and v.ndim >= 1:
                return int(v.shape[0])
    if x is not None:
        return int(x.shape[0])
    raise GuidanceValueError("cannot tell the batch size: the guider got no tensors")


def predictions(step_units: Sequence[Unit], data: Sequence[Any]) -> dict[Branch, torch.Tensor]:
    """Each branch's prediction: its rows of the ``noise_pred`` of the batch that held it."""
    if len(data) != len(step_units):
        raise GuidanceValueError(
            f"the guider prepared {len(step_units)} batches but got {len(data)} back"
        )
    preds: dict[Branch, torch.Tensor] = {}
    for (_model, branches), batch in zip(step_units, data):
        pred = getattr(batch, "noise_pred", None)
        if not isinstance(pred, torch.Tensor):
            raise GuidanceValueError("every guider batch needs its noise_pred set")
        parts = (pred,) if len(branches) == 1 else pred.chunk(len(branches))
        preds.update(zip(branches, parts))
    return preds
