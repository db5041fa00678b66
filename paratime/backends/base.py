"""The backend protocol: where the denoiser runs.

Parallel methods hand the backend a batch of rows (states, sigmas, model times, and for each row the index of its
sample) and get ``D`` back; the backend decides which devices or processes evaluate which rows. Backends own
resources (process groups, actors), so they are context managers; ``close()`` is idempotent.

Per ``sample()`` call the sampler first calls :meth:`Backend.prepare` with the per-sample conditioning (``B`` rows),
then ``evaluate(x, sigma, model_time, cond, samples=b)`` per network call, then :meth:`Backend.release`. A backend that
ships work to other processes places the conditioning there once (Ray: once in the object store) and sends only the
rows and their sample indices per call.

**Bounded memory.** No network call gets more than ``max_batch`` rows: every backend splits its share of a call into
chunks of at most ``max_batch`` rows (:meth:`Backend.run_chunked`). ``max_batch=None`` (the default) derives it from
the model and the device at the first call (:func:`paratime.backends.memory.default_max_batch`: on CUDA from the
peak memory of a first chunk of :data:`~paratime.backends.memory.PROBE_ROWS` rows and the free memory; on CPU the
stated constant :data:`~paratime.backends.memory.CPU_MAX_BATCH`), so a Stable-Diffusion-size model never gets one
8,000-row call.

**Fixed shapes** (``buckets=``, e.g. ``(8, 32, 128, 512)``): every network call is padded to the smallest bucket that
holds its rows (the padding repeats row 0; its outputs are dropped), and chunks never exceed the largest bucket, so a
compiled network (``torch.compile``) or a captured CUDA graph sees a handful of shapes instead of one per round.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Any

import torch

from ..cost import bucket_rows, chunk_rows
from ..denoiser import Denoiser
from .memory import PROBE_ROWS, default_max_batch, measure_rows

__all__ = ["Backend", "map_cond", "split_cond", "cat_outputs", "cast_network", "check_max_batch", "cond_bytes",
           "check_buckets", "pad_rows"]

log = logging.getLogger("paratime")


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


def cond_bytes(cond: dict) -> int:
    """Bytes held by the tensors of ``cond`` (nested dicts included)."""
    total = 0
    for v in cond.values():
        if isinstance(v, dict):
            total += cond_bytes(v)
        elif isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def check_max_batch(max_batch) -> int | None:
    """``max_batch`` validated: an integer >= 1, or None (derived from the model and device).

    Raises:
        ValueError: anything else.
    """
    if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
        raise ValueError(f"max_batch: must be an integer >= 1 or None (derived from the model and device), "
                         f"got {max_batch!r}")
    return max_batch


def check_buckets(buckets) -> tuple[int, ...] | None:
    """``buckets`` validated: None, or a non-empty sequence of increasing integers >= 1.

    Raises:
        ValueError: anything else.
    """
    if buckets is None:
        return None
    ok = isinstance(buckets, (tuple, list)) and len(buckets) > 0 and all(
        isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in buckets)
    if not ok or any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise ValueError(f"buckets: must be None or increasing integers >= 1 (row counts a call is padded to), "
                         f"got {buckets!r}")
    return tuple(buckets)


def _check_floor(limit: int | None, buckets: tuple[int, ...] | None, why: str = "") -> None:
    """Raise unless a given rows-per-call ``limit`` holds the smallest bucket (a call is padded up to a bucket, so
    under it every call would exceed the limit)."""
    if limit is not None and buckets and limit < buckets[0]:
        raise ValueError(f"max_batch, buckets: {limit} rows a call{why} is under the smallest bucket "
                         f"{buckets[0]}, to which every call is padded; give a max_batch of at least that or a "
                         f"smaller bucket")


def _guided_rows(limit: int | None, guided: bool) -> int | None:
    """Denoiser rows per call under a network-row ``limit``: half of it under classifier-free guidance (each row
    runs twice), at least 1; None stays None."""
    return max(1, limit // 2) if limit is not None and guided else limit


#: per network (id): the key of its weights (each tensor's storage and version) and their moments
_MOMENTS: dict[int, tuple[tuple, list[float]]] = {}


def weight_moments(net) -> tuple[list[float], int]:
    """A fingerprint of a network's weights, to check that replicas built apart (each rank's or actor's own model)
    hold the same network: ``([sum of k-weighted sums, sum of squares, sum of |.|], tensors)`` over its floating
    parameters and buffers, in float64 on their device (one host read), cached per state of the weights (a re-bind
    reuses it). Non-finite values (a -inf mask) count as fixed finite ones, so equal networks give equal sums. A
    network that is not an ``nn.Module`` gives zeros (nothing to compare)."""
    tensors = [t for t in (list(net.parameters()) + list(net.buffers()) if isinstance(net, torch.nn.Module) else [])
               if t.is_floating_point()]
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    seen = _MOMENTS.get(id(net))
    if seen is not None and seen[0] == key:
        return seen[1], len(tensors)
    acc = torch.zeros(3, dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    with torch.no_grad():
        for k, t in enumerate(tensors):
            v = t.detach().double().nan_to_num(nan=0.5, posinf=2.0, neginf=-3.0)
            acc += torch.stack([(k + 1) * v.sum(), (v * v).sum(), v.abs().sum()]).to(acc.device)
    moments = acc.tolist()
    if tensors:
        _MOMENTS[id(net)] = (key, moments)
    return moments, len(tensors)


def moments_agree(high: list[float], low: list[float]) -> bool:
    """Whether replicas' :func:`weight_moments` agree: ``high`` / ``low`` the largest / smallest of each of
    ``[weighted sum, squares, |.|, tensors]`` over the replicas (rounding aside: 1e-9 of the weights' scale)."""
    spread = max(high[0] - low[0], high[1] - low[1], high[3] - low[3])
    return spread <= 1e-9 * (high[2] * high[3] + high[1] + 1e-30)


def pad_rows(fn, buckets: tuple[int, ...], x, sigma, model_time, cond: dict):
    """``fn(x, sigma, model_time, **cond)`` on rows padded to the smallest bucket >= M (rows <= ``buckets[-1]``);
    the padding repeats row 0 (a gather: no host sync), and its outputs are dropped."""
    M = x.shape[0]
    P = bucket_rows(buckets, M)
    if P == M:
        return fn(x, sigma, model_time, **cond)
    idx = torch.cat([torch.arange(M, device=x.device), x.new_zeros(P - M, dtype=torch.long)])    # (P,)
    out = fn(x[idx], sigma[idx], model_time[idx], **map_cond(cond, lambda v: v[idx.to(v.device)]))
    return tuple(None if o is None else o[:M] for o in out) if isinstance(out, tuple) else out[:M]


def cast_network(denoiser: Denoiser, inplace: bool = False) -> Denoiser:
    """The denoiser with its ``torch.nn.Module`` network's floating parameters in ``denoiser.dtype``.

    ``Denoiser(dtype=torch.bfloat16)`` over float32 weights would feed bf16 inputs to fp32 layers (a dtype mismatch
    inside the network); this converts the weights instead, on a copy unless ``inplace`` (the caller owns the
    network, e.g. a model loaded by name). Nothing changes when the dtypes already agree or ``dtype`` is None.

    Returns:
        A :class:`Denoiser` whose network runs in ``denoiser.dtype``.
    """
    net, dtype = denoiser.network, denoiser.dtype
    if dtype is None or not isinstance(net, torch.nn.Module):
        return denoiser
    p = next((p for p in net.parameters() if p.is_floating_point()), None)
    if p is None or p.dtype == dtype:
        return denoiser
    log.info("casting the network's weights from %s to %s%s", p.dtype, dtype, "" if inplace else " (a copy)")
    net = (net if inplace else copy.deepcopy(net)).to(dtype)
    return replace(denoiser, network=net)


class Backend:
    """Base class. Subclasses implement :meth:`evaluate` and, if they hold resources, :meth:`close`.

    Args:
        max_batch: largest number of rows in one network call (per worker); None: derived from the model and the
            device at the first call (see the module docstring).
        buckets: row counts every network call is padded to (fixed shapes, see the module docstring), or None.

    Raises:
        ValueError: a bad ``max_batch`` or ``buckets``.
    """

    name: str = ""
    #: workers that evaluate rows in parallel (ranks, actors, devices)
    workers: int = 1

    def __init__(self, max_batch: int | None = None, buckets: tuple[int, ...] | None = None):
        self.max_batch = check_max_batch(max_batch)
        self.buckets = check_buckets(buckets)
        _check_floor(self.max_batch, self.buckets)
        self.denoiser: Denoiser | None = None
        self._cond: dict = {}
        self._auto_batch: int | None = None
        self.comm_s = 0.0
        self.comm_bytes = 0
        self.calls = 0

    # -- binding and per-sample state -----------------------------------------------------------------------------
    def bind(self, denoiser: Denoiser) -> None:
        """Attach the denoiser (called by the sampler before the first evaluation). Binding another denoiser later
        re-binds: the next call evaluates the new one (backends with workers re-ship it)."""
        if not isinstance(denoiser, Denoiser):
            raise TypeError(f"denoiser: expected a Denoiser, got {type(denoiser).__name__}")
        if self.denoiser is not None and denoiser is not self.denoiser:
            log.info("%s backend: re-bound to another denoiser", self.name or type(self).__name__)
            self._auto_batch = None
        if self.max_batch is not None and denoiser.guided:
            if self.max_batch < 2:
                raise ValueError("max_batch: 1 network row a call cannot hold a row under classifier-free guidance, "
                                 "whose call evaluates each row twice (conditional and unconditional): give "
                                 "max_batch >= 2")
            _check_floor(_guided_rows(self.max_batch, True), self.buckets, " under classifier-free guidance (each "
                         "row runs twice: max_batch // 2 rows a call)")
        self.denoiser = denoiser

    def prepare(self, cond: dict[str, Any]) -> None:
        """Per-sample conditioning for the coming ``sample()`` call (tensors with a leading batch dimension B).
        ``evaluate(..., samples=b)`` then reads row r's conditioning from sample ``b[r]``."""
        self._cond = cond

    def release(self) -> None:
        """Forget what :meth:`prepare` placed (the sampler calls it when ``sample()`` ends, also on error)."""
        self._cond = {}

    def rows_cond(self, cond: dict | None, samples: torch.Tensor | None) -> dict:
        """The per-row conditioning: ``cond`` as given when ``samples`` is None, else the prepared (or given)
        per-sample conditioning gathered at ``samples`` (on the conditioning's device, no host sync)."""
        if samples is None:
            return cond or {}
        per_sample = cond if cond else self._cond
        return map_cond(per_sample, lambda v: v[samples if samples.device == v.device else samples.to(v.device)])

    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, x: torch.Tensor, sigma: torch.Tensor, model_time: torch.Tensor,
                 cond: dict[str, Any] | None = None, samples: torch.Tensor | None = None, raw: bool = False):
        """``D(x, sigma, model_time, **cond)`` for ``(M, *shape)`` rows; the result is on ``x``'s device.

        Args:
            x: ``(M, *shape)`` VE-frame states. sigma, model_time: ``(M,)``.
            cond: per-row conditioning (``samples`` None), or per-sample conditioning (``samples`` given; empty:
                what :meth:`prepare` placed).
            samples: ``(M,)`` the sample index of each row, or None.
            raw: return the raw network outputs instead, :meth:`Denoiser.network_outputs`'s ``(out, uncond)``
                in the network's dtype (``uncond`` None without classifier-free guidance), for a caller that takes
                conversion and step in one fused pass (only for a :attr:`Denoiser.fusable` denoiser).
        Returns:
            ``D``, ``(M, *shape)`` in ``x``'s dtype; with ``raw``, the pair of outputs.
        """
        raise NotImplementedError

    def batch_limit(self, device: torch.device | str | None = None) -> int | None:
        """Denoiser rows per call in force: ``max_batch`` (or the derived one; None before the first call, except
        for a ``device`` other than CUDA, where the first call will derive the constant
        :func:`~paratime.backends.memory.default_max_batch`), halved under classifier-free guidance, whose network
        call holds each row twice."""
        limit = self.max_batch or self._auto_batch
        if limit is None and device is not None and torch.device(device).type != "cuda":
            limit = default_max_batch(device)
        return _guided_rows(limit, self.denoiser is not None and self.denoiser.guided)

    @staticmethod
    def _measures_memory(x: torch.Tensor) -> bool:
        """Whether a first call without ``max_batch`` derives it from a probe chunk's measured peak memory (CUDA;
        elsewhere the constant :func:`~paratime.backends.memory.default_max_batch`)."""
        return x.device.type == "cuda"

    def run_chunked(self, x: torch.Tensor, sigma: torch.Tensor, model_time: torch.Tensor, cond: dict,
                    fn=None) -> torch.Tensor:
        """Evaluate rows on this process, at most ``max_batch`` network rows per call (derived at the first call
        when None). ``cond`` is per-row; ``fn(x, sigma, model_time, **cond)`` defaults to the bound denoiser (raw
        outputs: its ``network_outputs``; the torch backend passes its ``run_network``) and may return a tuple."""
        if self.denoiser is None:
            raise RuntimeError("backend: not bound to a denoiser; the sampler calls bind() first")
        den = fn or self.denoiser
        if self.buckets is not None:
            den = lambda *a, _f=den, **c: pad_rows(_f, self.buckets, *a, c)  # noqa: E731 - fixed shapes
        M = x.shape[0]
        outs, start = [], 0
        if self.batch_limit() is None:
            per_row = None
            if self._measures_memory(x):
                # Evaluate a first small chunk while measuring its peak memory; derive max_batch from it. Never a
                # chunk above the largest bucket (a probe of 8 rows under buckets (1, 2, 4) had no bucket to fit).
                start = min(M, PROBE_ROWS, chunk_rows(None, self.buckets) or PROBE_ROWS)
                out, per_row = measure_rows(lambda: den(x[:start], sigma[:start], model_time[:start],
                                                        **split_cond(cond, 0, start)), start, x.device)
                outs.append(out)
                if self.denoiser.guided:
                    per_row /= 2                   # the probe's network call held each row twice
            self._auto_batch = default_max_batch(x.device, per_row)
            log.info("%s backend: max_batch %d network rows per call (derived for %s)", self.name, self._auto_batch,
                     x.device)
        step = chunk_rows(self.batch_limit(), self.buckets)      # no chunk beyond the largest bucket
        if start == 0 and M <= step:
            return den(x, sigma, model_time, **cond)     # one chunk: no slicing
        for s in range(start, M, step):
            outs.append(den(x[s:s + step], sigma[s:s + step], model_time[s:s + step], **split_cond(cond, s, s + step)))
        return cat_outputs(outs)

    # -- figures --------------------------------------------------------------------------------------------------
    @property
    def is_primary(self) -> bool:
        """Whether this process reports results (rank 0 under SPMD, always true otherwise)."""
        return True

    @property
    def timings(self) -> dict[str, float]:
        """Communication figures: ``comm_s`` seconds and ``comm_bytes`` bytes moved between workers (both
        cumulative), ``calls`` network calls made through this backend."""
        return {"comm_s": self.comm_s, "comm_bytes": float(self.comm_bytes), "calls": float(self.calls)}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def cat_outputs(outs: list):
    """Chunks' results joined along the rows: tensors, or tuples of tensors (raw outputs; None stays None)."""
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], tuple):
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def split_cond(cond: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every per-row tensor in ``cond``; other values pass through."""
    return map_cond(cond, lambda v: v[start:stop])
