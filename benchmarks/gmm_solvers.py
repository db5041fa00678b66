"""Picard against the sequential sampler on `gmm` for every solver (the README's first table).

    python benchmarks/gmm_solvers.py [--batch 256] [--steps 100] [--tols 0.1,0.001,0]
"""

import argparse

from paratime import ParallelSampler

SOLVERS = ["ddim", "ddpm", "euler_maruyama", "heun", "dpmpp_2m"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--tols", default="0.1,0.001,0")
    args = ap.parse_args()
    print(f"gmm, {args.batch} samples, seed 0, {args.steps} steps, window {args.steps}\n")
    print("| solver | tol | rounds | sequential rounds | NFE/sample | max abs diff | median abs diff |")
    print("|---|---|---|---|---|---|---|")
    for solver in SOLVERS:
        seq = ParallelSampler("gmm", solver=solver, steps=args.steps, method="sequential", progress=False).sample(
            args.batch, seed=0)
        for tol in (float(t) for t in args.tols.split(",")):
            par = ParallelSampler("gmm", solver=solver, steps=args.steps, tol=tol, progress=False).sample(
                args.batch, seed=0)
            d = (par.samples - seq.samples).abs().flatten(1).max(1).values
            print(f"| {solver} | {tol:g} | {par.stats.rounds} | {seq.stats.rounds} | {par.stats.nfe:.0f} | "
                  f"{float(d.max()):.3g} | {float(d.median()):.2g} |")


if __name__ == "__main__":
    main()
