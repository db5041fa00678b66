"""The worst sample of a stochastic solver's sliding window at a fixed data scale (issue 25): gmm DDPM-100 on a
window of 8, drawn by Picard with ``data_scale=`` fixed, against the sequential sample of the same seed, one table
row per seed, update rule, scale and tolerance.

    OMP_NUM_THREADS=1 python -m paratime.bench.fixed_scale_worst                 # the README's 108 runs, ~2 min
    OMP_NUM_THREADS=1 python -m paratime.bench.fixed_scale_worst --seeds 0 --updates secant --tols 0.1 --samples 500
    OMP_NUM_THREADS=1 python -m paratime.bench.fixed_scale_worst --json fixed_scale.json
    OMP_NUM_THREADS=1 python -m paratime.bench.fixed_scale_worst --accept 30             # accept_tol = tol / 30

Per seed the sequential samples (``--samples`` of them, seed ``--seeds``' value) give three fixed scales: the median
and the largest per-sample max-abs, and 1. Each run (``ParallelSampler("gmm", solver="ddpm", steps=100, window=8,
tol=tol, update=update, data_scale=scale)``) is judged by its worst sample: the largest per-sample max |Δ| against
the sequential sample, over the tolerance in force, ``tol * scale``; the row gives it, that sample's index, the
samples over tol, the samples the amplification guard rolled back and the run's rounds. With a fixed scale no
sample's own (stale) scale widens its tolerance, which is what the stochastic sliding window's ``tol / 3000``
acceptance is sized for; ``--accept DIV`` runs ``accept_tol = tol / DIV`` instead (the README's ``tol / 30`` to
``tol / 2000`` rows). About 1 s a run on one thread.
Deterministic; exits 1 when a sample ends over tol.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from paratime import ParallelSampler
from paratime.bench.scoring import sample_errors
from paratime.methods.picard import UPDATES

MODEL, SOLVER, STEPS, WINDOW = "gmm", "ddpm", 100, 8
TOLS = (0.1, 0.03, 0.01)
SCALES = ("median", "max", "1")          # the sequential samples' median and largest per-sample max-abs, and 1


def sampler(**options) -> ParallelSampler:
    """The case's sampler (gmm DDPM-100, no progress bar) with ``options``."""
    return ParallelSampler(MODEL, solver=SOLVER, steps=STEPS, progress=False, **options)


def scales(ref: torch.Tensor) -> dict[str, float]:
    """The fixed data scales of :data:`SCALES` from the sequential samples ``ref`` ``(B, *shape)``."""
    own = ref.abs().flatten(1).amax(1)                                                  # (B,) per-sample max-abs
    return {"median": float(own.median()), "max": float(own.max()), "1": 1.0}


def worst(ref: torch.Tensor, seed: int, tol: float, update: str, scale: float, accept: float | None = None) -> dict:
    """One run against the sequential samples ``ref`` of ``seed``: ``worst`` the largest per-sample max |Δ| / (tol *
    scale), ``sample`` its index, ``over`` the samples above 1, ``rolled_back`` the samples the guard rolled back,
    ``rounds`` the run's rounds. ``accept``: ``accept_tol = tol / accept`` (None: the sampler's default)."""
    opts = {} if accept is None else {"accept_tol": tol / accept}
    res = sampler(window=WINDOW, tol=tol, update=update, data_scale=scale, **opts).sample(len(ref), seed=seed)
    _, ratio = sample_errors(res.samples, ref, tol * scale)                              # (B,)
    return {"worst": float(ratio.max()), "sample": int(ratio.argmax()), "over": int((ratio > 1).sum()),
            "rolled_back": sum(res.stats.extra.get("rolled_back", [])), "rounds": res.stats.rounds}


def sweep(seeds=(0, 1, 2, 3), updates=UPDATES, tols=TOLS, samples: int = 4000, accept: float | None = None,
          report=None) -> list[dict]:
    """Every seed x update x scale x tol: one row each (:func:`worst` plus ``seed, update, scale`` (its
    :data:`SCALES` name), ``scale_value, tol``); ``accept`` as :func:`worst` takes it; ``report(row)`` is called
    after each."""
    rows = []
    with torch.no_grad():
        for seed in seeds:
            ref = sampler(method="sequential").sample(samples, seed=seed).samples
            for update in updates:
                for name, value in scales(ref).items():
                    for tol in tols:
                        row = dict(seed=seed, update=update, scale=name, scale_value=value, tol=tol,
                                   **worst(ref, seed, tol, update, value, accept))
                        rows.append(row)
                        if report:
                            report(row)
    return rows


HEADER = ("| seed | update | data_scale | tol | worst max \\|Δ\\| / (tol · scale) | worst sample | over tol "
          "| rolled back | rounds |\n|---|---|---|---|---|---|---|---|---|")


def markdown(row: dict) -> str:
    return (f"| {row['seed']} | {row['update']} | {row['scale']} ({row['scale_value']:.3f}) | {row['tol']:g} | "
            f"{row['worst']:.3f} | {row['sample']} | {row['over']} | {row['rolled_back']} | "
            f"{row['rounds']} |")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated noise seeds (default 0-3)")
    ap.add_argument("--updates", default=",".join(UPDATES), help=f"comma-separated of {', '.join(UPDATES)} "
                    "(default: every one)")
    ap.add_argument("--tols", default=",".join(f"{t:g}" for t in TOLS), help="comma-separated tolerances")
    ap.add_argument("--samples", type=int, default=4000, help="samples a run (default 4,000)")
    ap.add_argument("--accept", type=float, default=None, metavar="DIV",
                    help="accept_tol = tol / DIV (default: the sampler's, tol / 3000 here)")
    ap.add_argument("--json", default=None, help="also write every row to this file")
    args = ap.parse_args(argv)
    try:
        seeds, tols = _ints(args.seeds), [float(t) for t in args.tols.split(",")]
    except ValueError:
        ap.error(f"--seeds / --tols: expected comma-separated numbers, got {args.seeds!r} / {args.tols!r}")
    updates = args.updates.split(",")
    for u in updates:
        if u not in UPDATES:
            ap.error(f"--updates: unknown {u!r}; allowed: {', '.join(UPDATES)}")
    if any(s < 0 for s in seeds) or any(not t > 0 for t in tols) or args.samples < 1 \
            or (args.accept is not None and not args.accept > 0):
        ap.error("--seeds: >= 0; --tols, --accept: > 0; --samples: >= 1")
    print(f"{MODEL} {SOLVER.upper()}-{STEPS}, window {WINDOW}, {args.samples} samples, fixed data_scale, "
          f"accept_tol {'the default' if args.accept is None else f'tol / {args.accept:g}'}\n")
    print(HEADER, flush=True)
    rows = sweep(seeds, updates, tols, args.samples, args.accept, report=lambda r: print(markdown(r), flush=True))
    top = max(rows, key=lambda r: r["worst"])
    print(f"\n{len(rows)} runs; worst {top['worst']:.3f} of tol (seed {top['seed']}, {top['update']}, data_scale "
          f"{top['scale']}, tol {top['tol']:g}: sample {top['sample']}); runs with a sample over tol: "
          f"{sum(r['over'] > 0 for r in rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["over"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
