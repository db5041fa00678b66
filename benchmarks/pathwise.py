"""How far Picard's samples are from the sequential ones, sample by sample, on `gmm` (the README's pathwise claims).

    python benchmarks/pathwise.py [--batch 4000] [--solvers ddim,ddpm] [--stop final|paradigms] [--tol 0.1]

Per-sample max |picard - sequential| over coordinates, as percentiles: the max is set by rare samples on a mode
boundary, which land in a neighbouring mode (counted as mode switches). torch threads: 1 (set here).
"""

import argparse

import torch

from paratime import ParallelSampler
from paratime.models import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4000, help="samples (seed 0)")
    ap.add_argument("--steps", type=int, default=100, help="solver steps; Picard window = steps")
    ap.add_argument("--solvers", default="ddim,heun,dpmpp_2m,ddpm,euler_maruyama", help="comma-separated")
    ap.add_argument("--stop", default="final", help="Picard stopping rule: final (default) or paradigms")
    ap.add_argument("--tol", type=float, default=None, help="Picard tolerance (default: the stopping rule's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model("gmm")
    means = model.network.gmm.means
    print(f"gmm, {args.batch} samples, seed 0, {args.steps} steps, window {args.steps}, stop={args.stop}, "
          f"tol={'default' if args.tol is None else args.tol}; per-sample max |picard - sequential|\n")
    print("| solver | rounds | NFE/sample | p50 | p90 | p99 | p99.9 | max | samples > 0.1 | mode switches |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for solver in args.solvers.split(","):
        seq = ParallelSampler(model, solver=solver, steps=args.steps, method="sequential", progress=False).sample(
            args.batch, seed=0)
        par = ParallelSampler(model, solver=solver, steps=args.steps, window=args.steps, tol=args.tol,
                              stop=args.stop, progress=False).sample(args.batch, seed=0)
        d = (par.samples - seq.samples).abs().amax(1)                                  # (B,)
        q = torch.quantile(d, torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=d.dtype)).tolist()
        mode = lambda x: torch.cdist(x, means).argmin(1)  # noqa: E731
        switched = int((mode(par.samples) != mode(seq.samples)).sum())
        print(f"| {solver} | {par.stats.rounds} | {par.stats.nfe:.0f} | " + " | ".join(f"{v:.2g}" for v in q)
              + f" | {float(d.max()):.3g} | {int((d > 0.1).sum())} | {switched} |")


if __name__ == "__main__":
    main()
