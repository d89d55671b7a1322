"""Layer addressing: which attention modules an attention term targets, explicitly.

Every model gets one **named layer list** (a :class:`LayerTable`): an ordered tuple of module
paths built from the model's structure, never from discovery that depends on hash order
(``named_modules()`` follows registration order, which is fixed by the model's code).
A term's ``layers`` then picks from it:

* an ``int`` indexes the list (negative counts from the end, as in Python);
* a ``str`` is a module path: a listed layer (``"transformer_blocks.3.attn1"``) or a
  container holding listed layers (``"mid_block"``: all of them, in list order); for a
  plain module without a list, any submodule path;
* a list, tuple or range of those; ``None`` is the architecture's default below.

An unknown or out-of-range layer raises :class:`~guidekit.errors.GuidanceValueError` that
lists the valid ones, when the engine is installed (before any sampling step).

Per architecture (``type(model).__name__`` or a base class of it):

===========================  =======================================  ==========================
model                        named layer list                         default for PAG
===========================  =======================================  ==========================
DiTTransformer2DModel        ``transformer_blocks.{i}.attn1``         the last block (``-1``)
PixArtTransformer2DModel     ``transformer_blocks.{i}.attn1`` (self-  the last block (``-1``)
                             attention only; ``attn2`` is cross)
UNet2DConditionModel         every ``attn1`` in ``named_modules()``   the ``attn1`` layers under
                             order (self-attention; never ``attn2``)  ``mid_block``
any other ``nn.Module``      every submodule that is an instance of   the last listed layer
                             ``attention_class`` (``named_modules()``
                             order), or modules named by path
===========================  =======================================  ==========================

The defaults are starting points, not tuned values: the DiT default comes from one
measurement on a small DiT (PAG on the last block improved accuracy and FD, on the first
block it hurt badly; ``shared/reference/benchmark.md``), the UNet default is the PAG
paper's choice for Stable Diffusion (the middle block's self-attention), PixArt follows
DiT without its own measurement. Measure the layer for your model; it matters a lot.

In ``UNet2DConditionModel`` the registration order lists the up blocks before the middle
block (``down_blocks..., up_blocks..., mid_block...``), so integer indices follow that
order, not the order the forward runs them; :func:`layer_table` prints the list.

``SD3Transformer2DModel`` (joint text-image attention, image tokens first): the list is
``transformer_blocks.{i}.attn``; the perturbations act on the IMAGE queries only (the text
queries attend as usual, see :func:`guidekit.attention.engine.perturbed_joint_attention`);
the default for PAG is block 7 of 24 scaled to the depth (unmeasured).
``FluxTransformer2DModel``: ``transformer_blocks.{i}.attn`` then
``single_transformer_blocks.{j}.attn``; both join the streams text first, the engine
perturbs the queries after the call's text tokens (:mod:`guidekit.attention.flux`);
default: the last double-stream block (unmeasured).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from guidekit.attention.ops import Layers, to_layers
from guidekit.errors import GuidanceTypeError, GuidanceValueError

#: Architectures whose self-attention list is ``transformer_blocks.{i}.attn1``.
BLOCK_MODELS = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
UNET_MODELS = ("UNet2DConditionModel",)
#: Joint text-image attention: addressed on purpose later, refused for now.
JOINT_MODELS = ("QwenImageTransformer2DModel",)
#: Flux: double-stream then single-stream blocks, text tokens first in both.
FLUX_MODELS = ("FluxTransformer2DModel",)
#: SD3-style joint attention (image first, text second), perturbed on the image queries.
SD3_MODELS = ("SD3Transformer2DModel",)


@attrs.frozen
class LayerTable:
    """The addressable attention layers of one model, in a fixed order.

    ``paths[i]`` is the module path of layer ``i``; ``default`` the paths used when a term
    leaves ``layers`` as ``None``; ``free`` says any submodule path may be named (a plain
    module without ``attention_class``, where there is no list to index).
    """

    architecture: str
    paths: tuple[str, ...]
    default: tuple[str, ...]
    default_rule: str
    free: bool = False

    def describe(self, limit: int = 64) -> str:
        """``0: transformer_blocks.0.attn1, 1: ...`` (the valid layers, for errors)."""
        if not self.paths:
            return "none listed (name modules by path)"
        items = [f"{i}: {p}" for i, p in enumerate(self.paths[:limit])]
        more = len(self.paths) - limit
        return ", ".join(items) + (f", ... ({more} more)" if more > 0 else "")


#: Text and image tokens in one attention: no separate cross-attention layer to change.
JOINT_ARCHITECTURES = (
    "SD3Transformer2DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel",
)


def _class_names(model: Any) -> tuple[str, ...]:
    return tuple(c.__name__ for c in type(model).__mro__)


def diffusers_attention_class() -> type | None:
    """diffusers' ``Attention`` class if diffusers is already imported (never imports it)."""
    module = sys.modules.get("diffusers.models.attention_processor")
    return getattr(module, "Attention", None) if module is not None else None


def is_joint_attention(module: Any) -> bool:
    """A dual-stream (text + image) attention: extra key/value projections for the text."""
    if getattr(module, "add_k_proj", None) is not None:
        return True
    if getattr(module, "added_kv_proj_dim", None) is not None:
        return True
    names = _class_names(module)
    return any(n in ("FluxAttention", "JointAttention") for n in names)


def is_cross_attention(module: Any) -> bool:
    return bool(getattr(module, "is_cross_attention", False))


def check_module(model: Any) -> None:
    """Raise unless ``model`` is a ``torch.nn.Module`` (where attention layers live)."""
    if not isinstance(model, torch.nn.Module):
        raise GuidanceTypeError(
            f"attention layers live in a torch.nn.Module; got {type(model).__name__} (pass "
            f"the network itself, e.g. the transformer or UNet, not a wrapper function)"
        )


def listed_layers(
    model: torch.nn.Module, attention_class: type | tuple[type, ...]
) -> tuple[str, tuple[str, ...]]:
    """``(label, paths)``: every submodule of ``model`` that is an instance of
    ``attention_class`` (a class or tuple of classes), in ``named_modules()`` order."""
    arch = type(model).__name__
    classes = attention_class if isinstance(attention_class, tuple) else (attention_class,)
    if not all(isinstance(c, type) for c in classes):
        raise GuidanceTypeError(
            f"attention_class must be a class or a tuple of classes, got {attention_class!r}"
        )
    paths = tuple(n for n, m in model.named_modules() if n and isinstance(m, classes))
    if not paths:
        raise GuidanceValueError(
            f"{arch} has no submodule of class "
            f"{', '.join(c.__name__ for c in classes)} (attention_class)"
        )
    return f"{arch}[{', '.join(c.__name__ for c in classes)}]", paths


def layer_table(
    model: torch.nn.Module, *, attention_class: type | tuple[type, ...] | None = None
) -> LayerTable:
    """The named layer list of ``model`` (see the module docstring for each architecture).

    ``attention_class`` (a class or tuple of classes) overrides the architecture's list:
    every submodule that is an instance of it, in ``named_modules()`` order. For a model of
    no known architecture and no ``attention_class``, the table is empty and ``free``:
    layers must then be named by module path.
    """
    check_module(model)
    names = _class_names(model)
    arch = type(model).__name__
    if attention_class is not None:
        label, paths = listed_layers(model, attention_class)
        rule = "the last listed layer (a guess for a plain module: measure it)"
        return LayerTable(label, paths, paths[-1:], rule)
    joint = next((n for n in names if n in JOINT_MODELS), None)
    if joint is not None:
        raise GuidanceValueError(
            f"{joint} uses joint text-image attention, which guidekit's attention engine does "
            f"not perturb yet (PAG on the joint sequence would also perturb the text tokens)"
        )
    if any(n in FLUX_MODELS for n in names):
        double = getattr(model, "transformer_blocks", None)
        single = getattr(model, "single_transformer_blocks", None)
        if not isinstance(double, torch.nn.ModuleList) or not isinstance(single, torch.nn.ModuleList):
            raise GuidanceValueError(f"{arch} has no transformer_blocks / single_transformer_blocks")
        paths = tuple(f"transformer_blocks.{i}.attn" for i in range(len(double))) + tuple(
            f"single_transformer_blocks.{i}.attn" for i in range(len(single))
        )
        default = paths[len(double) - 1 : len(double)] or paths[:1]
        rule = "the last double-stream block (not measured: measure it)"
        return LayerTable(arch, paths, default, rule)
    if any(n in SD3_MODELS for n in names):
        blocks = getattr(model, "transformer_blocks", None)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise GuidanceValueError(f"{arch} has no transformer_blocks list")
        paths = tuple(f"transformer_blocks.{i}.attn" for i in range(len(blocks)))
        k = min(len(paths) - 1, round(7 * len(paths) / 24))
        rule = (
            "block 7 of 24 scaled to the depth (the first block of the SD3.5 skip-layer "
            "recipe; not measured for PAG: measure it)"
        )
        return LayerTable(arch, paths, paths[k : k + 1], rule)
    if any(n in BLOCK_MODELS for n in names):
        blocks = getattr(model, "transformer_blocks", None)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise GuidanceValueError(f"{arch} has no transformer_blocks list")
        paths = tuple(f"transformer_blocks.{i}.attn1" for i in range(len(blocks)))
        rule = "the last block (measured on a small DiT; measure it for your model)"
        return LayerTable(arch, paths, paths[-1:], rule)
    if any(n in UNET_MODELS for n in names):
        paths = tuple(
            n for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] == "attn1" and not is_cross_attention(m)
        )
        mid = tuple(p for p in paths if p.startswith("mid_block."))
        rule = "the self-attention of mid_block (the PAG paper's choice for Stable Diffusion)"
        return LayerTable(arch, paths, mid, rule)
    return LayerTable(arch, (), (), "none: name the layers", free=True)


def resolve_layers(
    model: torch.nn.Module, table: LayerTable, layers: Any, *, what: str = "layers"
) -> tuple[str, ...]:
    """Module paths selected by ``layers`` (see the module docstring), in model order.

    Raises :class:`GuidanceValueError` for an unknown path or an out-of-range index, listing
    the valid layers; ``what`` names the term in the message.
    """
    spec: Layers = to_layers(layers)
    if spec is not None and not isinstance(spec, tuple):
        raise GuidanceTypeError(f"{what}: layers must be ints or module paths, got {layers!r}")
    valid = f"valid layers of {table.architecture}: {table.describe()}"
    if spec is None:
        if not table.default:
            hint = (
                "pass attention_class=... to list its attention modules, or name them: "
                "layers=('blocks.0.attn',)" if table.free else f"name them: {valid}"
            )
            raise GuidanceValueError(
                f"{what}: {table.architecture} has no default attention layers; {hint}"
            )
        return table.default
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    n = len(table.paths)
    for item in spec:
        if isinstance(item, int):
            if not table.paths:
                raise GuidanceValueError(
                    f"{what}: layer {item} is an index, but {table.architecture} has no named "
                    f"layer list; pass attention_class=... or name modules by path"
                )
            if not -n <= item < n:
                raise GuidanceValueError(
                    f"{what}: layer {item} is out of range for {n} layers "
                    f"({-n}..{n - 1}); {valid}"
                )
            chosen.add(table.paths[item])
            continue
        if item in table.paths:
            chosen.add(item)
            continue
        inside = [p for p in table.paths if p.startswith(item + ".")]
        if inside:
            chosen.update(inside)
            continue
        if table.free and item in modules and item != "":
            chosen.add(item)
            continue
        if table.free:
            sample = ", ".join(p for p in list(modules)[1:40])
            raise GuidanceValueError(
                f"{what}: {table.architecture} has no submodule {item!r}; its modules: {sample}"
            )
        kind = ""
        if item in modules and is_cross_attention(modules[item]):
            kind = " (a cross-attention layer: only self-attention is addressable)"
        elif item in modules:
            kind = " (not in the layer list)"
        raise GuidanceValueError(f"{what}: unknown layer {item!r}{kind}; {valid}")
    order = {p: i for i, p in enumerate(modules)}
    return tuple(sorted(chosen, key=order.__getitem__))


def check_disjoint(paths: Sequence[str]) -> None:
    """Refuse a layer set where one layer contains another (it would be perturbed twice)."""
    ordered = sorted(set(paths))
    for a in ordered:
        for b in ordered:
            if a != b and b.startswith(a + "."):
                raise GuidanceValueError(
                    f"layers {a!r} and {b!r} overlap (one contains the other); name one of them"
                )


# -- cross-attention layers: what attention modifiers address --------------------------------


def cross_attention_table(
    model: torch.nn.Module, *, attention_class: type | tuple[type, ...] | None = None
) -> LayerTable:
    """The cross-attention layers an attention modifier may address (see module docstring)."""
    check_module(model)
    arch = type(model).__name__
    names = _class_names(model)
    if attention_class is not None:
        label, paths = listed_layers(model, attention_class)
        return LayerTable(label, paths, paths, "every listed attention layer")
    if any(n in SD3_MODELS or n in FLUX_MODELS for n in names):
        # joint text-image attention: the modifiers act on its image queries
        paths = layer_table(model).paths
        rule = "every joint text-image attention layer (NAG's code: every attention processor)"
        return LayerTable(arch, paths, paths, rule)
    joint = next((n for n in names if n in JOINT_ARCHITECTURES), None)
    if joint is None and any(is_joint_attention(m) for m in model.modules()):
        joint = arch
    if joint is not None:
        raise GuidanceValueError(
            f"{joint} uses a joint text-image attention guidekit's attention modifiers "
            f"(PLADIS, GAG, NAG) do not know: they handle SD3Transformer2DModel's and "
            f"FluxTransformer2DModel's, and cross-attention models"
        )
    if any(n in BLOCK_MODELS or n in UNET_MODELS for n in names):
        paths = tuple(
            n for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] == "attn2" and m is not None and is_cross_attention(m)
        )
        rule = "every cross-attention layer (PLADIS: all cross-attention modules; NAG: every attn2)"
        return LayerTable(arch, paths, paths, rule)
    return LayerTable(arch, (), (), "none: name the layers", free=True)


def context_projection(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How ``model`` turns a conditioning's text tensor into its cross-attention context
    (``None``: unknown, NAG then needs the negative rows in the same call)."""
    names = _class_names(model)
    if "PixArtTransformer2DModel" in names:
        proj = getattr(model, "caption_projection", None)
        return (lambda t: t) if proj is None else proj
    if "UNet2DConditionModel" in names:
        hid = getattr(model, "encoder_hid_proj", None)
        if hid is None:
            return lambda t: t
        if getattr(getattr(model, "config", None), "encoder_hid_dim_type", None) == "text_proj":
            return hid  # type: ignore[no-any-return]
    return None
