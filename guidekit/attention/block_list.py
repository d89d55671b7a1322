"""SLG's block list and perturbation value: which blocks ``layers`` indexes, per architecture,
and :class:`BlockSkip`, the perturbation the skipping machinery
(:mod:`guidekit.attention.blocks`) applies.

**The block list** (what ``layers`` indexes), per architecture:

=============================  =================================================  ===========
model                          blocks                                             default
=============================  =================================================  ===========
DiT, PixArt, SD3, Qwen-Image   ``transformer_blocks.{i}``                         SD3: 7, 8, 9
FluxTransformer2DModel         ``transformer_blocks.{i}`` then                    none
                               ``single_transformer_blocks.{j}`` (indices go on)
UNet2DConditionModel           every ``BasicTransformerBlock`` (in the            none
                               ``attentions`` of the down, up and mid blocks), in
                               ``named_modules()`` order (up blocks before mid)
any other ``nn.Module``        the first of the root's ``ModuleList`` attributes  none
                               ``transformer_blocks``, ``blocks``, ``layers``
                               (that fixed order); else name blocks by path
=============================  =================================================  ===========

Addressing follows :mod:`guidekit.attention.layers`: ints (negative from the end), ranges,
lists, module paths of listed blocks or of containers holding some (``"mid_block"``); an
unknown or out-of-range block raises when the engine is built, listing the valid ones.
SD3's default is the SD3.5 Medium recipe's blocks 7, 8, 9 (when the model has them);
elsewhere there is no default and ``layers`` must be given. The UNet's down and up blocks
themselves change resolution and cannot be skipped; their transformer blocks can.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import attrs
import torch

from guidekit.attention.layers import LayerTable
from guidekit.attention.ops import (
    AttentionPerturbation,
    Layers,
    check_layers,
    fmt_layers,
    to_layers,
)
from guidekit.errors import GuidanceTypeError, GuidanceValueError

#: root ``ModuleList`` attributes that are block lists, in the order they are concatenated
#: (Flux: double-stream then single-stream) and searched (plain modules: the first found)
DIFFUSERS_LISTS = ("transformer_blocks", "single_transformer_blocks")
PLAIN_LISTS = ("transformer_blocks", "blocks", "layers")
#: blocks returning ``(encoder_hidden_states, hidden_states)``
TWO_STREAM = (
    "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
    "QwenImageTransformerBlock",
)
#: the SD3.5 Medium recipe's blocks (Stability AI's sd3.5 reference config)
SD35_LAYERS = (7, 8, 9)
#: argument names that never hold the call's rows, even when their first axis matches
NOT_ROWS = ("rotary", "freqs", "_ids", "pos_emb")
SKIP_KINDS = ("block", "attention")


def _skip_kind(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in SKIP_KINDS:
        raise GuidanceValueError(
            f"SLG(skip=...) must be 'block' (skip whole blocks) or 'attention' (skip only "
            f"their self-attention), got {value!r}"
        )


@attrs.frozen(repr=False)
class BlockSkip(AttentionPerturbation):
    """SLG's perturbation: the blocks ``layers`` (indices into the model's BLOCK list, see
    the module docstring) are skipped, whole (``skip="block"``) or their self-attention
    only (``skip="attention"``), for the rows of its branch."""

    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    skip: str = attrs.field(default="block", validator=_skip_kind)
    #: handled by :class:`BlockSkipper`, not inside an attention layer
    skips_blocks: ClassVar[bool] = True
    needs_qk: ClassVar[bool] = False

    def attend(self, query: Any, key: Any, value: Any, **kw: Any) -> torch.Tensor:
        raise AssertionError("SLG skips blocks; it never runs inside an attention layer")

    def __repr__(self) -> str:
        parts = [] if self.layers is None else [fmt_layers(self.layers)]
        if self.skip != "block":
            parts.append(f"skip={self.skip!r}")
        return f"BlockSkip({', '.join(parts)})"


# -- the block list ----------------------------------------------------------------------------


def _names(obj: Any) -> tuple[str, ...]:
    return tuple(c.__name__ for c in type(obj).__mro__)


def block_table(model: torch.nn.Module) -> LayerTable:
    """The named block list of ``model`` (see the module docstring)."""
    if not isinstance(model, torch.nn.Module):
        raise GuidanceTypeError(
            f"blocks live in a torch.nn.Module; got {type(model).__name__} (pass the network "
            f"itself, e.g. the transformer, not a wrapper function)"
        )
    arch = type(model).__name__
    names = _names(model)
    if "UNet2DConditionModel" in names:
        paths = tuple(
            n for n, m in model.named_modules() if "BasicTransformerBlock" in _names(m)
        )
        return LayerTable(arch, paths, (), "none: name the blocks")
    if any(n.startswith(("DiT", "PixArt", "SD3", "Flux", "QwenImage")) for n in names):
        paths = tuple(
            f"{attr}.{i}"
            for attr in DIFFUSERS_LISTS
            if isinstance(blocks := getattr(model, attr, None), torch.nn.ModuleList)
            for i in range(len(blocks))
        )
        default: tuple[str, ...] = ()
        rule = "none: name the blocks"
        if "SD3Transformer2DModel" in names and len(paths) > max(SD35_LAYERS):
            default = tuple(paths[i] for i in SD35_LAYERS)
            rule = "blocks 7, 8, 9 (the SD3.5 Medium recipe)"
        return LayerTable(arch, paths, default, rule)
    for attr in PLAIN_LISTS:
        blocks = getattr(model, attr, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return LayerTable(arch, tuple(f"{attr}.{i}" for i in range(len(blocks))), (),
                              "none: name the blocks")
    return LayerTable(arch, (), (), "none: name the blocks", free=True)


def _attention_classes(attention_class: type | tuple[type, ...] | None) -> tuple[type, ...]:
    found: list[type] = []
    for module, name in (("diffusers.models.attention_processor", "Attention"),
                         ("diffusers.models.attention", "AttentionModuleMixin")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    if attention_class is not None:
        found.extend(attention_class if isinstance(attention_class, tuple) else (attention_class,))
    return tuple(found)
