"""Tiny, real diffusers pipelines built offline from configs (random weights, no hub).

Every builder seeds torch first, so two calls give identical weights. Sizes follow
``shared/reference/tiny-models.md``: 8x8 latents with 4 channels (16x16 images), a 2-stage
VAE, CLIP and T5 text encoders of ~50k parameters, tokenizers built in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

IMAGE = 16  # pixels; the tiny VAE halves it to 8x8 latents


def _vae(**extra: Any) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=IMAGE,
        **extra,
    ).eval()


def _byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE uses for the bytes 0..255 (printable ones as is)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:  # unprintable bytes are shifted above 255, in byte order
            out.append(chr(256 + extra))
            extra += 1
    return out


def clip_tokenizer(max_length: int = 77) -> Any:
    """A byte-level BPE CLIP tokenizer with no merges: 2 specials + 2 x 256 byte symbols."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def clip_encoder(hidden: int = 32, projection: bool = False, seed: int = 1) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def t5(d_model: int = 32, max_length: int = 16, seed: int = 2) -> tuple[Any, Any]:
    """A 104-token Unigram T5 tokenizer (every word is unk) and a tiny T5 encoder."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=1000, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    )
    return T5Tokenizer(model_max_length=max_length), T5EncoderModel(cfg).eval()


# -- denoisers ----------------------------------------------------------------------------------


def dit_transformer(seed: int = 0) -> Any:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
        num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=1000,
    ).eval()


def pixart_transformer(seed: int = 0) -> Any:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        caption_channels=32, norm_num_groups=2, use_additional_conditions=False,
    ).eval()


def sd3_transformer(seed: int = 0) -> Any:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16,
    ).eval()


def flux_transformer(seed: int = 0) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=False, axes_dims_rope=(4, 4, 8),
    ).eval()


def unet(seed: int = 0, in_channels: int = 4, **extra: Any) -> Any:
    """The tiny SD UNet; ``in_channels`` > 4 takes conditioning channels after the latents
    (inpainting: 4 latent + 1 mask + 4 masked-image channels), ``extra`` more config."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(4, 8),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=2, **extra,
    ).eval()


# -- pipelines ----------------------------------------------------------------------------------


def _quiet(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_pipeline(scheduler: Any = None) -> Any:
    from diffusers import DDIMScheduler, DiTPipeline

    return _quiet(DiTPipeline(
        transformer=dit_transformer(), vae=_vae(),
        scheduler=scheduler if scheduler is not None else DDIMScheduler(),
        id2label={0: "cat", 1: "dog"},
    ))


def pixart_pipeline() -> Any:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    tok, enc = t5(d_model=32)
    return _quiet(PixArtAlphaPipeline(
        tokenizer=tok, text_encoder=enc, vae=_vae(), transformer=pixart_transformer(),
        scheduler=DPMSolverMultistepScheduler(),
    ))


def sd3_pipeline() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok3, enc3 = t5(d_model=64)
    return _quiet(StableDiffusion3Pipeline(
        transformer=sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0),
        text_encoder=clip_encoder(projection=True, seed=1), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(projection=True, seed=3), tokenizer_2=clip_tokenizer(),
        text_encoder_3=enc3, tokenizer_3=tok3,
    ))


def flux_pipeline() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tok2, enc2 = t5(d_model=32, max_length=512)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15, shift=3.0,
    )
    return _quiet(FluxPipeline(
        scheduler=scheduler, vae=_vae(shift_factor=0.0), transformer=flux_transformer(),
        text_encoder=clip_encoder(), tokenizer=clip_tokenizer(),
        text_encoder_2=enc2, tokenizer_2=tok2,
    ))


def sd_pipeline(scheduler: Any = None) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if scheduler is None:
        scheduler = DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            steps_offset=1, clip_sample=False,
        )
    return _quiet(StableDiffusionPipeline(
        vae=_vae(), text_encoder=clip_encoder(), tokenizer=clip_tokenizer(), unet=unet(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ))


def _perturbed(module: Any) -> Any:
    """``module`` with every parameter moved by ``0.05 * randn`` from torch's global generator
    (seeded by the caller): a ControlNet's zero-initialised outputs would add nothing."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def sd_controlnet_pipeline(seed: int = 5) -> Any:
    """The tiny SD pipeline with a ControlNet built from its UNet; every ControlNet parameter
    is moved by ``0.05 * randn`` (its zero-initialised outputs would add nothing)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    sd = sd_pipeline()
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(4, 8))
    return _quiet(StableDiffusionControlNetPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        controlnet=_perturbed(controlnet), scheduler=sd.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ))


def sd3_controlnet_pipeline(seed: int = 5) -> Any:
    """The tiny SD3 pipeline with a one-block SD3 ControlNet, parameters moved by ``0.05 randn``."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    sd3 = sd3_pipeline()
    torch.manual_seed(seed)
    controlnet = SD3ControlNetModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
    )
    return _quiet(StableDiffusion3ControlNetPipeline(
        **sd3.components, controlnet=_perturbed(controlnet),
    ))


def sdxl_unet(seed: int = 0) -> Any:
    """The tiny UNet with SDXL's text-time conditioning (pooled text 16 wide, 6 time ids)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=2, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16,
    ).eval()


@pytest.fixture(scope="module", name="sd")
def sd_fixture() -> Any:
    """The tiny SD pipeline in float64, one per test module (import it to use ``sd``)."""
    return sd_pipeline().to(torch.float64)


def run_sd(pipe: Any, steps: int = 3, prompt: Any = ("a cat", "a photo of a dog"),
           **kwargs: Any) -> torch.Tensor:
    """``steps`` steps of the tiny SD pipeline at 16 x 16, seeded, its latents."""
    return pipe(  # type: ignore[no-any-return]
        prompt=list(prompt), height=IMAGE, width=IMAGE, num_inference_steps=steps,
        output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a test module (its float64 references and timings stay stable)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sdxl_pipeline(scheduler: Any = None) -> Any:
    """A tiny SDXL pipeline: two 16-wide CLIP encoders (their hidden states concatenated are
    the UNet's 32-wide cross-attention input, the second one's projection the pooled text)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    if scheduler is None:
        scheduler = EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        )
    return _quiet(StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=clip_encoder(hidden=16), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(hidden=16, projection=True, seed=3),
        tokenizer_2=clip_tokenizer(), unet=sdxl_unet(), scheduler=scheduler,
    ))


def sdxl_controlnet_pipeline(seed: int = 5) -> Any:
    """The tiny SDXL pipeline with a ControlNet built from its UNet (text-time conditioning
    included), parameters moved by ``0.05 randn``."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    sdxl = sdxl_pipeline()
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(sdxl.unet, conditioning_embedding_out_channels=(4, 8))
    return _quiet(StableDiffusionXLControlNetPipeline(
        **sdxl.components, controlnet=_perturbed(controlnet),
    ))


def flux_controlnet_pipeline(seed: int = 5) -> Any:
    """The tiny Flux pipeline with a one-double-block, one-single-block Flux ControlNet
    (the control image goes through the VAE), parameters moved by ``0.05 randn``."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    flux = flux_pipeline()
    torch.manual_seed(seed)
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=False, axes_dims_rope=[4, 4, 8],
    )
    return _quiet(FluxControlNetPipeline(**flux.components, controlnet=_perturbed(controlnet)))
