"""torch.distributed SPMD backend: every rank runs the same sampling loop on the same data.

Each network call, rank r evaluates its contiguous share of the rows (ceil(M / world) rows, the last shares padded),
in chunks of at most ``max_batch`` rows, and one all-gather gives every rank all outputs, so every
rank applies the identical update and holds the same trajectory without a coordinator. NCCL on CUDA (one GPU per
rank), gloo on CPU.

What is gathered: the network's raw outputs in the network's dtype (bf16/fp16 outputs travel at 2 bytes per
element), converted to ``x0`` on every rank afterwards (the same elementwise conversion the local backend applies).
With classifier-free or classifier guidance the per-rank results are already combined, and ``x0`` is gathered in
the state dtype.

Device of a rank (:func:`rank_device`): where the model's weights are (checked against ``device=`` and, for CUDA
weights, ``cuda:LOCAL_RANK``: a disagreement is an error naming both, e.g. ``--device cuda`` under torchrun, which
puts every rank's weights on cuda:0); without weights (a plain function), ``device=``, else under NCCL
``cuda:LOCAL_RANK`` or the current CUDA device, under gloo the CPU.

Communication time: on CUDA, events recorded on the compute stream just before the collective is issued and just
after the stream is made to wait for it (read once, when :attr:`timings` is asked for: no host sync per call); on
CPU, the wall time of the blocking gloo collective (it includes waiting for a slower peer's compute).

A rank that dies or hangs makes the collective fail on every other rank within ``timeout_s``: the error names the
rank, the collective and the timeout instead of hanging. gloo: the wait itself times out. NCCL (whose wait does not
block the host): the process group gets ``timeout_s`` and, unless the user set it, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``
(:func:`nccl_environment`): the watchdog aborts the communicators after ``timeout_s`` without killing the process,
so the stuck kernels return and the next collective raises, which becomes :class:`DistributedTimeoutError`.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .base import Backend, map_cond, moments_agree, split_cond, weight_moments

__all__ = ["TorchDistributedBackend", "check_rank_env", "DistributedTimeoutError", "rank_device", "nccl_environment",
           "release_default_group", "MAX_TIMEOUT_S"]

log = logging.getLogger("paratime")


#: the flat all-gather: ``all_gather_single`` where torch has it (it deprecates ``all_gather_into_tensor``)
_ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


#: the longest ``timeout_s``: gloo holds a timeout in milliseconds in a C int (2^31 ms, about 24.8 days)
MAX_TIMEOUT_S = (2**31 - 1) / 1000


@dataclass
class _MadeGroup:
    """The default group a backend of this process created: it is kept until the process exits and a later backend
    with the same options joins it; one with another init_method replaces it once no open backend uses it (see
    :meth:`TorchDistributedBackend.close`)."""

    options: tuple              # (dist_backend, init_method, rank, world_size) it was made with
    timeout_s: float            # the group's own timeout (gloo and NCCL's watchdog read it)
    users: int = 0              # open backends using it


_made: _MadeGroup | None = None     # None: no backend of this process created the default group


def _destroy_default_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def release_default_group() -> bool:
    """Destroy the default process group a backend of this process created, once no open backend uses it (it is
    otherwise kept until the process exits, see :meth:`TorchDistributedBackend.close`): for a process that goes on
    with a group of its own. Returns whether it did."""
    global _made
    if _made is None or _made.users > 0 or not dist.is_initialized():
        return False
    dist.destroy_process_group()
    _made = None
    return True


class DistributedTimeoutError(RuntimeError):
    """A collective did not complete: a peer rank died, hangs, or is unreachable."""


#: NCCL's watchdog on a timed-out collective: abort the communicators and keep the process (the error reaches Python)
NCCL_ERROR_HANDLING = "2"


def nccl_environment(env=os.environ) -> None:
    """Before an NCCL group is made: ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` unless the user set it (see the module
    docstring); without it a dead peer ends in the watchdog killing every rank."""
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", NCCL_ERROR_HANDLING)


def rank_device(weights: torch.device | None, requested: torch.device | None, local_rank: int | None, nccl: bool,
                current_cuda: int | None = None) -> torch.device:
    """This rank's compute device: the model's weights' device when it has weights, else ``requested``, else under
    NCCL ``cuda:local_rank`` (or ``cuda:current_cuda``), else the CPU.

    Args:
        weights: the device of the network's first parameter, or None (no weights). requested: ``device=``.
        local_rank: ``LOCAL_RANK`` as an integer, or None. nccl: whether the group is NCCL.
        current_cuda: the current CUDA device index (NCCL without weights, ``device=`` or LOCAL_RANK).
    Raises:
        ValueError: the weights' device disagrees with ``device=`` or (CUDA weights) with ``cuda:LOCAL_RANK``, or
            NCCL with weights off CUDA; the message names both devices.
    """
    if weights is not None:
        if requested is not None and torch.device(requested) != weights:
            raise ValueError(f"device: {torch.device(requested)} was given but the model's weights are on {weights}; "
                             "move the model there or leave device= unset")
        if weights.type == "cuda" and local_rank is not None and weights.index not in (None, local_rank):
            raise ValueError(f"device: the model's weights are on {weights} but LOCAL_RANK={local_rank} makes this "
                             f"rank's device cuda:{local_rank}; load the model on cuda:LOCAL_RANK on each rank "
                             "(not --device cuda, which is cuda:0 everywhere)")
        if nccl and weights.type != "cuda":
            raise ValueError(f"device: NCCL needs CUDA tensors but the model's weights are on {weights}; move the "
                             "model to cuda:LOCAL_RANK or use dist_backend='gloo'")
        return weights
    if requested is not None:
        return torch.device(requested)
    if nccl:
        return torch.device("cuda", local_rank if local_rank is not None else (current_cuda or 0))
    return torch.device("cpu")


def check_rank_env() -> None:
    """Under torchrun the environment describes the world: ``WORLD_SIZE`` >= 1, ``RANK`` (and ``LOCAL_RANK``, when
    set) in ``[0, WORLD_SIZE)``, a ``MASTER_ADDR`` and a ``MASTER_PORT`` in ``[1, 65536)``; checked before the group is
    joined (a bad value otherwise ends in int()'s message, or in a rank waiting out the timeout for peers that
    cannot exist).

    Raises:
        ValueError: naming the environment variable and the allowed values.
    """
    env = os.environ

    def integer(name: str, low: int, high: int | None = None) -> int:
        text = env.get(name, "")
        if not text.strip().isdigit() or int(text) < low or (high is not None and int(text) >= high):
            rng = f">= {low}" if high is None else f"in [{low}, {high})"
            raise ValueError(f"{name}: the environment variable must be an integer {rng} (torchrun sets it), "
                             f"got {text!r}")
        return int(text)

    world = integer("WORLD_SIZE", 1)
    integer("RANK", 0, world)
    if "LOCAL_RANK" in env:
        integer("LOCAL_RANK", 0, world)
    if not env.get("MASTER_ADDR"):
        raise ValueError("MASTER_ADDR: the environment variable must name the rank-0 host (torchrun sets it)")
    integer("MASTER_PORT", 1, 65536)


class TorchDistributedBackend(Backend):
    """Shard rows over the ranks of a process group.

    Args:
        group: a process group to use (passed in; not destroyed on close). None: the default group, created from
            the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) if needed;
            one this backend created lives until the process exits, and a later backend of the process joins it
            (:meth:`close`).
        timeout_s: seconds a collective may take before every waiting rank raises (at most
            :data:`MAX_TIMEOUT_S`).
        dist_backend: ``nccl`` or ``gloo``; default nccl when CUDA is available, else gloo.
        init_method: e.g. ``tcp://127.0.0.1:29500`` with ``rank`` and ``world_size``, instead of the environment.
        device: this rank's compute device (default: see the module docstring).
        max_batch: rows per network call on each rank (None: derived from the model and device).

    Raises:
        ValueError: a bad option, or no distributed environment to join.
    """

    name = "torch"

    def __init__(self, group=None, timeout_s: float = 300.0, dist_backend: str | None = None,
                 init_method: str | None = None, rank: int | None = None, world_size: int | None = None,
                 device: str | torch.device | None = None, max_batch: int | None = None):
        super().__init__(max_batch)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
            raise ValueError(f"timeout_s: must be a finite number > 0, got {timeout_s!r}")
        if timeout_s > MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s: at most {MAX_TIMEOUT_S:.0f} s (gloo's 2^31 ms), got {timeout_s!r}")
        if dist_backend not in (None, "nccl", "gloo"):
            raise ValueError(f"dist_backend: unknown {dist_backend!r}; allowed: nccl, gloo")
        try:
            self._device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: not a device: {device!r}") from e
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        self.owns_group = False           # whether this backend created the default group (one joining it: False)
        global _made
        options = (dist_backend or ("nccl" if torch.cuda.is_available() else "gloo"), init_method, rank, world_size)
        if group is None and _made is not None and init_method not in (None, _made.options[1]) and _made.users == 0 \
                and dist.is_initialized():
            # Made here for another rendezvous, and no open backend uses it: replace it. Never a re-creation on the
            # same rendezvous (the torchrun environment's), whose old state the new one met.
            dist.destroy_process_group()
            _made = None
        joining = group is None and not dist.is_initialized()
        if not joining and group is None and _made is not None and _made.options == options:
            # This process's earlier backend created the group with these options: join it, at its timeout.
            if float(timeout_s) != _made.timeout_s:
                raise ValueError(f"timeout_s: the process group this process's earlier backend created times out "
                                 f"after {_made.timeout_s:g} s, which a backend joining it cannot change (got "
                                 f"{timeout_s!r}); give the same, or release_default_group() first")
        elif not joining and group is None and _made is not None and any(v is not None for v in options[1:]):
            names = ("dist_backend", "init_method", "rank", "world_size")
            name, made, value = next((n, m, v) for n, m, v in zip(names, _made.options, options) if m != v)
            raise ValueError(f"{name}: the process group this process's earlier backend created has {name}="
                             f"{made!r}, which a backend joining it cannot change (got {value!r}); give the same, or "
                             f"release_default_group() first")
        elif not joining:       # the group exists: the options that would create one do not apply
            for name, value in (("dist_backend", dist_backend), ("init_method", init_method), ("rank", rank),
                                ("world_size", world_size)):
                if value is not None:
                    why = "group= is given" if group is not None else "a process group already exists"
                    raise ValueError(f"{name}: applies only when the backend creates the process group; {why}")
        elif init_method is None:
            for name, value in (("rank", rank), ("world_size", world_size)):
                if value is not None:
                    raise ValueError(f"{name}: applies only with init_method= (under torchrun the environment "
                                     f"gives it)")
        if joining:
            if init_method is None and ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ):
                raise ValueError("backend: 'torch' needs a process group: run under torchrun, pass group=, or "
                                 "init_method= with rank= and world_size=")
            if init_method is None:
                check_rank_env()
            else:
                for name, value, low, high in (("world_size", world_size, 1, None),
                                               ("rank", rank, 0, None if world_size is None else world_size - 1)):
                    if isinstance(value, bool) or not isinstance(value, int) or value < low or \
                            (high is not None and value > high):
                        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
                        raise ValueError(f"{name}: with init_method=, an integer {rng}, got {value!r}")
            dist_backend = options[0]
            if dist_backend == "gloo" and os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost") \
                    and "GLOO_SOCKET_IFNAME" not in os.environ:
                os.environ["GLOO_SOCKET_IFNAME"] = "lo"   # keep a single-machine run on loopback
            kw = {} if init_method is None else {"init_method": init_method, "rank": rank, "world_size": world_size}
            if dist_backend == "nccl":
                nccl_environment()
                torch.cuda.set_device(self._device or int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(dist_backend, timeout=self.timeout, **kw)
            if _made is None:
                atexit.register(_destroy_default_group)
            _made, self.owns_group = _MadeGroup(options, float(timeout_s)), True
        self._counted = group is None and _made is not None     # a user of the group made here
        if self._counted:
            _made.users += 1
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the process "
                             f"group given; build the backend only on the group's ranks")
        self.workers = dist.get_world_size(group)
        self._events: list = []          # (start, end) CUDA events of collectives not yet read

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def nccl(self) -> bool:
        return dist.get_backend(self.group) == "nccl"

    @property
    def device(self) -> torch.device:
        """This rank's compute device (:func:`rank_device`).

        Raises:
            ValueError: the model's weights disagree with ``device=`` or ``cuda:LOCAL_RANK``.
        """
        net = getattr(self.denoiser, "network", None)
        p = next(net.parameters(), None) if isinstance(net, torch.nn.Module) else None
        local = os.environ.get("LOCAL_RANK")
        nccl = self.nccl
        return rank_device(None if p is None else p.device, self._device, None if local is None else int(local),
                           nccl, torch.cuda.current_device() if nccl and torch.cuda.is_available() else None)

    @property
    def timings(self):
        if self._events:
            torch.cuda.synchronize()        # once, when the figures are read
            self.comm_s += sum(a.elapsed_time(b) for a, b in self._events) / 1000
            self._events.clear()
        return super().timings

    def evaluate(self, x, sigma, model_time, cond=None, samples=None, raw=False):
        self.calls += 1
        den, dev, M, world = self.denoiser, self.device, x.shape[0], self.workers
        per = -(-M // world)
        lo, hi = min(self.rank * per, M), min((self.rank + 1) * per, M)
        # What travels: raw outputs (the caller's fused step converts them: both halves under guidance, as many
        # bytes as a state-dtype x0 at half the network's precision), or the unguided raw output converted to x0
        # here, or x0 itself when guidance rescaling or a classifier acts between the outputs and x0.
        halves = 2 if raw and den.guided else 1
        net_out = raw or not (den.guided or den.classified)
        fn = den.network_outputs if raw else den.run_network if net_out else None
        # This rank's contiguous share, padded to `per` rows (`halves` blocks of them).
        share_cond = split_cond(cond or {}, lo, hi) if samples is None else self.rows_cond(cond, samples[lo:hi])
        share_cond = map_cond(share_cond, lambda v: v.to(dev))
        xs, ss, ts = x[lo:hi].to(dev), sigma[lo:hi].to(dev), model_time[lo:hi].to(dev)
        gather_dtype = (den.network_dtype or x.dtype) if net_out else x.dtype   # the same on every rank
        shape = x.shape[1:]
        failure, done = None, hi - lo       # done: rows evaluated here
        if hi > lo:
            try:
                out = self.run_chunked(xs, ss, ts, share_cond, fn=fn)
                out = [o for o in out if o is not None] if raw else [out]
            except Exception as e:     # noqa: BLE001 - told to every rank through this call's gather, raised below
                failure, done = e, 0
        if done == 0:
            out = [torch.empty((0, *shape), dtype=gather_dtype, device=dev)] * halves
        if done < per:
            out = [torch.cat([o.to(gather_dtype), o.new_zeros((per - done, *shape), dtype=gather_dtype)]) for o in out]
        out = out[0].to(gather_dtype)[None] if halves == 1 else torch.stack(out).to(gather_dtype)   # (halves, per, ...)
        # Where the gather lands in host memory (gloo), one more element per rank: whether its network failed, so
        # that every rank raises at this call together (a rank that raised alone left its peers waiting out timeout_s
        # in the next collective, the group broken). Under NCCL reading it would be a device sync per call: none.
        local = out.reshape(-1)
        if not self.nccl:
            local = torch.cat([local, local.new_full((1,), float(failure is not None))])
        gathered = self._all_gather(local, world).view(world, -1)                   # (world, L [+ 1])
        self.comm_bytes += (world - 1) * out.numel() * out.element_size()     # the outputs (the flag aside)
        self._raise_failed(None if self.nccl else gathered[:, -1], failure)
        full = gathered[:, :out.numel()].reshape(world, halves, per, *shape).transpose(0, 1).reshape(
            halves, world * per, *shape)
        full = full[:, :M].to(x.device)                                            # (halves, M, *shape)
        if raw:
            return full[0], (full[1] if halves == 2 else None)
        return den.to_x0(x, sigma, full[0]) if net_out else full[0].to(x.dtype)

    def _raise_failed(self, flags: torch.Tensor | None, failure: Exception | None) -> None:
        """Raise on every rank where a rank's network failed in this call (``flags``: ``(world,)`` on the host,
        nonzero where it did): the failing rank its own error, the others one naming it. Under NCCL (``flags`` None)
        a peer of a failed rank raises when the watchdog aborts its next collective (``timeout_s``)."""
        if failure is not None:
            raise failure
        if flags is not None:
            failed = flags.nonzero().flatten().tolist()
            if failed:
                raise RuntimeError(f"rank {self.rank}/{self.workers}: the network raised on rank(s) {failed} in this "
                                   f"call (their own error is raised there); every rank stops here")

    def _all_gather(self, local: torch.Tensor, world: int) -> torch.Tensor:
        # gloo wants a flat output tensor (NCCL accepts it too) on the CPU; half-precision outputs travel as their
        # bytes (gloo rejects bf16 and int16; a gather only copies bits).
        dtype = local.dtype
        if not self.nccl:
            local = local.cpu()
            if dtype in (torch.float16, torch.bfloat16):
                local = local.view(torch.uint8)
        gathered = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
        if self.nccl:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._collective(_ALL_GATHER, gathered, local)
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            self._collective(_ALL_GATHER, gathered, local)
            self.comm_s += time.perf_counter() - t0
        return gathered.view(dtype)

    def _collective(self, name, *args):
        try:
            work = getattr(dist, name)(*args, group=self.group, async_op=True)
            if self.nccl:
                work.wait()         # makes the current stream wait for NCCL's; the host does not block
            elif not work.wait(timeout=self.timeout):
                raise DistributedTimeoutError(f"rank {self.rank}: {name} did not complete within "
                                              f"{self.timeout.total_seconds():g} s")
        except DistributedTimeoutError:
            raise
        except RuntimeError as e:
            raise DistributedTimeoutError(
                f"rank {self.rank}/{self.workers}: {name} failed (timeout {self.timeout.total_seconds():g} s): a peer "
                f"rank died, hangs or is unreachable. Cause: {str(e).splitlines()[0][:300]}") from e

    def agree_max(self, values: list[float]) -> list[float]:
        """Every rank's maximum of each value (float64), through the timed collective, as a call's gather: a rank
        that hangs or dies raises :class:`DistributedTimeoutError` (gloo: here; NCCL, whose wait does not block the
        host: at the read below once the watchdog aborts, or at the next collective). One host read (planning, not
        the hot loop)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.nccl else "cpu")
        self._collective("all_reduce", t, dist.ReduceOp.MAX)
        try:
            return t.tolist()
        except RuntimeError as e:          # NCCL: the aborted collective surfaces at the read
            raise DistributedTimeoutError(f"rank {self.rank}/{self.workers}: all_reduce failed (timeout "
                                          f"{self.timeout.total_seconds():g} s): {str(e).splitlines()[0][:300]}") from e

    def bind(self, denoiser):
        """Attach the denoiser, and check that every rank holds the same network weights: each rank builds its own
        model, and an unseeded factory built a different network on each (Picard then differed from sequential by
        28 on a 2-rank run). One collective of a few numbers; raises on every rank alike.

        Raises:
            ValueError: naming ``model``, when the ranks' weights differ.
        """
        super().bind(denoiser)
        if self.workers == 1:
            return
        moments, count = weight_moments(getattr(denoiser, "network", None))
        # Every rank decides from the same agreed numbers: the largest and the smallest of each.
        mine = [*moments, float(count)]
        top = self.agree_max(mine + [-v for v in mine])
        if not moments_agree(top[:4], [-v for v in top[4:]]):
            raise ValueError("model: the network's weights differ across the ranks; every rank must build the same "
                             "network (seed its initialisation, or load the same weights)")

    def barrier(self):
        self._collective("all_reduce", torch.zeros(1, device=self.device if self.nccl else "cpu"))

    def close(self):
        """Forget the group. The default group this backend created is kept until the process exits: destroyed here,
        the next backend's ``init_process_group`` met the old rendezvous on the same store and port (a second
        sampler under torchrun hung or failed in 8 of 16 runs), so a later backend with the same options joins it
        instead (one with another ``init_method`` replaces it once no open backend uses it; other options on the same
        rendezvous are refused, naming them)."""
        if self._counted and _made is not None:
            _made.users -= 1
        self._counted = self.owns_group = False

