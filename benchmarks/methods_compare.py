"""Picard, Parareal and pipelined Parareal side by side on one model (issue: Parareal figures).

    python benchmarks/methods_compare.py [--model digits] [--batch 8] [--cases ddim:100,ddpm:1000]

Prints iterations, rounds (sequential network calls), NFE per sample (Parareal: fine + coarse) and the largest
difference from the sequential samples. Pipelined Parareal (SRDS) starts each fine solve as soon as its start is
known; one tick is one batched call (see paratime.methods.parareal).
"""

import argparse

from paratime import ParallelSampler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tol", type=float, default=0.1)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--cases", default="ddim:100,ddpm:1000")
    args = ap.parse_args()
    print(f"model={args.model} batch={args.batch} tol={args.tol} window={args.window}")
    print(f"{'case':<10} {'method':<18} {'iters':>5} {'rounds':>6} {'NFE/sample':>10} {'fine+coarse':>13} "
          f"{'wall s':>7} {'max diff':>9}")
    for spec in args.cases.split(","):
        solver, steps = spec.split(":")
        kw = dict(solver=solver, steps=int(steps), tol=args.tol, progress=False)
        seq = ParallelSampler(args.model, method="sequential", **kw).sample(args.batch, seed=0)
        print(f"{spec:<10} {'sequential':<18} {seq.stats.iterations:>5} {seq.stats.rounds:>6} {seq.stats.nfe:>10.0f} "
              f"{'':>13} {seq.stats.wall_s:>7.2f} {0:>9}")
        pic = ParallelSampler(args.model, method="picard", window=args.window, **kw).sample(args.batch, seed=0)
        par = ParallelSampler(args.model, method="parareal", **kw).sample(args.batch, seed=0)
        pip = ParallelSampler(args.model, method="parareal_pipelined", **kw).sample(args.batch, seed=0)
        for name, r, rounds in (("picard", pic, pic.stats.rounds), ("parareal", par, par.stats.rounds),
                                ("parareal pipelined", pip, pip.stats.rounds)):
            fc = (f"{r.stats.extra['nfe_fine']:.0f}+{r.stats.extra['nfe_coarse']:.0f}"
                  if "nfe_fine" in r.stats.extra else "")
            diff = float((r.samples - seq.samples).abs().max())
            print(f"{spec:<10} {name:<18} {r.stats.iterations:>5} {rounds:>6.0f} {r.stats.nfe:>10.0f} {fc:>13} "
                  f"{r.stats.wall_s:>7.2f} {diff:>9.3g}")


if __name__ == "__main__":
    main()
