"""Fixed-shape rounds with a compiled network: the embedded policy (DDPM-100, batch 1, one process) sampled with
Picard, its network eager, under ``torch.compile`` with the rows of every round as they come (a new shape most
rounds: recompiles, then dynamic shapes), and under ``torch.compile`` with the rows padded to a few bucket sizes
(``LocalBackend(buckets=...)``: one compiled graph per bucket); sequential sampling (always B rows) eager and compiled.

    python benchmarks/compiled_rounds.py [--threads 1] [--chunks 5] [--reps 3] [--buckets 8 32 100]

Per-chunk wall time (min / median / max over chunks x repeats, after a warm-up that pays the compilations) with the
thread setting stated; samples of the padded runs equal the unpadded ones (checked, max |Δ| printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--buckets", type=int, nargs="+", default=[8, 32, 100])
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import copy
    import dataclasses

    import torch

    torch.set_num_threads(args.threads)
    from paratime.backends import LocalBackend
    from paratime.policy_eval import latency_observations, policy_sampler
    from paratime.zoo.policy import load_policy_model

    model = load_policy_model()
    compiled = dataclasses.replace(model, network=torch.compile(copy.deepcopy(model.network)))
    runs = {
        "sequential eager": policy_sampler("sequential", model),
        "sequential compiled": policy_sampler("sequential", compiled),
        "picard eager": policy_sampler("picard", model),
        "picard compiled": policy_sampler("picard", compiled),
        "picard compiled+buckets": policy_sampler("picard", compiled,
                                                  backend=LocalBackend(buckets=tuple(args.buckets))),
    }
    obs_list = latency_observations(args.chunks)
    rec = {k: [] for k in runs}
    out = {}
    for name, s in runs.items():                                     # warm-up: every compilation happens here
        for obs in obs_list:
            out[name] = s.sample(1, seed=0, obs=obs[None]).samples
    for i, obs in enumerate(obs_list):
        for _ in range(args.reps):
            for name, s in runs.items():
                t0 = time.perf_counter()
                res = s.sample(1, seed=i, obs=obs[None])
                rec[name].append((time.perf_counter() - t0, res.stats.rounds))
    print(f"policy DDPM-100, batch 1, torch threads {torch.get_num_threads()}, buckets {args.buckets}; "
          f"{args.chunks} chunks x {args.reps} repeats; ms per chunk")
    for name, r in rec.items():
        w = [a for a, _ in r]
        print(f"{name:<26} min {1e3 * min(w):8.1f}  median {1e3 * statistics.median(w):8.1f}  "
              f"max {1e3 * max(w):8.1f}  rounds {statistics.median([b for _, b in r]):.0f}")
    d = (out["picard compiled+buckets"] - out["picard compiled"]).abs().max().item()
    print(f"max |padded - unpadded| (compiled picard, last chunk): {d:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
