"""Tiny diffusers pipelines built from configs (untrained, seeded; no download): Stable Diffusion, SDXL and SD3 with
the real ``vae_scale_factor`` of 8, for the pipeline tests and the ParaDiGMS comparison. Prompts go in as embeddings
(``prompt_embeds=`` ...), made by :func:`prompt_embeddings`; tokenizers are None."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["tiny_sd", "tiny_sdxl", "tiny_sd3", "prompt_embeddings"]


def _vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4, 4, 4, 4), in_channels=3, out_channels=3, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=4, norm_num_groups=2, sample_size=32, **kw)


def _unet(**kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=2, **kw)


def tiny_sd(scheduler=None, seed: int = 0):
    """``StableDiffusionPipeline``: UNet2DConditionModel, AutoencoderKL, CLIPTextModel (hidden size 8), and SD's
    scheduler (PNDM with ``skip_prk_steps``) unless ``scheduler`` is given."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=8, attention_head_dim=2)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                                        vocab_size=100, projection_dim=8, bos_token_id=0, eos_token_id=2,
                                        pad_token_id=1))
    scheduler = scheduler or PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(scheduler=None, seed: int = 0):
    """``StableDiffusionXLPipeline``: a UNet with SDXL's added text/time conditioning (pooled size 8, time ids 6 x 8),
    text embeddings of size 16 (two encoders concatenated), and SDXL's Euler scheduler unless given."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=16, attention_head_dim=(2, 4), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 8)
    scheduler = scheduler or EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                    timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=_vae(force_upcast=False), text_encoder=None, text_encoder_2=None,
                                     tokenizer=None, tokenizer_2=None, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3(scheduler=None, seed: int = 0):
    """``StableDiffusion3Pipeline``: an SD3Transformer2DModel (one joint block, joint dim 16, pooled 8) on flow
    matching (``FlowMatchEulerDiscreteScheduler(shift=3.0)`` unless given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=16, pooled_projection_dim=8, out_channels=4)
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler,
                                    vae=_vae(shift_factor=0.0609, scaling_factor=1.5035), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeddings(pipe, batch: int = 1, seq: int = 6, seed: int = 0) -> dict:
    """Random prompt and negative-prompt embeddings of the sizes the pipeline's network expects (what
    ``encode_prompt`` would return), as ``__call__`` keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    net = getattr(pipe, "unet", None) or pipe.transformer
    dim = net.config.cross_attention_dim if hasattr(net.config, "cross_attention_dim") else \
        net.config.joint_attention_dim
    out = {"prompt_embeds": torch.randn(batch, seq, dim, generator=g),
           "negative_prompt_embeds": torch.randn(batch, seq, dim, generator=g)}
    pooled = getattr(net.config, "pooled_projection_dim", None)
    if pooled is None and getattr(net.config, "addition_embed_type", None) == "text_time":
        pooled = net.config.projection_class_embeddings_input_dim - 6 * net.config.addition_time_embed_dim
    if pooled is not None:
        out["pooled_prompt_embeds"] = torch.randn(batch, pooled, generator=g)
        out["negative_pooled_prompt_embeds"] = torch.randn(batch, pooled, generator=g)
    return out
