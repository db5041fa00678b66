"""Run by tests/test_backends.py in each rank process (env RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT).

Modes:
  samples OUT   sample every configuration of CONFIGS with the torch backend; rank 0 saves them to OUT
  hang          rank 1 joins the group and then hangs; rank 0 must fail with DistributedTimeoutError
"""

import os
import sys
import time

import torch

from paratime import ParallelSampler
from paratime.backends.torch_dist import DistributedTimeoutError, TorchDistributedBackend

CONFIGS = {
    "ddim_picard": dict(solver="ddim", method="picard", tol=0.1),
    "ddpm_picard": dict(solver="ddpm", method="picard", tol=0.1),
    "heun_picard": dict(solver="heun", method="picard", tol=0.0, window=7),
    "ddpm_sequential": dict(solver="ddpm", method="sequential"),
    "ddim_parareal_pipelined": dict(solver="ddim", method="parareal_pipelined", tol=0.1),
}


def sample_all(backend="local", **kw):
    out = {}
    for name, cfg in CONFIGS.items():
        s = ParallelSampler("gmm", steps=30, progress=False, backend=backend, **cfg, **kw)
        out[name] = s.sample(12, seed=3).samples
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


if __name__ == "__main__":
    main()
