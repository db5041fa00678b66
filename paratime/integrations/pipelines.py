"""One-line parallel diffusers pipelines: ``ppipe = paratime.parallelize(pipe, method="picard", tol=0.1)``, then call
``ppipe`` exactly like ``pipe``.

The pipeline's own pieces run as in its ``__call__``: ``check_inputs``, ``encode_prompt``, ``set_timesteps``,
``prepare_latents`` and the VAE decoding / post-processing; only the denoising loop is replaced by a
:class:`~paratime.ParallelSampler` over :func:`~paratime.integrations.diffusers.from_diffusers` (the scheduler's own
grid and step map). Supported: ``StableDiffusionPipeline`` (SD 1.x / 2.x), ``StableDiffusionXLPipeline`` and
``StableDiffusion3Pipeline`` (flow matching). Arguments that change the loop itself (callbacks, IP adapters, custom
``timesteps`` / ``sigmas``, ``denoising_end``, skip-layer guidance, LCM's guidance embedding) raise ``TypeError``
naming them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends import Backend, make_backend
from ..sampler import ParallelSampler, SampleStats
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


def _prepare_sd(pipe, kw: dict) -> _Prepared:
    unet = pipe.unet
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    height = kw.get("height") or size[0] * pipe.vae_scale_factor
    width = kw.get("width") or size[1] * pipe.vae_scale_factor
    prompt, n = kw.get("prompt"), kw.get("num_images_per_prompt", 1)
    pipe.check_inputs(prompt, height, width, None, negative_prompt=kw.get("negative_prompt"),
                      prompt_embeds=kw.get("prompt_embeds"), negative_prompt_embeds=kw.get("negative_prompt_embeds"))
    g = kw.get("guidance_scale", 7.5)
    cfg = g > 1
    device = pipe._execution_device
    emb, neg = pipe.encode_prompt(prompt, device, n, cfg, kw.get("negative_prompt"),
                                  prompt_embeds=kw.get("prompt_embeds"),
                                  negative_prompt_embeds=kw.get("negative_prompt_embeds"),
                                  clip_skip=kw.get("clip_skip"))
    latents = _latents(pipe, kw.get("num_inference_steps", 50), _batch(prompt, kw.get("prompt_embeds")) * n,
                       unet.config.in_channels, height, width, emb.dtype, device, kw.get("generator"),
                       kw.get("latents"))
    return _Prepared(latents, {"encoder_hidden_states": emb}, {"encoder_hidden_states": neg} if cfg else None, g,
                     kw.get("guidance_rescale", 0.0))


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
        negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"), clip_skip=kw.get("clip_skip"))
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
        clip_skip=kw.get("clip_skip"), num_images_per_prompt=n, max_sequence_length=seq)
    tr = pipe.transformer.config
    latents = pipe.prepare_latents(_batch(prompt, kw.get("prompt_embeds")) * n, tr.in_channels, height, width,
                                   emb.dtype, device, kw.get("generator"), kw.get("latents"))
    mu, sc = kw.get("mu"), pipe.scheduler.config
    if sc.get("use_dynamic_shifting", None) and mu is None:     # the pipeline's resolution-dependent shift
        h, w = latents.shape[-2:]
        mu = calculate_shift((h // tr.patch_size) * (w // tr.patch_size), sc.get("base_image_seq_len", 256),
                             sc.get("max_image_seq_len", 4096), sc.get("base_shift", 0.5), sc.get("max_shift", 1.16))
    timestep_kwargs = {} if mu is None else {"mu": mu}
    pipe.scheduler.set_timesteps(kw.get("num_inference_steps", 28), device=device, **timestep_kwargs)
    cond = {"encoder_hidden_states": emb, "pooled_projections": pooled}
    uncond = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled}
    return _Prepared(latents, cond, uncond if cfg else None, g, 0.0, timestep_kwargs)


def _decode_sd(pipe, latents, output_type, generator, dtype):
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


def _decode_sdxl(pipe, latents, output_type, generator, dtype):
    from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

    if output_type == "latent":
        return StableDiffusionXLPipelineOutput(images=latents)
    upcast = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
    if upcast:
        pipe.upcast_vae()
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


def _decode_sd3(pipe, latents, output_type, generator, dtype):
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
    extra: frozenset                     # __call__ arguments beyond _COMMON


_FAMILIES = {
    "StableDiffusionPipeline": _Family(_prepare_sd, _decode_sd, "unet", frozenset({"guidance_rescale"})),
    "StableDiffusionXLPipeline": _Family(_prepare_sdxl, _decode_sdxl, "unet", frozenset({
        "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "guidance_rescale",
        "original_size", "target_size", "crops_coords_top_left", "negative_original_size", "negative_target_size",
        "negative_crops_coords_top_left"})),
    "StableDiffusion3Pipeline": _Family(_prepare_sd3, _decode_sd3, "transformer", frozenset({
        "prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3", "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds", "max_sequence_length", "mu"})),
}


def _family_of(pipe) -> _Family:
    for cls in type(pipe).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__]
    raise ValueError(f"pipe: {type(pipe).__name__} is not supported; supported: {', '.join(_FAMILIES)}")


class ParallelPipeline:
    """A diffusers pipeline whose denoising loop runs through paratime; call it exactly like the pipeline.

    The call returns what the pipeline returns (its output dataclass, or a tuple with ``return_dict=False``), with
    paratime's :class:`~paratime.SampleStats` as ``output.paratime_stats`` and ``ppipe.last_stats``. Build it with
    :func:`parallelize`; ``close()`` (or ``with``) releases the backend.
    """

    def __init__(self, pipe, backend: Backend, sampler_options: dict):
        self.pipe = pipe
        self.family = _family_of(pipe)
        network = getattr(pipe, self.family.network)
        if network.config.get("time_cond_proj_dim") is not None:
            raise ValueError("pipe: a UNet with time_cond_proj_dim (LCM's guidance embedding) is not supported")
        self.network = network if self.family.network == "unet" else Keyword(network)
        solver_for(pipe.scheduler)                       # an unsupported scheduler fails here, at wrap time
        self.backend = backend
        self.sampler_options = sampler_options
        self.last_stats: SampleStats | None = None
        self._samplers: dict = {}

    def _sampler(self, steps: int, eta: float, prep: _Prepared) -> ParallelSampler:
        key = (steps, eta, prep.uncond is not None and prep.guidance, prep.guidance_rescale,
               tuple(sorted(prep.timestep_kwargs.items())), id(self.pipe.scheduler))
        if key not in self._samplers:
            guided = prep.uncond is not None
            den = from_diffusers(self.network, self.pipe.scheduler, sample_shape=None,
                                 guidance=prep.guidance if guided else None, guidance_rescale=prep.guidance_rescale)
            den = with_timestep_kwargs(den, **prep.timestep_kwargs)
            # One sampler is kept (the last call's): a new steps / guidance / mu rebuilds it on the same backend.
            log.debug("parallelize: sampler for %d steps of %s", steps, type(self.pipe.scheduler).__name__)
            self._samplers = {key: ParallelSampler(den, solver=solver_for(self.pipe.scheduler, eta=eta), steps=steps,
                                                   backend=self.backend, **self.sampler_options)}
        return self._samplers[key]

    def __call__(self, **kwargs: Any):
        """Call the pipeline (keyword arguments as for the pipeline's ``__call__``).

        Raises:
            TypeError: an argument the parallel loop does not support (named).
            ValueError: as the pipeline's own checks, and a list of generators with a stochastic scheduler.
        """
        unknown = sorted(set(kwargs) - _COMMON - self.family.extra)
        if unknown:
            raise TypeError(f"{unknown[0]}: not supported by the parallel pipeline; supported arguments: "
                            f"{', '.join(sorted(_COMMON | self.family.extra))}")
        steps = kwargs.setdefault("num_inference_steps", 50 if self.family.network == "unet" else 28)
        eta = kwargs.get("eta") or 0.0
        generator = kwargs.get("generator")
        prep = self.family.prepare(self.pipe, kwargs)
        sampler = self._sampler(steps, eta, prep)
        if isinstance(generator, list):
            if sampler.solver.stochastic:
                raise ValueError("generator: a stochastic scheduler draws its step noise from one torch.Generator, "
                                 "not a list")
            generator = None
        cond = dict(prep.cond)
        if prep.uncond is not None:
            cond["uncond"] = prep.uncond
        res = sample_latents(sampler, prep.latents, generator=generator if sampler.solver.stochastic else None,
                             **cond)
        self.last_stats = res.stats
        out = self.family.decode(self.pipe, res.samples, kwargs.get("output_type", "pil"), generator,
                                 prep.cond["encoder_hidden_states"].dtype)
        self.pipe.maybe_free_model_hooks()
        if not kwargs.get("return_dict", True):
            return out.to_tuple()
        out.paratime_stats = res.stats
        return out

    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parallelize(pipe, method: str = "picard", tol: float | None = None, backend: str | Backend = "local",
                backend_options: dict | None = None, state_dtype: torch.dtype = torch.float64,
                progress: bool = False, **sampler_options: Any) -> ParallelPipeline:
    """Wrap a loaded diffusers pipeline so that its denoising loop runs in parallel in time.

    Args:
        pipe: ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or ``StableDiffusion3Pipeline`` (its
            scheduler one of :data:`~paratime.integrations.diffusers.SCHEDULERS`).
        method: ``picard`` (default), ``sequential``, ``parareal``, ``parareal_pipelined``.
        tol: the method's tolerance (0: the exact sequential result); None: the sampler's default.
        backend: ``local``, ``torch`` (under torchrun, every rank calls the pipeline alike), ``ray``, or a
            :class:`~paratime.backends.Backend`; created once and reused by every call.
        backend_options: the backend's constructor options.
        state_dtype: the trajectory's dtype (float64 by default: zero-SNR and flow-matching grids start at a
            VE-frame state of size ~1e7-1e8, see :mod:`paratime.integrations.diffusers`).
        progress: show paratime's progress bar.
        sampler_options: more :class:`~paratime.ParallelSampler` options (``window``, ``max_rounds``, ...).
    Returns:
        a :class:`ParallelPipeline`, called like ``pipe``.
    Raises:
        ValueError: an unsupported pipeline, scheduler or scheduler option (named).
    """
    if tol is not None:
        sampler_options["tol"] = tol
    options = dict(method=method, state_dtype=state_dtype, progress=progress, **sampler_options)
    return ParallelPipeline(pipe, make_backend(backend, **(backend_options or {})), options)
