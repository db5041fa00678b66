"""Ray backend: a pool of actors, one model replica each, created once and reused across ``sample`` calls.

The driver runs the sampling loop and scatters contiguous chunks of each batch of rows to the actors. The model
reaches the actors once, as a constructor: a model name, a picklable zero-argument factory, or the sampler's own
:class:`~paratime.denoiser.Denoiser` (put in the object store once). Every ``ray.get`` has a timeout; an actor that
dies or times out is replaced and its chunk re-run, so the sample is unchanged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from .base import Backend, map_cond
from .local import split_cond

__all__ = ["RayBackend", "RayWorkerError"]

log = logging.getLogger("paratime")


class RayWorkerError(RuntimeError):
    """An actor failed more times than ``max_retries`` allows."""


class _Replica:
    """Actor body: builds the denoiser once, then evaluates chunks of rows."""

    def __init__(self, spec: Any, device: str, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        if isinstance(spec, str):
            from ..zoo import load_model

            den = load_model(spec)
        elif callable(spec) and not hasattr(spec, "schedule"):
            den = spec()
        else:
            den = spec
        if device != "cpu" and isinstance(den.network, torch.nn.Module):
            den.network.to(device)
        self.den, self.device = den, device

    def evaluate(self, x, sigma, model_time, cond):
        """Returns the rows' D and the seconds spent computing them (for the driver's communication figure)."""
        t0 = time.perf_counter()
        d = self.device
        cond = map_cond(cond, lambda v: v.to(d))
        with torch.no_grad():
            out = self.den(x.to(d), sigma.to(d), model_time.to(d), **cond).cpu()
        return out, time.perf_counter() - t0

    def pid(self):
        import os

        return os.getpid()


class RayBackend(Backend):
    """Evaluate rows on Ray actors.

    Args:
        workers: number of actors (model replicas).
        model: how actors build the model: a model name, a zero-argument factory returning a Denoiser, or None to
            ship the sampler's Denoiser once through the object store.
        address: ``None`` starts (or reuses) a local Ray on loopback; ``"auto"`` or ``"ray://..."`` joins a cluster.
        num_gpus: GPUs per actor (default 1 if CUDA is available, else 0); num_cpus: CPUs per actor (default 1).
        timeout_s: limit on each ``ray.get``. max_retries: replacements per call before giving up.
        threads: torch threads per actor; default: this machine's CPUs shared evenly among the actors.

    Raises:
        ValueError: bad options. ImportError: ray is not installed (``pip install paratime[ray]``).
    """

    name = "ray"

    def __init__(self, workers: int = 2, model: str | Callable | None = None, address: str | None = None,
                 num_gpus: float | None = None, num_cpus: float = 1, timeout_s: float = 120.0,
                 max_retries: int = 2, threads: int | None = None):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries: must be an integer >= 0, got {max_retries!r}")
        if model is not None and not (isinstance(model, str) or callable(model)):
            raise ValueError(f"model: expected a model name, a factory or None, got {type(model).__name__}")
        try:
            import ray
        except ImportError as e:
            raise ImportError("backend 'ray' needs ray: pip install 'paratime[ray]'") from e
        self.ray = ray
        self.workers, self.model, self.timeout_s, self.max_retries = workers, model, float(timeout_s), max_retries
        self.num_gpus = (1 if torch.cuda.is_available() else 0) if num_gpus is None else num_gpus
        import os

        self.num_cpus = num_cpus
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.started_ray = False
        if not ray.is_initialized():
            if address is None:
                ray.init(num_cpus=max(os.cpu_count() or 1, int(workers * num_cpus + 0.999)), include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False)
            self.started_ray = True
        self.actors: list = []
        self.comm_s = 0.0
        self._spec = None

    @property
    def timings(self):
        return {"comm_s": self.comm_s}

    def bind(self, denoiser):
        super().bind(denoiser)
        if self._spec is None:
            self._spec = self.model if self.model is not None else self.ray.put(denoiser)
            self.actors = [self._new_actor() for _ in range(self.workers)]
            self.ray.get([a.pid.remote() for a in self.actors], timeout=self.timeout_s)

    def _new_actor(self):
        cls = self.ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0)(_Replica)
        device = "cuda" if self.num_gpus else "cpu"
        return cls.remote(self._spec, device, self.threads)

    def evaluate(self, x, sigma, model_time, cond):
        M = x.shape[0]
        n = min(self.workers, M)
        bounds = [(M * i // n, M * (i + 1) // n) for i in range(n)]
        xc, sc, tc = x.cpu(), sigma.cpu(), model_time.cpu()
        cc = map_cond(cond, lambda v: v.cpu())
        chunks = [(xc[a:b], sc[a:b], tc[a:b], split_cond(cc, a, b)) for a, b in bounds]
        t0 = time.perf_counter()
        refs = [self.actors[i].evaluate.remote(*chunks[i]) for i in range(n)]
        outs, compute = [], []
        for i in range(n):
            out, dt = self._get(i, refs[i], chunks[i])
            outs.append(out)
            compute.append(dt)
        # Communication: the call's wall time less the slowest actor's compute (serialisation, transfer, scheduling).
        self.comm_s += max(time.perf_counter() - t0 - max(compute), 0.0)
        return torch.cat(outs).to(x.device)

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
                try:
                    ray.kill(self.actors[i], no_restart=True)
                except Exception:  # noqa: BLE001 - the actor may already be gone
                    pass
                self.actors[i] = self._new_actor()
                ref = self.actors[i].evaluate.remote(*chunk)
        raise AssertionError("unreachable")

    def close(self):
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self.started_ray = False
