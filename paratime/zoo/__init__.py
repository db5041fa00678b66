"""Named models shipped with paratime: ``gmm`` (analytic 8-Gaussian ring), ``digits`` (a small trained U-Net) and
``policy`` (an untrained policy-sized MLP for latency benchmarks) and ``unet`` (an untrained diffusers UNet from a
config, for benchmarks)."""

from __future__ import annotations

from typing import Callable

from ..denoiser import Denoiser
from .gmm import GaussianMixture, ring_gmm

__all__ = ["MODELS", "load_model", "GaussianMixture", "ring_gmm"]


def _digits(**kw) -> Denoiser:
    from .digits import load_digits_model

    return load_digits_model(**kw)


def _policy(**kw) -> Denoiser:
    from .policy import policy_model

    return policy_model(**kw)


def _unet(**kw) -> Denoiser:
    """A small diffusers UNet2DModel built from a config (untrained, seed 0) with a DDIM scheduler: the cost profile
    of a diffusers model for benchmarks (needs ``paratime[diffusers]``)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    from ..diffusers_adapter import from_diffusers

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval().requires_grad_(False)
    return from_diffusers(unet, DDIMScheduler(timestep_spacing="trailing", clip_sample=False), **kw)


MODELS: dict[str, Callable[..., Denoiser]] = {"gmm": ring_gmm, "digits": _digits, "policy": _policy, "unet": _unet}


def load_model(name: str, **options) -> Denoiser:
    """A named model as a :class:`~paratime.denoiser.Denoiser`.

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in MODELS:
        raise ValueError(f"model: unknown {name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[name](**options)
