"""Which of a diffusers denoiser's arguments hold one entry per row, and how they follow the rows.

A classic pipeline calls its denoiser with its own CFG batch (``2B`` rows ``[uncond, cond]``,
or ``B`` rows per call for Flux). guidekit calls the same denoiser with the plan's rows
(``c``, ``u``, ``c`` perturbed by PAG, ...), so every argument with one entry per row must be
split into the conditionings and laid out again, row block by row block. That is not only the
text embeddings: ControlNet residuals (``down_block_additional_residuals``,
``mid_block_additional_residual``, ``down_intrablock_additional_residuals``, SD3's
``block_controlnet_hidden_states``, Flux's ``controlnet_block_samples`` /
``controlnet_single_block_samples``), SDXL's ``added_cond_kwargs``, IP-Adapter image
embeddings and masks inside ``cross_attention_kwargs`` / ``joint_attention_kwargs``.

The rule, applied to every argument, through dicts, lists and tuples at any depth:

* a tensor whose leading dimension is the call's row count is per-row: split by the
  pipeline's row blocks into the conditionings, laid out with the plan's rows (a perturbed
  branch gets the rows of the conditioning it perturbs);
* ``timestep``, ``guidance`` and ``timestep_cond`` are per-row but equal for every
  conditioning: tiled to the rows of each call;
* ``txt_ids``, ``img_ids`` and flags are never per-row; any other tensor passes unchanged
  (ids, rotary tables, a leading dimension of 1 that broadcasts);
* what cannot be laid out is refused, naming the argument: a tensor with one entry per
  *sample* in a call that carries the CFG batch, a ControlNet residual or image embedding
  whose rows are not the call's, an object of another type that holds per-row tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch

from guidekit.errors import GuidanceValueError

# Per-row, but the same for every conditioning: tiled to the rows of each call.
SHARED_ROW_ARGS = frozenset({"timestep", "guidance", "timestep_cond"})
# Never per-row, even when a dimension happens to equal the row count.
NOT_ROW_ARGS = frozenset({
    "txt_ids", "img_ids", "return_dict", "controlnet_blocks_repeat", "skip_layers",
})
# Arguments (and keys inside the attention/added kwargs) all of whose tensors are per-row:
# a tensor there with other rows is a pipeline the adapter does not understand.
ROW_ONLY = frozenset({
    "down_block_additional_residuals", "mid_block_additional_residual",
    "down_intrablock_additional_residuals", "block_controlnet_hidden_states",
    "controlnet_block_samples", "controlnet_single_block_samples", "image_embeds",
    "ip_adapter_image_embeds",
})


@attrs.frozen
class Leaf:
    """Where a per-row tensor sat in the arguments: filled in again for each model call."""

    path: str


@attrs.define(eq=False)
class RowArgs:
    """A call's arguments taken apart: per-row tensors by path, the rest as a template.

    ``template`` is the arguments with each per-row tensor replaced by a :class:`Leaf`;
    ``rows`` and ``shared`` map a leaf's path (``"added_cond_kwargs.text_embeds"``,
    ``"down_block_additional_residuals.0"``) to its tensor of the call's rows.
    """

    template: dict[str, Any]
    rows: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]


def take_apart(arguments: Mapping[str, Any], skip: str, rows: int, batch: int) -> RowArgs:
    """Split ``arguments`` (``skip`` is the latents, handled by the caller) of a call of
    ``rows`` rows for a pipeline batch of ``batch`` samples."""
    out = RowArgs({}, {}, {})
    for name, value in arguments.items():
        if name == skip:
            continue
        if name in NOT_ROW_ARGS:
            out.template[name] = value
        else:
            out.template[name] = _walk(value, name, name in ROW_ONLY, rows, batch, out)
    return out


def _walk(value: Any, path: str, row_only: bool, rows: int, batch: int, out: RowArgs) -> Any:
    if isinstance(value, torch.Tensor):
        lead = int(value.shape[0]) if value.ndim >= 1 else None
        if lead == rows:
            (out.shared if path in SHARED_ROW_ARGS else out.rows)[path] = value
            return Leaf(path)
        if lead is not None and lead != 1 and (row_only or (lead == batch and rows != batch)):
            raise GuidanceValueError(
                f"the denoiser's argument {path!r} has {lead} rows in a call of {rows} rows "
                f"(a batch of {batch} samples), so guidekit cannot tell which conditioning "
                f"each row belongs to; pass it with one row per row of the call (the "
                f"pipeline's CFG batch) or leave it out"
            )
        return value
    if isinstance(value, Mapping):
        items = {
            k: _walk(v, f"{path}.{k}", row_only or k in ROW_ONLY, rows, batch, out)
            for k, v in value.items()
        }
        if type(value) is dict or not _has_leaf(items):
            return items if type(value) is dict else value
        return _rebuilt(value, items, path)
    if isinstance(value, (list, tuple)):
        parts = [_walk(v, f"{path}.{i}", row_only, rows, batch, out) for i, v in enumerate(value)]
        if isinstance(value, list):
            return parts
        return type(value)(*parts) if hasattr(value, "_fields") else type(value)(parts)
    if any(_per_row(v, rows) for v in _fields(value)):
        raise GuidanceValueError(
            f"the denoiser's argument {path!r} is a {type(value).__name__} holding tensors "
            f"with one entry per row; guidekit lays out rows only through tensors, dicts, "
            f"lists and tuples: pass its tensors in one of those"
        )
    return value


def _rebuilt(proto: Mapping[str, Any], items: dict[str, Any], path: str) -> Any:
    try:
        return type(proto)(**items)
    except TypeError as err:
        raise GuidanceValueError(
            f"the denoiser's argument {path!r} is a {type(proto).__name__}, which guidekit "
            f"cannot rebuild with the plan's rows: pass a dict"
        ) from err


def _fields(value: Any) -> Iterator[Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield from (getattr(value, f.name) for f in dataclasses.fields(value))
    elif attrs.has(type(value)):
        yield from (getattr(value, a.name) for a in attrs.fields(type(value)))
    elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
        yield from vars(value).values()


def _per_row(v: Any, rows: int) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim >= 1 and int(v.shape[0]) == rows and rows > 1


def fill(template: Any, values: Mapping[str, Any]) -> Any:
    """``template`` with every :class:`Leaf` replaced by ``values[leaf.path]``."""
    if isinstance(template, Leaf):
        return values[template.path]
    if type(template) is dict:
        return {k: fill(v, values) for k, v in template.items()}
    if isinstance(template, Mapping) and _has_leaf(template):
        return type(template)(**{k: fill(v, values) for k, v in template.items()})
    if isinstance(template, list):
        return [fill(v, values) for v in template]
    if isinstance(template, tuple) and _has_leaf(template):
        parts = [fill(v, values) for v in template]
        return type(template)(*parts) if hasattr(template, "_fields") else type(template)(parts)
    return template


def _has_leaf(value: Any) -> bool:
    if isinstance(value, Leaf):
        return True
    if isinstance(value, Mapping):
        return any(_has_leaf(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_leaf(v) for v in value)
    return False


def broadcast_rows(
    a: dict[str, Any], b: dict[str, Any], rows: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two calls' arguments with each one-row tensor expanded to ``rows`` where the other
    call holds ``rows`` rows under the same name: a pipeline that encodes ONE negative
    prompt for several prompts (Flux's ``negative_prompt="..."``) hands the model one row,
    which the model broadcasts; guidekit's rows are per sample."""
    def expand(mine: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
        out = dict(mine)
        for k, v in mine.items():
            w = other.get(k)
            if (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) and v.ndim >= 1
                    and v.shape[0] == 1 and w.shape[0] == rows and v.shape[1:] == w.shape[1:]):
                out[k] = v.expand(rows, *v.shape[1:])
        return out

    return (a, b) if rows <= 1 else (expand(a, b), expand(b, a))


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The path of the first place two templates differ in a tensor or structure, if any."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (
            a.shape == b.shape and torch.equal(a, b)
        )
        return None if same else path
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if a.keys() != b.keys():
            return path
        for k in a:
            found = first_difference(a[k], b[k], f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return path
        for i, (v, w) in enumerate(zip(a, b)):
            found = first_difference(v, w, f"{path}.{i}")
            if found is not None:
                return found
    return None
