"""One-line parallel diffusers pipelines: ``ppipe = paratime.parallelize(pipe, method="picard", tol=0.1)``, then call
``ppipe`` exactly like ``pipe`` (the same positional and keyword arguments, bound against the pipeline's own
``__call__`` signature, run under ``torch.no_grad()``).

The pipeline's own pieces run as in its ``__call__``: ``check_inputs``, ``encode_prompt``, ``set_timesteps`` (and
img2img's ``get_timesteps``), ``prepare_latents`` and the VAE decoding / post-processing; only the denoising loop is
replaced by a :class:`~paratime.ParallelSampler` over :func:`~paratime.integrations.diffusers.from_diffusers` (the
scheduler's own grid and step map). Stochastic schedulers draw their step noise from the call's ``generator`` (one,
or a list with one per image; without one, torch's global generator) as the scheduler does: one draw of
``(B, *latent)`` per step, in the network's dtype, up front (:class:`~paratime.noise.PipelineNoise`), so sequential
and Picard at tol 0 give the pipeline's own sample.

Supported (``_FAMILIES``): ``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline``,
``StableDiffusionInpaintPipeline`` (an inpainting UNet with 9 input channels), ``StableDiffusionControlNetPipeline``
(one ControlNet on every step), ``StableDiffusionXLPipeline``, ``StableDiffusionXLControlNetPipeline`` (likewise),
``StableDiffusionXLImg2ImgPipeline``,
``StableDiffusionXLInpaintPipeline`` (9 channels),
``StableDiffusion3Pipeline``, ``FluxPipeline`` (guidance embedding, dynamic shift) and ``WanPipeline`` (Wan 2.1, text
to video). The call's attention kwargs (``cross_attention_kwargs``; ``joint_attention_kwargs`` for SD3 and Flux,
``attention_kwargs`` for Wan) run as in the pipeline: their ``scale`` is the text encoders' LoRA scale in
``encode_prompt``, and the dict goes to every network call (:class:`AttentionKwargs`). Arguments that change the loop
itself (callbacks, IP adapters, custom ``timesteps``, ``denoising_end``, skip-layer guidance, LCM's guidance
embedding, Flux's true CFG, ControlNet guess mode or partial control) raise naming them.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..backends import Backend, make_backend
from ..config import SamplerConfig
from ..methods.parareal import takes_solver
from ..noise import PipelineNoise
from ..sampler import ParallelSampler, SampleStats, check_kernels
from .diffusers import Keyword, from_diffusers, sample_latents, solver_for, with_timestep_kwargs

__all__ = ["parallelize", "ParallelPipeline"]

log = logging.getLogger("paratime")


@dataclass
class _Prepared:
    """What a pipeline's preamble produced: the initial latents and the network conditioning."""

    latents: torch.Tensor
    cond: dict
    uncond: dict | None                  # None: no classifier-free guidance
    guidance: float
    guidance_rescale: float = 0.0
    timestep_kwargs: dict = field(default_factory=dict)
    begin: int = 0                       # img2img: the grid point the loop starts at (strength < 1)
    steps: int | None = None             # the steps the loop runs (img2img: fewer than num_inference_steps)
    network: Any = None                  # the network of this call when not the pipeline's own (ControlNet + UNet)
    size: tuple | None = None            # (height, width) in pixels, where decoding needs it (Flux's unpacking)


#: what diffusers' pipelines read from their ``**kwargs`` (deprecated step callbacks)
_DEPRECATED_KWARGS = frozenset({"callback", "callback_steps"})
_COMMON = {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width", "generator",
           "latents", "output_type", "return_dict", "num_images_per_prompt", "prompt_embeds",
           "negative_prompt_embeds", "eta", "clip_skip"}


def _batch(prompt, prompt_embeds) -> int:
    if isinstance(prompt, str):
        return 1
    return len(prompt) if prompt is not None else prompt_embeds.shape[0]


def _latents(pipe, steps, batch, channels, height, width, dtype, device, generator, latents, **timestep_kwargs):
    # set_timesteps first, as the pipeline's retrieve_timesteps does: init_noise_sigma depends on it.
    pipe.scheduler.set_timesteps(steps, device=device, **timestep_kwargs)
    return pipe.prepare_latents(batch, channels, height, width, dtype, device, generator, latents)


def _sd_size(pipe, kw: dict) -> tuple[int, int]:
    """(height, width): the call's, or the UNet's sample size times the VAE's scale factor (SD's default)."""
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return kw.get("height") or size[0] * pipe.vae_scale_factor, kw.get("width") or size[1] * pipe.vae_scale_factor


def _lora_scale(kw: dict, name: str = "cross_attention_kwargs") -> float | None:
    """The text encoders' LoRA scale, read as the pipeline reads it: ``scale`` of the call's attention kwargs."""
    attention = kw.get(name)
    return None if attention is None else attention.get("scale")


def _sd_prompt(pipe, kw: dict):
    """SD's ``encode_prompt`` for the call: ``(guidance, guided?, device, prompt_embeds, negative_prompt_embeds)``."""
    g = kw.get("guidance_scale", 7.5)
    device = pipe._execution_device
    emb, neg = pipe.encode_prompt(kw.get("prompt"), device, kw.get("num_images_per_prompt", 1), g > 1,
                                  kw.get("negative_prompt"), prompt_embeds=kw.get("prompt_embeds"),
                                  negative_prompt_embeds=kw.get("negative_prompt_embeds"), lora_scale=_lora_scale(kw),
                                  clip_skip=kw.get("clip_skip"))
    return g, g > 1, device, emb, neg


def _truncated(pipe, steps: int, strength: float, device):
    """The pipeline's ``strength`` cut (img2img, inpainting): ``set_timesteps(steps)`` then its ``get_timesteps``.
    Returns ``(timesteps run, steps run)``; the loop begins at grid point ``steps - steps run``.

    Raises:
        ValueError: a strength that leaves no step.
    """
    pipe.scheduler.set_timesteps(steps, device=device)
    timesteps, run = pipe.get_timesteps(steps, strength, device)
    if run < 1:
        raise ValueError(f"strength: {strength} leaves {run} of num_inference_steps={steps} steps; need >= 1")
    return timesteps, run


def _prepare_sd(pipe, kw: dict) -> _Prepared:
    height, width = _sd_size(pipe, kw)
    prompt, n = kw.get("prompt"), kw.get("num_images_per_prompt", 1)
    pipe.check_inputs(prompt, height, width, None, negative_prompt=kw.get("negative_prompt"),
                      prompt_embeds=kw.get("prompt_embeds"), negative_prompt_embeds=kw.get("negative_prompt_embeds"))
    g, cfg, device, emb, neg = _sd_prompt(pipe, kw)
    latents = _latents(pipe, kw.get("num_inference_steps", 50), _batch(prompt, kw.get("prompt_embeds")) * n,
                       pipe.unet.config.in_channels, height, width, emb.dtype, device, kw.get("generator"),
                       kw.get("latents"))
    return _Prepared(latents, {"encoder_hidden_states": emb}, {"encoder_hidden_states": neg} if cfg else None, g,
                     kw.get("guidance_rescale", 0.0))


def _prepare_sd_img2img(pipe, kw: dict) -> _Prepared:
    strength, prompt, n = kw.get("strength", 0.8), kw.get("prompt"), kw.get("num_images_per_prompt", 1)
    pipe.check_inputs(prompt, strength, None, kw.get("negative_prompt"), kw.get("prompt_embeds"),
                      kw.get("negative_prompt_embeds"))
    g, cfg, device, emb, neg = _sd_prompt(pipe, kw)
    image = pipe.image_processor.preprocess(kw.get("image"))
    # The pipeline's own grid truncation: the last int(N * strength) of N steps, from grid point t_start.
    steps = kw.get("num_inference_steps", 50)
    timesteps, run = _truncated(pipe, steps, strength, device)
    batch = _batch(prompt, kw.get("prompt_embeds")) * n
    latents = pipe.prepare_latents(image, timesteps[:1].repeat(batch), _batch(prompt, kw.get("prompt_embeds")), n,
                                   emb.dtype, device, kw.get("generator"))
    return _Prepared(latents, {"encoder_hidden_states": emb}, {"encoder_hidden_states": neg} if cfg else None, g,
                     begin=steps - run, steps=run)


class ControlledUNet(torch.nn.Module):
    """A UNet with its ControlNet as one ``network(x_in, t, **cond)``: the ControlNet sees the same input, timestep
    and text embedding, its residuals feed the UNet (``StableDiffusionControlNetPipeline``'s loop body without
    guess mode). ``controlnet_cond`` (the prepared control image, ``(B, 3, H, W)``) follows its sample like any
    conditioning tensor, in the conditional and the unconditional half alike.

    Args:
        unet: ``UNet2DConditionModel``. controlnet: ``ControlNetModel``. conditioning_scale: the call's
            ``controlnet_conditioning_scale``.
    """

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module, conditioning_scale: float):
        super().__init__()
        self.unet, self.controlnet, self.conditioning_scale = unet, controlnet, conditioning_scale
        self.cache_key = conditioning_scale           # calls with the same scale share a sampler

    @property
    def config(self):
        return self.unet.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, **cond: Any) -> torch.Tensor:
        # SDXL: the ControlNet takes the UNet's added text/time conditioning too (without guess mode).
        added = {"added_cond_kwargs": cond["added_cond_kwargs"]} if "added_cond_kwargs" in cond else {}
        down, mid = self.controlnet(x, t, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
                                    conditioning_scale=self.conditioning_scale, guess_mode=False, return_dict=False,
                                    **added)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False, **cond)[0]


def _frozen(value: Any):
    """A hashable stand-in for attention kwargs: plain values (None, numbers, strings) and the dicts, lists and tuples
    of them by value; anything else (a tensor, a module) by identity."""
    if isinstance(value, dict):
        return "dict", tuple(sorted(((repr(k), _frozen(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_frozen(v) for v in value)
    if isinstance(value, (type(None), bool, int, float, str)):
        return value
    if isinstance(value, numbers.Real):         # a numpy scale (np.float32(0.5)) by value: one sampler, not one a call
        return float(value)
    return "id", id(value)


class AttentionKwargs(torch.nn.Module):
    """A network called with the call's attention kwargs on every evaluation (every window row, both guidance
    halves), as the pipeline's loop passes ``cross_attention_kwargs`` (``joint_attention_kwargs``,
    ``attention_kwargs``) to every UNet / transformer call: the network pops ``scale`` (its PEFT LoRA layers'
    strength) and hands the rest to its attention processors (Wan's transformer reads only ``scale``). They are one
    dict for all rows, not per-sample conditioning: a processor argument sized to the pipeline's batch does not fit a
    window's rows.

    Args:
        network: ``network(x_in, t, **cond)``. name: the keyword the network takes them by. kwargs: the call's dict.
    """

    def __init__(self, network: torch.nn.Module, name: str, kwargs: dict):
        super().__init__()
        self.network, self.name, self.kwargs = network, name, dict(kwargs)
        # Calls with equal kwargs share a sampler: plain values by value, the rest by identity (held in self.kwargs,
        # so no id is reused while the sampler is cached).
        self.cache_key = getattr(network, "cache_key", None), _frozen(self.kwargs)

    @property
    def config(self):
        return self.network.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.network(x, t, **cond, **{self.name: self.kwargs})


def _shared(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Prompt embeddings of one row for ``rows`` samples, repeated: the pipeline broadcasts ``prompt_embeds`` of
    batch 1 over ``num_images_per_prompt`` (Flux, Wan; its encode_prompt does not repeat given embeddings), where the
    parallel loop needs a row per sample. Anything else as it is."""
    if t is None or t.shape[0] != 1 or rows == 1:
        return t
    return t.expand(rows, *t.shape[1:])


def _check_controlnet(pipe) -> None:
    """The ControlNet the parallel pipeline runs: one, without guess mode (at wrap time and at every call, since
    ``pipe.controlnet`` may be replaced between them)."""
    from diffusers import ControlNetModel

    if not isinstance(pipe.controlnet, ControlNetModel):
        raise ValueError(f"pipe: a {type(pipe.controlnet).__name__} is not supported by the parallel pipeline; use one "
                         f"ControlNetModel")
    if pipe.controlnet.config.get("global_pool_conditions", False):
        # diffusers then runs guess mode (the ControlNet on the conditional half only, its residuals scaled per
        # block), which ControlledUNet does not: the samples differed by 0.49 relative.
        raise ValueError("pipe: a ControlNet with global_pool_conditions=True (guess mode, e.g. ControlNet 1.1 "
                         "shuffle) is not supported by the parallel pipeline")


def _control_scale(pipe, kw: dict) -> float:
    """The call's ControlNet scale, refusing what the parallel pipeline does not run (several ControlNets, guess
    mode, the ControlNet on part of the steps)."""
    _check_controlnet(pipe)
    scale = kw.get("controlnet_conditioning_scale", 1.0)
    if isinstance(scale, (list, tuple)):    # one per ControlNet: diffusers refuses a list for one (its first was run)
        raise TypeError(f"controlnet_conditioning_scale: one ControlNet takes a float, got {scale!r}")
    start, end = kw.get("control_guidance_start", 0.0), kw.get("control_guidance_end", 1.0)
    # As diffusers: a number or a list of one (a number beside a list is broadcast to it).
    starts = list(start) if isinstance(start, (list, tuple)) else [start]
    ends = list(end) if isinstance(end, (list, tuple)) else [end]
    if starts != [0.0] or ends != [1.0]:
        raise ValueError(f"control_guidance_start, control_guidance_end: only 0 and 1 (the ControlNet on every step) "
                         f"are supported, got {start!r}, {end!r}")
    return scale


def _control_image_and_latents(pipe, kw: dict, batch: int, n: int, device, dtype) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """The control image once per sample (the pipeline doubles it for guidance: the same image in both halves),
    and the initial latents at its size."""
    image = pipe.prepare_image(image=kw.get("image"), width=kw.get("width"), height=kw.get("height"),
                               batch_size=batch, num_images_per_prompt=n, device=device, dtype=pipe.controlnet.dtype,
                               do_classifier_free_guidance=False, guess_mode=False)
    height, width = image.shape[-2:]
    latents = _latents(pipe, kw.get("num_inference_steps", 50), batch, pipe.unet.config.in_channels, height, width,
                       dtype, device, kw.get("generator"), kw.get("latents"))
    return image, latents


def _prepare_sd_controlnet(pipe, kw: dict) -> _Prepared:
    scale = _control_scale(pipe, kw)
    prompt, n = kw.get("prompt"), kw.get("num_images_per_prompt", 1)
    pipe.check_inputs(prompt, kw.get("image"), None, kw.get("negative_prompt"), kw.get("prompt_embeds"),
                      kw.get("negative_prompt_embeds"), controlnet_conditioning_scale=scale)
    g, cfg, device, emb, neg = _sd_prompt(pipe, kw)
    image, latents = _control_image_and_latents(pipe, kw, _batch(prompt, kw.get("prompt_embeds")) * n, n, device,
                                                emb.dtype)
    return _Prepared(latents, {"encoder_hidden_states": emb, "controlnet_cond": image},
                     {"encoder_hidden_states": neg, "controlnet_cond": image} if cfg else None, g,
                     network=ControlledUNet(pipe.unet, pipe.controlnet, float(scale)))


def _prepare_sdxl_controlnet(pipe, kw: dict) -> _Prepared:
    """``StableDiffusionXLControlNetPipeline``: SDXL's text and micro-conditioning (the time ids from the control
    image's size, as the pipeline builds them), the control image once per sample, the ControlNet on every step."""
    scale = _control_scale(pipe, kw)
    prompt, n = kw.get("prompt"), kw.get("num_images_per_prompt", 1)
    pipe.check_inputs(prompt, kw.get("prompt_2"), kw.get("image"), None, kw.get("negative_prompt"),
                      kw.get("negative_prompt_2"), kw.get("prompt_embeds"), kw.get("negative_prompt_embeds"),
                      kw.get("pooled_prompt_embeds"), None, None, kw.get("negative_pooled_prompt_embeds"),
                      controlnet_conditioning_scale=scale)
    g, cfg, device, emb, neg, pooled, neg_pooled = _sdxl_prompt(pipe, kw)
    image, latents = _control_image_and_latents(pipe, kw, _batch(prompt, kw.get("prompt_embeds")) * n, n, device,
                                                emb.dtype)
    height, width = image.shape[-2:]
    proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim

    def time_ids(original, crops, target):
        ids = pipe._get_add_time_ids(original, crops, target, dtype=emb.dtype, text_encoder_projection_dim=proj)
        return ids.to(device).repeat(emb.shape[0], 1)

    ids = time_ids(kw.get("original_size") or (height, width), kw.get("crops_coords_top_left") or (0, 0),
                   kw.get("target_size") or (height, width))
    neg_ids = ids
    if kw.get("negative_original_size") is not None and kw.get("negative_target_size") is not None:
        neg_ids = time_ids(kw["negative_original_size"], kw.get("negative_crops_coords_top_left") or (0, 0),
                           kw["negative_target_size"])
    cond = {"encoder_hidden_states": emb, "controlnet_cond": image,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    uncond = {"encoder_hidden_states": neg, "controlnet_cond": image,
              "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": neg_ids}}
    return _Prepared(latents, cond, uncond if cfg else None, g,
                     network=ControlledUNet(pipe.unet, pipe.controlnet, float(scale)))


class InpaintUNet(torch.nn.Module):
    """An inpainting UNet (9 input channels) as ``network(x_in, t, **cond)``: the scaled latents, then the mask and
    the masked image's latents (``(B, 1, h, w)`` and ``(B, 4, h, w)``, unscaled), concatenated on channels as
    ``StableDiffusionInpaintPipeline`` does before every call."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, masked_image_latents: torch.Tensor,
                **cond: Any) -> torch.Tensor:
        return self.unet(torch.cat([x, mask.to(x.dtype), masked_image_latents.to(x.dtype)], 1), t,
                         return_dict=False, **cond)[0]


def _check_inpaint(pipe) -> None:
    if type(pipe.vae).__name__ == "AsymmetricAutoencoderKL":
        # diffusers decodes it with the init image and the mask (decode(..., image=, mask=)); _decode_sd does not:
        # the images differed by up to 0.79.
        raise ValueError(f"pipe: {type(pipe).__name__} with an AsymmetricAutoencoderKL (decoded with the image and "
                         f"mask) is not supported by the parallel pipeline; use an AutoencoderKL")
    if pipe.unet.config.in_channels != 9:
        raise ValueError(f"pipe: {type(pipe).__name__} with a {pipe.unet.config.in_channels}-channel UNet "
                         f"overwrites the unmasked latents after every step (a projection paratime's step maps do not "
                         f"carry); use an inpainting UNet (9 input channels) or StableDiffusionImg2ImgPipeline")


def _prepare_sd_inpaint(pipe, kw: dict) -> _Prepared:
    height, width = _sd_size(pipe, kw)
    strength, prompt, n = kw.get("strength", 1.0), kw.get("prompt"), kw.get("num_images_per_prompt", 1)
    image, mask_image = kw.get("image"), kw.get("mask_image")
    pipe.check_inputs(prompt, image, mask_image, height, width, strength, None, kw.get("output_type", "pil"),
                      kw.get("negative_prompt"), kw.get("prompt_embeds"), kw.get("negative_prompt_embeds"))
    g, cfg, device, emb, neg = _sd_prompt(pipe, kw)
    steps = kw.get("num_inference_steps", 50)
    timesteps, run = _truncated(pipe, steps, strength, device)
    batch = _batch(prompt, kw.get("prompt_embeds")) * n
    # Image, noised latents and mask latents in the pipeline's order (each may draw from the generator).
    init_image = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    latents, _ = pipe.prepare_latents(batch, pipe.vae.config.latent_channels, height, width, emb.dtype, device,
                                      kw.get("generator"), kw.get("latents"), image=init_image,
                                      timestep=timesteps[:1].repeat(batch), is_strength_max=strength == 1.0,
                                      return_noise=True, return_image_latents=False)
    mask_condition = pipe.mask_processor.preprocess(mask_image, height=height, width=width)
    masked = kw.get("masked_image_latents")
    masked = init_image * (mask_condition < 0.5) if masked is None else masked
    mask, masked_latents = pipe.prepare_mask_latents(mask_condition, masked, batch, height, width, emb.dtype, device,
                                                     kw.get("generator"), False)
    image_cond = {"mask": mask, "masked_image_latents": masked_latents}
    return _Prepared(latents, {"encoder_hidden_states": emb, **image_cond},
                     {"encoder_hidden_states": neg, **image_cond} if cfg else None, g,
                     begin=steps - run, steps=run, network=InpaintUNet(pipe.unet))


def _prepare_sdxl(pipe, kw: dict) -> _Prepared:
    height = kw.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    width = kw.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
    prompt, n = kw.get("prompt"), kw.get("num_images_per_prompt", 1)
    pipe.check_inputs(prompt, kw.get("prompt_2"), height, width, None, negative_prompt=kw.get("negative_prompt"),
                      negative_prompt_2=kw.get("negative_prompt_2"), prompt_embeds=kw.get("prompt_embeds"),
                      negative_prompt_embeds=kw.get("negative_prompt_embeds"),
                      pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
                      negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"))
    g = kw.get("guidance_scale", 5.0)
    cfg = g > 1
    device = pipe._execution_device
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=kw.get("prompt_2"), device=device, num_images_per_prompt=n,
        do_classifier_free_guidance=cfg, negative_prompt=kw.get("negative_prompt"),
        negative_prompt_2=kw.get("negative_prompt_2"), prompt_embeds=kw.get("prompt_embeds"),
        negative_prompt_embeds=kw.get("negative_prompt_embeds"), pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
        negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"), lora_scale=_lora_scale(kw),
        clip_skip=kw.get("clip_skip"))
    latents = _latents(pipe, kw.get("num_inference_steps", 50), _batch(prompt, kw.get("prompt_embeds")) * n,
                       pipe.unet.config.in_channels, height, width, emb.dtype, device, kw.get("generator"),
                       kw.get("latents"))
    # Micro-conditioning time ids, built by the pipeline's own helper (it checks them against the UNet).
    proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim

    def time_ids(prefix: str = ""):
        original = kw.get(f"{prefix}original_size") or (height, width)
        target = kw.get(f"{prefix}target_size") or (height, width)
        crops = kw.get(f"{prefix}crops_coords_top_left") or (0, 0)
        ids = pipe._get_add_time_ids(original, crops, target, dtype=emb.dtype, text_encoder_projection_dim=proj)
        return ids.to(device).repeat(emb.shape[0], 1)

    ids = time_ids()
    neg_ids = time_ids("negative_") if kw.get("negative_original_size") and kw.get("negative_target_size") else ids
    cond = {"encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    uncond = {"encoder_hidden_states": neg, "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": neg_ids}}
    return _Prepared(latents, cond, uncond if cfg else None, g, kw.get("guidance_rescale", 0.0))


def _sdxl_prompt(pipe, kw: dict):
    """SDXL's ``encode_prompt`` for the call: ``(guidance, guided?, device, emb, neg, pooled, neg_pooled)``."""
    g = kw.get("guidance_scale", 5.0)
    device = pipe._execution_device
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=kw.get("prompt"), prompt_2=kw.get("prompt_2"), device=device,
        num_images_per_prompt=kw.get("num_images_per_prompt", 1), do_classifier_free_guidance=g > 1,
        negative_prompt=kw.get("negative_prompt"), negative_prompt_2=kw.get("negative_prompt_2"),
        prompt_embeds=kw.get("prompt_embeds"), negative_prompt_embeds=kw.get("negative_prompt_embeds"),
        pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
        negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"), lora_scale=_lora_scale(kw),
        clip_skip=kw.get("clip_skip"))
    return g, g > 1, device, emb, neg, pooled, neg_pooled


def _sdxl_refiner_cond(pipe, kw: dict, height: int, width: int, batch: int, emb, neg, pooled, neg_pooled):
    """SDXL img2img / inpainting conditioning: text embeddings and the micro-conditioning time ids (with aesthetic
    scores when ``requires_aesthetics_score``), built by the pipeline's own ``_get_add_time_ids``.
    Returns ``(cond, uncond)``."""
    original, target = kw.get("original_size") or (height, width), kw.get("target_size") or (height, width)
    proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    ids, neg_ids = pipe._get_add_time_ids(
        original, kw.get("crops_coords_top_left", (0, 0)), target, kw.get("aesthetic_score", 6.0),
        kw.get("negative_aesthetic_score", 2.5), kw.get("negative_original_size") or original,
        kw.get("negative_crops_coords_top_left", (0, 0)), kw.get("negative_target_size") or target,
        dtype=emb.dtype, text_encoder_projection_dim=proj)
    ids, neg_ids = ids.repeat(batch, 1).to(emb.device), neg_ids.repeat(batch, 1).to(emb.device)
    return ({"encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}},
            {"encoder_hidden_states": neg, "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": neg_ids}})


def _prepare_sdxl_img2img(pipe, kw: dict) -> _Prepared:
    strength, prompt, n = kw.get("strength", 0.3), kw.get("prompt"), kw.get("num_images_per_prompt", 1)
    steps = kw.get("num_inference_steps", 50)
    pipe.check_inputs(prompt, kw.get("prompt_2"), strength, steps, None, kw.get("negative_prompt"),
                      kw.get("negative_prompt_2"), kw.get("prompt_embeds"), kw.get("negative_prompt_embeds"))
    g, cfg, device, emb, neg, pooled, neg_pooled = _sdxl_prompt(pipe, kw)
    image = pipe.image_processor.preprocess(kw.get("image"))
    timesteps, run = _truncated(pipe, steps, strength, device)   # the pipeline's truncation, as for SD img2img
    batch = _batch(prompt, kw.get("prompt_embeds"))
    latents = kw.get("latents")
    if latents is None:
        latents = pipe.prepare_latents(image, timesteps[:1].repeat(batch * n), batch, n, emb.dtype, device,
                                       kw.get("generator"), True)
    height, width = (s * pipe.vae_scale_factor for s in latents.shape[-2:])
    cond, uncond = _sdxl_refiner_cond(pipe, kw, height, width, batch * n, emb, neg, pooled, neg_pooled)
    return _Prepared(latents, cond, uncond if cfg else None, g, kw.get("guidance_rescale", 0.0), begin=steps - run,
                     steps=run)


def _prepare_sdxl_inpaint(pipe, kw: dict) -> _Prepared:
    height, width = _sd_size(pipe, kw)      # the UNet's sample size, as the pipeline (no default_sample_size)
    strength, prompt, n = kw.get("strength", 0.9999), kw.get("prompt"), kw.get("num_images_per_prompt", 1)
    image, mask_image = kw.get("image"), kw.get("mask_image")
    pipe.check_inputs(prompt, kw.get("prompt_2"), image, mask_image, height, width, strength, None,
                      kw.get("output_type", "pil"), kw.get("negative_prompt"), kw.get("negative_prompt_2"),
                      kw.get("prompt_embeds"), kw.get("negative_prompt_embeds"))
    g, cfg, device, emb, neg, pooled, neg_pooled = _sdxl_prompt(pipe, kw)
    steps = kw.get("num_inference_steps", 50)
    timesteps, run = _truncated(pipe, steps, strength, device)
    batch = _batch(prompt, kw.get("prompt_embeds")) * n
    # Image, mask, noised latents and mask latents in the pipeline's order (each may draw from the generator).
    init_image = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    mask = pipe.mask_processor.preprocess(mask_image, height=height, width=width)
    masked = kw.get("masked_image_latents")
    masked = init_image * (mask < 0.5) if masked is None else masked
    latents, _ = pipe.prepare_latents(batch, pipe.vae.config.latent_channels, height, width, emb.dtype, device,
                                      kw.get("generator"), kw.get("latents"), image=init_image,
                                      timestep=timesteps[:1].repeat(batch), is_strength_max=strength == 1.0,
                                      add_noise=True, return_noise=True, return_image_latents=False)
    mask, masked_latents = pipe.prepare_mask_latents(mask, masked, batch, height, width, emb.dtype, device,
                                                     kw.get("generator"), False)
    cond, uncond = _sdxl_refiner_cond(pipe, kw, height, width, batch, emb, neg, pooled, neg_pooled)
    image_cond = {"mask": mask, "masked_image_latents": masked_latents}
    return _Prepared(latents, {**cond, **image_cond}, {**uncond, **image_cond} if cfg else None, g,
                     kw.get("guidance_rescale", 0.0), begin=steps - run, steps=run, network=InpaintUNet(pipe.unet))


def _prepare_sd3(pipe, kw: dict) -> _Prepared:
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    height = kw.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    width = kw.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
    prompt, n = kw.get("prompt"), kw.get("num_images_per_prompt", 1)
    seq = kw.get("max_sequence_length", 256)
    pipe.check_inputs(prompt, kw.get("prompt_2"), kw.get("prompt_3"), height, width,
                      negative_prompt=kw.get("negative_prompt"), negative_prompt_2=kw.get("negative_prompt_2"),
                      negative_prompt_3=kw.get("negative_prompt_3"), prompt_embeds=kw.get("prompt_embeds"),
                      negative_prompt_embeds=kw.get("negative_prompt_embeds"),
                      pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
                      negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"), max_sequence_length=seq)
    g = kw.get("guidance_scale", 7.0)
    cfg = g > 1
    device = pipe._execution_device
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=kw.get("prompt_2"), prompt_3=kw.get("prompt_3"),
        negative_prompt=kw.get("negative_prompt"), negative_prompt_2=kw.get("negative_prompt_2"),
        negative_prompt_3=kw.get("negative_prompt_3"), do_classifier_free_guidance=cfg,
        prompt_embeds=kw.get("prompt_embeds"), negative_prompt_embeds=kw.get("negative_prompt_embeds"),
        pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
        negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"), device=device,
        clip_skip=kw.get("clip_skip"), num_images_per_prompt=n, max_sequence_length=seq,
        lora_scale=_lora_scale(kw, "joint_attention_kwargs"))
    tr = pipe.transformer.config
    latents = pipe.prepare_latents(_batch(prompt, kw.get("prompt_embeds")) * n, tr.in_channels, height, width,
                                   emb.dtype, device, kw.get("generator"), kw.get("latents"))
    mu, sc = kw.get("mu"), pipe.scheduler.config
    if mu is not None and not sc.get("use_dynamic_shifting", None):
        raise ValueError(f"mu: applies only to a scheduler with use_dynamic_shifting ({type(pipe.scheduler).__name__} "
                         f"has it off, and would ignore mu={mu!r})")
    if sc.get("use_dynamic_shifting", None) and mu is None:     # the pipeline's resolution-dependent shift
        h, w = latents.shape[-2:]
        mu = calculate_shift((h // tr.patch_size) * (w // tr.patch_size), sc.get("base_image_seq_len", 256),
                             sc.get("max_image_seq_len", 4096), sc.get("base_shift", 0.5), sc.get("max_shift", 1.16))
    timestep_kwargs = {} if mu is None else {"mu": mu}
    pipe.scheduler.set_timesteps(kw.get("num_inference_steps", 28), device=device, **timestep_kwargs)
    cond = {"encoder_hidden_states": emb, "pooled_projections": pooled}
    uncond = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled}
    return _Prepared(latents, cond, uncond if cfg else None, g, 0.0, timestep_kwargs)


class FluxNet(torch.nn.Module):
    """Flux's transformer as ``network(x_in, t, **cond)``: packed latents ``(B, seq, 4 C)``, the timestep divided by
    1000 in the latents' dtype (as ``FluxPipeline`` passes it), and the position ids of this call's image and text
    (``(seq, 3)``, no batch dimension: held here, not in the per-sample conditioning).

    Args:
        transformer: ``FluxTransformer2DModel``. txt_ids, img_ids: from ``encode_prompt`` / ``prepare_latents``.
        cache_key: what the ids depend on (height, width, text length): calls that share it share a sampler.
    """

    def __init__(self, transformer: torch.nn.Module, txt_ids: torch.Tensor, img_ids: torch.Tensor, cache_key):
        super().__init__()
        self.transformer, self.cache_key = transformer, cache_key
        self.register_buffer("txt_ids", txt_ids, persistent=False)
        self.register_buffer("img_ids", img_ids, persistent=False)

    @property
    def config(self):
        return self.transformer.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=t.to(x.dtype) / 1000, txt_ids=self.txt_ids,
                                img_ids=self.img_ids, return_dict=False, **cond)[0]


def _prepare_flux(pipe, kw: dict) -> _Prepared:
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if kw.get("true_cfg_scale", 1.0) > 1 and (kw.get("negative_prompt") is not None
                                              or kw.get("negative_prompt_embeds") is not None):
        raise ValueError("true_cfg_scale: Flux's true classifier-free guidance (a second transformer call with the "
                         "negative prompt) is not supported by the parallel pipeline; use true_cfg_scale=1")
    height = kw.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    width = kw.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
    prompt, n, seq = kw.get("prompt"), kw.get("num_images_per_prompt", 1), kw.get("max_sequence_length", 512)
    pipe.check_inputs(prompt, kw.get("prompt_2"), height, width, negative_prompt=kw.get("negative_prompt"),
                      negative_prompt_2=kw.get("negative_prompt_2"), prompt_embeds=kw.get("prompt_embeds"),
                      negative_prompt_embeds=kw.get("negative_prompt_embeds"),
                      pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
                      negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"), max_sequence_length=seq)
    device = pipe._execution_device
    emb, pooled, txt_ids = pipe.encode_prompt(prompt=prompt, prompt_2=kw.get("prompt_2"),
                                              prompt_embeds=kw.get("prompt_embeds"),
                                              pooled_prompt_embeds=kw.get("pooled_prompt_embeds"), device=device,
                                              num_images_per_prompt=n, max_sequence_length=seq,
                                              lora_scale=_lora_scale(kw, "joint_attention_kwargs"))
    tr = pipe.transformer
    latents, img_ids = pipe.prepare_latents(_batch(prompt, kw.get("prompt_embeds")) * n, tr.config.in_channels // 4,
                                            height, width, emb.dtype, device, kw.get("generator"), kw.get("latents"))
    # The pipeline's own grid: sigmas linspace(1, 1/N, N) shifted by mu from the packed sequence length.
    steps, sc = kw.get("num_inference_steps", 28), pipe.scheduler.config
    sigmas = kw.get("sigmas")
    if sigmas is None and not sc.get("use_flow_sigmas", False):
        sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(latents.shape[1], sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                         sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
    timestep_kwargs = {"mu": mu} if sigmas is None else {"mu": mu, "sigmas": tuple(float(v) for v in sigmas)}
    # Given sigmas set the steps, as diffusers' retrieve_timesteps does (num_inference_steps is then not read).
    run_steps = None if kw.get("sigmas") is None else len(timestep_kwargs["sigmas"])
    cond = {"encoder_hidden_states": _shared(emb, latents.shape[0]),
            "pooled_projections": _shared(pooled, latents.shape[0])}
    if tr.config.guidance_embeds:                  # guidance distilled into the model: one value per sample
        cond["guidance"] = torch.full((latents.shape[0],), float(kw.get("guidance_scale", 3.5)), device=device,
                                      dtype=torch.float32)
    key = (tuple(img_ids.shape), int(height), int(width), tuple(txt_ids.shape))
    return _Prepared(latents, cond, None, 1.0, timestep_kwargs=timestep_kwargs, steps=run_steps,
                     network=FluxNet(tr, txt_ids, img_ids, key), size=(int(height), int(width)))


def _decode_flux(pipe, latents, output_type, generator, dtype, prep):
    from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

    if output_type == "latent":
        return FluxPipelineOutput(images=latents)
    height, width = prep.size
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents, return_dict=False)[0]
    return FluxPipelineOutput(images=pipe.image_processor.postprocess(image, output_type=output_type))


def _prepare_wan(pipe, kw: dict) -> _Prepared:
    if pipe.config.boundary_ratio is not None or pipe.transformer_2 is not None or pipe.config.expand_timesteps:
        raise ValueError("pipe: Wan 2.2's two-expert switch (boundary_ratio, transformer_2) and per-token timesteps "
                         "(expand_timesteps) are not supported by the parallel pipeline; use a Wan 2.1 pipeline")
    prompt, n = kw.get("prompt"), kw.get("num_videos_per_prompt", 1)
    height, width, frames = kw.get("height", 480), kw.get("width", 832), kw.get("num_frames", 81)
    pipe.check_inputs(prompt, kw.get("negative_prompt"), height, width, kw.get("prompt_embeds"),
                      kw.get("negative_prompt_embeds"), None, kw.get("guidance_scale_2"))
    # The pipeline's own rounding: frames to 4 k + 1, sides to the VAE factor times the patch.
    t_factor, s_factor = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    frames = max(frames // t_factor * t_factor + 1 if frames % t_factor != 1 else frames, 1)
    patch = pipe.transformer.config.patch_size
    height, width = height // (s_factor * patch[1]) * s_factor * patch[1], width // (s_factor * patch[2]) * \
        s_factor * patch[2]
    g = kw.get("guidance_scale", 5.0)
    device = pipe._execution_device
    emb, neg = pipe.encode_prompt(prompt=prompt, negative_prompt=kw.get("negative_prompt"),
                                  do_classifier_free_guidance=g > 1, num_videos_per_prompt=n,
                                  prompt_embeds=kw.get("prompt_embeds"),
                                  negative_prompt_embeds=kw.get("negative_prompt_embeds"),
                                  max_sequence_length=kw.get("max_sequence_length", 512), device=device)
    dtype = pipe.transformer.dtype
    pipe.scheduler.set_timesteps(kw.get("num_inference_steps", 50), device=device)
    latents = pipe.prepare_latents(_batch(prompt, kw.get("prompt_embeds")) * n, pipe.transformer.config.in_channels,
                                   height, width, frames, torch.float32, device, kw.get("generator"),
                                   kw.get("latents"))
    emb, neg = _shared(emb, latents.shape[0]), _shared(neg, latents.shape[0])
    return _Prepared(latents, {"encoder_hidden_states": emb.to(dtype)},
                     {"encoder_hidden_states": neg.to(dtype)} if g > 1 else None, g)


def _decode_wan(pipe, latents, output_type, generator, dtype, prep):
    from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

    if output_type == "latent":
        return WanPipelineOutput(frames=latents)
    vcfg = pipe.vae.config
    latents = latents.to(pipe.vae.dtype)
    mean = torch.tensor(vcfg.latents_mean).view(1, vcfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vcfg.latents_std).view(1, vcfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    video = pipe.vae.decode(latents / inv_std + mean, return_dict=False)[0]
    return WanPipelineOutput(frames=pipe.video_processor.postprocess_video(video, output_type=output_type))


def _decode_sd(pipe, latents, output_type, generator, dtype, prep):
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    nsfw = None
    if output_type == "latent":
        image = latents
    else:
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = pipe.run_safety_checker(image, latents.device, dtype)
    denormalize = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
    image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)


def _decode_sdxl(pipe, latents, output_type, generator, dtype, prep):
    from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

    if output_type == "latent":
        return StableDiffusionXLPipelineOutput(images=latents)
    upcast = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
    if upcast:
        pipe.vae.to(dtype=torch.float32)        # what the pipeline's upcast_vae() does (deprecated: removed in 1.0)
        latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
    vcfg = pipe.vae.config
    if getattr(vcfg, "latents_mean", None) is not None and getattr(vcfg, "latents_std", None) is not None:
        mean = torch.tensor(vcfg.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(vcfg.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vcfg.scaling_factor + mean
    else:
        latents = latents / vcfg.scaling_factor
    image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    if upcast:
        pipe.vae.to(dtype=torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return StableDiffusionXLPipelineOutput(images=pipe.image_processor.postprocess(image, output_type=output_type))


def _decode_sd3(pipe, latents, output_type, generator, dtype, prep):
    from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput

    if output_type == "latent":
        return StableDiffusion3PipelineOutput(images=latents)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents, return_dict=False)[0]
    return StableDiffusion3PipelineOutput(images=pipe.image_processor.postprocess(image, output_type=output_type))


@dataclass(frozen=True)
class _Family:
    prepare: Any
    decode: Any
    network: str                         # the pipeline attribute holding the denoising network
    extra: frozenset                     # __call__ arguments beyond _COMMON and `attention`
    check: Any = None                    # check(pipe) at wrap time: raises for a pipeline the family cannot run
    attention: str = "cross_attention_kwargs"   # the __call__ argument passed to every network call (LoRA scale)

    @property
    def arguments(self) -> frozenset:
        """The ``__call__`` arguments the parallel pipeline runs."""
        return frozenset(_COMMON | self.extra | {self.attention})


_FAMILIES = {
    "StableDiffusionPipeline": _Family(_prepare_sd, _decode_sd, "unet", frozenset({"guidance_rescale"})),
    "StableDiffusionImg2ImgPipeline": _Family(_prepare_sd_img2img, _decode_sd, "unet", frozenset({"image",
                                                                                                  "strength"})),
    "StableDiffusionInpaintPipeline": _Family(_prepare_sd_inpaint, _decode_sd, "unet", frozenset({
        "image", "mask_image", "masked_image_latents", "strength"}), _check_inpaint),
    "StableDiffusionControlNetPipeline": _Family(_prepare_sd_controlnet, _decode_sd, "unet", frozenset({
        "image", "controlnet_conditioning_scale", "control_guidance_start",
        "control_guidance_end"}), _check_controlnet),
    "StableDiffusionXLControlNetPipeline": _Family(_prepare_sdxl_controlnet, _decode_sdxl, "unet", frozenset({
        "image", "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
        "original_size", "target_size", "crops_coords_top_left", "negative_original_size", "negative_target_size",
        "negative_crops_coords_top_left"}), _check_controlnet),
    "StableDiffusionXLPipeline": _Family(_prepare_sdxl, _decode_sdxl, "unet", frozenset({
        "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "guidance_rescale",
        "original_size", "target_size", "crops_coords_top_left", "negative_original_size", "negative_target_size",
        "negative_crops_coords_top_left"})),
    "StableDiffusionXLImg2ImgPipeline": _Family(_prepare_sdxl_img2img, _decode_sdxl, "unet", frozenset({
        "image", "strength", "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "guidance_rescale", "original_size", "target_size", "crops_coords_top_left", "negative_original_size",
        "negative_target_size", "negative_crops_coords_top_left", "aesthetic_score", "negative_aesthetic_score"})),
    "FluxPipeline": _Family(_prepare_flux, _decode_flux, "transformer", frozenset({
        "prompt_2", "negative_prompt_2", "true_cfg_scale", "sigmas", "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds", "max_sequence_length"}), attention="joint_attention_kwargs"),
    "WanPipeline": _Family(_prepare_wan, _decode_wan, "transformer", frozenset({
        "num_frames", "num_videos_per_prompt", "guidance_scale_2", "max_sequence_length"}),
        attention="attention_kwargs"),
    "StableDiffusionXLInpaintPipeline": _Family(_prepare_sdxl_inpaint, _decode_sdxl, "unet", frozenset({
        "image", "mask_image", "masked_image_latents", "strength", "prompt_2", "negative_prompt_2",
        "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "guidance_rescale", "original_size", "target_size",
        "crops_coords_top_left", "negative_original_size", "negative_target_size", "negative_crops_coords_top_left",
        "aesthetic_score", "negative_aesthetic_score"}), _check_inpaint),
    "StableDiffusion3Pipeline": _Family(_prepare_sd3, _decode_sd3, "transformer", frozenset({
        "prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3", "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds", "max_sequence_length", "mu"}), attention="joint_attention_kwargs"),
}


def _family_of(pipe) -> _Family:
    for cls in type(pipe).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__]
    raise ValueError(f"pipe: {type(pipe).__name__} is not supported; supported: {', '.join(_FAMILIES)}")


# Options parallelize() passes on to ParallelSampler; the rest are set by the pipeline itself (the scheduler decides
# the solver, schedule, prediction and clipping; the call decides steps, guidance and eta; the VAE decodes).
_SET_BY_PIPELINE = {"solver": "the pipeline's scheduler", "steps": "num_inference_steps= of the call",
                    "schedule": "the pipeline's scheduler", "prediction": "the scheduler's prediction_type",
                    "clip_x0": "the scheduler's clip_sample", "guidance": "guidance_scale= of the call",
                    "guidance_rescale": "guidance_rescale= of the call", "eta": "eta= of the call",
                    "latent_scale": "the pipeline's VAE", "decoder": "the pipeline's VAE", "dtype": "the network",
                    "spacing": "the scheduler's timestep_spacing",
                    "device": "the pipeline's device", "classifier": "not supported by pipelines",
                    "classifier_scale": "not supported by pipelines"}


def _check_options(solver, options: dict) -> SamplerConfig:
    """Every parallelize() option checked at wrap time, as ParallelSampler will check it at the first call.

    Raises:
        TypeError: an unknown option, or one the pipeline sets itself (named, with what sets it).
        ValueError: a bad value (named, with the allowed values), or Parareal with a multi-step scheduler.
    """
    options = dict(options)
    progress, kernels = options.pop("progress"), options.pop("kernels", None)
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected True or False, got {progress!r}")
    if kernels not in (None, "auto", "torch", "triton"):
        raise ValueError(f"kernels: unknown {kernels!r}; allowed: auto, torch, triton (or None)")
    allowed = sorted({f.name for f in fields(SamplerConfig)} - set(_SET_BY_PIPELINE) | {"kernels", "progress"})
    for name in options:
        if name in _SET_BY_PIPELINE:
            raise TypeError(f"{name}: set by {_SET_BY_PIPELINE[name]}, not a parallelize() option")
        if name not in allowed:
            raise TypeError(f"{name}: unknown parallelize() option; allowed: {', '.join(allowed)}")
    # steps: the smallest grid the options allow (Parareal's slices of coarse_steps each; one more than an integer
    # window, which then slides, so a fill is not refused before the call); the call's num_inference_steps is
    # checked again.
    window, slices, coarse = options.get("window"), options.get("slices"), options.get("coarse_steps", 1)
    slid = window + 1 if isinstance(window, int) and not isinstance(window, bool) else 1
    sliced = (slices or coarse) * coarse if all(isinstance(v, int) for v in (slices or 1, coarse)) else 1
    method = options.get("method")          # named here, before the config names the scheduler's solver
    if isinstance(method, str) and method.startswith("parareal") and not takes_solver(solver):
        raise ValueError(f"method: {method!r} carries one previous model output across slices, but "
                         f"{solver.name} uses {solver.history_depth}; use method='picard' or 'sequential'")
    return SamplerConfig.from_options(solver=solver, steps=max(1, slices or 1, slid, sliced), **options)


def _global_generator(device: torch.device) -> torch.Generator:
    """The generator ``torch.randn(..., device=device)`` draws from when given none: a pipeline called without
    ``generator=`` draws its step noise from it (CUDA's default generator of that device, else the CPU's)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.default_generators[torch.cuda.current_device() if device.index is None else device.index]
    return torch.default_generator


def _check_ranks_draw_alike(backend: Backend, generator: torch.Generator) -> None:
    """Under torch.distributed, that every rank's ``generator`` (torch's global one: a call without ``generator=``) is
    in the same state: each rank draws its latents and step noise from its own, and ranks seeded apart
    (``torch.manual_seed(seed + rank)``) sampled a trajectory from several noises, the pipeline's sample on none of
    them. One collective of two numbers (a 48-bit digest of the state); raises on every rank alike.

    Raises:
        ValueError: naming ``generator``, where the ranks' states differ.
    """
    if backend.workers <= 1 or backend.name != "torch":
        return
    state = generator.get_state().numpy().tobytes()
    digest = float(int.from_bytes(hashlib.blake2b(state, digest_size=6).digest(), "big"))   # exact in float64
    top = backend.agree_max([digest, -digest])
    if top[0] != -top[1]:
        raise ValueError("generator: without generator=, every rank draws the latents and step noise from torch's "
                         "global generator, whose state differs across the ranks (seeded per rank?); seed every "
                         "rank alike (torch.manual_seed(s)) or pass generator=torch.Generator(device).manual_seed(s)")


def _is_default(value: Any, default: Any) -> bool:
    """Whether a call argument is its signature's default: the same object, or an equal plain value (None, a number,
    a string, or a list / tuple of them; never a tensor or an image, whose equality is not one bool)."""
    if value is default:
        return True
    plain = (type(None), bool, int, float, str)
    flat = lambda v: isinstance(v, plain) or isinstance(v, (list, tuple)) and all(isinstance(e, plain) for e in v)
    return default is not inspect.Parameter.empty and flat(value) and flat(default) and value == default


class ParallelPipeline:
    """A diffusers pipeline whose denoising loop runs through paratime; call it exactly like the pipeline.

    The call returns what the pipeline returns (its output dataclass, or a tuple with ``return_dict=False``), with
    paratime's :class:`~paratime.SampleStats` as ``output.paratime_stats`` and ``ppipe.last_stats``. Build it with
    :func:`parallelize`; ``close()`` (or ``with``) releases the backend.
    """

    def __init__(self, pipe, backend: str | Backend, backend_options: dict, sampler_options: dict):
        self.pipe = pipe
        self.family = _family_of(pipe)
        self._check_pipe()
        # An unsupported scheduler or a bad option fails here, at wrap time, before the backend starts.
        cfg = _check_options(solver_for(pipe.scheduler), sampler_options)
        check_kernels(sampler_options.get("kernels"), cfg.state_dtype_on(pipe.device), pipe.device)
        self.sampler_options = sampler_options
        self.backend = make_backend(backend, **backend_options)
        self.last_stats: SampleStats | None = None
        self._samplers: dict = {}

    def _check_pipe(self) -> None:
        """What the family runs, on the networks the pipeline holds now (at wrap time and at every call: a UNet,
        transformer or ControlNet may be replaced between them)."""
        if self.family.check is not None:
            self.family.check(self.pipe)
        if getattr(self.pipe, self.family.network).config.get("time_cond_proj_dim") is not None:
            raise ValueError("pipe: a UNet with time_cond_proj_dim (LCM's guidance embedding) is not supported")

    def _sampler(self, steps: int, eta: float, prep: _Prepared, attention: dict | None) -> ParallelSampler:
        held = getattr(self.pipe, self.family.network)              # the pipeline's network at this call
        network = prep.network if prep.network is not None else held if self.family.network == "unet" else \
            Keyword(held)
        if attention is not None:               # None: the network as it is, called as before
            network = AttentionKwargs(network, self.family.attention, attention)
        # The networks by identity: one replaced on the pipeline after wrapping (a fine-tune, torch.compile) gets a
        # sampler of its own (the first call's was kept). The cached sampler holds the old ones, so no id is reused.
        key = (steps, eta, prep.uncond is not None and prep.guidance, prep.guidance_rescale,
               tuple(sorted(prep.timestep_kwargs.items())), prep.begin, id(self.pipe.scheduler), id(held),
               id(getattr(self.pipe, "controlnet", None)), getattr(network, "cache_key", None))
        if key not in self._samplers:
            guided = prep.uncond is not None
            den = from_diffusers(network, self.pipe.scheduler, sample_shape=None,
                                 guidance=prep.guidance if guided else None,
                                 guidance_rescale=prep.guidance_rescale if guided else 0.0)   # diffusers: off then
            den = with_timestep_kwargs(den, begin=prep.begin, **prep.timestep_kwargs)
            # One sampler is kept (the last call's): a new steps / guidance / mu rebuilds it on the same backend.
            log.debug("parallelize: sampler for %d steps of %s", steps, type(self.pipe.scheduler).__name__)
            solver = solver_for(self.pipe.scheduler, eta=eta, total_steps=steps + prep.begin)
            self._samplers = {key: ParallelSampler(den, solver=solver, steps=steps, backend=self.backend,
                                                   **self.sampler_options)}
        return self._samplers[key]

    def _arguments(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name, bound as ``pipe(*args, **kwargs)`` binds them.

        Raises:
            TypeError: what the pipeline's ``__call__`` would refuse, or an argument the parallel loop does not
                support (named).
        """
        sig = inspect.signature(self.pipe.__call__)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self.pipe).__name__}.__call__: {e}") from None
        arguments = dict(bound.arguments)
        named = {n for n, p in sig.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        supported = ", ".join(sorted(self.family.arguments & named))
        for name, param in sig.parameters.items():       # the pipeline's **kwargs (deprecated callbacks)
            if param.kind is not inspect.Parameter.VAR_KEYWORD:
                continue
            extra = sorted(k for k, v in arguments.pop(name, {}).items() if not (k in _DEPRECATED_KWARGS and v is None))
            # Not a parameter of this pipeline (img2img's height, ControlNet's guidance_rescale: the pipeline does not
            # read it, and the loop must not either; it was accepted and dropped), or a deprecated callback the
            # pipeline reads from its **kwargs and the loop does not run.
            if extra:
                what = "deprecated; not run" if extra[0] in _DEPRECATED_KWARGS else \
                    f"not an argument of {type(self.pipe).__name__}.__call__"
                raise TypeError(f"{extra[0]}: {what} (not supported by the parallel pipeline); supported arguments: "
                                f"{supported}")
        # An argument given at its signature's default changes nothing the pipeline does: accepted (callback=None,
        # cross_attention_kwargs=None, callback_on_step_end_tensor_inputs=["latents"]).
        outside = set(arguments) - self.family.arguments
        unknown = sorted(n for n in outside if not _is_default(arguments[n], sig.parameters[n].default))
        if unknown:
            raise TypeError(f"{unknown[0]}: not supported by the parallel pipeline; supported arguments: {supported}")
        for name in outside:                    # each at its default
            del arguments[name]
        return arguments

    def __call__(self, *args: Any, **kwargs: Any):
        """Call the pipeline: the same positional and keyword arguments as its ``__call__``, run (like it) under
        ``torch.no_grad()``.

        Raises:
            TypeError: an argument the parallel loop does not support (named), or one the pipeline refuses.
            ValueError: as the pipeline's own checks.
        """
        kwargs = self._arguments(args, kwargs)
        with torch.no_grad():
            return self._call(kwargs)

    def _call(self, kwargs: dict):
        # The pipeline's own defaults (guidance 7.5 or 5, strength 0.8 or 0.9999, 50 or 28 steps, "pil" or "np"), so
        # no default is restated here: every supported argument the call leaves out takes the signature's value.
        for name, param in inspect.signature(self.pipe.__call__).parameters.items():
            if name in self.family.arguments and param.default not in (inspect.Parameter.empty, None):
                kwargs.setdefault(name, param.default)
        steps = kwargs["num_inference_steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"num_inference_steps: must be an integer >= 1, got {steps!r}")
        steps = kwargs["num_inference_steps"] = int(steps)      # a numpy integer as a Python one, as the pipeline
        eta = kwargs.get("eta") or 0.0
        generator = kwargs.get("generator")
        attention = kwargs.get(self.family.attention)
        if attention is not None and not isinstance(attention, dict):   # the pipeline reads it with .get("scale")
            raise TypeError(f"{self.family.attention}: expected a dict or None, got {type(attention).__name__}")
        if attention is not None and getattr(self.backend, "model", None) is not None:
            # Actors that build their own network (Ray's model=) never see the call's kwargs: refused before any work
            raise TypeError(f"{self.family.attention}: not supported with a backend whose workers build their own "
                            f"network (model=); the kwargs would not reach it")
        self._check_pipe()
        prep = self.family.prepare(self.pipe, kwargs)
        sampler = self._sampler(steps if prep.steps is None else prep.steps, eta, prep, attention)
        # Step noise drawn from the call's generator(s) as the scheduler draws it: per step, in the network's dtype.
        # Without one, from torch's global generator, as diffusers' randn_tensor draws it (not the sampler's fixed
        # seed 0, which gave every call the same step noise and ignored torch.manual_seed).
        noise = None
        if sampler.solver.stochastic:
            noise = PipelineNoise(_global_generator(prep.latents.device) if generator is None else generator,
                                  prep.latents.dtype)
            if generator is None:       # SPMD ranks must draw alike: the same global state on each
                _check_ranks_draw_alike(sampler.backend, noise.generator)
        cond = dict(prep.cond)
        if prep.uncond is not None:
            cond["uncond"] = prep.uncond
        res = sample_latents(sampler, prep.latents, generator=noise, **cond)
        self.last_stats = res.stats
        out = self.family.decode(self.pipe, res.samples, kwargs["output_type"], generator,
                                 prep.cond["encoder_hidden_states"].dtype, prep)
        self.pipe.maybe_free_model_hooks()
        if not kwargs.get("return_dict", True):
            # The pipeline's own tuple: every field in order, None included (SD's (images, nsfw) has None without a
            # safety checker, which BaseOutput.to_tuple() would drop).
            return tuple(getattr(out, f.name) for f in fields(out))
        out.paratime_stats = res.stats
        return out

    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parallelize(pipe, method: str = "picard", tol: float | None = None, backend: str | Backend = "local",
                backend_options: dict | None = None, state_dtype: torch.dtype | None = None,
                progress: bool = False, **sampler_options: Any) -> ParallelPipeline:
    """Wrap a loaded diffusers pipeline so that its denoising loop runs in parallel in time.

    Every option is checked here, before the backend starts and before the first call.

    Args:
        pipe: a pipeline of the module's list (its scheduler one of
            :data:`~paratime.integrations.diffusers.SCHEDULERS`; the others are refused with the reason,
            :data:`~paratime.integrations.diffusers.REFUSED`).
        method: ``picard`` (default), ``sequential``, ``parareal``, ``parareal_pipelined``, ``staggered`` or
            ``auto``.
        tol: the method's tolerance (0: the exact sequential result); None: the sampler's default.
        backend: ``local``, ``torch`` (under torchrun, every rank calls the pipeline alike), ``ray``, or a
            :class:`~paratime.backends.Backend`; created once and reused by every call.
        backend_options: the backend's constructor options.
        state_dtype: the trajectory's dtype; None: the sampler's default (float32 on CUDA, where the Triton
            kernels run; float64 on CPU). float32 is enough on every grid, zero-SNR and flow matching included
            (whose VE-frame state starts at ~1e7-1e8): every method steps in the solvers' next-state form
            (``tests/test_precision.py``: within 1e-5 of float64).
        progress: show paratime's progress bar.
        sampler_options: more :class:`~paratime.ParallelSampler` options (``window``, ``max_rounds``, ``kernels``,
            ...); options the pipeline sets itself (``solver``, ``steps``, ``guidance``, ``eta``, ...) are refused.
    Returns:
        a :class:`ParallelPipeline`, called like ``pipe``.
    Raises:
        ValueError: an unsupported pipeline, scheduler or scheduler option, or a bad option value (named).
        TypeError: an unknown option, one the pipeline sets itself, or an option of the wrong type (named).
    """
    if backend_options is not None and not isinstance(backend_options, dict):
        raise TypeError(f"backend_options: expected a dict or None, got {type(backend_options).__name__}")
    if tol is not None:
        sampler_options["tol"] = tol
    options = dict(method=method, state_dtype=state_dtype, progress=progress, **sampler_options)
    return ParallelPipeline(pipe, backend, backend_options or {}, options)
