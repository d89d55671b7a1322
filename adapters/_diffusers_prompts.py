"""Named prompts of ``guided(pipe, expr, prompts={"neg": "blurry", ...})``: encoded by the
pipeline, laid out as named conditionings.

An expression may read conditionings other than the pipeline's own two (``Cond("style")``,
``CFG(7, negative="neg")``). Their rows are built from what the pipeline itself does:

* text pipelines: at the pipeline call's ``encode_prompt`` of its prompt (not the one a
  pipeline may make for its negative prompt), each named prompt is encoded ONCE per call, by
  the pipeline's own ``encode_prompt`` called with the
  same arguments (device, ``num_images_per_prompt``, ``max_sequence_length``, ``clip_skip``,
  LoRA scale, ...), the prompt replaced by the named one (every sample of the batch, or one
  per prompt of the call when a list is given), no negative prompt and no CFG;
* at each denoiser call, every per-row argument of the conditional rows that IS one of the
  pipeline's encoded outputs (its values equal that output's) takes the named prompt's output
  at the same position: ``encoder_hidden_states``, SDXL's ``added_cond_kwargs.text_embeds``,
  SD3's and Flux's ``pooled_projections``, PixArt's ``encoder_attention_mask``, ...;
* a few per-row arguments that the prompt does not decide follow the conditional rows
  (:data:`FOLLOW`: SDXL's time ids, PixArt's resolution and aspect ratio), and so does any
  per-row argument the pipeline passes alike for its conditional and unconditional rows (it
  does not depend on the prompt: a ControlNet's zero pooled projection, say); ControlNet
  residuals are computed for each named prompt (see ``_diffusers_controlnet``);
* class-label pipelines (DiT): a "prompt" is a class label, an int or a label name the
  pipeline's ``get_label_ids`` knows, for every sample or one per class label of the call;
* ICG's pools (``prompts={"icg": [...]}``) are lists of candidates, ``P`` rows per input
  instead of one per sample (see ``_diffusers_pools``);
* anything else with one entry per row is refused, naming the argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from guidekit.branch import COND, UNCOND
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.plan import Plan

from ._diffusers_pools import (
    check_pool_labels,
    check_pool_value,
    example,
    plan_pools,
    pool_sizes,
    pooled_rows,
)

#: per-row denoiser arguments a prompt does not decide: a named conditioning takes the
#: conditional rows' values
FOLLOW = frozenset({
    "added_cond_kwargs.time_ids", "added_cond_kwargs.resolution", "added_cond_kwargs.aspect_ratio",
})
LABELS = "class_labels"
Lookup = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def named_conds(plan: Plan) -> set[str]:
    """The conditionings ``plan`` reads besides the pipeline's own ``cond`` / ``uncond``."""
    return {b.cond for _, _, p in plan.regions() for b in p.branches} - {COND, UNCOND}


def check_prompts(
    prompts: Any, plan: Plan, *, labels: bool, defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``guided``'s ``prompts=``: every named conditioning of ``plan`` given, nothing else;
    ``defaults`` fill the pools left out (DiT: every real class label)."""
    given: dict[str, Any] = {}
    pools = plan_pools(plan)
    if prompts is not None:
        if not isinstance(prompts, Mapping) or not all(isinstance(k, str) for k in prompts):
            raise GuidanceTypeError(
                f"guided(prompts=...) maps conditioning names to prompts, e.g. "
                f"prompts={{'neg': 'blurry'}}, got {prompts!r:.80}"
            )
        given = dict(prompts)
    for name, value in given.items():
        if name in (COND, UNCOND):
            raise GuidanceValueError(
                f"guided(prompts={{{name!r}: ...}}): {name!r} is the pipeline's own "
                f"{'prompt' if name == COND else 'negative prompt'}; pass it to the pipeline "
                f"call ({'prompt' if name == COND else 'negative_prompt'}=...)"
            )
        if name in pools:
            check_pool_value(name, value, labels)
        _check_value(name, value, labels)
    given = {**{k: v for k, v in (defaults or {}).items() if k not in given}, **given}
    needed = named_conds(plan)
    missing, unused = sorted(needed - given.keys()), sorted(given.keys() - needed)
    if missing and missing[0] in pools:
        raise GuidanceValueError(
            f"{plan.expr!r} draws the conditioning {missing[0]!r} from a pool of real "
            f"conditions, which the pipeline does not make: pass ICG's pool as guided(..., "
            f"{example(missing[0], labels)}), one drawn per sample at every step"
        )
    if missing:
        kind = "class label" if labels else "prompt"
        raise GuidanceValueError(
            f"{plan.expr!r} reads the conditioning(s) {', '.join(map(repr, missing))}, which "
            f"the pipeline does not make: pass guided(..., prompts={{{missing[0]!r}: ...}}) "
            f"(a {kind})"
        )
    if unused:
        raise GuidanceValueError(
            f"guided(prompts=...) names {', '.join(map(repr, unused))}, which {plan.expr!r} "
            f"does not read (it reads {', '.join(map(repr, sorted(needed))) or 'none'}): "
            f"write Cond({unused[0]!r}) or CFG(w, negative={unused[0]!r}) in the expression"
        )
    return given


def _check_value(name: str, value: Any, labels: bool) -> None:
    items = value if isinstance(value, (list, tuple)) else [value]
    ok = (str, int) if labels else (str,)
    if not items or not all(isinstance(v, ok) and not isinstance(v, bool) for v in items):
        kind = "a class label (int or label name)" if labels else "a prompt (str)"
        raise GuidanceTypeError(
            f"guided(prompts={{{name!r}: ...}}) takes {kind} or a list of them (one per "
            f"prompt of the call), got {value!r:.60}"
        )


class NamedPrompts:
    """The named prompts of one ``guided`` block and their encodings in the current call."""

    def __init__(
        self, pipe: Any, prompts: Mapping[str, Any], *, labels: bool,
        pools: tuple[str, ...] = (), classes: int | None = None,
    ) -> None:
        self.pipe = pipe
        self.prompts = dict(prompts)
        self.labels = labels
        # ICG's pools: P candidates each (a list of prompts or class labels)
        self.pools = pool_sizes({n: v for n, v in self.prompts.items() if n in pools})
        self._label_ids = {n: self._ids(n, v) for n, v in self.prompts.items()} if labels else {}
        for name in self.pools.keys() & self._label_ids.keys():
            check_pool_labels(name, self._label_ids[name], classes)
        self.in_call = False
        self.own: tuple[Any, ...] | None = None  # the pipeline's own encode_prompt outputs
        self.encoded: dict[str, tuple[Any, ...]] = {}
        self._prompt: tuple[Any, Any] = (None, None)  # the call's prompt, as first encoded

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.prompts)

    def start_call(self) -> None:
        """A new pipeline call: its prompts are encoded at its first ``encode_prompt``."""
        self.in_call, self.own, self.encoded = True, None, {}

    def end_call(self) -> None:
        self.in_call = False

    def _ids(self, name: str, value: Any) -> list[int]:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        names = [v for v in items if isinstance(v, str)]
        found: dict[str, int] = {}
        if names:
            get = getattr(self.pipe, "get_label_ids", None)
            if not callable(get):
                raise GuidanceValueError(
                    f"guided(prompts={{{name!r}: {names[0]!r}}}): {type(self.pipe).__name__} "
                    f"has no get_label_ids to map label names; pass class label ints"
                )
            try:
                found = dict(zip(names, get(names)))
            except ValueError as err:
                raise GuidanceValueError(f"guided(prompts={{{name!r}: ...}}): {err}") from err
        return [found[v] if isinstance(v, str) else int(v) for v in items]

    # -- text pipelines: encoded by the pipeline's own encode_prompt --------------------------------
    def after_encode(
        self, orig: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        """After the pipeline call's first ``encode_prompt``: encode each named prompt alike."""
        if not self.in_call:
            return
        signature = inspect.signature(orig)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        prompt = (given.get("prompt"), given.get("prompt_embeds"))
        if self.own is None:
            self._prompt = prompt
        elif any(a is not b for a, b in zip(prompt, self._prompt)):
            return  # the negative prompt's encoding (Flux encodes it in a call of its own)
        # another encoder of the same prompt (HunyuanDiT encodes once per text encoder)
        self.own = (*(self.own or ()), *_outputs(out))
        batch = _prompt_batch(given)
        for name, value in self.prompts.items():
            texts = [value] * batch if isinstance(value, str) else list(value)
            if name in self.pools:  # P candidates, encoded together: one token length
                named = _outputs(orig(**_named_arguments(signature, given, texts, images=1)))
                self.encoded[name] = (*self.encoded.get(name, ()), *named)
                continue
            if len(texts) != batch:
                raise GuidanceValueError(
                    f"guided(prompts={{{name!r}: [...]}}) has {len(texts)} prompts for a "
                    f"pipeline call of {batch} prompts: give one per prompt, or one string"
                )
            named = _outputs(orig(**_named_arguments(signature, given, texts)))
            self.encoded[name] = (*self.encoded.get(name, ()), *named)

    # -- at a denoiser call ---------------------------------------------------------------------------
    def conds(
        self, cond: Mapping[str, torch.Tensor], needed: Sequence[str],
        computed: Lookup | None = None, uncond: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The rows of each ``needed`` named conditioning, built from the conditional rows
        ``cond`` (path -> tensor of ``B`` rows); ``computed(name, rows)`` gives what another
        hook built for a name (ControlNet residuals), or ``None``; an input the pipeline
        passes alike in ``cond`` and ``uncond`` does not depend on the prompt: kept as is."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name in needed:
            rows: dict[str, torch.Tensor] = {}
            for path, value in cond.items():
                alike = uncond is not None and path in uncond and torch.equal(uncond[path], value)
                rows[path] = self._row(name, path, value, computed, alike)
            out[name] = rows
        return out

    def _row(
        self, name: str, path: str, value: torch.Tensor, computed: Lookup | None, alike: bool
    ) -> torch.Tensor:
        size = self.pools.get(name)
        if path in FOLLOW:
            return value if size is None else pooled_rows(name, path, value, size)
        if self.labels and path == LABELS:
            ids = self._label_ids[name]
            if size is not None:  # the pool's P labels, drawn from by the plan
                return torch.tensor(ids, dtype=value.dtype, device=value.device)
            b = int(value.shape[0])
            if b % len(ids):
                raise GuidanceValueError(
                    f"guided(prompts={{{name!r}: [...]}}) has {len(ids)} class labels for a "
                    f"batch of {b}: give one per class label of the call, or one label"
                )
            t = torch.tensor(ids, dtype=value.dtype, device=value.device)
            return t.repeat_interleave(b // len(ids))
        if not self.labels:
            found = self._encoded(name, path, value)
            if found is not None:
                return found
        if computed is not None:
            found = computed(name, value)
            if found is not None:
                return found
        if alike:
            return value if size is None else pooled_rows(name, path, value, size)
        raise GuidanceValueError(
            f"the denoiser's argument {path!r} has one entry per row, and guidekit cannot build "
            f"it for the named conditioning {name!r}: it is not an output of the pipeline's "
            f"own {'class labels' if self.labels else 'encode_prompt'} (supported: the text "
            f"embeddings, pooled embeddings and masks encode_prompt returns, "
            f"{', '.join(sorted(FOLLOW))}, inputs alike for cond and uncond and ControlNet "
            f"residuals); leave prompts= out or drop that input"
        )

    def _encoded(self, name: str, path: str, value: torch.Tensor) -> torch.Tensor | None:
        if self.own is None:
            raise GuidanceValueError(
                f"guided(prompts={{{name!r}: ...}}) is encoded at the pipeline's encode_prompt, "
                f"which this pipeline call did not call (prompt embeddings passed to a pipeline "
                f"without one?): call the pipeline with prompt=... or prompt_embeds=..."
            )
        for i, own in enumerate(self.own):
            if (
                isinstance(own, torch.Tensor) and own.shape == value.shape
                and torch.equal(own.to(value.device, value.dtype), value)
            ):
                got = self.encoded[name][i] if i < len(self.encoded[name]) else None
                if isinstance(got, torch.Tensor):
                    return got.to(value.device, value.dtype)
        return None


def _outputs(out: Any) -> tuple[Any, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _prompt_batch(given: Mapping[str, Any]) -> int:
    """The number of prompts an ``encode_prompt`` call encodes (before images per prompt)."""
    prompt = given.get("prompt")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    embeds = given.get("prompt_embeds")
    if isinstance(embeds, torch.Tensor):
        return int(embeds.shape[0])
    raise GuidanceValueError(
        "guided(prompts=...): cannot tell how many prompts the pipeline call encodes (neither "
        "prompt nor prompt_embeds given to its encode_prompt)"
    )


def _named_arguments(
    signature: inspect.Signature, given: Mapping[str, Any], texts: list[str],
    images: int | None = None,
) -> dict[str, Any]:
    """``encode_prompt``'s arguments for the named prompt ``texts``: the pipeline's own,
    the prompt replaced, without negative prompt, given embeddings or CFG; ``images``
    replaces the images per prompt (a pool: one row per candidate)."""
    out: dict[str, Any] = {}
    for name, param in signature.parameters.items():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        default = None if param.default is inspect.Parameter.empty else param.default
        if name == "prompt":
            out[name] = texts
        elif name == "do_classifier_free_guidance":
            out[name] = False
        elif name == "num_images_per_prompt" and images is not None:
            out[name] = images
        elif (
            name.startswith(("negative_", "prompt_")) or "embeds" in name
            or "attention_mask" in name
        ):
            out[name] = default  # prompt_2 / prompt_3 default to the prompt
        else:
            out[name] = given.get(name, default)
    return out
