"""Memory bounds: how many rows one network call may take, and whether a request fits the device at all.

- :func:`default_max_batch`: rows per network call when the user states none. On CUDA it is derived from the
  model: the first call evaluates :data:`PROBE_ROWS` rows while the allocator's peak is recorded, and
  ``max_batch = MEMORY_FRACTION * free memory / (peak bytes per row)``, capped at :data:`CUDA_MAX_BATCH`. On CPU (and
  other devices) it is the stated constant :data:`CPU_MAX_BATCH`.
- :func:`check_memory`: refuses, before anything is allocated, a request whose trajectory, pre-drawn noise and
  window buffers cannot fit the device's free memory (:class:`DeviceMemoryError`, a ``ValueError``).

What a Picard round holds at its worst moment, in ``(W, B, *shape)`` window buffers besides the trajectory, the
pre-drawn noise, the constant-D path's noise table and a history solver's ``(N + 1, B, *shape)`` buffer of D
(:func:`window_buffers`): measured with ``benchmarks/live_bytes.py`` (every live tensor's bytes, peak over the run) on a
trivial network at 4x16x16 and 4x64x64 latents, N = 1000, W = 500, B = 1, float32, over enough rounds to fill each
update's history, then rounded up by one buffer:

    =====================  ======  ======  ========
    solver kind             picard  secant  anderson
    =====================  ======  ======  ========
    one call (DDIM, DDPM)    12      15       23
    two calls (Heun, ...)    14      17       23
    history (DPM++, PLMS)    20      23       27
    =====================  ======  ======  ========

(the window rows, their VE-frame copies, D or the raw outputs, the increments, the new and old values, the
residuals' temporaries, and the update's history: secant one past evaluation and increment per point, Anderson
three past values and residuals plus its ``(m, W, B, D)`` differences). ``tests/test_memory_bound.py`` holds the
table to the measurement at Stable Diffusion size.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["DeviceMemoryError", "check_memory", "default_max_batch", "max_batch_for", "measure_rows",
           "request_bytes", "available_bytes", "noise_draws", "window_buffers", "solver_kind", "PICARD_BUFFERS",
           "PROBE_ROWS", "CPU_MAX_BATCH", "CUDA_MAX_BATCH", "MEMORY_FRACTION"]

#: rows of the first (measured) chunk when max_batch is derived
PROBE_ROWS = 8
#: rows per network call on CPU when the user states none
CPU_MAX_BATCH = 4096
#: upper bound of the derived max_batch on CUDA (tiny models: keeps one call's index arithmetic and launch sane)
CUDA_MAX_BATCH = 16384
#: share of the free device memory the activations of one network call may take
MEMORY_FRACTION = 0.5
#: window-sized working buffers of a method without a window of its own (sequential, Parareal: W = 1)
WORK_BUFFERS = 4
#: Picard's window buffers at a round's peak, by solver kind and update (see the module docstring)
PICARD_BUFFERS = {"one_call": {"picard": 12, "secant": 15, "anderson": 23},
                  "two_calls": {"picard": 14, "secant": 17, "anderson": 23},
                  "history": {"picard": 20, "secant": 23, "anderson": 27}}


def solver_kind(solver) -> str:
    """``history`` (the solver reads D at earlier points), ``two_calls`` (a second network call inside a step:
    Heun, a Langevin corrector) or ``one_call``: the key of :data:`PICARD_BUFFERS`."""
    if solver.uses_history:
        return "history"
    return "two_calls" if solver.evals_per_step > 1 else "one_call"


def window_buffers(update: str, solver) -> int:
    """``(W, B, *shape)`` buffers a Picard round with ``update`` and ``solver`` holds at its peak.

    Raises:
        ValueError: an unknown ``update``.
    """
    table = PICARD_BUFFERS[solver_kind(solver)]
    if update not in table:
        raise ValueError(f"update: unknown {update!r}; allowed: {', '.join(table)}")
    return table[update]


class DeviceMemoryError(ValueError):
    """The request cannot fit the device's memory; the message gives the sizes and what to reduce."""


def max_batch_for(free_bytes: int, bytes_per_row: float, fraction: float = MEMORY_FRACTION,
                  cap: int = CUDA_MAX_BATCH) -> int:
    """``floor(fraction * free_bytes / bytes_per_row)`` rows, at least 1 and at most ``cap``.

    Raises:
        ValueError: a non-positive ``bytes_per_row`` or ``fraction``.
    """
    if not bytes_per_row > 0:
        raise ValueError(f"bytes_per_row: must be > 0, got {bytes_per_row!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: must lie in (0, 1], got {fraction!r}")
    return int(max(1, min(cap, math.floor(fraction * max(free_bytes, 0) / bytes_per_row))))


def measure_rows(fn, rows: int, device: torch.device):
    """Run ``fn()`` (a network call on ``rows`` rows) and measure its peak memory per row on CUDA.

    Returns:
        ``(fn(), bytes_per_row)``; ``bytes_per_row`` is None off CUDA. The allocator's counters are host-side:
        no device synchronisation.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return fn(), None
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    peak = torch.cuda.max_memory_allocated(device)
    return out, max(peak - base, 1) / max(rows, 1)


def default_max_batch(device: torch.device | str, bytes_per_row: float | None = None) -> int:
    """Rows per network call when the user states none: from the measured ``bytes_per_row`` and the free memory
    on CUDA, :data:`CPU_MAX_BATCH` elsewhere (or when nothing was measured)."""
    device = torch.device(device)
    if device.type == "cuda" and bytes_per_row is not None:
        free, _ = torch.cuda.mem_get_info(device)
        return max_batch_for(free, bytes_per_row)
    return CPU_MAX_BATCH


def noise_draws(solver) -> int:
    """How many ``(N, B, *shape)`` noise tensors a solver pre-draws: 1 for an SDE step, plus ``corrector_steps``
    with a Langevin corrector, 0 for an ODE solver."""
    base = getattr(solver, "base", None)
    if base is not None and hasattr(solver, "corrector_steps"):       # LangevinCorrected
        return int(base.stochastic) + solver.corrector_steps
    return int(bool(solver.stochastic))


def available_bytes(device: torch.device | str) -> int:
    """Free memory on ``device``: CUDA's free memory, or the host's available physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):   # not POSIX: no bound known
        return 1 << 62


def request_bytes(shape: tuple[int, ...], steps: int, state_dtype: torch.dtype, noise_draws: int = 0,
                  window: int | None = None, buffers: int = WORK_BUFFERS, point_buffers: int = 0) -> int:
    """Bytes a sampling request holds on the state device: the trajectory ``(N + 1, B, *shape)``, ``noise_draws``
    tabulated noise tensors of ``(N, B, *shape)`` (a caller's generator; seeded noise is drawn per round, a window
    buffer per stream), ``point_buffers`` more ``(N + 1, B, *shape)`` tensors (a history solver's D buffer) and
    ``buffers`` window buffers of ``(W, B, *shape)`` (W = ``window``, default N; ``buffers``: :func:`window_buffers`
    for Picard)."""
    per_point = math.prod(shape) * torch.empty((), dtype=state_dtype).element_size()   # B * prod(sample shape)
    W = steps if window is None else min(window, steps)
    return per_point * ((1 + point_buffers) * (steps + 1) + noise_draws * steps + buffers * W)


def check_memory(shape: tuple[int, ...], steps: int, state_dtype: torch.dtype, device: torch.device | str,
                 noise_draws: int = 0, window: int | None = None, available: int | None = None,
                 buffers: int = WORK_BUFFERS, point_buffers: int = 0) -> int:
    """Refuse a request whose trajectory + noise + window buffers cannot fit ``device`` (before allocating them).

    Args:
        shape: ``(B, *sample_shape)``. steps: N. state_dtype: the trajectory's dtype.
        device: the state device. noise_draws: pre-drawn ``(N, B, *shape)`` noise tensors (1 for an SDE solver,
            + corrector steps with a Langevin corrector). window: Picard's window (default N).
        available: free bytes to compare with (default: measured on ``device``).
        buffers: window buffers held at a round's peak (:func:`window_buffers` for Picard).
        point_buffers: ``(N + 1, B, *shape)`` tensors besides the trajectory.
    Returns:
        The bytes the request needs.
    Raises:
        DeviceMemoryError: it needs more than is available (the message names the sizes and what to reduce).
    """
    need = request_bytes(shape, steps, state_dtype, noise_draws, window, buffers, point_buffers)
    free = available_bytes(device) if available is None else int(available)
    if need > free:
        raise DeviceMemoryError(
            f"shape, steps: {tuple(shape)} over {steps} steps needs {need / 2**30:.2f} GiB on {torch.device(device)} "
            f"(trajectory (N+1)xB and {point_buffers} more, {noise_draws} noise tensor(s) NxB, {buffers} window "
            f"buffers WxB, in {state_dtype}) but only {free / 2**30:.2f} GiB is free; reduce the batch (shape[0]), "
            "steps or window, or split the batch across sample() calls with first_sample=")
    return need
