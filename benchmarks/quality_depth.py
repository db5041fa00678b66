"""Sample quality against sequential depth on digits (issue 17, item 4): is parallel sampling better than a
few-step solver?

    python benchmarks/quality_depth.py [--samples 512] [--out quality_out] [--threads 1]

Sequential DDIM, Heun and DPM-Solver++(2M) at N in {5, 10, 20, 50, 100}, and Picard on DDIM-100 and DPM++-100 (full
window) with the old rule (ParaDiGMS, tol 0.1) and the default (secant update, final-point rule) across tolerances.
Depth is rounds: sequential network calls (Heun: 2N - 1). Quality, from :mod:`paratime.digits_eval`'s classifier
(logistic regression on the real digits): confident share (max probability >= 0.9), k-NN precision / recall in PCA
space, and the Fréchet distance between the classifier's logits of the samples and of the 1,797 real digits; plus
max |Δ| against the sequential N=100 sample of the same solver (same noise). Writes ``OUT/quality_depth.json`` and,
with matplotlib, ``OUT/quality_depth.png`` (Fréchet distance and confident share against rounds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

SEQUENTIAL = ("ddim", "heun", "dpmpp_2m")
DEPTHS = (5, 10, 20, 50, 100)
#: (label, solver, update, stop, tol) of the parallel runs, all at N = 100 with the full window
PARALLEL = [("Picard, ParaDiGMS rule", s, "picard", "paradigms", t) for s in ("ddim", "dpmpp_2m")
            for t in (0.1, 0.01)] + \
           [("secant + final (default)", s, "secant", "final", t) for s in ("ddim", "dpmpp_2m")
            for t in (0.3, 0.1, 0.03, 0.01, 1e-3)]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` for ``(n, d)`` feature arrays.

    Raises:
        ValueError: ``a`` or ``b`` not a finite ``(n >= 2, d)`` array (a covariance needs two rows), or their ``d``
            differ.
    """
    from scipy import linalg

    from paratime.digits_eval import check_features

    check_features(2, a=a, b=b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))    # (d, d), d = 1 too
    root = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def score(judge, samples: torch.Tensor, real_logits: np.ndarray) -> dict:
    from paratime.digits_eval import _to_features

    sc = judge.score(samples)
    sc["frechet"] = frechet_distance(judge.clf.decision_function(_to_features(samples)), real_logits)
    return {k: sc[k] for k in ("confident_share", "knn_precision", "knn_recall", "frechet")}


def sample(solver, steps, n, seed, **options):
    from paratime import ParallelSampler

    res = ParallelSampler("digits", solver=solver, steps=steps, progress=False, **options).sample(n, seed=seed)
    return res.samples, res.stats


def run(n: int, seed: int = 0, log=print) -> list[dict]:
    from paratime.digits_eval import DigitsJudge

    judge = DigitsJudge(seed=seed)
    real_logits = judge.clf.decision_function(judge.real)
    rows, ref = [], {}
    with torch.no_grad():
        for solver in SEQUENTIAL:
            for N in DEPTHS:
                x, st = sample(solver, N, n, seed, method="sequential")
                if N == 100:
                    ref[solver] = x
                rows.append({"method": f"sequential {solver}", "solver": solver, "steps": N, "tol": None,
                             "rounds": st.rounds, "nfe": st.nfe, "x": x, **score(judge, x, real_logits)})
                log(_line(rows[-1]))
        for label, solver, update, stop, tol in PARALLEL:
            x, st = sample(solver, 100, n, seed, method="picard", window=100, update=update, stop=stop, tol=tol)
            rows.append({"method": label, "solver": solver, "steps": 100, "tol": tol, "rounds": st.rounds,
                         "nfe": st.nfe, "x": x, **score(judge, x, real_logits)})
            log(_line(rows[-1]))
    for r in rows:
        r["max_abs_diff"] = float((r.pop("x") - ref[r["solver"]]).abs().max()) if r["solver"] in ref else None
    return rows


def _line(r: dict) -> str:
    tol = "" if r["tol"] is None else f" tol {r['tol']:g}"
    return (f"  {r['method']} {r['solver']}-{r['steps']}{tol}: rounds {r['rounds']}, confident "
            f"{r['confident_share']:.3f}, FD {r['frechet']:.2f}")


def to_markdown(rows: list[dict]) -> str:
    lines = ["| method | solver-N | tol | rounds | NFE/sample | confident | k-NN precision | k-NN recall | "
             "Fréchet (logits) | max Δ vs N=100 |", "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (r["solver"], r["rounds"])):
        tol = "" if r["tol"] is None else f"{r['tol']:g}"
        d = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2g}"
        lines.append(f"| {r['method']} | {r['solver']}-{r['steps']} | {tol} | {r['rounds']} | {r['nfe']:.0f} | "
                     f"{r['confident_share']:.3f} | {r['knn_precision']:.3f} | {r['knn_recall']:.3f} | "
                     f"{r['frechet']:.2f} | {d} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups = {}
    for r in rows:
        groups.setdefault(f"{r['method']} ({r['solver']})", []).append(r)
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["rounds"])
        style = "o-" if label.startswith("sequential") else "s--"
        for ax, key in zip(axes, ("frechet", "confident_share")):
            ax.plot([r["rounds"] for r in rs], [r[key] for r in rs], style, label=label)
    for ax, name in zip(axes, ("Fréchet distance (classifier logits)", "confident share")):
        ax.set_xscale("log")
        ax.set_xlabel("rounds (sequential network calls)")
        ax.set_ylabel(name)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "quality_depth.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="quality_out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"digits, {args.samples} samples, seed {args.seed}, torch threads={args.threads}", flush=True)
    rows = run(args.samples, args.seed)
    (out / "quality_depth.json").write_text(json.dumps(rows, indent=1))
    print(to_markdown(rows))
    path = plot(rows, out)
    print(f"wrote {out / 'quality_depth.json'}" + (f", {path}" if path else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
