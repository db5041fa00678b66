"""Noise that depends on (seed, sample, stream, step) only, never on the batch split, window, backend or device.

Each sample ``i`` (its global index, ``first_sample + b``) owns one CPU generator per stream, seeded by
``numpy.random.SeedSequence([seed, i, stream])`` (EDM's ``StackedRandomGenerator`` idea, without seed collisions
between neighbouring seeds). Streams: 0 is the initial noise ``x_T``, 1 the per-step SDE noise ``z[step]``, 2 the
Langevin corrector noise. Noise is drawn in float32 on the CPU and then moved, so CPU and GPU runs see equal noise.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["draw_noise", "INITIAL", "STEP", "CORRECTOR"]

INITIAL, STEP, CORRECTOR = 0, 1, 2


def _sample_seed(seed: int, sample: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, sample, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def draw_noise(seed: int, batch: int, shape: tuple[int, ...], count: int | None, stream: int,
               first_sample: int = 0, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Standard-normal noise for samples ``first_sample .. first_sample + batch - 1``.

    Returns:
        ``(batch, *shape)`` when ``count`` is None (one draw per sample), else ``(count, batch, *shape)``.

    Raises:
        ValueError: a negative ``seed`` or ``first_sample``.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
    if first_sample < 0:
        raise ValueError(f"first_sample: must be >= 0, got {first_sample}")
    per = (1 if count is None else count, *shape)
    out = torch.empty((batch, *per), dtype=torch.float32)
    for b in range(batch):
        g = torch.Generator().manual_seed(_sample_seed(seed, first_sample + b, stream))
        out[b] = torch.randn(per, generator=g, dtype=torch.float32)
    out = out[:, 0] if count is None else out.transpose(0, 1)
    return out.to(device=device, dtype=dtype).contiguous()
