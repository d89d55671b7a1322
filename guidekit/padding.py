"""Conditionings of different token lengths in one batched call: pad, repeat, or split.

A negative prompt rarely has the positive prompt's token count. The rows of one forward
group are concatenated into one tensor per key, so a token axis must agree. How a model lets
it agree is a property of the model, never guessed: it is declared with :class:`Tokens`
(by the user, ``guide(..., tokens=Tokens("text", mask="text_mask"))``, or by an adapter that
knows its model), and :func:`share` applies the declaration to one forward group:

* ``mask=`` names the model's attention-mask keyword over those tokens (diffusers'
  ``encoder_attention_mask``, PixArt's ``prompt_attention_mask`` passed as it): shorter rows
  are padded at the end with zeros and masked out. Exact where the model applies the mask to
  every use of the tokens (a masked key gets no attention weight).
* ``repeat=True`` declares that repeating a row's tokens leaves the model unchanged: true of
  plain softmax cross-attention, whose output is a weighted mean over the keys (each key
  ``k`` times at ``k`` times ``exp`` mass, the same mean), where the tokens carry no position
  after encoding. Lengths go to their least common multiple when it is at most
  ``max_repeat`` times the shortest (ComfyUI's rule for CLIP chunks).
* otherwise, and for any other shape difference, the rows run as separate calls, one per
  shape, in layout order.

Each result says which in ``how`` (shown in ``CallRecord.tokens`` and ``print(plan)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from guidekit.errors import GuidanceTypeError, GuidanceValueError


def _key(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None and attribute.name == "mask":
        return
    if not isinstance(value, str) or not value:
        raise GuidanceTypeError(
            f"Tokens({attribute.name}={value!r}): give the model's keyword name as a string, "
            f"e.g. Tokens('encoder_hidden_states', mask='encoder_attention_mask')"
        )


@attrs.frozen
class Tokens:
    """How rows with different token counts under ``key`` may share one call (see the module).

    ``axis`` is the token axis of ``key``'s tensors (1: ``[B, L, C]``); a mask is ``[B, L]``
    with 1 (or True) where a token is attended.
    """

    key: str = attrs.field(validator=_key)
    mask: str | None = attrs.field(default=None, validator=_key)
    repeat: bool = False
    max_repeat: int = 4
    axis: int = 1

    def __attrs_post_init__(self) -> None:
        if self.mask is None and not self.repeat:
            raise GuidanceValueError(
                f"Tokens({self.key!r}) declares neither mask= nor repeat=True: rows of different "
                f"lengths then run as separate calls, which needs no declaration; name the "
                f"model's attention-mask keyword (mask='encoder_attention_mask') or declare "
                f"that repetition is exact (repeat=True)"
            )
        if self.mask == self.key:
            raise GuidanceValueError(f"Tokens({self.key!r}, mask={self.mask!r}): the mask is "
                                     f"its own keyword, not the tokens'")
        if not isinstance(self.max_repeat, int) or self.max_repeat < 1:
            raise GuidanceValueError(
                f"Tokens(max_repeat={self.max_repeat!r}): a whole number >= 1 (ComfyUI uses 4)"
            )
        if not isinstance(self.axis, int) or self.axis < 1:
            raise GuidanceValueError(
                f"Tokens(axis={self.axis!r}): the token axis comes after the batch axis (>= 1)"
            )


@attrs.frozen
class Shared:
    """Some branches of one forward group that share one model call.

    ``indices`` are their positions in the group (layout order), ``conds`` the conditionings
    they read made to agree (name -> dict of tensors), ``how`` what was done ("" nothing).
    """

    indices: tuple[int, ...]
    conds: Mapping[str, Mapping[str, Any]] = attrs.field(eq=False, repr=False)
    how: str = ""


def as_tokens(tokens: Tokens | Sequence[Tokens] | None, where: str = "tokens") -> tuple[Tokens, ...]:
    """``tokens=`` as a tuple of :class:`Tokens`, refusing anything else by name."""
    if tokens is None:
        return ()
    items = (tokens,) if isinstance(tokens, Tokens) else tuple(tokens)
    for t in items:
        if not isinstance(t, Tokens):
            raise GuidanceTypeError(
                f"{where}= takes guidekit.Tokens(...) values, got {type(t).__name__}: e.g. "
                f"{where}=Tokens('encoder_hidden_states', mask='encoder_attention_mask')"
            )
    return items


def _length(name: str, d: Mapping[str, Any], rule: Tokens) -> int | None:
    v = d.get(rule.key)
    if not isinstance(v, torch.Tensor):
        return None
    if v.ndim <= rule.axis:
        raise GuidanceValueError(
            f"conditioning {name!r} key {rule.key!r} has shape {list(v.shape)}: Tokens(axis="
            f"{rule.axis}) needs a token axis there"
        )
    m = d.get(rule.mask) if rule.mask is not None else None
    if m is not None and (not isinstance(m, torch.Tensor) or m.ndim != 2
                          or m.shape != (v.shape[0], v.shape[rule.axis])):
        got = list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise GuidanceValueError(
            f"conditioning {name!r} mask {rule.mask!r} is {got}; it must be [B, L] = "
            f"{[v.shape[0], v.shape[rule.axis]]}, one entry per token of {rule.key!r}"
        )
    return int(v.shape[rule.axis])


def _form(d: Mapping[str, Any], rules: Sequence[Tokens]) -> tuple[Any, ...]:
    """What must be equal for two conditionings to share a call once the rules apply."""
    masks = {r.mask for r in rules}
    axes = {r.key: r.axis for r in rules}
    out: list[tuple[str, Any]] = []
    for k in sorted(d):
        v = d[k]
        if k in masks:
            continue  # a declared mask may be absent (all tokens attended) or padded
        if isinstance(v, torch.Tensor):
            shape = list(v.shape[1:])
            if k in axes and v.ndim > axes[k]:
                shape[axes[k] - 1] = -1
            out.append((k, tuple(shape)))
        else:
            out.append((k, None))
    return tuple(out)


def _pad(d: Mapping[str, Any], rule: Tokens, length: int, dtype: torch.dtype) -> dict[str, Any]:
    v: torch.Tensor = d[rule.key]
    have = v.shape[rule.axis]
    out = dict(d)
    mask = d.get(rule.mask) if rule.mask is not None else None
    if mask is None:
        mask = torch.ones(v.shape[0], have, dtype=dtype, device=v.device)
    if have < length:
        shape = list(v.shape)
        shape[rule.axis] = length - have
        out[rule.key] = torch.cat([v, v.new_zeros(shape)], rule.axis)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], length - have)], 1)
    out[str(rule.mask)] = mask
    return out


def _repeat(d: Mapping[str, Any], rule: Tokens, length: int) -> dict[str, Any]:
    v: torch.Tensor = d[rule.key]
    k = length // v.shape[rule.axis]
    out = dict(d)
    if k > 1:
        reps = [1] * v.ndim
        reps[rule.axis] = k
        out[rule.key] = v.repeat(*reps)
        if rule.mask is not None and isinstance(d.get(rule.mask), torch.Tensor):
            out[rule.mask] = d[rule.mask].repeat(1, k)
    return out


def _align(
    names: list[str], dicts: dict[str, Mapping[str, Any]], rules: Sequence[Tokens]
) -> list[tuple[list[str], str]] | None:
    """Bring one class of equal form to common lengths in place; ``None`` if a rule can't."""
    notes = []
    for rule in rules:
        found = {n: _length(n, dicts[n], rule) for n in names}
        lengths = {n: v for n, v in found.items() if v is not None}
        if len(lengths) < len(names):
            continue
        values = sorted(set(lengths.values()))
        given = [dicts[n][rule.mask] for n in names if rule.mask is not None
                 and isinstance(dicts[n].get(rule.mask), torch.Tensor)]
        # a made mask takes a given one's dtype (they are concatenated), else the tokens'
        v = dicts[names[0]][rule.key]
        dtype = given[0].dtype if given else (
            v.dtype if v.is_floating_point() else torch.float32)
        if len(values) == 1:
            if given:  # some rows carry the mask: the others attend to every token
                for n in names:
                    dicts[n] = _pad(dicts[n], rule, values[0], dtype)
            continue
        seen = ", ".join(f"{n} {lengths[n]}" for n in names)
        if rule.mask is not None:
            for n in names:
                dicts[n] = _pad(dicts[n], rule, values[-1], dtype)
            notes.append(f"padded {rule.key!r} to {values[-1]} tokens under {rule.mask!r} "
                         f"({seen})")
            continue
        common = math.lcm(*values)
        if common > rule.max_repeat * values[0]:
            return None
        for n in names:
            dicts[n] = _repeat(dicts[n], rule, common)
        notes.append(f"repeated {rule.key!r} to {common} tokens ({seen})")
    return [(names, "; ".join(notes))]


def _classes(
    names: list[str], dicts: dict[str, Mapping[str, Any]], rules: Sequence[Tokens]
) -> list[tuple[list[str], str]]:
    forms: dict[tuple[Any, ...], list[str]] = {}
    for n in names:
        forms.setdefault(_form(dicts[n], rules), []).append(n)
    out = []
    for members in forms.values():
        aligned = _align(members, dicts, rules)
        if aligned is not None:
            out += aligned
            continue
        # a rule could not bring them together: split by the exact shapes
        by_shape: dict[tuple[Any, ...], list[str]] = {}
        for n in members:
            by_shape.setdefault(_form(dicts[n], ()), []).append(n)
        out += [(group, "") for group in by_shape.values()]
    return out


def _describe(names: list[str], dicts: Mapping[str, Mapping[str, Any]]) -> str:
    keys = [k for k in dicts[names[0]] if isinstance(dicts[names[0]][k], torch.Tensor)]
    differ = [k for k in keys if len({tuple(dicts[n][k].shape[1:]) for n in names
                                      if isinstance(dicts[n].get(k), torch.Tensor)}) > 1]
    parts = [f"{k!r} " + ", ".join(f"{n} {list(dicts[n][k].shape)}" for n in names
                                   if isinstance(dicts[n].get(k), torch.Tensor))
             for k in differ]
    return "; ".join(parts)


def _sequences_differ(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether ``a`` and ``b`` differ only in sequence lengths (axis 1), at least one of them
    a ``[B, L, ...]`` token sequence: the difference separate calls are made for. Any other
    (a feature width, a missing axis) is more likely a mistake, and is refused."""
    sequence = False
    for k, va in a.items():
        vb = b.get(k)
        if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
            continue
        if va.shape == vb.shape:
            continue
        if va.ndim != vb.ndim or va.ndim < 2 or va.shape[2:] != vb.shape[2:]:
            return False
        sequence = sequence or va.ndim >= 3
    return sequence


def _same_shapes(dicts: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``dicts`` have the same keys, and under each key tensors of one shape in all
    of them or a non-tensor in all of them (one form, :func:`_form`, without rules)."""
    first = dicts[0]
    for d in dicts[1:]:
        if d.keys() != first.keys():
            return False
        for k, v in first.items():
            w = d[k]
            if isinstance(v, torch.Tensor):
                if not isinstance(w, torch.Tensor) or w.shape[1:] != v.shape[1:]:
                    return False
            elif isinstance(w, torch.Tensor):
                return False
    return True


def share(
    names: Sequence[str],
    conds: Mapping[str, Mapping[str, Any]],
    tokens: Sequence[Tokens] = (),
) -> list[Shared]:
    """Which of a forward group's rows share a call, and their conditionings made to agree.

    ``names`` is each branch's conditioning name in layout order; ``conds`` maps names to
    dicts of tensors. Returns one :class:`Shared` per call, in layout order of its first row:
    one for the whole group where the shapes agree (after the ``tokens`` rules), several
    where they cannot, each ``how`` saying so. Conditionings are never changed in place.
    """
    unique = list(dict.fromkeys(names))
    if len(unique) == 1:
        return [Shared(tuple(range(len(names))), conds)]
    given = []
    for n in unique:  # a loop, not a generator: this runs at every model call
        d = conds.get(n)
        if type(d) is not dict and not isinstance(d, Mapping):
            return [Shared(tuple(range(len(names))), conds)]  # concat_conds refuses it
        given.append(d)
    if not tokens and _same_shapes(given):
        # the usual step (equal keys and shapes, no rules): what the classes below find
        # for it, without building them at every call
        return [Shared(tuple(range(len(names))), dict(conds))]
    whole = [Shared(tuple(range(len(names))), conds)]
    dicts: dict[str, Mapping[str, Any]] = {n: conds[n] for n in unique}
    masks = {r.mask for r in tokens}
    if len({frozenset(set(d) - masks) for d in dicts.values()}) > 1:
        return whole  # different keys: concat_conds refuses them by name
    classes = _classes(unique, dicts, tokens)
    if len(classes) == 1:
        return [Shared(tuple(range(len(names))), {**conds, **dicts}, classes[0][1])]
    first = conds[classes[0][0][0]]
    if not all(_sequences_differ(first, conds[c[0][0]]) for c in classes[1:]):
        return whole  # not a token-length difference: concat_conds says what differs
    hint = "" if tokens else (
        "; declare tokens=Tokens(key, mask=...) or Tokens(key, repeat=True) to share one call"
    )
    why = _describe(unique, conds)
    parts = []
    for i, (members, note) in enumerate(classes):
        idx = tuple(j for j, n in enumerate(names) if n in members)
        how = f"separate call {i + 1} of {len(classes)} ({why}{hint})"
        parts.append((idx, how + (f"; {note}" if note else "")))
    parts.sort(key=lambda p: p[0][0])
    merged = {**conds, **dicts}
    return [Shared(idx, merged, how) for idx, how in parts]


__all__ = ["Shared", "Tokens", "as_tokens", "share"]
