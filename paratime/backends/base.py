"""The backend protocol: where the denoiser runs.

Parallel methods hand the backend a batch of rows (states, sigmas, model times, per-row conditioning) and get
``D`` back; the backend decides which devices or processes evaluate which rows. Backends own resources (process
groups, actors), so they are context managers; ``close()`` is idempotent.
"""

from __future__ import annotations

from typing import Any

import torch

from ..denoiser import Denoiser

__all__ = ["Backend", "map_cond"]


def map_cond(cond: dict, fn) -> dict:
    """Apply ``fn`` to every per-row tensor of ``cond`` (recursing into nested dicts such as ``uncond``)."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, dict):
            out[k] = map_cond(v, fn)
        elif isinstance(v, torch.Tensor) and v.ndim > 0:
            out[k] = fn(v)
        else:
            out[k] = v
    return out


class Backend:
    """Base class. Subclasses implement :meth:`evaluate` and, if they hold resources, :meth:`close`."""

    name: str = ""
    #: workers that evaluate rows in parallel (ranks, actors, devices)
    workers: int = 1

    def bind(self, denoiser: Denoiser) -> None:
        """Attach the denoiser (called once by the sampler before the first evaluation)."""
        self.denoiser = denoiser

    def evaluate(self, x: torch.Tensor, sigma: torch.Tensor, model_time: torch.Tensor,
                 cond: dict[str, Any]) -> torch.Tensor:
        """``D(x, sigma, model_time, **cond)`` for ``(M, *shape)`` rows; the result is on ``x``'s device."""
        raise NotImplementedError

    @property
    def is_primary(self) -> bool:
        """Whether this process reports results (rank 0 under SPMD, always true otherwise)."""
        return True

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent in communication, if the backend measures it."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
