"""Staggered cores (CHORDS's hierarchy, ``method="staggered"``) against Picard with a window of K points, on K
devices (issue 21 item 3): sequential call equivalents (SCE) and max |Δ| against the sequential sample.

    OMP_NUM_THREADS=1 python benchmarks/staggered_vs_picard.py                 # digits DDIM-50, 16 seeds, ~2 min
    OMP_NUM_THREADS=1 python benchmarks/staggered_vs_picard.py --solver dpmpp_2m --steps 20

One sample per seed (batch 1, the case the devices must speed up): every decision of both methods is per sample, so
one batched run of the 16 seeds gives each seed's batch-1 run (its own finishing tick or round). At batch 1 a tick or
round evaluates at most K rows, one call of ceil(rows / K) = 1 SCE, so a sample's SCE is the tick (staggered) or
round (Picard, the x0 guess's call included) it finished at; speed-up = N / SCE (sequential costs N at any K).
Columns: mean and worst SCE over the seeds, the speed-up of the mean, max |Δ| over the seeds (data units, digits
in [-1, 1]). Tolerances are absolute (``tol_units="absolute"``). Every number printed is deterministic.
"""

from __future__ import annotations

import argparse
import time

import torch

from paratime import ParallelSampler


def run(solver: str, steps: int, seeds: int, cores: list[int], tols: list[float]) -> list[dict]:
    kw = dict(solver=solver, steps=steps, progress=False)
    seq = ParallelSampler("digits", method="sequential", **kw).sample(seeds, seed=0).samples
    rows = []
    for K in cores:
        for method, extra in (("staggered", {}), ("picard", dict(update="secant", stop="final"))):
            for tol in tols:
                t0 = time.perf_counter()
                res = ParallelSampler("digits", method=method, window=K, tol=tol, tol_units="absolute", **kw,
                                      **extra).sample(seeds, seed=0)
                sce = torch.tensor(res.stats.sample_rounds, dtype=torch.float64)
                err = (res.samples - seq).abs().flatten(1).amax(1)
                rows.append(dict(K=K, method=method, tol=tol, sce_mean=float(sce.mean()), sce_max=int(sce.max()),
                                 speedup=steps / float(sce.mean()), max_err=float(err.max()),
                                 seconds=time.perf_counter() - t0))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solver", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--cores", default="2,4,8")
    ap.add_argument("--tols", default="2e-3,1e-2,3e-2")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = run(a.solver, a.steps, a.seeds, [int(k) for k in a.cores.split(",")],
               [float(t) for t in a.tols.split(",")])
    print(f"digits {a.solver}-{a.steps}, {a.seeds} seeds at batch 1, 1 thread")
    print("| K | method | tol | SCE mean | SCE max | speed-up N/SCE | max \\|Δ\\| |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['method']} | {r['tol']:g} | {r['sce_mean']:.1f} | {r['sce_max']} | "
              f"{r['speedup']:.2f}x | {r['max_err']:.1e} |")
    print("best at max |Δ| <= 2e-3, per K:")
    for K in sorted({r["K"] for r in rows}):
        ok = [r for r in rows if r["K"] == K and r["max_err"] <= 2e-3]
        for method in ("staggered", "picard"):
            best = max((r for r in ok if r["method"] == method), key=lambda r: r["speedup"], default=None)
            if best is not None:
                print(f"  K={K} {method}: {best['speedup']:.2f}x (tol {best['tol']:g}, max |Δ| {best['max_err']:.1e})")


if __name__ == "__main__":
    main()
