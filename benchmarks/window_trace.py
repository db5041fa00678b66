"""What limits a window of K points on K devices (issue 21): one sample's Picard run traced round by round.

    OMP_NUM_THREADS=1 python benchmarks/window_trace.py                     # digits DDIM-50, W = 2, seed 0
    OMP_NUM_THREADS=1 python benchmarks/window_trace.py --window 8 --steps 50 --sample 3

Per round: the window start before it, how far it slid, and for each slot the change of the point it updates over
that point's acceptance threshold (``<= 1``: accepted; ``inf``: a point with noise level 0, which only the stop rule
ends; a start below the one before is the stop rule's reopen of the last window, or the amplification guard's
rollback). Then the rounds per stretch of the grid against the ceiling of a window of W points (N / W rounds and the x0
guess's call). Instrumentation only: :meth:`SlidingWindow.accept` is wrapped to read its arguments and returns what
it returned; the sample is the default sampler's. Deterministic.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager

import torch

from paratime import ParallelSampler
from paratime.methods import window as window_module
from paratime.bench.devices import solver_name
from paratime.solvers import SOLVERS


@contextmanager
def traced(rows_out: list[dict]):
    """Record, per call of :meth:`SlidingWindow.accept` (one per round), sample 0's window start, stride and the
    slots' change / threshold."""
    accept = window_module.SlidingWindow.accept

    def wrapper(self, rows, err, levels, shared, scale=None):
        stride, residual = accept(self, rows, err, levels, shared, scale)
        thr = levels[0, rows.tgt] * (1 if scale is None else scale)                 # (W, B)
        ratio = torch.where(thr > 0, err / thr, torch.where(err > 0, math.inf, 0.0))
        n = int(rows.counts[0])
        rows_out.append({"start": self.begin_h[0], "stride": int(stride[0]),
                         "ratios": [float(r) for r in ratio[:n, 0]]})
        return stride, residual

    window_module.SlidingWindow.accept = wrapper
    try:
        yield rows_out
    finally:
        window_module.SlidingWindow.accept = accept


def trace(window: int, steps: int, sample: int, solver: str = "ddim") -> tuple[list[dict], int, float]:
    """``(rounds, total rounds, max |Δ|)`` of one digits sample (batch 1, the devices benchmark's label) against its
    sequential twin."""
    kw = dict(steps=steps, solver=solver, progress=False)
    cond = {"labels": torch.tensor([sample % 10])}
    seq = ParallelSampler("digits", method="sequential", **kw).sample(1, seed=0, first_sample=sample, **cond).samples
    rounds: list[dict] = []
    with traced(rounds):
        res = ParallelSampler("digits", method="picard", window=window, **kw).sample(1, seed=0, first_sample=sample,
                                                                                   **cond)
    return rounds, res.stats.rounds, float((res.samples - seq).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sample", type=int, default=0, help="the sample's global index (seed 0)")
    ap.add_argument("--solver", default="ddim", help="paratime's solver (ddim, dpmpp_2m, ...)")
    args = ap.parse_args(argv)
    if args.window < 2 or args.window >= args.steps:
        ap.error("--window: a sliding window, 2 <= W < --steps")
    if args.solver not in SOLVERS:
        ap.error(f"--solver: unknown {args.solver!r}; allowed: {', '.join(SOLVERS)}")
    rounds, total, err = trace(args.window, args.steps, args.sample, args.solver)
    print(f"digits {solver_name(args.solver)}-{args.steps}, window {args.window}, sample {args.sample}: "
          f"{total} rounds (the x0 call included), max |Δ| {err:.2e}\n")
    print("| start | stride | change / threshold per slot |\n|---|---|---|")
    for r in rounds:
        print(f"| {r['start']} | {r['stride']} | {' '.join(f'{v:.1f}' for v in r['ratios'])} |")
    N, W = args.steps, args.window
    print("\n| stretch of the grid | rounds | points a round | ceiling (W a round) |\n|---|---|---|---|")
    cuts = [0, N // 2, (4 * N) // 5, N]
    for lo, hi in zip(cuts, cuts[1:]):
        n = sum(1 for r in rounds if lo <= r["start"] < hi)
        print(f"| {lo}–{hi} | {n} | {(hi - lo) / max(n, 1):.2f} | {W} |")
    ceiling = math.ceil(N / W) + 1
    print(f"\nceiling: {ceiling} rounds (N / W and the x0 call) = {N / ceiling:.2f}x; this run {N / total:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
