"""Tiny diffusers pipelines built from configs (untrained, seeded; no download): Stable Diffusion, SDXL and SD3 with
the real ``vae_scale_factor`` of 8, for the pipeline tests and the ParaDiGMS comparison. By default prompts go in as
embeddings (``prompt_embeds=`` ...), made by :func:`prompt_embeddings`, and tokenizers are None; with ``text=True``
the pipelines get tiny CLIP text encoders and an in-memory CLIP BPE tokenizer (:func:`clip_tokenizer`), so string
prompts work (SD3's T5 encoder stays None: the pipeline then uses zeros for it, as diffusers documents)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["tiny_sd", "tiny_sdxl", "tiny_sd3", "tiny_sd_controlnet", "tiny_sd_inpaint", "tiny_sdxl_inpaint",
           "tiny_flux", "tiny_wan", "prompt_embeddings", "clip_tokenizer", "clip_text_encoder"]

# A CLIP BPE vocabulary: the special tokens (bos 0, unk 1, eos 2), single letters, word-final letters, a few merges.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_VOCAB = (["<|startoftext|>", "<unk>", "<|endoftext|>"] + list(_LETTERS) + [c + "</w>" for c in _LETTERS]
          + ["ca", "cat</w>", "do", "dog</w>"])
_MERGES = ["c a", "ca t</w>", "d o", "do g</w>"]


def clip_tokenizer(max_length: int = 16):
    """A ``CLIPTokenizer`` over a 59-token vocabulary, built from files written to a temporary folder (removed
    after loading): unknown characters become ``<unk>``; ``max_length`` is its ``model_max_length``."""
    import json
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump({t: i for i, t in enumerate(_VOCAB)}, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
        return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=max_length)


def clip_text_encoder(hidden: int = 8, projection: int = 8, with_projection: bool = False):
    """A one-layer CLIP text encoder for :func:`clip_tokenizer`'s vocabulary (``CLIPTextModelWithProjection`` for
    SDXL's second encoder and SD3's pooled embeddings)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=100, projection_dim=projection, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                         max_position_embeddings=32)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4, 4, 4, 4), in_channels=3, out_channels=3, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=4, norm_num_groups=2, sample_size=32, **kw)


def _unet(in_channels: int = 4, **kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=in_channels,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=2, **kw)


def tiny_sd(scheduler=None, seed: int = 0, text: bool = False):
    """``StableDiffusionPipeline``: UNet2DConditionModel, AutoencoderKL, CLIPTextModel (hidden size 8), and SD's
    scheduler (PNDM with ``skip_prk_steps``) unless ``scheduler`` is given; ``text``: with :func:`clip_tokenizer`."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=8, attention_head_dim=2)
    encoder = clip_text_encoder()
    scheduler = scheduler or PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=encoder, tokenizer=clip_tokenizer() if text else None,
                                   unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_unet(in_channels: int = 4):
    return _unet(in_channels, cross_attention_dim=16, attention_head_dim=(2, 4), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 8)


def tiny_sdxl(scheduler=None, seed: int = 0, text: bool = False):
    """``StableDiffusionXLPipeline``: a UNet with SDXL's added text/time conditioning (pooled size 8, time ids 6 x 8),
    text embeddings of size 16 (two encoders of hidden size 8 concatenated), and SDXL's Euler scheduler unless given;
    ``text``: with the two CLIP encoders and tokenizers."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = _sdxl_unet()
    scheduler = scheduler or EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                    timestep_spacing="leading", steps_offset=1)
    enc = dict(text_encoder=clip_text_encoder(), text_encoder_2=clip_text_encoder(with_projection=True),
               tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer()) if text else \
        dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    pipe = StableDiffusionXLPipeline(vae=_vae(force_upcast=False), **enc, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3(scheduler=None, seed: int = 0, text: bool = False):
    """``StableDiffusion3Pipeline``: an SD3Transformer2DModel (one joint block, joint dim 16, pooled 8) on flow
    matching (``FlowMatchEulerDiscreteScheduler(shift=3.0)`` unless given); ``text``: two CLIP encoders (hidden 8,
    projections 4 + 4) and tokenizers, no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=16, pooled_projection_dim=8, out_channels=4)
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0)
    enc = dict(text_encoder=clip_text_encoder(projection=4, with_projection=True), tokenizer=clip_tokenizer(),
               text_encoder_2=clip_text_encoder(projection=4, with_projection=True), tokenizer_2=clip_tokenizer()) \
        if text else dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler,
                                    vae=_vae(shift_factor=0.0609, scaling_factor=1.5035), **enc,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeddings(pipe, batch: int = 1, seq: int = 6, seed: int = 0) -> dict:
    """Random prompt and negative-prompt embeddings of the sizes the pipeline's network expects (what
    ``encode_prompt`` would return), as ``__call__`` keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    net = getattr(pipe, "unet", None) or pipe.transformer
    dim = next(getattr(net.config, k) for k in ("cross_attention_dim", "joint_attention_dim", "text_dim")
               if getattr(net.config, k, None) is not None)
    out = {"prompt_embeds": torch.randn(batch, seq, dim, generator=g),
           "negative_prompt_embeds": torch.randn(batch, seq, dim, generator=g)}
    pooled = getattr(net.config, "pooled_projection_dim", None)
    if pooled is None and getattr(net.config, "addition_embed_type", None) == "text_time":
        pooled = net.config.projection_class_embeddings_input_dim - 6 * net.config.addition_time_embed_dim
    if pooled is not None:
        out["pooled_prompt_embeds"] = torch.randn(batch, pooled, generator=g)
        out["negative_pooled_prompt_embeds"] = torch.randn(batch, pooled, generator=g)
    return out


def _random_controlnet(unet, seed: int):
    """A ControlNet made from ``unet`` (``ControlNetModel.from_unet``) whose zero-initialised convolutions (image
    embedding out, residual outs) are drawn at random (std 1), so that the control image changes the sample."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 4, 4))
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]:
            for p in block.parameters():
                p.normal_(0, 1.0)
    return controlnet


def tiny_sd_controlnet(scheduler=None, seed: int = 0, text: bool = False):
    """``StableDiffusionControlNetPipeline``: :func:`tiny_sd`'s parts and a ControlNet made from its UNet
    (``ControlNetModel.from_unet``), whose zero-initialised convolutions (image embedding out, residual outs) are
    drawn at random (std 1) so that the control image changes the sample."""
    from diffusers import StableDiffusionControlNetPipeline

    base = tiny_sd(scheduler, seed, text)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=_random_controlnet(base.unet, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_controlnet(scheduler=None, seed: int = 0, text: bool = False):
    """``StableDiffusionXLControlNetPipeline``: :func:`tiny_sdxl`'s parts and a ControlNet made from its UNet (SDXL's
    added text/time conditioning included), its zero-initialised convolutions drawn at random as in
    :func:`tiny_sd_controlnet`."""
    from diffusers import StableDiffusionXLControlNetPipeline

    base = tiny_sdxl(scheduler, seed, text)
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusionXLControlNetPipeline(**parts, controlnet=_random_controlnet(base.unet, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(scheduler=None, seed: int = 0):
    """``FluxPipeline``: a FluxTransformer2DModel (one double and one single block, 2 heads of 16, guidance
    embedding on, joint dim 32, pooled 32) over 4 latent channels packed 2 x 2 (16 inputs), a 4-level VAE, and
    Flux's flow-matching scheduler with dynamic shifting unless given. No text encoders: pass ``prompt_embeds`` and
    ``pooled_prompt_embeds`` (:func:`prompt_embeddings`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                             max_shift=1.15, base_image_seq_len=256,
                                                             max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_inpaint(scheduler=None, seed: int = 0, text: bool = False):
    """``StableDiffusionInpaintPipeline`` with an inpainting UNet (9 input channels: latents, mask, masked-image
    latents), otherwise :func:`tiny_sd`'s parts."""
    from diffusers import StableDiffusionInpaintPipeline

    base = tiny_sd(scheduler, seed, text)
    torch.manual_seed(seed + 2)
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": _unet(9, cross_attention_dim=8,
                                                                               attention_head_dim=2)})
    pipe.set_progress_bar_config(disable=True)
    return pipe



def tiny_wan(scheduler=None, seed: int = 0):
    """``WanPipeline`` (text to video): a WanTransformer3DModel (one block, 2 heads of 12, patch 1 x 2 x 2, text dim
    32) on 16 latent channels, a tiny ``AutoencoderKLWan`` (spatial factor 8, temporal 4), and flow matching
    (``FlowMatchEulerDiscreteScheduler(shift=3.0)`` unless given). No text encoder: pass ``prompt_embeds`` /
    ``negative_prompt_embeds`` of width 32 (:func:`prompt_embeddings`)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_inpaint(scheduler=None, seed: int = 0, text: bool = False):
    """``StableDiffusionXLInpaintPipeline`` with a 9-channel SDXL UNet, otherwise :func:`tiny_sdxl`'s parts (no
    aesthetic-score conditioning)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    base = tiny_sdxl(scheduler, seed, text)
    torch.manual_seed(seed + 2)
    pipe = StableDiffusionXLInpaintPipeline(**{**base.components, "unet": _sdxl_unet(9)},
                                            requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
