"""The tiny modular SD3 denoise step the modular ``guider=`` tests share (float64).

``sd3_setup()`` builds the tiny SD3 pipeline and the inputs of its modular denoise step (two
prompts, empty negatives, fixed latents, 3 steps); ``sd3_modular(pipe, guider)`` is the
modular ``StableDiffusion3T2ICoreDenoiseStep`` on that pipeline's transformer and scheduler
with ``guider`` as its ``guider=`` component.
"""

from __future__ import annotations

from typing import Any

import tiny_diffusers as tiny
import torch

F64 = torch.float64


def sd3_setup() -> tuple[Any, dict[str, Any]]:
    """The tiny SD3 pipeline and its modular denoise step's inputs."""
    pipe = tiny.sd3_pipeline().to(F64)
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=["a cat", "a dog"], prompt_2=None, prompt_3=None, negative_prompt=["", ""],
            do_classifier_free_guidance=True, max_sequence_length=16,
        )
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    inputs = {
        "prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
        "negative_pooled_prompt_embeds": nppe, "latents": lat, "num_inference_steps": 3,
        "height": 16, "width": 16,
    }
    return pipe, inputs


def sd3_modular(pipe: Any, guider: Any) -> Any:
    """The modular SD3 denoise step on ``pipe``'s transformer and scheduler with ``guider``."""
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    modular = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    modular.update_components(transformer=pipe.transformer, scheduler=pipe.scheduler, guider=guider)
    modular.set_progress_bar_config(disable=True)
    return modular
