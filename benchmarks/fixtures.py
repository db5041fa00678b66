"""Benchmark fixtures (not shipped models): cost profiles of real workloads, registered as named models when
:mod:`paratime.bench` is imported.

- ``mlp``: a diffusion-policy-sized network for latency benchmarks, an MLP over a flattened action chunk.

  It is *not* trained: weights are drawn from a fixed seed (small output layer, so the probability-flow ODE is smooth)
and it stands in for the cost profile of a policy head (tens of microseconds per call), where each sequential
network call is latency-bound and batching a Picard window is almost free.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from paratime.denoiser import Denoiser
from paratime.models import MODELS, register_model
from paratime.schedules import DiscreteVPSchedule

__all__ = ["PolicyMLP", "mlp_model", "unet_model"]


class PolicyMLP(nn.Module):
    """eps-network ``(M, horizon * action_dim), t -> (M, horizon * action_dim)``."""

    def __init__(self, dim: int = 32, hidden: int = 256, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(dim + 16, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)
        with torch.no_grad():
            for lin in (self.inp, self.mid, self.out):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features**0.5)
                lin.bias.zero_()
            self.out.weight.mul_(0.1)
        self.register_buffer("freqs", torch.exp(-torch.arange(8) * 1.0))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] / 1000 * self.freqs[None] * 100
        h = torch.cat([x, arg.sin(), arg.cos()], 1)
        h = torch.nn.functional.silu(self.inp(h))
        h = torch.nn.functional.silu(self.mid(h))
        return x * 0.5 + self.out(h)


def mlp_model(dim: int = 32) -> Denoiser:
    """The benchmark model ``mlp``: untrained :class:`PolicyMLP` under DDPM linear betas (1000 steps)."""
    net = PolicyMLP(dim).eval().requires_grad_(False)
    return Denoiser(net, DiscreteVPSchedule.from_betas("linear"), "eps", sample_shape=(dim,))


def unet_model(**kw) -> Denoiser:
    """The benchmark model ``unet``: a small diffusers UNet2DModel built from a config (untrained, seed 0) with a DDIM
    scheduler, the cost profile of a diffusers model (needs ``paratime[diffusers]``)."""
    from diffusers import DDIMScheduler, UNet2DModel

    from paratime.integrations.diffusers import from_diffusers

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval().requires_grad_(False)
    return from_diffusers(unet, DDIMScheduler(timestep_spacing="leading", steps_offset=1, clip_sample=False),
                          **kw)  # leading: DDIM's t -> t - T//N is the next timestep for every N


for _name, _factory in (("mlp", mlp_model), ("unet", unet_model)):
    if _name not in MODELS:
        register_model(_name, _factory)
