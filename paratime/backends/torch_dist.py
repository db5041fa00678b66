"""torch.distributed SPMD backend: every rank runs the same sampling loop on the same data.

Each network call, rank r evaluates its contiguous share of the rows (ceil(M / world) rows, the last shares padded),
and one ``all_gather_into_tensor`` gives every rank all outputs, so every rank applies the identical update and
holds the same trajectory without a coordinator. NCCL on CUDA (one GPU per rank, ``LOCAL_RANK``), gloo on CPU.

A rank that dies or hangs makes the collective fail on every other rank within ``timeout_s``: the error names the
rank, the collective and the timeout instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import os
import time

import torch
import torch.distributed as dist

from .base import Backend, map_cond
from .local import split_cond

__all__ = ["TorchDistributedBackend", "DistributedTimeoutError"]

log = logging.getLogger("paratime")


class DistributedTimeoutError(RuntimeError):
    """A collective did not complete: a peer rank died, hangs, or is unreachable."""


class TorchDistributedBackend(Backend):
    """Shard rows over the ranks of a process group.

    Args:
        group: a process group to use (passed in; not destroyed on close). None: the default group, created from
            the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) if needed,
            and destroyed on close if this backend created it.
        timeout_s: seconds a collective may take before every waiting rank raises.
        dist_backend: ``nccl`` or ``gloo``; default nccl when CUDA is available, else gloo.
        init_method: e.g. ``tcp://127.0.0.1:29500`` with ``rank`` and ``world_size``, instead of the environment.

    Raises:
        ValueError: a bad option, or no distributed environment to join.
    """

    name = "torch"

    def __init__(self, group=None, timeout_s: float = 300.0, dist_backend: str | None = None,
                 init_method: str | None = None, rank: int | None = None, world_size: int | None = None):
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
        if dist_backend not in (None, "nccl", "gloo"):
            raise ValueError(f"dist_backend: unknown {dist_backend!r}; allowed: nccl, gloo")
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        self.owns_group = False
        if group is None and not dist.is_initialized():
            if init_method is None and ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ):
                raise ValueError("backend: 'torch' needs a process group: run under torchrun, pass group=, or "
                                 "init_method= with rank= and world_size=")
            dist_backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if dist_backend == "gloo" and os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost") \
                    and "GLOO_SOCKET_IFNAME" not in os.environ:
                os.environ["GLOO_SOCKET_IFNAME"] = "lo"   # keep a single-machine run on loopback
            kw = {} if init_method is None else {"init_method": init_method, "rank": rank, "world_size": world_size}
            if dist_backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(dist_backend, timeout=self.timeout, **kw)
            self.owns_group = True
        self.group = group
        self.rank = dist.get_rank(group)
        self.workers = dist.get_world_size(group)
        self.comm_s = 0.0

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def timings(self):
        return {"comm_s": self.comm_s}

    def evaluate(self, x, sigma, model_time, cond):
        M, world = x.shape[0], self.workers
        per = -(-M // world)
        lo, hi = min(self.rank * per, M), min((self.rank + 1) * per, M)
        # This rank's contiguous share, padded to `per` rows so every rank sends the same size.
        local = torch.zeros((per, *x.shape[1:]), dtype=x.dtype, device=self.device)
        if hi > lo:
            out = self.denoiser(x[lo:hi].to(self.device), sigma[lo:hi].to(self.device),
                                model_time[lo:hi].to(self.device), **map_cond(split_cond(cond, lo, hi), lambda v: v.to(self.device)))
            local[: hi - lo] = out
        # gloo wants a flat output tensor; NCCL accepts it too.
        gathered = torch.empty(world * local.numel(), dtype=x.dtype, device=self.device)
        t0 = time.perf_counter()
        self._collective("all_gather_into_tensor", gathered, local.reshape(-1))
        self.comm_s += time.perf_counter() - t0
        return gathered.view(world * per, *x.shape[1:])[:M].to(x.device)

    def _collective(self, name, *args):
        try:
            work = getattr(dist, name)(*args, group=self.group, async_op=True)
            if not work.wait(timeout=self.timeout):
                raise DistributedTimeoutError(f"rank {self.rank}: {name} did not complete within "
                                              f"{self.timeout.total_seconds():g} s")
        except DistributedTimeoutError:
            raise
        except RuntimeError as e:
            raise DistributedTimeoutError(
                f"rank {self.rank}/{self.workers}: {name} failed (timeout {self.timeout.total_seconds():g} s): a peer "
                f"rank died, hangs or is unreachable. Cause: {str(e).splitlines()[0][:300]}") from e

    def barrier(self):
        self._collective("all_reduce", torch.zeros(1, device=self.device))

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

