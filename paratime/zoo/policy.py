"""A diffusion-policy-sized network for latency benchmarks: an MLP over a flattened action chunk.

It is *not* trained: weights are drawn from a fixed seed (small output layer, so the probability-flow ODE is smooth)
and it stands in for the cost profile of a policy head (tens of microseconds per call), where each sequential
network call is latency-bound and batching a Picard window is almost free.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..denoiser import Denoiser
from ..schedules import DiscreteVPSchedule

__all__ = ["PolicyMLP", "policy_model"]


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


def policy_model(dim: int = 32) -> Denoiser:
    """The named model ``policy``: untrained :class:`PolicyMLP` under DDPM linear betas (1000 steps)."""
    net = PolicyMLP(dim).eval().requires_grad_(False)
    return Denoiser(net, DiscreteVPSchedule.from_betas("linear"), "eps", sample_shape=(dim,))
