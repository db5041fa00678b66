"""Ray backend: a pool of actors, one model replica each, created once and reused across ``sample`` calls.

The driver runs the sampling loop and scatters contiguous chunks of each batch of rows to the actors. What travels:

- once per :meth:`RayBackend.bind` (a new model): the sampler's :class:`~paratime.denoiser.Denoiser`, through the
  object store; with ``model=`` (a name or factory) the actors build the network themselves and receive only the
  denoiser's settings (guidance, dtype, clipping), and a denoiser with a different network type is refused;
- once per ``sample()`` (:meth:`RayBackend.prepare`): the per-sample conditioning, through the object store;
- per network call: the rows (states, sigmas, model times, sample indices) in, the outputs out. ``timings`` reports
  the bytes (``comm_bytes``) and the calls, so bytes per round = ``comm_bytes / calls``.

Each actor evaluates its chunk with a :class:`~paratime.backends.local.LocalBackend` (at most ``max_batch`` rows per
network call). Every ``ray.get`` has a timeout; an actor that dies or times out is replaced and its chunk re-run, so
the sample is unchanged. Actors that cannot be scheduled (no GPU, too few CPUs) raise :class:`RayWorkerError` saying
so within ``start_timeout_s``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from ..denoiser import Denoiser
from .base import Backend, cast_network, cat_outputs, map_cond, moments_agree, split_cond, weight_moments

__all__ = ["RayBackend", "RayWorkerError", "check_ray_address"]

log = logging.getLogger("paratime")


def check_ray_address(address: str | None, timeout_s: float) -> None:
    """An explicit ``HOST:PORT`` (or ``ray://HOST:PORT``) must accept a connection within ``timeout_s``: Ray itself
    waits for minutes on an address where nothing listens (one where something other than Ray listens can still
    hold ``ray.init`` up to Ray's own limits). ``auto`` and None are Ray's to resolve.

    Raises:
        ValueError: naming ``address``.
    """
    if address is None or address == "auto":
        return
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address: expected auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ValueError(f"address: nothing answers at {host}:{port} ({e.strerror or e}); start the cluster with "
                         f"`ray start --head` or give its address") from e


class RayWorkerError(RuntimeError):
    """An actor failed more times than ``max_retries`` allows, or actors could not be scheduled."""


def _kind(network) -> str:
    return f"{type(network).__module__}.{type(network).__qualname__}"


class _ActorNetwork:
    """Placeholder network of a denoiser whose actors build the real one from ``model=``; ``kind`` names the
    sampler's network type, which the actors' own network must have."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, *args, **kwargs):
        raise RuntimeError("this denoiser's network lives on the Ray actors")


def _tensor_bytes(*items) -> int:
    total = 0
    for v in items:
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            total += _tensor_bytes(*v.values())
    return total


class _Replica:
    """Actor body: builds the network once (from ``spec``) or receives the denoiser, then evaluates chunks."""

    def __init__(self, spec: Any, device: str, threads: int | None, max_batch: int | None):
        if threads:
            torch.set_num_threads(threads)
        from .local import LocalBackend

        self.device = device
        self.own = None                       # the denoiser built from the spec, if any
        if isinstance(spec, str):
            from ..models import load_model

            self.own = load_model(spec)
        elif spec is not None:
            self.own = spec()
        self.local = LocalBackend(max_batch)

    def set_denoiser(self, den: Denoiser):
        """Bind a denoiser; one with the placeholder network takes this actor's own network."""
        if isinstance(den.network, _ActorNetwork):
            if self.own is None:
                raise ValueError("model: this actor has no model of its own")
            if den.network.kind != _kind(self.own.network):
                raise ValueError(f"model: the actors were built for a {_kind(self.own.network)} network, not a "
                                 f"{den.network.kind}; make a new RayBackend (or one with model=None)")
            den = replace(den, network=self.own.network)
        den = cast_network(den, inplace=self.own is not None)
        if self.device != "cpu" and isinstance(den.network, torch.nn.Module):
            den.network.to(self.device)
        self.local.bind(den)
        return weight_moments(den.network)      # the driver checks an own network against its own

    def set_cond(self, cond: dict | None):
        self.local.prepare({} if cond is None else map_cond(cond, lambda v: v.to(self.device)))
        return True

    def evaluate(self, x, sigma, model_time, samples, cond, raw=False):
        """Rows' D (on the CPU; ``raw``: the network's ``(out, uncond)`` in its dtype) and the seconds spent
        computing them (for the driver's communication figure). ``samples`` indexes the prepared conditioning;
        ``cond`` carries per-row conditioning instead (or None)."""
        t0 = time.perf_counter()
        d = self.device
        with torch.no_grad():
            out = self.local.evaluate(x.to(d), sigma.to(d), model_time.to(d),
                                      None if cond is None else map_cond(cond, lambda v: v.to(d)),
                                      None if samples is None else samples.to(d), raw=raw)
        out = tuple(None if o is None else o.cpu() for o in out) if raw else out.cpu()
        return out, time.perf_counter() - t0

    def pid(self):
        return os.getpid()


class RayBackend(Backend):
    """Evaluate rows on Ray actors.

    Args:
        workers: number of actors (model replicas).
        model: how actors build the network: a model name, a zero-argument factory returning a Denoiser, or None to
            ship the sampler's Denoiser through the object store (re-shipped when another one is bound).
        address: ``None`` starts (or reuses) a local Ray, asking for node address 127.0.0.1 (Ray 2.60 rewrites it
            to the machine's own address, and its services listen on every interface: a firewall decides what
            reaches them); ``"auto"`` or ``"ray://..."`` joins a
            cluster (an error when Ray is already initialised in this process: that Ray would be used instead).
        num_gpus: GPUs per actor (default 1 if CUDA is available, else 0); num_cpus: CPUs per actor (default 1).
        timeout_s: limit on each ``ray.get``. max_retries: replacements per call before giving up.
        start_timeout_s: how long actors may take to be scheduled and start before :class:`RayWorkerError`.
        threads: torch threads per actor; default: this machine's CPUs shared evenly among the actors.
        max_batch: rows per network call on each actor (None: derived from the model and device).

    Raises:
        ValueError: bad options. ImportError: ray is not installed (``pip install paratime[ray]``).
    """

    name = "ray"

    def __init__(self, workers: int = 2, model: str | Callable | None = None, address: str | None = None,
                 num_gpus: float | None = None, num_cpus: float = 1, timeout_s: float = 120.0,
                 max_retries: int = 2, threads: int | None = None, max_batch: int | None = None,
                 start_timeout_s: float = 60.0):
        super().__init__(max_batch)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
        for arg, v in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s), ("num_cpus", num_cpus)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{arg}: must be a finite number > 0, got {v!r}")
        if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float))
                                     or not 0 <= num_gpus < math.inf):
            raise ValueError(f"num_gpus: must be a finite number >= 0 or None, got {num_gpus!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads: must be an integer >= 1 or None, got {threads!r}")
        if address is not None and not isinstance(address, str):
            raise ValueError(f"address: expected 'auto', 'ray://host:port', 'host:port' or None, "
                             f"got {type(address).__name__}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries: must be an integer >= 0, got {max_retries!r}")
        if model is not None and not (isinstance(model, str) or callable(model)):
            raise ValueError(f"model: expected a model name, a factory or None, got {type(model).__name__}")
        try:
            import ray
        except ImportError as e:
            raise ImportError("backend 'ray' needs ray: pip install 'paratime[ray]'") from e
        self.ray = ray
        self.workers, self.model, self.timeout_s, self.max_retries = workers, model, float(timeout_s), max_retries
        self.start_timeout_s = float(start_timeout_s)
        self.num_gpus = (1 if torch.cuda.is_available() else 0) if num_gpus is None else num_gpus
        self.num_cpus = num_cpus
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.started_ray = False
        if address is not None and ray.is_initialized():
            raise ValueError(f"address: Ray is already initialised in this process, and that Ray would be used, not "
                             f"{address!r}; omit address, or ray.shutdown() first")
        if not ray.is_initialized():
            if address is None:
                ray.init(num_cpus=max(os.cpu_count() or 1, int(workers * num_cpus + 0.999)), include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
            else:
                check_ray_address(address, min(self.start_timeout_s, 10.0))
                ray.init(address=address, log_to_driver=False)
            self.started_ray = True
        self.actors: list = []
        self._den_ref = None                  # what the actors were last bound to (object store)
        self._mine = None                     # the sampler's weight fingerprint, where actors build their own
        self._cond_ref = None
        self._shipped = None                  # the bound network's weight fingerprint when it was shipped
        self._closed = False
        self.prepare_bytes = 0                # bytes placed once per sample() call (conditioning)

    # -- binding --------------------------------------------------------------------------------------------------
    def bind(self, denoiser):
        """Ship the denoiser to the actors; again when its network's weights changed in place since (checked at
        every :meth:`prepare`: the actors otherwise kept evaluating the weights they were sent)."""
        if self._closed:
            self._live()
        shipped = weight_moments(getattr(denoiser, "network", None))
        if denoiser is self.denoiser and self.actors and shipped == self._shipped:
            return
        super().bind(denoiser)
        payload = denoiser if self.model is None else replace(denoiser, network=_ActorNetwork(_kind(denoiser.network)))
        self._den_ref = self.ray.put(payload)
        if not self.actors:
            self.actors = [self._new_actor() for _ in range(self.workers)]
            try:
                self._await_start(self.actors)
            except BaseException:
                self.close()    # actors pending or dead, and the Ray this backend started: nothing left behind
                raise
        self._mine = None if self.model is None else shipped
        for i, theirs in enumerate(self._call_all("set_denoiser", self._den_ref)):
            self._check_weights(i, theirs)
        self._shipped = shipped

    def _check_weights(self, i, theirs):
        """An actor that built its own network from ``model=`` must have built the sampler's (checked when bound,
        and again for an actor that replaced a failed one: it ran the factory anew)."""
        if self._mine is None:
            return
        pair = [[*moments, count] for moments, count in (self._mine, theirs)]
        if not moments_agree([max(v) for v in zip(*pair)], [min(v) for v in zip(*pair)]):
            raise ValueError(f"model: actor {i} built another network than this sampler's from model= "
                             f"(an unseeded factory?); build the same network (seed it, or load the same "
                             f"weights), or give model=None to ship the sampler's")

    def _new_actor(self):
        cls = self.ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0)(_Replica)
        device = "cuda" if self.num_gpus else "cpu"
        return cls.remote(self.model, device, self.threads, self.max_batch)

    def _await_start(self, actors):
        ray = self.ray
        try:
            ray.get([a.pid.remote() for a in actors], timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise RayWorkerError(
                f"workers: {len(actors)} actor(s) needing num_cpus={self.num_cpus}, num_gpus={self.num_gpus} each "
                f"could not be scheduled within start_timeout_s={self.start_timeout_s:g} s; the cluster has "
                f"{ray.cluster_resources()} in all and {ray.available_resources()} free. Lower workers, num_cpus "
                f"or num_gpus, or add nodes") from e

    def _call_all(self, method: str, *args, replace: bool = True):
        """``method(*args)`` on every actor; an actor that died (between sample() calls too) or timed out is
        replaced, as in :meth:`_get`, up to ``max_retries`` times (``replace=False``, a clean-up: Ray's error as it
        comes)."""
        ray = self._live()
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        results = [None] * len(refs)
        for i, ref in enumerate(refs):
            for attempt in range(self.max_retries + 1 if replace else 1):
                try:
                    results[i] = ray.get(ref, timeout=self.timeout_s)
                    break
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)   # the actor's own exception, without Ray's remote traceback
                    if isinstance(cause, ValueError):
                        raise ValueError(f"model: the actors cannot evaluate this denoiser ({cause})") from e
                    raise
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                        ray.exceptions.ActorUnavailableError) as e:
                    if not replace:
                        raise
                    if attempt == self.max_retries:
                        raise RayWorkerError(f"actor {i} failed {attempt + 1} times in {method} (timeout "
                                             f"{self.timeout_s:g} s): {type(e).__name__}") from e
                    log.warning("ray actor %d failed in %s (%s); replacing it", i, method, type(e).__name__)
                    self._replace(i)
                    ref = getattr(self.actors[i], method).remote(*args)
        return results

    def _live(self):
        """``ray``, once the backend has actors (bound and not closed)."""
        if not self.actors:
            raise RuntimeError("backend: this Ray backend has no actors (closed, or never bound); make a new "
                               "sampler")
        return self.ray

    # -- per sample() ---------------------------------------------------------------------------------------------
    def prepare(self, cond):
        self.bind(self.denoiser)              # weights changed in place since they were shipped: ship them again
        super().prepare(cond)
        cpu = map_cond(cond, lambda v: v.cpu())
        self._cond_ref = self.ray.put(cpu)
        self.prepare_bytes += _tensor_bytes(cpu)
        self._call_all("set_cond", self._cond_ref)

    def release(self):
        super().release()
        if self._cond_ref is not None and self.actors:
            try:
                self._call_all("set_cond", None, replace=False)
            except (self.ray.exceptions.GetTimeoutError, self.ray.exceptions.RayActorError) as e:
                # Clean-up after a failure must not hide it (the RayWorkerError naming the actor): close() kills them.
                log.warning("ray: actors did not release their conditioning (%s); close() ends them", type(e).__name__)
        self._cond_ref = None

    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, x, sigma, model_time, cond=None, samples=None, raw=False):
        self._live()
        self.calls += 1
        M = x.shape[0]
        if M == 0:          # nothing to scatter: the empty result, of the shape and dtype the actors would return
            return self.run_chunked(x, sigma, model_time, self.rows_cond(cond, samples),
                                    fn=self.denoiser.network_outputs if raw else None)
        n = min(self.workers, M)
        bounds = [(M * i // n, M * (i + 1) // n) for i in range(n)]
        xc, sc, tc = x.cpu(), sigma.cpu(), model_time.cpu()
        if samples is not None and cond:                  # per-sample conditioning given with the call
            cond, samples = self.rows_cond(cond, samples), None
        bc = None if samples is None else samples.cpu()
        cc = None if samples is not None else map_cond(cond or {}, lambda v: v.cpu())
        chunks = [(xc[a:b], sc[a:b], tc[a:b], None if bc is None else bc[a:b],
                   None if cc is None else split_cond(cc, a, b), raw) for a, b in bounds]
        t0 = time.perf_counter()
        refs = [self.actors[i].evaluate.remote(*chunks[i]) for i in range(n)]
        outs, compute = [], []
        for i in range(n):
            out, dt = self._get(i, refs[i], chunks[i])
            outs.append(out)
            compute.append(dt)
        # Communication: the call's wall time less the slowest actor's compute (serialisation, transfer, scheduling).
        self.comm_s += max(time.perf_counter() - t0 - max(compute), 0.0)
        self.comm_bytes += _tensor_bytes(xc, sc, tc, bc, cc) + sum(_tensor_bytes(*o) if raw else _tensor_bytes(o)
                                                                   for o in outs)
        out = cat_outputs(outs)
        return tuple(None if o is None else o.to(x.device) for o in out) if raw else out.to(x.device)

    def _get(self, i, ref, chunk):
        ray = self.ray
        for attempt in range(self.max_retries + 1):
            try:
                return ray.get(ref, timeout=self.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                    ray.exceptions.ActorUnavailableError) as e:
                if attempt == self.max_retries:
                    raise RayWorkerError(f"actor {i} failed {attempt + 1} times (timeout {self.timeout_s:g} s): "
                                         f"{type(e).__name__}") from e
                log.warning("ray actor %d failed (%s); replacing it and re-running its chunk", i, type(e).__name__)
                self._replace(i)
                ref = self.actors[i].evaluate.remote(*chunk)
        raise AssertionError("unreachable")

    def _replace(self, i):
        """A fresh actor in slot i, bound to the current denoiser and conditioning."""
        try:
            self.ray.kill(self.actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - the actor may already be gone
            pass
        a = self.actors[i] = self._new_actor()
        self._await_start([a])
        pending = [a.set_denoiser.remote(self._den_ref)]
        if self._cond_ref is not None:
            pending.append(a.set_cond.remote(self._cond_ref))
        try:
            self._check_weights(i, self.ray.get(pending, timeout=self.timeout_s)[0])
        except ValueError:
            self.ray.kill(a, no_restart=True)     # never left in its slot: the next call replaces it again
            raise

    def close(self):
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        self._den_ref = self._cond_ref = None
        self._closed = True                   # bind() after close refuses (it made new actors, and a new Ray)
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self.started_ray = False
