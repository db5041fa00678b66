"""The one-device backend: rows are evaluated on the state's device, at most ``max_batch`` rows per network call."""

from __future__ import annotations

from .base import Backend, split_cond

__all__ = ["LocalBackend", "split_cond"]


class LocalBackend(Backend):
    """Evaluate on the state's device.

    Args:
        max_batch: largest number of rows per network call; None: derived from the model and device at the first
            call (see :mod:`paratime.backends.base`).
        buckets: row counts every network call is padded to (fixed shapes for a compiled network), or None.

    Raises:
        ValueError: ``max_batch < 1``, bad ``buckets``.
    """

    name = "local"

    def __init__(self, max_batch: int | None = None, buckets: tuple[int, ...] | None = None):
        super().__init__(max_batch, buckets)

    def evaluate(self, x, sigma, model_time, cond=None, samples=None, raw=False):
        self.calls += 1
        return self.run_chunked(x, sigma, model_time, self.rows_cond(cond, samples),
                                fn=self.denoiser.network_outputs if raw and self.denoiser is not None else None)
