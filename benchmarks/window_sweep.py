"""Rounds and NFE against the Picard window size (the measurement behind the default window).

    OMP_NUM_THREADS=1 python benchmarks/window_sweep.py [--batch 8] [--threads 1] [--device cuda] [--json out.json]

Cases: digits DDIM-100 and DDPM-1000 (the trained U-Net) and the policy-size ``mlp`` fixture (DDIM-100 and DDPM-100,
one sample), Picard at the default options (``--tol``: the default 2e-3 unless given). For each window W it prints
rounds (sequential network calls), NFE per sample, the rounds relative to the full window (W = N) and NFE relative to
it, plus wall time and time per round (median of ``--reps``; noisy on shared cores, rounds and NFE are exact). The
recommended default is the smallest W whose rounds stay within 15% of the full window's on every case.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

CASES = {
    "digits/ddim-100": dict(model="digits", solver="ddim", steps=100, windows=(100, 64, 50, 32, 25, 16, 8)),
    "digits/ddpm-1000": dict(model="digits", solver="ddpm", steps=1000, windows=(1000, 500, 250, 128, 100, 64, 32)),
    "mlp/ddim-100": dict(model="mlp", solver="ddim", steps=100, windows=(100, 64, 50, 32, 25, 16, 8), batch=1),
    "mlp/ddpm-100": dict(model="mlp", solver="ddpm", steps=100, windows=(100, 64, 50, 32, 25, 16, 8), batch=1),
}


def sweep(name: str, batch: int, reps: int, tol: float | None = None, device: str = "cpu") -> list[dict]:
    """One case's rows: ``{"case", "window", "rounds", "nfe", "wall_s", "rounds_rel", "nfe_rel"}``."""
    import paratime.bench  # noqa: F401 - registers the ``mlp`` fixture
    from paratime import ParallelSampler
    from paratime.models import load_model

    c = CASES[name]
    model = load_model(c["model"])
    model.network.to(device)
    rows = []
    for W in c["windows"]:
        s = ParallelSampler(model, solver=c["solver"], steps=c["steps"], window=W, tol=tol, progress=False)
        walls = []
        for _ in range(reps):
            res = s.sample(c.get("batch", batch), seed=0)
            walls.append(res.stats.wall_s)
        rows.append({"case": name, "window": W, "rounds": res.stats.rounds, "nfe": res.stats.nfe,
                     "wall_s": statistics.median(walls), "wall_min_s": min(walls),
                     "per_round_ms": 1e3 * statistics.median(walls) / res.stats.rounds})
    full = rows[0]
    for r in rows:
        r["rounds_rel"] = r["rounds"] / full["rounds"]
        r["nfe_rel"] = r["nfe"] / full["nfe"]
    return rows


def recommend(rows: list[dict], slack: float = 0.15) -> dict[str, int]:
    """Per case, the smallest window whose rounds are within ``slack`` of the full window's."""
    best: dict[str, int] = {}
    for r in rows:
        if r["rounds_rel"] <= 1 + slack:
            best[r["case"]] = min(best.get(r["case"], r["window"]), r["window"])
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tol", type=float, default=None, help="Picard's tol (default: the sampler's default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    tol = "default" if args.tol is None else args.tol
    print(f"device={args.device} threads={args.threads} batch={args.batch} tol={tol} (wall: median of {args.reps})")
    print(f"{'case':<18} {'W':>5} {'rounds':>6} {'NFE/sample':>10} {'rounds/full':>11} {'NFE/full':>8} {'wall s':>8} "
          f"{'ms/round':>8}")
    for name in args.cases:
        for r in sweep(name, args.batch, args.reps, args.tol, device=args.device):
            rows.append(r)
            print(f"{r['case']:<18} {r['window']:>5} {r['rounds']:>6} {r['nfe']:>10.0f} {r['rounds_rel']:>11.2f} "
                  f"{r['nfe_rel']:>8.2f} {r['wall_s']:>8.2f} {r['per_round_ms']:>8.1f}", flush=True)
    print("smallest window within 15% of the full window's rounds:", recommend(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
