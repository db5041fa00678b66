"""Parareal on stochastic solvers: the worst sample's distance from the sequential one, in units of the relative
tolerance ``tol x max(1, max |x|)`` (tests/test_equivalence.py's bound), with the cost in rounds and iterations.

    OMP_NUM_THREADS=1 python benchmarks/parareal_sde.py [--seeds 4] [--batch 256]

The ring ``gmm``, DDPM and Euler ancestral on 8 grids (steps, slices, coarse steps), each seed's 256 samples against
the sequential ones. Prints one row per case (its ratio, iterations, rounds and NFE per sample, against the
sequential N rounds) and the worst ratio; exits 1 when a case ends over its tolerance.
"""

from __future__ import annotations

import argparse
import sys

SOLVERS = ("ddpm", "euler_ancestral")
#: (steps, slices, coarse_steps)
GRIDS = ((20, 4, 2), (20, 4, 1), (50, 7, 2), (50, 7, 1), (30, 5, 2), (100, 10, 2), (12, 3, 2), (40, 8, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/parareal_sde.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="seeds per case (default 4)")
    ap.add_argument("--batch", type=int, default=256, help="samples per seed (default 256)")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.batch < 1:
        ap.error("--seeds, --batch: must be >= 1")
    import torch

    from paratime import ParallelSampler

    torch.set_num_threads(1)
    worst = 0.0
    print("| solver | steps | slices | coarse steps | seed | worst / tol | iterations | rounds (sequential N) | NFE |")
    print("|---|---|---|---|---|---|---|---|---|")
    for solver in SOLVERS:
        for steps, slices, coarse_steps in GRIDS:
            for seed in range(args.seeds):
                kw = dict(solver=solver, steps=steps, progress=False)
                ref = ParallelSampler("gmm", method="sequential", **kw).sample(args.batch, seed=seed).samples
                res = ParallelSampler("gmm", method="parareal", slices=slices, coarse_steps=coarse_steps,
                                      **kw).sample(args.batch, seed=seed)
                st = res.stats
                ratio = float((res.samples - ref).abs().max()) / (st.tol * max(1.0, float(ref.abs().max())))
                worst = max(worst, ratio)
                print(f"| {solver} | {steps} | {slices} | {coarse_steps} | {seed} | {ratio:.3f} | {st.iterations} | "
                      f"{st.rounds} ({steps}) | {st.nfe:.0f} |", flush=True)
    print(f"worst: {worst:.3g} of the tolerance")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
