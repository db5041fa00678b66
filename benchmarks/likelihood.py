"""Digits bits/dim through the probability-flow ODE: sequential against Picard (issue 16).

    OMP_NUM_THREADS=1 python benchmarks/likelihood.py [--samples 64] [--steps 100] [--threads 1] [--repeats 3]
    (every option of `paratime likelihood`; --exact-samples N adds an exact-trace row on N real images)

Sets: scikit-learn's held-out digits (the 70/30 split of `paratime eval-digits`; the diffusion model itself was trained
on all 1,797 images), the same images with shuffled pixels, and uniform noise on the same 17 levels. Prints, per set
and method: rounds (sequential network calls), NFE per sample, wall clock min / median over the repeats (the first
run of each method included: wall times on the shared CPU are noisy), mean bits/dim with its standard error over the
images (uniform dequantisation, bin 2/16), and the largest per-image |bits/dim difference| from the sequential solve.
Torch threads are set explicitly (default 1, stated in the header line).
"""

from __future__ import annotations

import argparse
import sys

from paratime.likelihood_cli import add_likelihood_parser, run_likelihood


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="benchmarks/likelihood.py")
    p = add_likelihood_parser(ap.add_subparsers(dest="command"))
    p.add_argument("--exact-samples", type=int, default=0, help="also the exact trace on this many real images")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(["likelihood", "--threads", "1", "--repeats", "3", *argv])   # later flags win
    rec = {"hutchinson": run_likelihood(args, emit=print)}
    if args.exact_samples:
        exact = argparse.Namespace(**{**vars(args), "divergence": "exact", "samples": args.exact_samples,
                                      "sets": "real", "repeats": 1})
        print()
        rec["exact"] = run_likelihood(exact, emit=print)
    return rec


if __name__ == "__main__":
    main()
