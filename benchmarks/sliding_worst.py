"""The worst sample of many on each sliding window (issue 25): digits samples drawn by Picard at the default tolerance
against the sequential sample of the same noise, one table row per window.

    OMP_NUM_THREADS=1 python benchmarks/sliding_worst.py                          # DDIM-50, 4,096 samples, W 2-8
    OMP_NUM_THREADS=1 python benchmarks/sliding_worst.py --solver dpmpp_2m --steps 20
    OMP_NUM_THREADS=1 python benchmarks/sliding_worst.py --before                 # the sliding acceptance of before
    OMP_NUM_THREADS=1 python benchmarks/sliding_worst.py --tol 0.01 --windows 2,4,8   # a looser tolerance

Sample ``i`` is seed 0, ``first_sample=i``, label ``i % 10`` (as :mod:`paratime.bench.devices` draws them), drawn
``--chunk`` at a time: each sample has its own window, so a chunk decides as each sample alone would. Per window: the
worst error over the tolerance in force for it (``SampleStats.tol_abs``), the three worst samples, how many exceed
tol, a sample's mean rounds, the worst max |Δ| itself and N / rounds (the speed-up on W compute-bound devices,
where each round of W rows costs one call). ``--tol``: a tolerance other than the default (the README's fixed
windows held over 4,096 samples). ``--before`` runs the acceptance a deterministic solver's sliding window had before
its grid's last half accepted at ``tol / 100``: the flat ``accept_tol = tol / 30`` (a deterministic solver only: a
stochastic one's acceptance did not change). About 1-2 min per window of 4,096 DDIM-50 samples on one thread (the
sequential reference is drawn once). Deterministic; exits 1 when a sample ends over tol (as ``--before`` does on
DDIM-50 with windows of 5 and 7).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

from paratime.bench.devices import make_sampler
from paratime.bench.scoring import sample_errors
from paratime.methods.stops import DEFAULT_TOL, default_accept_tol
from paratime.solvers import SOLVERS, make_solver


def _labels(first: int, n: int) -> dict:
    return {"labels": torch.tensor([(first + i) % 10 for i in range(n)])}


@functools.lru_cache(maxsize=2)
def _sequential(steps: int, solver: str, samples: int, chunk: int) -> tuple[torch.Tensor, ...]:
    """The sequential samples, one tensor per chunk (drawn once for every window)."""
    seq = make_sampler("digits", steps, "compute", 1, method="sequential", solver=solver)
    out = []
    for first in range(0, samples, chunk):
        n = min(chunk, samples - first)
        out.append(seq.sample(n, seed=0, first_sample=first, **_labels(first, n)).samples)
    return tuple(out)


def _check_before(solver: str, before: bool) -> None:
    """``before`` applies to a deterministic solver only: a stochastic one's sliding acceptance did not change."""
    if before and make_solver(solver).stochastic:
        raise ValueError(f"before: applies to a deterministic solver only, not {solver!r} (it draws step noise)")


def worst(steps: int, solver: str, samples: int, chunk: int, window: int, before: bool = False,
          tol: float | None = None) -> dict:
    """One window's row: ``worst`` (error / tol), ``top`` the three worst ``(sample, error / tol)``, ``over`` the
    samples above tol, ``rounds`` a sample's mean rounds, ``worst_abs`` the worst max-abs error (data units: the
    digits' data range is [-1, 1], so this is also the error per unit data scale); ``tol``: None for the default.

    Raises:
        ValueError: ``before`` with a stochastic ``solver`` (its sliding acceptance did not change)."""
    _check_before(solver, before)
    opts = dict(accept_tol=default_accept_tol(DEFAULT_TOL["final"] if tol is None else tol)) if before else {}
    if tol is not None:
        opts["tol"] = tol
    par = make_sampler("digits", steps, "compute", window, method="picard", window=window, solver=solver, **opts)
    errs, abs_errs, rounds = [], [], []
    for first, ref in zip(range(0, samples, chunk), _sequential(steps, solver, samples, chunk)):
        res = par.sample(ref.shape[0], seed=0, first_sample=first, **_labels(first, ref.shape[0]))
        err, ratio = sample_errors(res.samples, ref, res.stats.tol_abs)                       # (n,), (n,)
        abs_errs.append(err)
        errs.append(ratio)
        rounds += res.stats.sample_rounds
    e = torch.cat(errs)
    top = torch.topk(e, min(3, e.numel()))
    return {"window": window, "worst": float(top.values[0]), "over": int((e > 1).sum()),
            "top": [(int(i), float(v)) for i, v in zip(top.indices, top.values)],
            "rounds": sum(rounds) / len(rounds), "worst_abs": float(torch.cat(abs_errs).max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--solver", default="ddim", help="paratime's solver (ddim, dpmpp_2m, ...)")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=256, help="samples per call (default 256)")
    ap.add_argument("--windows", default="2,3,4,5,6,7,8", help="comma-separated sliding windows (default 2-8)")
    ap.add_argument("--before", action="store_true", help="the flat tol / 30 acceptance of before")
    ap.add_argument("--tol", type=float, default=None, help="the tolerance (default: the sampler's default)")
    args = ap.parse_args(argv)
    if args.solver not in SOLVERS:
        ap.error(f"--solver: unknown {args.solver!r}; allowed: {', '.join(SOLVERS)}")
    try:
        _check_before(args.solver, args.before)
    except ValueError as e:
        ap.error(f"--{e}")
    if args.tol is not None and not args.tol > 0:
        ap.error(f"--tol: must be > 0, got {args.tol}")
    if args.steps < 3 or args.samples < 1 or args.chunk < 1:
        ap.error("--steps: at least 3; --samples, --chunk: at least 1")
    try:
        windows = [int(w) for w in args.windows.split(",")]
    except ValueError:
        ap.error(f"--windows: expected comma-separated integers, got {args.windows!r}")
    if any(not 2 <= w < args.steps for w in windows):
        ap.error(f"--windows: sliding windows, 2 <= W < --steps ({args.steps}), got {windows}")
    kind = "the acceptance of before (flat tol / 30)" if args.before else "the default acceptance"
    tol = "default tol" if args.tol is None else f"tol {args.tol:g}"
    print(f"digits {args.solver}-{args.steps}, {args.samples} samples, {tol}, {kind}\n")
    print("| window | worst error / tol | worst max \\|Δ\\| | three worst: sample (error / tol) | over tol "
          "| rounds (a sample's mean) | N / rounds (W compute-bound devices) |")
    print("|---|---|---|---|---|---|---|")
    bad = 0
    for w in windows:
        r = worst(args.steps, args.solver, args.samples, args.chunk, w, args.before, args.tol)
        top = ", ".join(f"{i} ({v:.3f})" for i, v in r["top"])
        print(f"| {w} | {r['worst']:.3f} | {r['worst_abs']:.2e} | {top} | {r['over']} | {r['rounds']:.2f} "
              f"| {args.steps / r['rounds']:.2f}x |", flush=True)
        bad += r["over"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
