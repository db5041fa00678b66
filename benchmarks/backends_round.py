"""Per-round time, communication and bytes per round of the backends, 1 and 2 workers, and the engine's overhead.

    python benchmarks/backends_round.py [--batch 64] [--steps 100] [--window 100] [--reps 3] [--threads 1]

The digits U-Net with Picard DDIM: ``local`` (1 worker), ``torch`` (gloo, torchrun on 127.0.0.1, 1 and 2 ranks) and
``ray`` (1 and 2 local actors). Every worker gets ``--threads`` torch threads (default 1: on a 2-core machine 2
workers use both cores, 1 worker one of them). Prints per round: the median and min wall time over ``--reps`` runs
(after a warm-up), communication seconds, bytes moved between workers per round, and the 2-worker / 1-worker ratio
of the per-round time (goal <= 0.55). For ``local`` it also prints the engine overhead: wall time outside the
network's forward calls, per round and as a share of the round (goal <= 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


class _ForwardTimer:
    """Seconds spent in a module's forward calls (CPU: calls are synchronous), by hooks on the module itself: a
    wrapping module would hide what the network declares (its ``data_range``, which sets the tolerance's units: the
    local row ran another stop rule, 603.7 evaluations a sample against the other backends' 613.1)."""

    def __init__(self, net: torch.nn.Module):
        self.seconds, self._t0 = 0.0, 0.0
        net.register_forward_pre_hook(self._start)
        net.register_forward_hook(self._stop)

    def _start(self, module, args):
        self._t0 = time.perf_counter()

    def _stop(self, module, args, out):
        self.seconds += time.perf_counter() - self._t0


def measure(backend, args) -> dict:
    """Run the case ``reps`` times (after one warm-up) on ``backend``; per-round figures."""
    from paratime import ParallelSampler
    from paratime.models import load_model

    den = load_model("digits")
    # Ray actors build their own digits network (model="digits"): timed on the local backend only.
    timed = _ForwardTimer(den.network) if backend == "local" else None
    s = ParallelSampler(den, steps=args.steps, window=args.window, progress=False, backend=backend)
    s.sample(args.batch, seed=0)
    walls, comm, nbytes, net = [], [], [], []
    for _ in range(args.reps):
        t0 = dict(s.backend.timings)
        n0 = timed.seconds if timed else 0.0
        res = s.sample(args.batch, seed=0)
        t1 = s.backend.timings
        walls.append(res.stats.wall_s)
        comm.append(t1.get("comm_s", 0.0) - t0.get("comm_s", 0.0))
        nbytes.append(t1.get("comm_bytes", 0.0) - t0.get("comm_bytes", 0.0))
        net.append(timed.seconds - n0 if timed else 0.0)
    R = res.stats.rounds
    med = statistics.median(walls)
    rec = {"backend": s.backend.name, "workers": s.backend.workers, "rounds": R, "nfe": res.stats.nfe,
           "per_round_s": med / R, "per_round_min_s": min(walls) / R, "comm_per_round_s": statistics.median(comm) / R,
           "bytes_per_round": statistics.median(nbytes) / R}
    if timed is not None:
        over = [w - n for w, n in zip(walls, net)]
        rec["overhead_per_round_s"] = statistics.median(over) / R
        rec["overhead_share"] = statistics.median(o / w for o, w in zip(over, walls))
    return rec


def _torchrun(workers: int, args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d, "rec.json")
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={workers}", "--master_addr=127.0.0.1",
               f"--master_port={port}", __file__, "--worker", str(out), "--batch", str(args.batch), "--steps",
               str(args.steps), "--window", str(args.window), "--reps", str(args.reps), "--threads", str(args.threads)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"torchrun with {workers} workers failed:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--backends", nargs="*", default=["local", "torch", "ray"])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:                                   # one torchrun rank
        from paratime.backends.torch_dist import TorchDistributedBackend

        with TorchDistributedBackend(timeout_s=600) as be:
            rec = measure(be, args)
            if be.rank == 0:
                Path(args.worker).write_text(json.dumps(rec))
        return 0
    print(f"digits DDIM-{args.steps}, Picard window {args.window}, batch {args.batch}, {args.threads} thread(s) per "
          f"worker, {args.reps} reps (median; min in brackets)")
    recs = []
    if "local" in args.backends:
        recs.append(measure("local", args))
        print(json.dumps(recs[-1]), flush=True)
    if "torch" in args.backends:
        for w in (1, 2):
            recs.append(_torchrun(w, args))
            print(json.dumps(recs[-1]), flush=True)
    if "ray" in args.backends:
        import ray

        from paratime.backends.ray_actors import RayBackend

        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
        try:
            for w in (1, 2):
                with RayBackend(workers=w, model="digits", threads=args.threads) as be:
                    recs.append(measure(be, args))
                print(json.dumps(recs[-1]), flush=True)
        finally:
            ray.shutdown()
    one = {r["backend"]: r["per_round_s"] for r in recs if r["workers"] == 1}
    print(f"\n{'backend':<8} {'workers':>7} {'rounds':>6} {'per round ms':>18} {'comm ms/round':>13} "
          f"{'bytes/round':>12} {'2w/1w':>6}")
    for r in recs:
        ratio = f"{r['per_round_s'] / one[r['backend']]:.2f}" if r["workers"] == 2 else ""
        print(f"{r['backend']:<8} {r['workers']:>7} {r['rounds']:>6} {1e3 * r['per_round_s']:>9.1f} "
              f"[{1e3 * r['per_round_min_s']:>6.1f}] {1e3 * r['comm_per_round_s']:>13.1f} "
              f"{r['bytes_per_round']:>12.0f} {ratio:>6}")
    for r in recs:
        if "overhead_per_round_s" in r:
            print(f"\nengine overhead (local, outside the network's forward): {1e3 * r['overhead_per_round_s']:.2f} "
                  f"ms per round, {100 * r['overhead_share']:.1f}% of the round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
