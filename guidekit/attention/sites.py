"""How the attention engine hooks one layer: the site chosen per module kind.

How a layer is hooked (chosen per module, documented protocol):

* **diffusers ``Attention`` modules** (``attn1`` of DiT, PixArt, UNet): the module's processor
  is replaced, through ``get_processor()`` / ``set_processor()``, by a row-aware processor
  holding the original. Unperturbed rows go through the ORIGINAL processor object -- any
  custom processor the user installed -- with the same arguments (the wrapper advertises
  the original's call signature, so diffusers forwards the same ``cross_attention_kwargs``).
  Where that processor is exactly diffusers' stock ``AttnProcessor2_0`` on self-attention
  without a mask, the call's rows share one pass of its projections instead
  (:mod:`guidekit.attention.fused`: the same per-row maths, fewer kernel launches). Perturbed rows are computed by guidekit following
  ``AttnProcessor2_0``'s structure with the module's own layers: spatial norm, group norm,
  ``to_q``/``to_k``/``to_v``, q/k norms, the perturbed attention, ``to_out``, the residual
  connection and ``rescale_output_factor``. A custom processor's own changes to attention
  therefore do not reach perturbed rows (their linear layers, LoRA included, do). If the
  original processor is an ``nn.Module`` the wrapper is one too and takes its slot, so module
  order and ``state_dict`` keys are unchanged after exit (during the run the original's
  parameters appear under ``processor.original``). Processors are read on ENTRY (``with``),
  not by ``install()``: exit restores what the model held when the run began. Do not change
  processors while installed.
* **plain PyTorch modules** (named by path, or listed by ``attention_class``): the module's
  ``forward`` is wrapped (an instance attribute, deleted again on exit). While it runs,
  every call of ``torch.nn.functional.scaled_dot_product_attention`` it makes -- directly or
  in its children, however the function was imported -- is intercepted by a
  ``TorchFunctionMode``. The protocol: ``query``, ``key`` and ``value`` have the model call's
  rows as their FIRST axis (``[rows, heads, tokens, dim]`` or ``[rows, tokens, dim]``), as
  they do when a module splits heads without folding them into the batch. A hooked module
  whose forward makes no such call while perturbed rows are present raises instead of
  silently leaving the branch unperturbed.

Flux's joint text-image attention is a plain-forward site too (its text length is read
from the model call); SD3-style joint attention (``add_q_proj``) is a diffusers
``Attention`` site for the perturbations that declare ``joint``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from guidekit.attention.flux import check_native, is_flux_attention
from guidekit.attention.hooks import LayerHook
from guidekit.attention.layers import (
    diffusers_attention_class,
    is_cross_attention,
    is_joint_attention,
)
from guidekit.errors import GuidanceValueError


def _flux_hook(path: str, module: Any, users: Sequence[Any], flux_text: bool) -> LayerHook:
    unsupported = [p for p in users if not getattr(p, "joint", False)]
    if unsupported or not flux_text:
        raise GuidanceValueError(
            f"layer {path!r} is Flux joint text-image attention; "
            + (f"{unsupported[0]!r} does not support it" if unsupported else
               "hook the FluxTransformer2DModel itself (its text length is needed)")
        )
    check_native(path, module)
    return LayerHook.forward(path, module, flux=True)


def layer_hook(
    model: torch.nn.Module, path: str, users: Sequence[Any], *, flux_text: bool
) -> LayerHook:
    """The hook of layer ``path`` for the perturbations ``users`` that target it; raises
    (before anything is installed) where the layer cannot serve them. ``flux_text``: the
    engine reads the model call's text length (it is installed on a Flux model)."""
    module = model.get_submodule(path)
    if is_flux_attention(module):
        return _flux_hook(path, module, users, flux_text)
    if is_joint_attention(module):
        unsupported = [p for p in users if not getattr(p, "joint", False)]
        if unsupported or not hasattr(module, "add_q_proj") or not hasattr(module, "to_q"):
            what = f"{unsupported[0]!r}" if unsupported else type(module).__name__
            raise GuidanceValueError(
                f"layer {path!r} ({type(module).__name__}) is a joint text-image "
                f"attention; the engine perturbs SD3-style joint attention for PAG, EMAG, "
                f"EMAG-Q and SAG only, not {what}"
            )
    if is_cross_attention(module) and any(p.self_only for p in users):
        raise GuidanceValueError(
            f"layer {path!r} is a cross-attention layer; {users[0]!r} is defined for "
            f"self-attention only"
        )
    attention_cls = diffusers_attention_class()
    if attention_cls is not None and isinstance(module, attention_cls):
        if getattr(module, "to_out", None) is None:
            raise GuidanceValueError(f"layer {path!r} has no output projection (to_out)")
        return LayerHook.processor(path, module)
    if hasattr(module, "get_processor") and hasattr(module, "set_processor"):
        raise GuidanceValueError(
            f"layer {path!r} is a {type(module).__name__}, an attention class the engine "
            f"does not support yet"
        )
    return LayerHook.forward(path, module)
