"""Noise that depends on (seed, sample, stream, step) only, never on the batch split, window, backend or device.

Each sample ``i`` (its global index, ``first_sample + b``) owns one CPU generator per stream, seeded by
``numpy.random.SeedSequence([seed, i, stream])`` (EDM's ``StackedRandomGenerator`` idea, without seed collisions
between neighbouring seeds). Streams: 0 is the initial noise ``x_T``, 1 the per-step SDE noise ``z[step]``, 2 the
Langevin corrector noise, 3 Hutchinson's divergence probes and 4 the likelihood's dequantisation noise. Noise is
drawn in float32 on the CPU and then moved, so CPU and GPU runs see equal noise.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["draw_noise", "initial_noise", "step_noise", "INITIAL", "STEP", "CORRECTOR", "PROBE", "DEQUANT"]

INITIAL, STEP, CORRECTOR, PROBE, DEQUANT = 0, 1, 2, 3, 4


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
    for name, value in (("seed", seed), ("first_sample", first_sample)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
    per = (1 if count is None else count, *shape)
    out = torch.empty((batch, *per), dtype=torch.float32)
    for b in range(batch):
        g = torch.Generator().manual_seed(_sample_seed(seed, first_sample + b, stream))
        out[b] = torch.randn(per, generator=g, dtype=torch.float32)
    out = out[:, 0] if count is None else out.transpose(0, 1)
    return out.to(device=device, dtype=dtype).contiguous()


def initial_noise(shape, noise, seed: int, generator, first_sample: int, sample_shape, dtype, device,
                  check=None) -> torch.Tensor:
    """The standard-normal initial noise ``(B, *sample_shape)`` of a ``sample()`` call, checked.

    Args:
        shape: ``(B, *sample_shape)``, ``B`` (with a known ``sample_shape``) or None (then ``noise`` is required).
        noise: the caller's own noise, or None to draw it per sample from ``seed`` (or from ``generator``).
        sample_shape: the model's sample shape, or None if it accepts any.
        check: called with the checked ``(B, *sample_shape)`` before any noise is drawn (the sampler's memory bound).
    Returns:
        ``(B, *sample_shape)`` in ``dtype`` on ``device`` (not yet scaled by the prior std).
    Raises:
        ValueError, TypeError: a bad ``shape``, ``noise`` or ``generator``, naming it.
    """
    if noise is None:
        if shape is None:
            raise ValueError("shape: give a shape or noise")
        if isinstance(shape, int) and not isinstance(shape, bool):
            if sample_shape is None:
                raise ValueError("shape: the model has no known sample shape; give (B, *sample_shape)")
            shape = (shape, *sample_shape)
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"shape: expected an int or a tuple (B, *sample_shape), got {type(shape).__name__}")
        shape = tuple(shape)
        if len(shape) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
            raise ValueError(f"shape: expected (B, *sample_shape) of positive integers, got {shape}")
    else:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError("noise: expected a floating-point tensor")
        if noise.ndim < 2:
            raise ValueError(f"noise: expected (B, *sample_shape), got shape {tuple(noise.shape)}")
        if shape is not None and not isinstance(shape, int) and tuple(shape) != tuple(noise.shape):
            raise ValueError(f"shape: {tuple(shape)} differs from noise.shape {tuple(noise.shape)}")
        if noise.device.type != torch.device(device).type:
            raise ValueError(f"noise: on {noise.device} but the sampler runs on {device}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise: contains NaN or inf")
        shape = tuple(noise.shape)
    if sample_shape is not None and tuple(shape[1:]) != tuple(sample_shape):
        raise ValueError(f"shape: the model expects samples of shape {tuple(sample_shape)}, got {shape[1:]}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if check is not None:
        check(shape)
    if noise is None:
        if generator is not None:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)
        else:
            noise = draw_noise(seed, shape[0], shape[1:], None, INITIAL, first_sample, dtype=dtype, device=device)
    return noise.to(dtype=dtype, device=device)


def step_noise(solver, steps: int, shape: tuple[int, ...], seed: int, generator, first_sample: int, dtype, device):
    """The per-step noise a solver consumes, drawn once up front (so Picard's fixed point is the sequential sample).

    Returns:
        None for a deterministic solver; ``(N, B, *sample_shape)``; or, for a Langevin-corrected solver, the tuple
        (predictor noise or None, ``(N, B, corrector_steps, *sample_shape)``).
    """
    B, sample = shape[0], tuple(shape[1:])

    def draw(stream, per_step=()):
        if generator is not None:
            n = torch.randn((steps, B, *per_step, *sample), generator=generator, dtype=torch.float32,
                            device=generator.device)
        else:
            n = draw_noise(seed, B, (*per_step, *sample), steps, stream, first_sample, dtype=dtype, device=device)
        return n.to(dtype=dtype, device=device)

    corrector_steps = getattr(solver, "corrector_steps", None)
    if corrector_steps is not None:          # LangevinCorrected: (predictor noise, corrector noise)
        return (draw(STEP) if solver.base.stochastic else None, draw(CORRECTOR, (corrector_steps,)))
    return draw(STEP) if solver.stochastic else None
