"""The value range of the digits model's samples (the README's "range" claim; nothing is clipped by default).

    python benchmarks/digits_range.py [--batch 1000] [--solver ddim] [--steps 100] [--clip]

torch threads: 1 (set here).
"""

import argparse

import torch

from paratime import ParallelSampler


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1000, help="samples (seed 0)")
    ap.add_argument("--solver", default="ddim", help="solver (default: ddim)")
    ap.add_argument("--steps", type=int, default=100, help="solver steps (default: 100)")
    ap.add_argument("--clip", action="store_true", help="clip the x0 prediction to [-1, 1] (clip_x0=1)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for method in ("sequential", "picard"):
        x = ParallelSampler("digits", solver=args.solver, steps=args.steps, method=method,
                            clip_x0=1.0 if args.clip else None, progress=False).sample(args.batch, seed=0).samples
        outside = (x.abs() > 1).double()
        print(f"digits {args.solver}-{args.steps} {method}, {args.batch} samples{' clip_x0=1' if args.clip else ''}: "
              f"min {float(x.min()):.3f}, max {float(x.max()):.3f}, "
              f"pixels outside [-1, 1] {float(outside.mean()):.1%}, "
              f"samples with any {float(outside.flatten(1).amax(1).mean()):.1%}")


if __name__ == "__main__":
    main()
