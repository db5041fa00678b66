"""diffusers models: a ``UNet2DModel`` / ``UNet2DConditionModel`` with its scheduler becomes a :class:`Denoiser`
whose time grid and step maps match the scheduler's own loop; a Stable Diffusion-like pipeline samples through
:class:`~paratime.ParallelSampler`.

What maps to what:

    scheduler                         paratime solver    grid
    DDIMScheduler (eta 0)             ddim               scheduler.timesteps; last step to final_alpha_cumprod
    DDPMScheduler (fixed_small)       ddpm               scheduler.timesteps; clip_sample -> clip_x0
    DPMSolverMultistepScheduler       dpmpp_2m           scheduler.timesteps; final sigma 0 (lower_order_final)
    (dpmsolver++, order 2)

    prediction_type epsilon | v_prediction | sample  ->  prediction eps | v | x0

One difference is left as is: diffusers' DDIM steps from t to ``t - T // N`` whatever the spacing, so with
``timestep_spacing="linspace"`` (or ``trailing`` when N does not divide T) it lands off the next grid timestep;
paratime always steps to the next grid point. ``leading`` spacing, and ``trailing`` with N dividing T, match.
diffusers stays an optional extra (``pip install paratime[diffusers]``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .denoiser import Denoiser
from .schedules import DiscreteVPSchedule, TimeGrid

__all__ = ["from_diffusers", "DiffusersSchedule", "solver_for", "pipeline_sampler"]

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SOLVERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp_2m"}


@dataclass(frozen=True)
class DiffusersSchedule(DiscreteVPSchedule):
    """A discrete VP schedule whose grid is the diffusers scheduler's own ``timesteps``."""

    scheduler: Any = field(default=None, compare=False)

    def grid(self, steps: int, spacing: str | None = None) -> TimeGrid:
        if spacing is not None:
            raise ValueError("spacing: set timestep_spacing on the diffusers scheduler instead")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: must be an integer >= 1, got {steps!r}")
        sch = copy.deepcopy(self.scheduler)
        sch.set_timesteps(steps)
        ts = torch.as_tensor(np.asarray(sch.timesteps), dtype=torch.long)
        ac = torch.cat([self.alphas_cumprod[ts], torch.tensor([self.final_alpha_cumprod], dtype=torch.float64)])
        sig = ((1 - ac) / ac).sqrt()
        times = torch.cat([ts.double(), torch.zeros(1, dtype=torch.float64)])
        return TimeGrid(sig, times, ac.sqrt())


def solver_for(scheduler) -> str:
    """The paratime solver that reproduces this scheduler's step.

    Raises:
        ValueError: an unsupported scheduler or option.
    """
    name = type(scheduler).__name__
    if name not in _SOLVERS:
        raise ValueError(f"scheduler: {name} is not supported; allowed: {', '.join(_SOLVERS)}")
    cfg = scheduler.config
    if name == "DPMSolverMultistepScheduler":
        if cfg.algorithm_type != "dpmsolver++" or cfg.solver_order != 2 or cfg.use_karras_sigmas:
            raise ValueError("scheduler: DPMSolverMultistepScheduler needs algorithm_type='dpmsolver++', "
                             "solver_order=2, use_karras_sigmas=False")
    if name == "DDPMScheduler" and cfg.variance_type not in ("fixed_small", None):
        raise ValueError(f"scheduler: DDPMScheduler variance_type {cfg.variance_type!r} is not supported")
    if getattr(cfg, "thresholding", False):
        raise ValueError("scheduler: thresholding is not supported")
    return _SOLVERS[name]


def from_diffusers(unet: torch.nn.Module, scheduler, dtype: torch.dtype | None = None, **denoiser_options) -> Denoiser:
    """Wrap a diffusers UNet and its scheduler.

    Args:
        unet: ``UNet2DModel`` or ``UNet2DConditionModel`` (or any module with the same call).
        scheduler: DDIM, DDPM or DPMSolverMultistep scheduler (its config: ``alphas_cumprod``, ``prediction_type``,
            ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ``clip_sample``).
        dtype: network dtype. denoiser_options: e.g. ``guidance=7.5``.
    Returns:
        a :class:`Denoiser`; use ``solver_for(scheduler)`` as the sampler's solver.
    Raises:
        ValueError: unsupported scheduler or prediction type.
    """
    cfg = scheduler.config
    if cfg.prediction_type not in _PREDICTIONS:
        raise ValueError(f"prediction_type: {cfg.prediction_type!r} is not supported; allowed: "
                         f"{', '.join(_PREDICTIONS)}")
    solver_for(scheduler)
    ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    final = 1.0
    if type(scheduler).__name__ == "DDIMScheduler" and not cfg.set_alpha_to_one:
        final = float(ac[0])
    schedule = DiffusersSchedule(ac, steps_offset=cfg.steps_offset, final_alpha_cumprod=final, scheduler=scheduler)
    clip = float(cfg.clip_sample_range) if getattr(cfg, "clip_sample", False) else None
    shape = None
    ucfg = getattr(unet, "config", None)
    if ucfg is not None and getattr(ucfg, "sample_size", None) is not None:
        size = ucfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (ucfg.in_channels, *size)
    return Denoiser(unet, schedule, _PREDICTIONS[cfg.prediction_type], dtype=dtype, clip_x0=clip,
                    sample_shape=shape, **denoiser_options)


def pipeline_sampler(pipe, guidance: float | None = 7.5, **sampler_options):
    """A :class:`~paratime.ParallelSampler` for a Stable Diffusion-like pipeline (``unet``, ``vae``, ``scheduler``).

    Encode prompts with the pipeline (``pipe.encode_prompt``) and pass them to ``sample`` as
    ``encoder_hidden_states=`` and ``uncond={"encoder_hidden_states": negative}``; images come back decoded by
    the VAE (``latent_scale`` from ``vae.config.scaling_factor``), in [-1, 1].
    """
    from .sampler import ParallelSampler

    den = from_diffusers(pipe.unet, pipe.scheduler, guidance=guidance)
    sampler_options.setdefault("solver", solver_for(pipe.scheduler))
    return ParallelSampler(den, decoder=pipe.vae, latent_scale=pipe.vae.config.scaling_factor, **sampler_options)
