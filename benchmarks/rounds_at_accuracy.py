"""Rounds and NFE at fixed accuracy (issue 17): for each Picard update / stopping rule, and for diffusers' ParaDiGMS
loop, sweep the tolerance and report the fewest rounds whose samples lie within max |Δ| <= 1e-2, 2e-3, 5e-4 of
the sequential samples (same model, noise and grid; the diffusers loop against its own sequential run).

    python benchmarks/rounds_at_accuracy.py                       # gmm DDIM-100 (256 samples), ~1-2 min
    python benchmarks/rounds_at_accuracy.py --cases all           # + gmm DDPM-1000, digits DDIM-100 / DDPM-1000
    python benchmarks/rounds_at_accuracy.py --cases digits-ddim100 --batch 64

Cases: gmm-ddim100, gmm-ddpm1000, digits-ddim100, digits-ddpm1000 (DDPM-1000 with window 100, the others with
the full window). Rounds are sequential network calls; NFE is time-point evaluations per sample. "today" is the
accuracy of the old default (Picard, ParaDiGMS rule, tol 0.1); the last column gives each combination's rounds at
that accuracy (the no-regression check). Threads: ``--threads`` (default 1); rounds and NFE do not depend on timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TARGETS = (1e-2, 2e-3, 5e-4)
CASES = {"gmm-ddim100": ("gmm", "ddim", 100, None, 256), "gmm-ddpm1000": ("gmm", "ddpm", 1000, 100, 256),
         "digits-ddim100": ("digits", "ddim", 100, None, 16), "digits-ddpm1000": ("digits", "ddpm", 1000, 100, 16)}
#: (label, update, stop, tolerances swept from loose to strict)
COMBOS = [("Picard + ParaDiGMS rule", "picard", "paradigms", (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5)),
          ("Picard + final-point rule", "picard", "final", (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)),
          ("secant + ParaDiGMS rule", "secant", "paradigms", (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5)),
          ("secant + final-point rule (default)", "secant", "final", (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4))]


def _sweep(run, tols, floor):
    """Run ``run(tol) -> (rounds, nfe, max_diff)`` from loose to strict until max_diff <= floor."""
    out = []
    for tol in tols:
        rounds, nfe, diff = run(tol)
        out.append({"tol": tol, "rounds": rounds, "nfe": nfe, "max_abs_diff": diff})
        if diff <= floor:
            break
    return out


def at_accuracy(runs: list[dict], target: float) -> dict | None:
    """The run with the fewest rounds (then NFE) among those within ``target``; None if none reached it."""
    ok = [r for r in runs if r["max_abs_diff"] <= target]
    return min(ok, key=lambda r: (r["rounds"], r["nfe"])) if ok else None


def paratime_runs(model, solver, steps, window, batch, update, stop, tols, floor):
    from paratime import ParallelSampler

    ref = ParallelSampler(model, solver=solver, steps=steps, method="sequential", progress=False).sample(
        batch, seed=0).samples

    def run(tol):
        res = ParallelSampler(model, solver=solver, steps=steps, window=window, tol=tol, update=update, stop=stop,
                              progress=False).sample(batch, seed=0)
        return res.stats.rounds, res.stats.nfe, float((res.samples - ref).abs().max())

    return _sweep(run, tols, floor)


def diffusers_runs(model_name, solver, steps, window, batch, tols, floor):
    """diffusers' ParaDiGMS loop (DDIM/DDPMParallelScheduler), each run against the loop's own sequential run."""
    try:
        from diffusers import DDIMParallelScheduler, DDPMParallelScheduler
    except ImportError:
        return []
    from paratime.bench.suite import paradigms_loop
    from paratime.models import load_model
    from paratime.noise import INITIAL, draw_noise

    model = load_model(model_name)
    dtype = model.dtype or torch.float32                  # the network's own precision (gmm: float64)
    net = lambda x, t: model.network(x.to(dtype), t).to(x.dtype)  # noqa: E731
    common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  timestep_spacing="trailing", clip_sample=False)
    sch = (DDIMParallelScheduler(**common, set_alpha_to_one=True) if solver == "ddim"
           else DDPMParallelScheduler(**common))
    x_T = draw_noise(0, batch, model.sample_shape, None, INITIAL, dtype=dtype)
    W = window or steps
    with torch.no_grad():
        ref = paradigms_loop(net, sch, x_T, steps, 1, 0.0, torch.Generator().manual_seed(0))[0]

        def run(tol):
            x, rounds, nfe = paradigms_loop(net, sch, x_T, steps, W, tol, torch.Generator().manual_seed(0))
            return rounds, nfe, float((x - ref).abs().max())

        return _sweep(run, tols, floor)


def run_case(name: str, batch: int | None = None) -> dict:
    model, solver, steps, window, default_batch = CASES[name]
    batch = batch or default_batch
    floor = min(TARGETS)
    rows = {}
    with torch.no_grad():
        for label, update, stop, tols in COMBOS:
            rows[label] = paratime_runs(model, solver, steps, window, batch, update, stop, tols, floor)
            print(f"  {name} {label}: " + ", ".join(f"tol {r['tol']:g}: {r['rounds']} rounds, {r['max_abs_diff']:.2g}"
                                                     for r in rows[label]), flush=True)
    d = diffusers_runs(model, solver, steps, window, batch, COMBOS[0][3], floor)
    if d:
        rows["diffusers ParaDiGMS loop"] = d
        print(f"  {name} diffusers: " + ", ".join(f"tol {r['tol']:g}: {r['rounds']} rounds, {r['max_abs_diff']:.2g}"
                                                  for r in d), flush=True)
    today = next(r for r in rows[COMBOS[0][0]] if r["tol"] == 0.1)
    return {"case": name, "batch": batch, "window": window or steps, "today": today, "runs": rows}


def to_markdown(results: list[dict]) -> str:
    head = "| case | update + stop | " + " | ".join(f"rounds (NFE) at {t:g}" for t in TARGETS) + \
           " | rounds at today's accuracy |"
    lines = [head, "|" + "---|" * (len(TARGETS) + 3)]
    for res in results:
        today = res["today"]["max_abs_diff"]
        for label, runs in res["runs"].items():
            cells = []
            for t in (*TARGETS, today):
                r = at_accuracy(runs, t)
                cells.append(f"{r['rounds']} ({r['nfe']:.0f})" if r else "not reached")
            case = f"{res['case']} b{res['batch']} W{res['window']}"
            lines.append(f"| {case} | {label} | " + " | ".join(cells[:-1]) + f" | {cells[-1]} (max Δ {today:.2g}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="gmm-ddim100", help=f"comma-separated of {', '.join(CASES)}, or 'all'")
    ap.add_argument("--batch", type=int, default=None, help="samples (default: 256 for gmm, 16 for digits)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write every run to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(CASES) if args.cases == "all" else args.cases.split(",")
    for n in names:
        if n not in CASES:
            ap.error(f"--cases: unknown {n!r}; allowed: {', '.join(CASES)}, all")
    print(f"torch threads={args.threads}; targets max|Δ| {', '.join(f'{t:g}' for t in TARGETS)}", flush=True)
    results = [run_case(n, args.batch) for n in names]
    print(to_markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
