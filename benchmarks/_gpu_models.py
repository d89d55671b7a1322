"""The models and guidance configs of ``benchmarks/gpu.py``: real-size shapes and tiny ones.

Random weights built from configs (no hub). Real sizes: an SD3-Medium-shaped
``SD3Transformer2DModel`` at 1024 x 1024 (latent 16 x 128 x 128, 24 layers, 24 heads x 64,
154 text tokens of 4096, pooled 2048) and a DiT-XL/2-shaped ``DiTTransformer2DModel`` at
256 x 256 (latent 4 x 32 x 32, 28 layers, 16 heads x 72, patch 2, 1000 classes). ``tiny``
shrinks each to 2 layers, small widths and 8 x 8 latents, for a CPU check.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as bench  # noqa: E402

from guidekit import CFG, EMAG, EMAGQ, PAG, SAG, SEG  # noqa: E402
from guidekit.terms.emag import DIT_XL_LAYERS, SD3_MEDIUM_LAYERS  # noqa: E402

PAG_S, SEG_S, SAG_S = 3.0, 3.0, 0.75


@attrs.frozen
class Spec:
    """One benchmark model: how to build it, call it, and which layers the terms target."""

    name: str
    build: Callable[[], torch.nn.Module]
    latent: tuple[int, ...]  # per sample
    #: ``(batch, device, dtype, generator) -> (cond, uncond)`` keyword tensors
    conds: Callable[..., tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
    #: ``net -> model(x, sigma, **cond)``
    fn: Callable[[torch.nn.Module], Callable[..., torch.Tensor]]
    prediction: str
    noise: str
    sigmas: Callable[[int], list[float]]
    w: float  # the CFG scale (the EMAG paper's for this model)
    w_e: float
    candidates: tuple[int, ...]  # EMAG's candidate layers
    mid: int  # PAG / SEG / SAG layer


def sd3_net(tiny: bool) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    if tiny:
        cfg: dict[str, Any] = dict(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
            caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
        )
    else:  # SD3-Medium
        cfg = dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
            caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
        )
    return SD3Transformer2DModel(**cfg).eval()  # type: ignore[attr-defined]


def dit_net(tiny: bool) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    size, layers, heads, dim = (8, 2, 2, 8) if tiny else (32, 28, 16, 72)
    net = DiTTransformer2DModel(
        sample_size=size, patch_size=2, in_channels=4, out_channels=8, num_layers=layers,
        num_attention_heads=heads, attention_head_dim=dim, num_embeds_ada_norm=1000,
    ).eval()  # type: ignore[attr-defined]
    return bench._randomised(net)  # adaLN-zero would make every block an identity


def sd3_conds(tokens: int, text: int, pooled: int) -> Callable[..., Any]:
    def make(b: int, device: Any, dtype: torch.dtype, g: torch.Generator) -> Any:
        def one(scale: float) -> dict[str, torch.Tensor]:
            return {
                "text": scale * torch.randn(b, tokens, text, generator=g, device=device, dtype=dtype),
                "pooled": scale * torch.randn(b, pooled, generator=g, device=device, dtype=dtype),
            }

        return one(1.0), one(0.1)

    return make


def dit_conds(b: int, device: Any, dtype: torch.dtype, g: torch.Generator) -> Any:
    c = torch.arange(b, device=device) * 37 % 1000
    return {"class_labels": c}, {"class_labels": torch.full_like(c, 1000)}  # 1000: null class


def sd3_fn(net: torch.nn.Module) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> Any:
        return net(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                   timestep=sigma * 1000).sample

    return fn


def dit_fn(net: torch.nn.Module) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> Any:
        out = net(x, timestep=bench._timestep(sigma), class_labels=class_labels).sample
        return out[:, : x.shape[1]]  # the learned-sigma half is not the prediction

    return fn


def flow_sigmas(steps: int) -> list[float]:
    return [1.0 - 0.95 * i / max(steps - 1, 1) for i in range(steps)]


def specs(tiny: bool) -> dict[str, Spec]:
    """The benchmark models by name (``sd3``, ``dit``)."""
    return {
        "sd3": Spec(
            "sd3", lambda: sd3_net(tiny), (4, 8, 8) if tiny else (16, 128, 128),
            sd3_conds(7, 32, 32) if tiny else sd3_conds(154, 4096, 2048), sd3_fn,
            "flow", "flow", flow_sigmas, 7.0, 1.5, (1,) if tiny else SD3_MEDIUM_LAYERS,
            1 if tiny else 7,
        ),
        "dit": Spec(
            "dit", lambda: dit_net(tiny), (4, 8, 8) if tiny else (4, 32, 32), dit_conds, dit_fn,
            "eps", "ve", bench.schedule, 1.5, 3.0, (1,) if tiny else DIT_XL_LAYERS,
            1 if tiny else 13,
        ),
    }


def expressions(spec: Spec) -> dict[str, Any]:
    """The guidekit expressions by table name; EMAG / EMAG-Q with the paper's ``w``, ``w_e``
    and candidate layers (``EMAG.dit`` on the DiT; on SD3 ``EMAG.paper`` with ``EMAG.sd3``'s
    scales and layers, active at every step so each timed step has the branch)."""
    w, mid = spec.w, spec.mid
    if spec.name == "dit" and spec.candidates == DIT_XL_LAYERS:
        emag, emagq = EMAG.dit(), EMAGQ.dit()
    else:
        emag = EMAG.paper(w, spec.w_e, layers=spec.candidates)
        emagq = EMAGQ.paper(w, spec.w_e, layers=spec.candidates)
    return {
        "CFG": CFG(w),
        "CFG + PAG": CFG(w) + PAG(PAG_S, layers=mid),
        "CFG + EMAG": emag,
        "CFG + EMAG-Q": emagq,
        "CFG + SEG": CFG(w) + SEG(SEG_S, layers=mid),
        "CFG + SAG": CFG(w) + SAG(SAG_S, layers=mid),
    }


def peer_guider(spec: Spec, expression: str) -> Any:
    """diffusers' own guider for a table expression, or ``None`` where diffusers has none."""
    from diffusers.guiders import (
        ClassifierFreeGuidance,
        PerturbedAttentionGuidance,
        SmoothedEnergyGuidance,
    )

    w, mid = spec.w, spec.mid
    if expression == "CFG":
        return ClassifierFreeGuidance(guidance_scale=w)
    if expression == "CFG + PAG":  # the default window (0.01, 0.2) would skip most steps
        return PerturbedAttentionGuidance(
            guidance_scale=w, perturbed_guidance_scale=PAG_S, perturbed_guidance_start=0.0,
            perturbed_guidance_stop=1.0, perturbed_guidance_layers=[mid],
        )
    if expression == "CFG + SEG":
        return SmoothedEnergyGuidance(
            guidance_scale=w, seg_guidance_scale=SEG_S, seg_guidance_start=0.0,
            seg_guidance_stop=1.0, seg_guidance_layers=[mid],
        )
    return None
