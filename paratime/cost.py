"""The cost model: ``c(r)``, the time one device takes for a network call of ``r`` rows.

A round of a parallel method makes network calls of ``M`` rows spread over ``K`` devices; each device evaluates
``ceil(M / K)`` of them, so the round costs ``c(ceil(M / K))``. In units of one sequential call that is the round's
**sequential call equivalents**, ``SCE = c(ceil(M / K)) / c(1)``; a sample's predicted wall time is the sum over its
rounds, and sequential sampling of one sample costs ``N`` SCE at any ``K``. Two limiting shapes:

- compute-bound (a large model on a GPU): ``c(r) = r``, so ``SCE = ceil(M / K)``;
- latency-bound (a small model, or a large GPU): ``c(r) = 1``, so every round costs one SCE whatever its width.

A :class:`CostCurve` is a table of measured (or given) points ``(r, c(r))``, interpolated linearly in ``r`` and
extrapolated beyond the last point along the last segment's slope (past the measured rows a call is at least as
compute-bound as at the largest ones). :func:`measure_cost` times a few calls at ``r = 1, 2, 4, ...`` on the device
the model runs on and caches the curve per model, device, dtype and sample shape; :func:`make_cost` turns a user's
specification (a name, a callable, a table) into a curve.
"""

from __future__ import annotations

import logging
import math
import numbers
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .checks import is_integer

__all__ = ["CostCurve", "COST_NAMES", "make_cost", "check_cost", "measure_cost", "measure_rows", "cached_cost",
           "round_cost", "chunked_cost", "chunk_rows", "bucket_rows", "device_rows", "call_gaps",
           "OVERHEAD_CALLS"]

log = logging.getLogger("paratime")

#: the named curves, and the two requests that are resolved at sample time
COST_NAMES = ("auto", "measure", "compute", "latency")
#: row counts a measurement times by default: 1, 2, 4, ..., 64
MEASURE_ROWS = tuple(2 ** k for k in range(7))
#: a callable cost ``c(rows)`` is tabulated at the powers of 2 up to this many rows (it is the caller's, and cheap)
CALLABLE_ROWS = 2 ** 20
#: network calls of a plan's timing run (:func:`call_gaps`; the first gap warms up, the median of the rest counts)
OVERHEAD_CALLS = 10


@dataclass(frozen=True)
class CostCurve:
    """``c(r)`` from points ``(rows[k], seconds[k])``, piecewise linear in ``r``.

    Attributes:
        rows: increasing row counts, the first one 1. seconds: ``c`` at those rows: seconds when measured or given
            as a dict ``{rows: seconds}`` (``table``: the stats then predict wall seconds too); a callable's or a
            named curve's own unit (only ratios to ``c(1)`` matter to the planner). name: where the curve came
            from (``compute``, ``latency``, ``measured``, ``table``, ``callable``).
    """

    rows: tuple[int, ...]
    seconds: tuple[float, ...]
    name: str = "table"

    def __post_init__(self):
        if len(self.rows) != len(self.seconds) or not self.rows:
            raise ValueError(f"cost: rows and seconds must be non-empty and of one length, got {len(self.rows)} "
                             f"and {len(self.seconds)}")
        if self.rows[0] != 1 or any(b <= a for a, b in zip(self.rows, self.rows[1:])):
            raise ValueError(f"cost: row counts must increase from 1, got {self.rows}")
        if any(not (math.isfinite(s) and s > 0) for s in self.seconds):
            raise ValueError(f"cost: every c(r) must be a finite number > 0, got {self.seconds}")

    def __call__(self, r: float) -> float:
        """``c(r)``: 0 for ``r <= 0``; linear between the table's points and along the last slope past them."""
        if r <= 0:
            return 0.0
        rows, secs = self.rows, self.seconds
        if len(rows) == 1:                 # one point: no slope to extrapolate along
            return secs[0]
        k = 1
        while k < len(rows) - 1 and rows[k] < r:
            k += 1
        r0, r1, s0, s1 = rows[k - 1], rows[k], secs[k - 1], secs[k]
        return max(s0 + (s1 - s0) * (max(r, 1.0) - r0) / (r1 - r0), 1e-12)

    def sce(self, rows: int, devices: int) -> float:
        """SCE of a call of ``rows`` rows on ``devices`` devices: ``c(ceil(rows / K)) / c(1)``."""
        return round_cost(self, rows, devices) / self(1)

    def describe(self) -> str:
        """One line: the curve's name and ``c(r) / c(1)`` at its table points."""
        ratios = ", ".join(f"{r}:{s / self.seconds[0]:.2g}" for r, s in zip(self.rows, self.seconds))
        return f"{self.name} [{ratios}]"


def device_rows(rows: int, devices: int) -> int:
    """``ceil(rows / devices)``: the rows each device evaluates when a call's rows are spread over the devices."""
    return -(-rows // devices)


def chunk_rows(limit: int | None, buckets: tuple[int, ...] | None) -> int | None:
    """The most rows of one network call: ``limit`` (``max_batch`` in force; None: no limit); with fixed shapes
    (``buckets``) the largest bucket at or under it, since a chunk is padded up to a bucket (the smallest bucket
    where none is: fixed shapes have no smaller call; the backend refuses a given ``max_batch`` under it). The
    backend's ``run_chunked`` splits a call so; :func:`chunked_cost` prices the chunks alike."""
    if not buckets:
        return limit
    if limit is None:
        return buckets[-1]
    return max((b for b in buckets if b <= limit), default=buckets[0])


def bucket_rows(buckets: tuple[int, ...] | None, rows: int) -> int:
    """The rows a call of ``rows`` rows runs as: the smallest bucket that holds them (the backend's ``pad_rows``),
    or ``rows`` itself without buckets."""
    if not buckets:
        return rows
    fit = next((b for b in buckets if b >= rows), None)
    if fit is None:
        raise ValueError(f"buckets: no bucket holds a call of {rows} rows (the largest is {buckets[-1]})")
    return fit


def chunked_cost(curve: CostCurve, rows: int, limit: int | None, buckets: tuple[int, ...] | None = None) -> float:
    """The time of ``rows`` rows on one device whose network calls hold at most ``limit`` rows (``max_batch``; None:
    no limit): the chunks run back to back, ``floor(rows / limit) c(limit) + c(rows mod limit)``. With fixed shapes
    (the backend's ``buckets``) no chunk exceeds the largest bucket and each is padded to the smallest bucket that
    holds it, and costs that bucket's rows."""
    if rows <= 0:
        return 0.0
    step = chunk_rows(limit, buckets)
    if not step or rows <= step:
        return curve(bucket_rows(buckets, rows))
    full, rest = divmod(rows, step)
    return full * curve(bucket_rows(buckets, step)) + (curve(bucket_rows(buckets, rest)) if rest else 0.0)


def round_cost(curve: CostCurve, rows: int, devices: int, limit: int | None = None,
               buckets: tuple[int, ...] | None = None) -> float:
    """``c(ceil(rows / devices))``: the time of one call of ``rows`` rows spread over ``devices`` devices, each
    device's share run as chunks of at most ``limit`` rows (``max_batch``; None: one call) padded to ``buckets``
    (see :func:`chunked_cost`)."""
    return chunked_cost(curve, device_rows(rows, devices), limit, buckets)


def _named(name: str) -> CostCurve:
    if name == "compute":
        return CostCurve((1, 2), (1.0, 2.0), "compute")         # c(r) = r
    return CostCurve((1, 2), (1.0, 1.0), "latency")             # c(r) = 1


def check_cost(cost: Any) -> None:
    """Raise unless ``cost`` is a cost specification :func:`make_cost` accepts (names not resolved here).

    Raises:
        ValueError: an unknown name or a bad table. TypeError: anything else.
    """
    if isinstance(cost, str):
        if cost not in COST_NAMES:
            raise ValueError(f"cost: unknown {cost!r}; allowed: {', '.join(COST_NAMES)}, a callable c(rows), "
                             f"a dict {{rows: seconds}} or a CostCurve")
        return
    if isinstance(cost, CostCurve):
        return
    if callable(cost):
        make_cost(cost)     # tabulated once here: a callable that cannot take c(rows) fails before any work
        return
    if isinstance(cost, dict):
        make_cost(cost)
        return
    raise TypeError(f"cost: expected one of {', '.join(COST_NAMES)}, a callable c(rows), a dict {{rows: seconds}} "
                    f"or a CostCurve, got {type(cost).__name__}")


def make_cost(cost: Any, max_rows: int = CALLABLE_ROWS) -> CostCurve:
    """A :class:`CostCurve` from a specification: ``"compute"`` (``c(r) = r``), ``"latency"`` (``c(r) = 1``), a
    :class:`CostCurve`, a dict ``{rows: seconds}`` (must contain rows 1), or a callable ``c(rows)`` tabulated at
    ``1, 2, 4, ..., max_rows`` (and ``max_rows``; :data:`CALLABLE_ROWS` by default, beyond any call the planner
    prices: at 64, ``max(1, r / 128)`` read flat past 64 rows and priced rounds of 800 rows at 1). ``"auto"`` and
    ``"measure"`` are resolved by the sampler
    (:func:`measure_cost`), not here.

    Raises:
        ValueError: ``auto`` / ``measure`` (need a model), a table without rows 1, non-positive or non-finite
            values. TypeError: anything else.
    """
    if isinstance(cost, CostCurve):
        return cost
    if isinstance(cost, str):
        if cost in ("compute", "latency"):
            return _named(cost)
        raise ValueError(f"cost: {cost!r} needs a model to measure; allowed here: compute, latency, a callable, a "
                         f"dict {{rows: seconds}} or a CostCurve")
    if isinstance(cost, dict):
        if any(not is_integer(r) or r < 1 for r in cost):
            raise ValueError(f"cost: table keys must be row counts >= 1, got {sorted(cost, key=str)}")
        rows = tuple(sorted(int(r) for r in cost))
        bad = [cost[r] for r in rows if isinstance(cost[r], bool) or not isinstance(cost[r], numbers.Real)]
        if bad:
            raise TypeError(f"cost: table values must be seconds (numbers), got {bad[0]!r}")
        return CostCurve(rows, tuple(float(cost[r]) for r in rows), "table")
    if callable(cost):
        rows = tuple(sorted({*(2 ** k for k in range(max(1, max_rows).bit_length())), max(1, max_rows)}))
        values = []
        for r in rows:
            try:
                v = cost(r)
            except TypeError as e:
                raise TypeError(f"cost: the callable must take one argument, the row count (c(rows)): {e}") from e
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"cost: the callable must return a number, got {type(v).__name__} at rows={r}")
            values.append(float(v))
        return CostCurve(rows, tuple(values), "callable")
    check_cost(cost)   # raises the TypeError that names the allowed kinds
    raise AssertionError("unreachable")


def measure_rows(call: Callable[[int], Any], device: torch.device, rows: tuple[int, ...] = MEASURE_ROWS,
                 repeats: int = 5) -> CostCurve:
    """Time ``call(r)`` (one network call of ``r`` rows) at each row count: one warm-up call each, then the median
    of ``repeats`` calls, the row counts interleaved, each timed call right after an untimed one of the same rows
    (CUDA synchronised around each timing: this runs before sampling, never in its loop). The untimed call puts the
    caches where a sampler's run of same-size calls has them: timed straight after a call of 64 rows, a 1-row call
    of the digits U-Net on the project's CPU took 1.2 ms against 0.94 ms in a run of 1-row calls, which made
    sequential sampling look 25% dearer than it is. The median, not the fastest: on a shared machine the fastest is
    a lucky time slice the sampler will not see (on the 2-core project machine under load, the fastest 1-row call
    was 5x below the median). The curve is made non-decreasing (a running maximum over the row counts): a call with
    more rows is never cheaper, and on a shared machine a lucky fast timing at many rows would otherwise make wide
    windows look free.

    A row count whose call runs out of device memory (``torch.cuda.OutOfMemoryError`` in its warm-up) ends the
    curve at the row count before it.

    Returns:
        The measured :class:`CostCurve` (seconds).
    Raises:
        ValueError: ``repeats < 1`` or row counts that do not increase from 1. torch.cuda.OutOfMemoryError: a call of
            1 row does not fit.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: must be an integer >= 1, got {repeats!r}")
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for k, r in enumerate(rows):
        try:
            call(r)                                       # warm-up (allocator, kernels' autotuning)
        except torch.cuda.OutOfMemoryError:
            # The device holds no call of r rows: the curve ends at the last one that fit (and is extrapolated
            # along its last slope), the sampler's calls being chunked to fit.
            if k == 0:
                raise
            torch.cuda.empty_cache()
            log.info("cost: a call of %d rows does not fit %s; measured up to %d", r, device, rows[k - 1])
            rows = rows[:k]
            break
    # Row counts interleaved, repeat by repeat: a slow spell of a shared machine hits every row count alike.
    times: dict[int, list[float]] = {r: [] for r in rows}
    for _ in range(repeats):
        for r in rows:
            call(r)
            sync()
            t0 = time.perf_counter()
            call(r)
            sync()
            times[r].append(time.perf_counter() - t0)
    secs: list[float] = []
    for r in rows:
        secs.append(max(statistics.median(times[r]), 1e-9, *secs))
    return CostCurve(tuple(rows), tuple(secs), "measured")


# Measured curves per (network, device, dtype, sample shape, rows, call variant). The network is held weakly: a new
# model that reuses a freed one's id() is not served the old curve.
_CACHE: dict[tuple, tuple[weakref.ref, CostCurve]] = {}


def cached_cost(network: Any, device: torch.device, dtype: torch.dtype | None, shape: tuple[int, ...],
                rows: tuple[int, ...] = MEASURE_ROWS, variant: tuple = ()) -> CostCurve | None:
    """The cached measured curve of this model, device, dtype, sample shape and call variant, or None."""
    hit = _CACHE.get((id(network), str(device), dtype, tuple(shape), rows, variant))
    if hit is None or hit[0]() is not network:
        return None
    return hit[1]


def measure_cost(network: Any, call: Callable[[int], Any], device: torch.device, dtype: torch.dtype | None,
                 shape: tuple[int, ...], rows: tuple[int, ...] = MEASURE_ROWS, repeats: int = 5,
                 variant: tuple = ()) -> CostCurve:
    """The measured cost curve of ``network`` (cached per model, device, dtype, sample shape and call variant).

    Args:
        network: the model (the cache key; held weakly). call: ``call(r)`` makes one network call of ``r`` rows.
        device, dtype, shape: where and how the network runs, and the sample shape (the rest of the cache key).
        rows, repeats: see :func:`measure_rows`.
        variant: what else sets a call's cost on the same network (hashable; the sampler's: classifier-free guidance,
            which doubles the rows, a classifier's gradient, the conditioning's shapes).
    Returns:
        :class:`CostCurve` in seconds.
    """
    curve = cached_cost(network, device, dtype, shape, rows, variant)
    if curve is None:
        curve = measure_rows(call, device, rows, repeats)
        try:
            ref = weakref.ref(network)
        except TypeError:                  # not weak-referenceable: keep a strong reference
            ref = (lambda n: (lambda: n))(network)
        _CACHE[(id(network), str(device), dtype, tuple(shape), rows, variant)] = (ref, curve)
        log.info("cost: measured on %s: %s", device, curve.describe())
    return curve


class _Enough(Exception):
    """Raised by :func:`call_gaps`' stamp at the start of the call after the last one timed, ending the run."""


def call_gaps(run: Callable[[Callable[[int], None]], Any], device: torch.device,
              calls: int = OVERHEAD_CALLS) -> list[tuple[float, int]]:
    """Time a method's run call by call: from the start of each network call to the start of the next, i.e. the
    call itself and the method's own work after it (packing its window, the update, acceptance, the stop rule).

    Args:
        run: ``run(stamp)`` runs the method, calling ``stamp(rows)`` at the start of each network call (before
            making it). device: where the method runs (CUDA synchronised at every stamp: this runs before
            sampling, never in its loop). calls: the run ends at the start of call ``calls + 1`` (or earlier, when
            the method finishes).
    Returns:
        ``(seconds, rows)`` per call that has a successor (the last one's end is not known).
    """
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    stamps: list[float] = []
    rows: list[int] = []

    def stamp(r: int) -> None:
        sync()
        stamps.append(time.perf_counter())
        if len(stamps) > calls:
            raise _Enough
        rows.append(int(r))

    try:
        run(stamp)
    except _Enough:
        pass
    return [(b - a, r) for a, b, r in zip(stamps, stamps[1:], rows)]
