"""Run by tests/test_backends.py and tests/test_gpu_grade.py in each rank process (env RANK, WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT).

Modes:
  samples OUT   sample every configuration of CONFIGS with the torch backend; rank 0 saves them to OUT
  hang          rank 1 joins the group and then hangs; rank 0 must fail with DistributedTimeoutError
  memory        rank 1's device is all but full: every rank must raise DeviceMemoryError before the first round
  twice         six samplers with backend="torch" one after another in one process (each closes its backend):
                every one samples; prints TWICE-OK
  weights       the same network with a -inf buffer on every rank is accepted (SAME-OK); then every rank builds a
                network with its own random weights: every rank must refuse it naming model
  agree OUT     the kernel path (Triton interpreter) on every rank: Picard residuals placed at the threshold and a
                Picard sample through a max_batch-capped network; rank 0 saves every rank's results to OUT
"""

import os
import socket
import subprocess
import sys
import time
from dataclasses import replace

import torch

from paratime import ParallelSampler
from paratime.backends.torch_dist import DistributedTimeoutError, TorchDistributedBackend

CONFIGS = {
    "ddim_picard": dict(solver="ddim", method="picard", tol=0.1),
    "ddpm_picard": dict(solver="ddpm", method="picard", tol=0.1),
    "heun_picard": dict(solver="heun", method="picard", tol=0.0, window=7),
    "ddpm_sequential": dict(solver="ddpm", method="sequential"),
    "ddim_parareal_pipelined": dict(solver="ddim", method="parareal_pipelined", tol=0.1),
    "ddpm_staggered": dict(solver="ddpm", method="staggered", window=8, tol=3e-2),
}


class CappedNetwork:
    """Wraps a network and refuses any call with more than ``cap`` rows: proves ``max_batch`` is honoured."""

    def __init__(self, net, cap: int):
        self.net, self.cap = net, cap

    def __call__(self, x, t, **cond):
        if x.shape[0] > self.cap:
            raise RuntimeError(f"max_batch violated: a network call with {x.shape[0]} rows > {self.cap}")
        return self.net(x, t, **cond)


def capped_gmm(cap: int):
    """The analytic ring mixture behind a :class:`CappedNetwork`."""
    from paratime.zoo import ring_gmm

    den = ring_gmm()
    return replace(den, network=CappedNetwork(den.network, cap))


class LabelledNet:
    """The ring mixture's network, shifted by a label-dependent amount (a conditional model for traffic tests)."""

    def __init__(self):
        from paratime.zoo import ring_gmm

        self.net = ring_gmm().network

    def __call__(self, x, t, labels):
        return self.net(x, t) + 0.01 * labels.to(x.dtype)[:, None]


def sample_all(backend="local", **kw):
    out = {}
    for name, cfg in CONFIGS.items():
        s = ParallelSampler("gmm", steps=30, progress=False, backend=backend, **cfg, **kw)
        out[name] = s.sample(12, seed=3).samples
    return out


def residuals_at_threshold():
    """Picard residuals through the fused kernel with old values placed so that each residual sits at its
    threshold (the float64 value rounded to float32). Returns (err of 3 repeated launches, thresholds)."""
    from paratime.kernels import picard_update

    g = torch.Generator().manual_seed(0)
    W, B, D = 9, 3, 1030
    start = torch.randn(B, D, generator=g)
    dx = 0.05 * torch.randn(W, B, D, generator=g)
    old = (start.double()[None] + dx.double().cumsum(0) + 1e-3 * torch.randn(W, B, D, generator=g,
                                                                              dtype=torch.float64)).float()
    exact = (start.double()[None] + dx.double().cumsum(0) - old.double()).pow(2).mean(-1).sqrt()
    errs = [picard_update(start, dx, old)[1] for _ in range(3)]
    return errs, exact.float()


def _gather(be, t):
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(be.workers)]
    dist.all_gather(out, t.contiguous())
    return out


def main():
    torch.set_num_threads(1)
    mode = sys.argv[1]
    if mode == "samples":
        with TorchDistributedBackend(timeout_s=60) as be:
            res = sample_all(be)
            if be.rank == 0:
                torch.save(res, sys.argv[2])
    elif mode == "hang":
        be = TorchDistributedBackend(timeout_s=float(sys.argv[2]))
        if be.rank == 1:
            time.sleep(120)
            return
        t0 = time.perf_counter()
        try:
            ParallelSampler("gmm", steps=10, progress=False, backend=be).sample(4, seed=0)
        except DistributedTimeoutError as e:
            print(f"TIMEOUT-OK {time.perf_counter() - t0:.1f} {e}", flush=True)
            os._exit(0)
        print("NO-ERROR", flush=True)
        os._exit(1)
    elif mode == "memory":
        import paratime.backends.memory as memory
        from paratime.backends.memory import DeviceMemoryError

        be = TorchDistributedBackend(timeout_s=30)
        if be.rank == 1:
            memory.available_bytes = lambda device: 1000
        t0 = time.perf_counter()
        try:
            ParallelSampler("gmm", steps=12, method="picard", window=4, progress=False, backend=be).sample(2, seed=0)
        except DeviceMemoryError as e:
            print(f"MEMORY-ERROR {time.perf_counter() - t0:.1f} {e}", flush=True)
            be.close()
            return
        print("NO-ERROR", flush=True)
        sys.exit(1)
    elif mode == "twice":
        outs = []
        for _ in range(6):
            with ParallelSampler("gmm", steps=6, progress=False, backend="torch",
                                 backend_options={"timeout_s": 30}) as s:
                outs.append(s.sample(4, seed=1).samples)
        assert all(torch.equal(o, outs[0]) for o in outs)
        print("TWICE-OK", flush=True)
    elif mode == "weights":
        from paratime import Denoiser
        from paratime.schedules import VESchedule

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(2, 2).double()

            def forward(self, x, t):
                return self.lin(x)

        be = TorchDistributedBackend(timeout_s=30)
        # The same network on every rank, with a -inf mask buffer (its sums are not finite): accepted.
        torch.manual_seed(0)
        same = Net()
        same.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))
        ParallelSampler(Denoiser(same, VESchedule(), "eps"), steps=4, progress=False, backend=be)
        print("SAME-OK", flush=True)
        torch.manual_seed(int(os.environ["RANK"]))          # an unseeded factory: each rank its own weights
        try:
            ParallelSampler(Denoiser(Net(), VESchedule(), "eps"), steps=4, progress=False, backend=be)
        except ValueError as e:
            print(f"WEIGHTS-ERROR {e}", flush=True)
            return
        print("NO-ERROR", flush=True)
        sys.exit(1)
    elif mode == "agree":
        from paratime.kernels import set_kernel_mode

        set_kernel_mode("triton")                      # every dispatch on the interpreted kernels, or an error
        with TorchDistributedBackend(timeout_s=120, max_batch=3) as be:
            errs, thr = residuals_at_threshold()
            decisions = (errs[0] <= thr).to(torch.uint8)
            # A window given (the reference's in test_gpu_grade.py): the planner prices max_batch's chunks, so a
            # planned one would differ from the unlimited reference's.
            res = ParallelSampler(capped_gmm(3), steps=10, state_dtype=torch.float32, tol=0.1, progress=False,
                                  backend=be, window=4).sample(6, seed=0)
            rounds = torch.tensor([res.stats.rounds])
            got = {"errs": _gather(be, errs[0]), "repeats": [torch.equal(errs[0], e) for e in errs],
                   "decisions": _gather(be, decisions), "samples": _gather(be, res.samples),
                   "rounds": _gather(be, rounds), "comm_bytes": be.timings["comm_bytes"], "calls": be.calls,
                   "nfe_total": res.stats.nfe_total}
            # bf16 network outputs travel through gloo as their bytes.
            set_kernel_mode("auto")
            got["bf16"] = ParallelSampler("digits", steps=4, method="sequential", dtype=torch.bfloat16,
                                          progress=False, backend=be).sample(4, seed=0).samples
            if be.rank == 0:
                torch.save(got, sys.argv[2])


if __name__ == "__main__":
    main()


def run_ranks(script, world: int = 2, timeout: float = 150, cwd=None) -> list[str]:
    """Run the Python file ``script`` as ``world`` gloo ranks on loopback (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``, and the port again as ``PORT``; one thread each) and return
    each rank's output; a rank still running after ``timeout`` seconds is killed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=cwd,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PORT=port,
                                       GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1"))
             for r in range(world)]
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)

