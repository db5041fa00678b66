"""Does ``method="auto"`` ever measure slower than sequential sampling on a stochastic solver? The planner's plans
for the noise-drawing solvers over a grid of models, steps, batches, devices and cost curves, each run's network calls
priced on the curve as the stats price them, against sequential sampling's SCE on the same devices.

    OMP_NUM_THREADS=1 python -m paratime.bench.auto_stochastic                 # the README's 1,536 runs, ~12 min
    OMP_NUM_THREADS=1 python -m paratime.bench.auto_stochastic --models gmm --steps 10,20 --seeds 2   # a small grid
    OMP_NUM_THREADS=1 python -m paratime.bench.auto_stochastic --json auto_stochastic.json

Grid (each option shrinks it): ``--models`` gmm and digits (digits: label ``i % 10`` for sample ``i``), ``--solvers``
DDPM, Euler ancestral and Euler-Maruyama, ``--steps`` N = 10, 20, 50, 100, ``--batches`` 1 and 16, ``--devices``
K = 1, 2, 4, 8 (:class:`paratime.bench.devices.Spread`: every row evaluated here, K devices reported), ``--costs``
``compute`` (``c(r) = r``) and ``latency`` (``c(r) = 1``), ``--seeds`` 0 .. 3. A run's SCE is the sum over its
network calls (as the backend saw them) of ``c(ceil(rows / K)) / c(1)``, each device's share chunked at the
backend's rows per call (:func:`paratime.cost.round_cost`), which must equal ``stats.sce``; sequential's is
measured the same way (``method="sequential"`` on the same devices: the batch spread over them, N calls of
``ceil(B / K)`` rows on a one-call solver). Exits 1 when a run measured slower than sequential or its stats priced it
otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from paratime import ParallelSampler
from paratime.bench.devices import Spread
from paratime.cost import make_cost, round_cost
from paratime.solvers import SOLVERS, make_solver

MODELS = ("gmm", "digits")
SOLVERS_RUN = ("ddpm", "euler_ancestral", "euler_maruyama")
STEPS = (10, 20, 50, 100)
BATCHES = (1, 16)
DEVICES = (1, 2, 4, 8)
COSTS = ("compute", "latency")
SEEDS = 4
#: how far a run's SCE may exceed sequential's before it counts as slower (float sums of the same calls)
SLACK = 1e-9


class Recorder(Spread):
    """:class:`~paratime.bench.devices.Spread` that also keeps the rows of every network call."""

    def __init__(self, workers: int):
        super().__init__(workers)
        self.rows: list[int] = []

    def evaluate(self, x, sigma, model_time, cond=None, samples=None, raw=False):
        self.rows.append(int(x.shape[0]))
        return super().evaluate(x, sigma, model_time, cond, samples, raw)


def _cond(model: str, batch: int) -> dict:
    return {"labels": torch.arange(batch) % 10} if model == "digits" else {}


def price(rows: list[int], cost: str, devices: int, limit: int | None = None, buckets=None) -> float:
    """SCE of network calls of ``rows`` rows on ``devices`` devices under the named curve ``cost``."""
    curve = make_cost(cost)
    return sum(round_cost(curve, r, devices, limit, buckets) for r in rows) / curve(1)


def run(model: str, solver: str, steps: int, batch: int, devices: int, cost: str, seed: int,
        method: str = "auto") -> dict:
    """One run: ``method``, ``window``, ``rounds``, ``sce`` (the stats'), ``priced`` (the backend's calls priced by
    :func:`price`) and ``plan`` (the planner's :meth:`~paratime.planner.Plan.to_dict`, None when not planned)."""
    backend = Recorder(devices)
    s = ParallelSampler(model, solver=solver, steps=steps, method=method, cost=cost, backend=backend,
                        progress=False)
    with torch.no_grad():
        st = s.sample(batch, seed=seed, **_cond(model, batch)).stats
    return {"method": st.method, "window": st.window, "rounds": st.rounds, "sce": st.sce,
            "priced": price(backend.rows, cost, devices, backend.batch_limit(), backend.buckets), "plan": st.plan}


def sweep(models=MODELS, solvers=SOLVERS_RUN, steps=STEPS, batches=BATCHES, devices=DEVICES, costs=COSTS,
          seeds=SEEDS, report=None) -> list[dict]:
    """Every run of the grid, one record each: the configuration, :func:`run`'s figures (``plan``: its predicted
    SCE only) and ``seq``, sequential's SCE on the same devices and curve; ``report(record)`` after each."""
    out = []
    for model, solver, n, b, cost, k in itertools.product(models, solvers, steps, batches, costs, devices):
        seq = run(model, solver, n, b, k, cost, 0, method="sequential")["sce"]
        for seed in range(seeds):
            r = run(model, solver, n, b, k, cost, seed)
            r["predicted"] = r.pop("plan")["predicted_sce"]
            rec = dict(model=model, solver=solver, steps=n, batch=b, cost=cost, K=k, seed=seed, seq=seq, **r)
            out.append(rec)
            if report:
                report(rec)
    return out


def slower(records: list[dict]) -> list[dict]:
    """The runs that measured slower than sequential sampling on the same devices."""
    return [r for r in records if r["sce"] > r["seq"] * (1 + SLACK)]


def mispriced(records: list[dict]) -> list[dict]:
    """The runs whose stats' SCE is not their calls priced on the curve."""
    return [r for r in records if not math.isclose(r["sce"], r["priced"], rel_tol=1e-9)]


def _plan(r: dict) -> str:
    return r["method"] if r["window"] is None or r["method"] == "sequential" else f"{r['method']} W={r['window']}"


def table(records: list[dict]) -> list[str]:
    """Markdown: one row per configuration (its seeds together): the plans taken, the SCE range, sequential's and
    the worst SCE / sequential."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["solver"], r["steps"], r["batch"], r["cost"], r["K"]), []).append(r)
    lines = ["| model | solver | N | batch | cost | K | plans (seeds) | SCE (min-max) | sequential | worst / seq |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, solver, n, b, cost, k), rs in groups.items():
        plans = ", ".join(f"{p} ({c})" for p, c in Counter(_plan(r) for r in rs).items())
        sce = [r["sce"] for r in rs]
        worst = max(r["sce"] / r["seq"] for r in rs)
        lines.append(f"| {model} | {solver} | {n} | {b} | {cost} | {k} | {plans} | {min(sce):.1f}-{max(sce):.1f} | "
                     f"{rs[0]['seq']:.1f} | {worst:.3f}{' **slower**' if worst > 1 + SLACK else ''} |")
    return lines


def summary(records: list[dict]) -> list[str]:
    """The closing lines: runs, how many planned a parallel method, the slower ones and the mispriced ones."""
    parallel = [r for r in records if r["method"] != "sequential"]
    worst = max(parallel or records, key=lambda r: r["sce"] / r["seq"])
    lines = [f"{len(records)} runs of method=\"auto\" ({len(parallel)} planned a parallel method); slower than "
             f"sequential: {len(slower(records))}; the worst {'parallel plan' if parallel else 'run'}'s SCE / "
             f"sequential {worst['sce'] / worst['seq']:.3f} "
             f"({worst['model']} {worst['solver']}-{worst['steps']}, batch {worst['batch']}, {worst['cost']}, "
             f"K={worst['K']}, seed {worst['seed']}: {_plan(worst)})"]
    for r in slower(records):
        lines.append(f"SLOWER: {r['model']} {r['solver']}-{r['steps']}, batch {r['batch']}, {r['cost']}, K={r['K']}, "
                     f"seed {r['seed']}: {_plan(r)}, {r['rounds']} rounds, SCE {r['sce']:.1f} against {r['seq']:.1f}")
    for r in mispriced(records):
        lines.append(f"MISPRICED: {r['model']} {r['solver']}-{r['steps']}, batch {r['batch']}, {r['cost']}, "
                     f"K={r['K']}, seed {r['seed']}: stats {r['sce']:.3f}, calls priced {r['priced']:.3f}")
    return lines


def _list(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {', '.join(MODELS)}")
    ap.add_argument("--solvers", default=",".join(SOLVERS_RUN), help="comma-separated stochastic solvers")
    ap.add_argument("--steps", default=",".join(map(str, STEPS)), help="comma-separated step counts")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    ap.add_argument("--devices", default=",".join(map(str, DEVICES)), help="comma-separated K")
    ap.add_argument("--costs", default=",".join(COSTS), help=f"comma-separated of {', '.join(COSTS)}")
    ap.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds 0 .. SEEDS - 1 (default {SEEDS})")
    ap.add_argument("--json", default=None, help="also write every run's record to this file")
    a = ap.parse_args(argv)
    try:
        steps, batches, devices = _list(a.steps, int), _list(a.batches, int), _list(a.devices, int)
    except ValueError:
        ap.error("--steps, --batches, --devices: expected comma-separated integers")
    models, solvers, costs = _list(a.models), _list(a.solvers), _list(a.costs)
    for flag, given, allowed in (("models", models, MODELS), ("costs", costs, COSTS)):
        if any(v not in allowed for v in given):
            ap.error(f"--{flag}: unknown in {given}; allowed: {', '.join(allowed)}")
    for s in solvers:
        if s not in SOLVERS or not make_solver(s).stochastic:
            ap.error(f"--solvers: {s!r} is not one of paratime's stochastic solvers")
    if min(steps) < 2 or min(batches) < 1 or min(devices) < 1 or a.seeds < 1:
        ap.error("--steps: at least 2; --batches, --devices, --seeds: at least 1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print("| model | solver | N | batch | cost | K | seed | plan | rounds | SCE | sequential |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    records = sweep(models, solvers, steps, batches, devices, costs, a.seeds, report=lambda r: print(
        f"| {r['model']} | {r['solver']} | {r['steps']} | {r['batch']} | {r['cost']} | {r['K']} | {r['seed']} | "
        f"{_plan(r)} | {r['rounds']} | {r['sce']:.1f} | {r['seq']:.1f} |", flush=True))
    print("\n" + "\n".join(table(records)) + "\n\n" + "\n".join(summary(records)))
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1))
    return 1 if slower(records) or mispriced(records) else 0


if __name__ == "__main__":
    sys.exit(main())
