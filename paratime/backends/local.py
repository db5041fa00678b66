"""The one-device backend: rows are evaluated in one batched call (optionally in chunks of ``max_batch``)."""

from __future__ import annotations

import torch

from .base import Backend, map_cond

__all__ = ["LocalBackend"]


def split_cond(cond: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every per-row tensor in ``cond``; other values pass through."""
    return map_cond(cond, lambda v: v[start:stop])


class LocalBackend(Backend):
    """Evaluate on the state's device.

    Args:
        max_batch: largest number of rows per network call; None: all rows at once.

    Raises:
        ValueError: ``max_batch < 1``.
    """

    name = "local"

    def __init__(self, max_batch: int | None = None):
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch: must be an integer >= 1 or None, got {max_batch!r}")
        self.max_batch = max_batch

    def evaluate(self, x, sigma, model_time, cond):
        M = x.shape[0]
        step = self.max_batch or max(M, 1)
        outs = [self.denoiser(x[s:s + step], sigma[s:s + step], model_time[s:s + step], **split_cond(cond, s, s + step))
                for s in range(0, M, step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
