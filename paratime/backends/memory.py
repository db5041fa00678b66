"""Memory bounds: how many rows one network call may take, and whether a request fits the device at all.

- :func:`default_max_batch`: rows per network call when the user states none. On CUDA it is derived from the
  model: the first call evaluates :data:`PROBE_ROWS` rows while the allocator's peak is recorded, and
  ``max_batch = MEMORY_FRACTION * free memory / (peak bytes per row)``, capped at :data:`CUDA_MAX_BATCH`. On CPU (and
  other devices) it is the stated constant :data:`CPU_MAX_BATCH`.
- :func:`check_memory`: refuses, before anything is allocated, a request whose trajectory, pre-drawn noise and
  window buffers cannot fit the device's free memory (:class:`DeviceMemoryError`, a ``ValueError``). Methods that
  keep no trajectory (sequential, Parareal, staggered) are counted by what they keep and their largest call's rows
  instead (:func:`method_footprint`), plus a stochastic coarse jump's noise chunk (:func:`jump_bytes`).

What a Picard round holds at its worst moment, in ``(W, B, *shape)`` window buffers besides the trajectory, the
pre-drawn noise, the constant-D path's noise table and a history solver's ``(N + 1, B, *shape)`` buffer of D
(:func:`window_buffers`): measured with ``benchmarks/live_bytes.py`` (every live tensor's bytes, peak over the run) on a
trivial network at 4x16x16 and 4x64x64 latents, N = 1000, W = 500, B = 1, float32, over enough rounds to fill each
update's history, then rounded up by one buffer:

    =====================  ======  ======  ========
    solver kind             picard  secant  anderson
    =====================  ======  ======  ========
    one call (DDIM, DDPM)    14      15       23
    two calls (Heun, ...)    16      17       23
    history (DPM++, PLMS)    22      23       29
    =====================  ======  ======  ========

(the window rows, their VE-frame copies, D or the raw outputs, the increments, the new and old values, the
residuals' temporaries, and the update's history: secant one past evaluation and increment per point, Anderson
three past values and residuals plus its ``(m, W, B, D)`` differences; under ``picard`` and ``anderson`` the
amplification guard keeps each point's past evaluation and increment too, two buffers). ``tests/test_memory_bound.py``
holds the table to the measurement at Stable Diffusion size.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

__all__ = ["DeviceMemoryError", "check_memory", "default_max_batch", "max_batch_for", "measure_rows",
           "guidance_buffers", "request_bytes", "Footprint", "method_footprint", "jump_bytes", "table_draw_bytes",
           "available_bytes", "noise_draws", "window_buffers", "solver_kind", "PICARD_BUFFERS",
           "PROBE_ROWS", "CPU_MAX_BATCH", "CUDA_MAX_BATCH", "MEMORY_FRACTION"]

#: rows of the first (measured) chunk when max_batch is derived
PROBE_ROWS = 8
#: rows per network call on CPU when the user states none
CPU_MAX_BATCH = 4096
#: upper bound of the derived max_batch on CUDA (tiny models: keeps one call's index arithmetic and launch sane)
CUDA_MAX_BATCH = 16384
#: share of the free device memory the activations of one network call may take
MEMORY_FRACTION = 0.5
#: window buffers :func:`request_bytes` counts when the caller states none (the methods state theirs: config.py)
WORK_BUFFERS = 4
#: Picard's window buffers at a round's peak, by solver kind and update (see the module docstring)
PICARD_BUFFERS = {"one_call": {"picard": 14, "secant": 15, "anderson": 23},
                  "two_calls": {"picard": 16, "secant": 17, "anderson": 23},
                  "history": {"picard": 22, "secant": 23, "anderson": 29}}


def guidance_buffers(solver) -> int:
    """Window buffers classifier-free guidance adds at a round's peak: each network call of a step runs twice the
    rows (the doubled input and output), so two per call (measured: DDIM 1.97, Heun 3.85 beyond the unguided
    peak; tests/test_memory_bound.py)."""
    return 2 * solver.evals_per_step


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
                  window: int | None = None, buffers: int = WORK_BUFFERS, point_buffers: int = 0,
                  held: int | None = None, extra_bytes: int = 0) -> int:
    """Bytes a sampling request holds on the state device: the trajectory ``(N + 1, B, *shape)``, ``noise_draws``
    tabulated noise tensors of ``(N, B, *shape)`` (a caller's generator; seeded noise is drawn per round, a window
    buffer per stream), ``point_buffers`` more ``(N + 1, B, *shape)`` tensors (a history solver's D buffer) and
    ``buffers`` window buffers of ``(W, B, *shape)`` (W = ``window``, default N; ``buffers``: :func:`window_buffers`
    for Picard).

    A method without a trajectory gives ``held``, the ``(B, *shape)`` tensors it keeps for the run, in place of the
    trajectory and ``point_buffers`` (:func:`method_footprint`), its largest call's rows as ``window`` (not capped
    at N), and ``extra_bytes`` (its coarse jumps' noise chunks: :func:`jump_bytes`)."""
    per_point = math.prod(shape) * torch.empty((), dtype=state_dtype).element_size()   # B * prod(sample shape)
    if held is None:
        held = (1 + point_buffers) * (steps + 1)
        W = steps if window is None else min(window, steps)
    else:
        W = steps if window is None else window
    return per_point * (held + noise_draws * steps + buffers * W) + int(extra_bytes)


class Footprint(NamedTuple):
    """What a method without a trajectory holds, in ``(B, *shape)`` tensors (:func:`method_footprint`)."""

    held: int          # kept for the whole run
    rows: int          # rows of its largest network call (each with a Picard point's working buffers)
    jump_rows: int     # rows of its largest coarse jump (0: none), and the most steps one jump spans
    jump_span: int


def method_footprint(method: str, steps: int, solver, cores: int, slices: int | None) -> Footprint:
    """The :class:`Footprint` of a method without a trajectory, measured with ``benchmarks/live_bytes.py``
    (``tests/test_memory_bound.py``):

    - ``sequential``: the state and its next value; one row; no jumps.
    - ``parareal``: per slice start (S of them, :func:`~paratime.methods.parareal.slice_bounds`) the iterate, its
      coarse jump, the fine result and the new iterate (+ a multistep solver's history and the history read); the
      fine solves of all S slices in one call; the sweep jumps one slice (B rows) at a time.
    - ``parareal_pipelined``: per slice the newest iterate and the coarse results still to be read, and one state
      per running propagation; a tick runs at most a fine and a coarse propagation per slice (2S + 1 rows: measured
      at most 1.75 S over N = 20 .. 400, S = 2 .. 50, coarse_steps 1 and 3, tol 0 .. 1), its coarse rows jumped
      together.
    - ``staggered`` with K ``cores``: per core its state, begin, finish, their D and the next state (+ the history
      values of a multistep solver); K rows; a core's jump (B rows) reaches up to N steps.

    Raises:
        ValueError: a method with a trajectory (``picard``: :func:`window_buffers`) or an unknown one.
    """
    from ..methods.parareal import slice_bounds     # host integers: where the slices fall
    depth = solver.history_depth if solver.uses_history else 0
    if method == "sequential":
        return Footprint(2 + depth, 1, 0, 0)
    if method in ("parareal", "parareal_pipelined"):
        bounds = slice_bounds(steps, slices)
        S, span = bounds.numel() - 1, int((bounds[1:] - bounds[:-1]).max())
        if method == "parareal":
            return Footprint(4 * (S + 1) + 2 * S * int(depth > 0), S, 1, span)
        return Footprint(3 * S + 2, 2 * S + 1, S, span)
    if method == "staggered":
        return Footprint((6 + depth) * cores + 3, cores, 1, steps)
    raise ValueError(f"method: no footprint for {method!r}; allowed: sequential, parareal, parareal_pipelined, "
                     "staggered (picard: window_buffers)")


#: bytes held per element of noise while it is drawn: the counter-based generator's temporaries (measured 24 for a
#: seeded table drawn whole) and, in a stochastic coarse jump, the drawn rows, their weighted copy and the running sum
#: (measured 22-24 at 4x16x16 float64 and 4x64x64 float32: the generator's integer temporaries dominate, whatever
#: the state's dtype)
NOISE_BYTES_PER_ELEMENT = 32


def table_draw_bytes(elements: int) -> int:
    """Bytes held while a seeded noise table of ``elements`` elements is drawn (one stream at a time, in chunks of
    at most ``2 * paratime.noise._CHUNK_PAIRS`` elements)."""
    from ..noise import _CHUNK_PAIRS
    return NOISE_BYTES_PER_ELEMENT * min(int(elements), 2 * _CHUNK_PAIRS)


def jump_bytes(rows_elements: int, span: int) -> int:
    """Bytes a stochastic coarse jump (:func:`paratime.solvers.constant_d_jump`) of rows with ``rows_elements``
    elements in all, over at most ``span`` steps, holds at once: its noise is drawn and summed a chunk of at most
    ``PATH_CHUNK_ELEMENTS`` elements (or one step of the rows, if larger) at a time."""
    from ..solvers import PATH_CHUNK_ELEMENTS
    chunk = min(span * rows_elements, max(PATH_CHUNK_ELEMENTS, rows_elements))
    return NOISE_BYTES_PER_ELEMENT * int(chunk)


def check_memory(shape: tuple[int, ...], steps: int, state_dtype: torch.dtype, device: torch.device | str,
                 noise_draws: int = 0, window: int | None = None, available: int | None = None,
                 buffers: int = WORK_BUFFERS, point_buffers: int = 0, held: int | None = None,
                 extra_bytes: int = 0) -> int:
    """Refuse a request whose trajectory + noise + window buffers cannot fit ``device`` (before allocating them).

    Args:
        shape: ``(B, *sample_shape)``. steps: N. state_dtype: the trajectory's dtype.
        device: the state device. noise_draws: pre-drawn ``(N, B, *shape)`` noise tensors (1 for an SDE solver,
            + corrector steps with a Langevin corrector). window: Picard's window (default N).
        available: free bytes to compare with (default: measured on ``device``).
        buffers: window buffers held at a round's peak (:func:`window_buffers` for Picard).
        point_buffers: ``(N + 1, B, *shape)`` tensors besides the trajectory.
        held, extra_bytes: a method without a trajectory (:func:`request_bytes`).
    Returns:
        The bytes the request needs.
    Raises:
        DeviceMemoryError: it needs more than is available (the message names the sizes and what to reduce).
        ValueError: a negative count or size (or zero steps, window or shape entry), naming it.
    """
    counts = {"steps": (steps, 1), "window": (window, 1), "available": (available, 0), "noise_draws": (noise_draws, 0),
              "buffers": (buffers, 0), "point_buffers": (point_buffers, 0), "held": (held, 0),
              "extra_bytes": (extra_bytes, 0), **{f"shape[{k}]": (n, 1) for k, n in enumerate(shape)}}
    for name, (value, low) in counts.items():     # a negative count made a negative need, which always fit
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
    need = request_bytes(shape, steps, state_dtype, noise_draws, window, buffers, point_buffers, held, extra_bytes)
    free = available_bytes(device) if available is None else available
    if need > free:
        kept = (f"trajectory (N+1)xB and {point_buffers} more" if held is None else
                f"{held} states of B samples kept")
        raise DeviceMemoryError(
            f"shape, steps: {tuple(shape)} over {steps} steps needs {need / 2**30:.2f} GiB on {torch.device(device)} "
            f"({kept}, {noise_draws} noise tensor(s) NxB, {buffers} buffers per row of a call, in {state_dtype}) "
            f"but only {free / 2**30:.2f} GiB is free; reduce the batch (shape[0]), steps or window, or split the "
            "batch across sample() calls with first_sample=")
    return need
