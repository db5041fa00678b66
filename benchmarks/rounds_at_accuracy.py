"""Rounds and NFE at fixed accuracy (issue 17): for each Picard update / stopping rule, and for diffusers' ParaDiGMS
loop, sweep the tolerance and report the fewest rounds whose samples lie within max |Δ| <= 1e-2, 2e-3, 5e-4 of
the sequential samples (same model, noise and grid; the diffusers loop against its own sequential run).

    python benchmarks/rounds_at_accuracy.py                                  # gmm DDIM-100 (256 samples), ~1-2 min
    python benchmarks/rounds_at_accuracy.py --cases all --json out.json      # every case below
    python benchmarks/rounds_at_accuracy.py --cases digits-ddim100 --batch 64
    python benchmarks/rounds_at_accuracy.py --cases policy --updates secant --no-diffusers
    python benchmarks/rounds_at_accuracy.py --merge a.json b.json           # one table from earlier --json runs
    python benchmarks/rounds_at_accuracy.py --cases gmm-ddpm1000 --init noise --fill copy   # other initial guesses

Cases (``CASES``): gmm-ddim100 and gmm-ddpm1000 (256 samples), digits-ddim100 and digits-ddpm1000 (16 samples;
~12 min on one core of a loaded 2-core machine), policy (the embedded diffusion policy, 64 samples, DDPM-100,
conditioned on a fixed batch of observations met along the expert's rollouts of the reach task's evaluation
episodes, :func:`paratime.policy_eval.latency_observations`). Windows: the full grid at 100 steps, 100 points at
1000 steps, 32 for the policy (its evaluation's, ``paratime.policy_eval.POLICY_METHODS``).

Combinations: every ``update`` in :data:`paratime.methods.picard.UPDATES` with every ``stop`` in ``STOPS``
(``--updates`` / ``--stops`` pick a subset; a new update rule joins the table without editing this file), each
swept over ``SWEEPS[stop]``. Runs of the same case from several ``--json`` files are merged by ``--merge``.

Rounds are sequential network calls; NFE is time-point evaluations per sample. "today" is the accuracy of the old
default (Picard, ParaDiGMS rule, tol 0.1, ``init="noise"``, ``fill="copy"``; on a sliding window it is a row of its
own, as the sampler's ``init="auto"`` / ``fill="path"`` change Picard there); the last column gives each
combination's rounds at that accuracy (the no-regression check). Threads: ``--threads`` (default 1); rounds, NFE and max |Δ| do not depend on timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from paratime import ParallelSampler
from paratime.denoiser import Denoiser
from paratime.methods.picard import FILLS, INITS, STOPS, UPDATES

TARGETS = (1e-2, 2e-3, 5e-4)
#: tolerances swept per stopping rule, loose to strict (``paradigms``: noise-level units; ``final``: data units)
SWEEPS = {"paradigms": (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5),
          "final": (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)}
DEFAULT = ("secant", "final")                           # the sampler's default (update, stop)
#: the old default (before issue 17: Picard, ParaDiGMS's rule at tol 0.1, Picard's guess x_T copied along the
#: trajectory and into new window slots): its accuracy is the no-regression point
OLD_DEFAULT, TODAY_TOL = ("picard", "paradigms", (("init", "noise"), ("fill", "copy"))), 0.1
DIFFUSERS = "diffusers ParaDiGMS loop"


def policy_cond(batch: int) -> dict:
    """``obs`` ``(batch, 12)``: states met along the expert's rollouts of the evaluation episodes (seeded)."""
    from paratime.policy_eval import latency_observations

    return {"obs": latency_observations(batch)}


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        model, solver, steps: the sampler's (model: a registered name, or a :class:`~paratime.denoiser.Denoiser`
            for paratime's runs only: the diffusers loop loads it by name).
        window: Picard's and the diffusers loop's (None: the full grid).
        batch: samples. cond: ``cond(batch) -> dict`` of conditioning tensors with a leading batch dimension.
        scheduler: the diffusers ``DDIM/DDPMParallelScheduler`` options that reproduce the model's schedule.
    """

    model: str | Denoiser
    solver: str
    steps: int
    window: int | None
    batch: int
    cond: Callable[[int], dict] | None = None
    scheduler: tuple[tuple[str, object], ...] = (("num_train_timesteps", 1000), ("beta_schedule", "linear"),
                                                 ("beta_start", 1e-4), ("beta_end", 0.02),
                                                 ("timestep_spacing", "trailing"), ("clip_sample", False))

    def conditioning(self, batch: int) -> dict:
        return self.cond(batch) if self.cond is not None else {}


CASES = {"gmm-ddim100": Case("gmm", "ddim", 100, None, 256),
         "gmm-ddpm1000": Case("gmm", "ddpm", 1000, 100, 256),
         "digits-ddim100": Case("digits", "ddim", 100, None, 16),
         "digits-ddpm1000": Case("digits", "ddpm", 1000, 100, 16),
         # The policy's own schedule and x0 clipping (clip_x0 = 1: diffusers' clip_sample), as in policy_latency.py.
         "policy": Case("policy", "ddpm", 100, 32, 64, policy_cond,
                        (("num_train_timesteps", 100), ("beta_schedule", "squaredcos_cap_v2"), ("clip_sample", True),
                         ("clip_sample_range", 1.0)))}


@dataclass(frozen=True)
class Combo:
    """A Picard update rule with a stopping rule and more sampler options (``init``, ``fill``, ...; default: the
    sampler's), swept over ``SWEEPS[stop]``."""

    update: str
    stop: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.options)
        default = " (default)" if (self.update, self.stop) == DEFAULT and not self.options else ""
        return f"{self.update} + {self.stop} rule{extra}{default}"

    @property
    def tols(self) -> tuple[float, ...]:
        return SWEEPS[self.stop]


def combos(updates=UPDATES, stops=STOPS, options: tuple[tuple[str, object], ...] = ()) -> list[Combo]:
    """Every ``update`` with every ``stop``, in the order given, each with the sampler ``options``."""
    return [Combo(u, s, options) for u in updates for s in stops]


# -- runs ----------------------------------------------------------------------------------------------------------
def sample(case: Case, batch: int, seed: int = 0, first_sample: int = 0, noise: torch.Tensor | None = None,
           **options):
    """``case``'s samples ``first_sample .. first_sample + batch - 1`` of ``seed``
    (:class:`~paratime.results.SampleResult`) with sampler ``options`` (``method``, ``tol``, ``update``, ...);
    ``window`` defaults to the case's; ``noise``: the initial noise instead of the seed's (the steps' noise still
    comes from the seed)."""
    options.setdefault("window", case.window)
    s = ParallelSampler(case.model, solver=case.solver, steps=case.steps, progress=False, **options)
    cond = {k: v[first_sample:] for k, v in case.conditioning(first_sample + batch).items()}
    return s.sample(None if noise is not None else batch, noise=noise, seed=seed, first_sample=first_sample, **cond)


def sweep(run: Callable[[float], tuple[int, float, float]], tols, floor: float) -> list[dict]:
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


def paratime_runs(case: Case, batch: int, combo: Combo, ref: torch.Tensor, floor: float,
                  tols: tuple[float, ...] | None = None) -> list[dict]:
    """Picard with ``combo`` over its tolerances, each against the sequential samples ``ref``."""
    def run(tol):
        res = sample(case, batch, tol=tol, update=combo.update, stop=combo.stop, **dict(combo.options))
        return res.stats.rounds, res.stats.nfe, float((res.samples - ref).abs().max())

    return sweep(run, combo.tols if tols is None else tols, floor)


def diffusers_runs(case: Case, batch: int, tols, floor: float) -> list[dict]:
    """diffusers' ParaDiGMS loop (``DDIM/DDPMParallelScheduler``, one window for the whole batch), each run against
    the loop's own sequential run; empty without diffusers."""
    try:
        from diffusers import DDIMParallelScheduler, DDPMParallelScheduler
    except ImportError:
        return []
    from paratime.bench.suite import paradigms_loop
    from paratime.models import load_model
    from paratime.noise import INITIAL, draw_noise

    model = load_model(case.model)
    dtype = model.dtype or torch.float32                  # the network's own precision (gmm: float64)
    cond = case.conditioning(batch)

    def net(x, t):                                        # x: (P * batch, *shape), P window points, point-major
        rows = {k: v.repeat(x.shape[0] // batch, *([1] * (v.ndim - 1))) for k, v in cond.items()}
        return model.network(x.to(dtype), t, **rows).to(x.dtype)

    options = dict(case.scheduler)
    sch = (DDIMParallelScheduler(**options, set_alpha_to_one=True) if case.solver == "ddim"
           else DDPMParallelScheduler(**options))
    x_T = draw_noise(0, batch, model.sample_shape, None, INITIAL, dtype=dtype)
    W = case.window or case.steps
    with torch.no_grad():
        ref = paradigms_loop(net, sch, x_T, case.steps, 1, 0.0, torch.Generator().manual_seed(0))[0]

        def run(tol):
            x, rounds, nfe = paradigms_loop(net, sch, x_T, case.steps, W, tol, torch.Generator().manual_seed(0))
            return rounds, nfe, float((x - ref).abs().max())

        return sweep(run, tols, floor)


def _progress(name: str, label: str, runs: list[dict]) -> None:
    print(f"  {name} {label}: " + ", ".join(f"tol {r['tol']:g}: {r['rounds']} rounds, {r['max_abs_diff']:.2g}"
                                             for r in runs), flush=True)


def run_case(name: str, batch: int | None = None, selected: list[Combo] | None = None,
             with_diffusers: bool = True) -> dict:
    """Every combination (default: :func:`combos`), the old default on a sliding window (where its initial guess
    and window fill differ from today's Picard + ParaDiGMS rule) and the diffusers loop on case ``name``.

    Returns:
        ``{"case", "model", "solver", "steps", "batch", "window", "today", "runs": {label: [run, ...]},
        "combos": {label: {"update", "stop"}}}``, each run ``{"tol", "rounds", "nfe", "max_abs_diff"}``.
    """
    case = CASES[name]
    batch = batch or case.batch
    floor = min(TARGETS)
    rows, meta = {}, {}
    with torch.no_grad():
        ref = sample(case, batch, method="sequential").samples
        old = Combo(*OLD_DEFAULT) if (case.window or case.steps) < case.steps else Combo(*OLD_DEFAULT[:2])
        for combo in [*(selected or combos()), old]:
            if combo.label in rows:
                continue
            rows[combo.label] = paratime_runs(case, batch, combo, ref, floor)
            meta[combo.label] = {"update": combo.update, "stop": combo.stop, **dict(combo.options)}
            _progress(name, combo.label, rows[combo.label])
        today = next((r for r in rows[old.label] if r["tol"] == TODAY_TOL), None)
        today = today or paratime_runs(case, batch, old, ref, 0.0, tols=(TODAY_TOL,))[0]
    if with_diffusers:
        d = diffusers_runs(case, batch, SWEEPS["paradigms"], floor)
        if d:
            rows[DIFFUSERS] = d
            _progress(name, "diffusers", d)
    return {"case": name, "model": case.model, "solver": case.solver, "steps": case.steps, "batch": batch,
            "window": case.window or case.steps, "today": today, "runs": rows, "combos": meta}


def merge(results: list[dict]) -> list[dict]:
    """Results of the same case (and batch) from several runs as one, later runs replacing a label's rows."""
    out: dict[tuple, dict] = {}
    for res in results:
        key = (res["case"], res["batch"], res["window"])
        if key not in out:
            out[key] = {**res, "runs": {}, "combos": {}}
        out[key]["runs"].update(res["runs"])
        out[key]["combos"].update(res.get("combos", {}))
    return list(out.values())


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


def _names(text: str, allowed, what: str, ap: argparse.ArgumentParser) -> list[str]:
    names = list(allowed) if text == "all" else text.split(",")
    for n in names:
        if n not in allowed:
            ap.error(f"{what}: unknown {n!r}; allowed: {', '.join(allowed)}, all")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rounds_at_accuracy", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--cases", default="gmm-ddim100", help=f"comma-separated of {', '.join(CASES)}, or 'all'")
    ap.add_argument("--batch", type=int, default=None, help="samples for every case (default: each case's)")
    ap.add_argument("--updates", default="all", help=f"comma-separated of {', '.join(UPDATES)}, or 'all'")
    ap.add_argument("--stops", default="all", help=f"comma-separated of {', '.join(STOPS)}, or 'all'")
    ap.add_argument("--init", choices=INITS, default=None, help="Picard's initial guess (default: the sampler's)")
    ap.add_argument("--fill", choices=FILLS, default=None, help="how points entering a sliding window start "
                    "(default: the sampler's)")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers' ParaDiGMS loop")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", default=None, help="also write every run to this file")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="print one table from earlier --json files instead of running")
    args = ap.parse_args(argv)
    if (args.batch is not None and args.batch < 1) or args.threads < 1:
        ap.error("--batch, --threads: must be >= 1")
    if args.merge:
        results = merge([r for f in args.merge for r in json.loads(Path(f).read_text())])
    else:
        torch.set_num_threads(args.threads)
        names = _names(args.cases, CASES, "--cases", ap)
        options = tuple((k, v) for k, v in (("init", args.init), ("fill", args.fill)) if v is not None)
        selected = combos(_names(args.updates, UPDATES, "--updates", ap), _names(args.stops, STOPS, "--stops", ap),
                          options)
        print(f"torch threads={args.threads}; targets max|Δ| {', '.join(f'{t:g}' for t in TARGETS)}", flush=True)
        results = []
        for n in names:
            results.append(run_case(n, args.batch, selected, not args.no_diffusers))
            if args.json:                               # after every case: a long run keeps what it finished
                Path(args.json).write_text(json.dumps(results, indent=1))
    print(to_markdown(results))
    if args.json and args.merge:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
