"""Speed-up on K devices in sequential call equivalents: paratime's planner, fixed Picard windows, pipelined
Parareal and the CHORDS port against sequential sampling, on a compute-bound and a latency-bound cost.

What is measured: each sample (batch 1, one seed per sample) is drawn with every method; a method's wall time on K
devices is its SCE, the sum over its network calls of ``c(ceil(rows / K)) / c(1)`` (:mod:`paratime.cost`; rows are
counted by the sampler, K is what the backend reports: the rows are evaluated on this machine), and its speed-up is
sequential sampling's measured SCE over its mean SCE, printed as "N / SCE" (sequential costs N on a one-call solver,
DDIM or DPM++; 2N - 1 on Heun). Accuracy is max |Δ| against the sequential sample of the same seed over all seeds,
as a fraction of the data range (the largest |x| of the sequential samples: 1.05 on digits, so this table's 2e-3 is
2.1e-3 absolute where ``sliding_worst.py``'s is 2e-3 on the declared scale 1). Two levels, 2e-3 and 5e-2: per
method the fastest setting whose max |Δ| stays within the level ("best found": fixed windows over
``W in {K, 2K, 4K, N}`` and tolerances; CHORDS: the earliest hit index meeting the level on every seed, a fixed
index as a stop rule must be;
pipelined Parareal and paratime's own staggered method, ``method="staggered"`` with K cores, over tolerances); the
planner runs its defaults only. ``--solver`` runs every method with another of paratime's solvers; the CHORDS port
(one-step solvers, :data:`CHORDS_SOLVERS`) and pipelined Parareal (one-step solvers) are left out of a multistep
solver's tables, and the run says so.

Costs: ``digits`` U-Net with the ``compute`` curve ``c(r) = r`` (a large model on a GPU), ``policy`` with the
``latency`` curve ``c(r) = 1`` (a small model). CHORDS (:mod:`paratime.bench.chords_ref`) uses the staggered schedule of
:func:`~paratime.bench.chords_ref.stagger`; each tick is one call of at most K rows: one SCE on K devices.

Usage::

    OMP_NUM_THREADS=1 python -m paratime.bench.devices [--quick] [--out DIR]    # table, devices.json, devices.png
    OMP_NUM_THREADS=1 python -m paratime.bench.devices --models digits --solver dpmpp_2m --steps 20   # another solver
    OMP_NUM_THREADS=1 python -m paratime.bench.devices --models digits --curve \
        benchmarks/h100_curves.json:'sd15-unet float16'      # the rows priced with a GPU-measured curve
    OMP_NUM_THREADS=1 python -m paratime.bench.devices --calibrate               # the planner's rounds model
    python -m paratime.bench.devices --real                                      # 2 gloo ranks, measured wall clock

Exits 1 when a check fails: sequential at 1.0x, the planner never below 1.0x and within 2e-3 of the data range,
CHORDS's core 0 equal to paratime's sequential sample, the plot's axes holding every plotted point.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from paratime.bench.chords_ref import run_chords, stagger
from paratime import ParallelSampler
from paratime.backends import LocalBackend
from paratime.cost import make_cost
from paratime.methods import METHODS
from paratime.noise import INITIAL, draw_noise
from paratime.planner import picard_rows
from paratime.solvers import SOLVERS, make_solver

LEVELS = (2e-3, 5e-2)
PICARD_TOLS = (3e-2, 1e-2, 2e-3)
PARAREAL_TOLS = (0.1, 0.03, 0.01)
MODELS = {"digits": "compute", "policy": "latency"}
SOLVER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM++(2M)"}
#: the CHORDS port takes one-step solvers (``solver(x_t, score_t, t, s)``, as the reference does); paratime's DDIM
#: jump is exact with the score held, a multistep solver's is not, so the port runs for DDIM only
CHORDS_SOLVERS = ("ddim",)
#: CHORDS's core 0 against paratime's sequential sample (data-range units): float32 batch-size rounding only
CORE0_TOL = 1e-5


class Spread(LocalBackend):
    """Evaluates every row on this machine but reports ``workers`` devices: the sampler's SCE counts each call's
    rows as if spread over them (the planner plans for them too)."""

    def __init__(self, workers: int):
        super().__init__()
        self.workers = workers


def _cond(model: str, i: int) -> dict:
    if model == "digits":
        return {"labels": torch.tensor([i % 10])}
    return {"obs": torch.randn(1, 12, generator=torch.Generator().manual_seed(1000 + i))}


def make_sampler(model, steps, cost, workers=1, **kw):
    """The benchmarks' sampler: ``model`` with ``steps`` steps, cost curve ``cost`` ("compute" or "latency") on
    ``workers`` simulated devices, no progress bar; ``kw`` the remaining :class:`ParallelSampler` options."""
    return ParallelSampler(model, steps=steps, cost=cost, backend=Spread(workers), progress=False, **kw)


def not_run(solver: str) -> dict[str, str]:
    """The methods (as the tables name them) left out for ``solver``, with why: the CHORDS port takes one-step
    solvers exact with the score held (:data:`CHORDS_SOLVERS`), pipelined Parareal one-step solvers."""
    out = {}
    if solver not in CHORDS_SOLVERS:
        why = "one-step solvers, exact with the score held: DDIM here"
        out.update({"CHORDS port": why, "CHORDS recommended stop": why})
    if make_solver(solver).uses_history:
        out["pipelined Parareal"] = "one-step solvers"
    return out


def solver_name(solver: str) -> str:
    """The solver as the tables write it: ``DDIM``, ``DPM++(2M)``, else its paratime name."""
    return SOLVER_NAMES.get(solver, solver)


def _runs(model, steps, cost, workers, seeds, seq, **kw) -> dict:
    """One configuration over the seeds: mean SCE, speed-up, max |Δ| (data-range units), the plan; a method that
    raises is recorded with its error (and fails the run's checks), not dropped."""
    try:
        return _measured(model, steps, cost, workers, seeds, seq, **kw)
    except (ValueError, TypeError, RuntimeError) as e:
        return {"sce": math.nan, "speedup": math.nan, "err": math.inf, "plan": None, "error": f"{kw}: {e}"}


def draw_alone(model: str, steps: int, cost: str, workers: int, seeds: int, **kw) -> dict:
    """Samples ``0 .. seeds - 1`` of seed 0, each drawn alone (batch 1, its own conditioning, :func:`_cond`) with
    one sampler: ``x`` ``(seeds, *sample_shape)``, ``sce`` the mean SCE on ``workers`` devices, ``plan`` the last
    sample's plan."""
    s = make_sampler(model, steps, cost, workers, **kw)
    xs, sce, plan = [], [], None
    for i in range(seeds):
        r = s.sample(1, seed=0, first_sample=i, **_cond(model, i))
        xs.append(r.samples)
        sce.append(r.stats.sce)
        plan = r.stats.plan
    return {"x": torch.cat(xs), "sce": statistics.mean(sce), "plan": plan}


def _measured(model, steps, cost, workers, seeds, seq, **kw) -> dict:
    d = draw_alone(model, steps, cost, workers, seeds, **kw)
    err = float((d["x"] - seq["x"]).abs().max()) / seq["range"]
    return {"sce": d["sce"], "speedup": seq["sce"] / d["sce"], "err": err, "plan": d["plan"]}


def chords_runs(model: str, steps: int, workers: int, seeds: int) -> list[list[tuple[int, torch.Tensor]]]:
    """The CHORDS port on paratime's DDIM step map, sample ``i`` drawn as :func:`draw_alone` draws it (seed 0,
    ``first_sample=i``): per sample, its hits in the order the cores finish, each ``(tick, x_T)`` in the sample's
    units (``(1, *sample_shape)``); the last is core 0, the sequential solution."""
    s = make_sampler(model, steps, "compute", 1, method="sequential")
    den, grid = s.denoiser, s.grid
    sig, times = grid.sigmas.to(s.state_dtype), grid.model_times

    def ddim(x, d, t, u):                 # the VE-frame DDIM jump from point t to u with D held: exact for DDIM
        return d + (sig[u] / sig[t]) * (x - d)

    out = []
    for i in range(seeds):
        cond = _cond(model, i)

        def score(points):
            ts = torch.tensor([t for t, _ in points])
            x = torch.stack([x for _, x in points])
            rows = {k: v.expand(len(points), *v.shape[1:]) for k, v in cond.items()}
            with torch.no_grad():
                d = den(x, sig[ts], times[ts].to(x), **rows)
            return list(d)

        x0 = draw_noise(0, 1, den.sample_shape, None, INITIAL, i)[0] * den.schedule.prior_std(grid.sigmas[:1])
        run = run_chords(steps, x0.to(s.state_dtype), score, stagger(steps, workers), solver=ddim, index=10 ** 6)
        out.append([(hit.tick, (hit.x * grid.frame_scales[-1])[None]) for hit in run.hits])
    return out


def _chords(model, steps, workers, seeds, seq) -> list[dict]:
    """The CHORDS port: per hit index, the mean tick and the max |Δ| over seeds (data-range units)."""
    per_hit: dict[int, list] = {}
    for i, hits in enumerate(chords_runs(model, steps, workers, seeds)):
        for j, (tick, x) in enumerate(hits):
            per_hit.setdefault(j, []).append((tick, float((x - seq["x"][i]).abs().max()) / seq["range"]))
    return [{"hit": j, "sce": statistics.mean(t for t, _ in v), "err": max(e for _, e in v)}
            for j, v in sorted(per_hit.items())]


def _best(rows: list[dict], level: float) -> dict | None:
    ok = [r for r in rows if r["err"] <= level]
    return max(ok, key=lambda r: r["speedup"]) if ok else None


def measure(model: str, steps: int, devices: list[int], seeds: int, quick: bool = False,
            solver: str = "ddim", curve: tuple[str, dict[int, float]] | None = None) -> dict:
    """Every method at every K for one model and solver (``quick``: windows K and N, one tolerance each); returns
    the records (the CHORDS port only for :data:`CHORDS_SOLVERS`). ``curve``: ``(label, {rows: seconds})``, a
    measured table that prices every model's calls in place of its named curve (``--curve``)."""
    cost, skip = (MODELS[model] if curve is None else curve[1]), not_run(solver)
    d = draw_alone(model, steps, cost, 1, seeds, method="sequential", solver=solver)
    # The baseline's cost is measured, not N: a two-call solver (Heun: 2N - 1) or PLMS's first step costs more.
    # One sample's sequential calls hold one row each, so this is its cost on any K.
    seq = {"x": d["x"], "range": float(d["x"].abs().max()), "sce": d["sce"]}          # x: (seeds, *shape)
    out = {"model": model, "cost": cost if curve is None else curve[0], "solver": solver, "steps": steps,
           "seeds": seeds, "range": seq["range"], "K": {}}
    for K in devices:
        rec = {"sequential": {"sce": seq["sce"], "speedup": 1.0, "err": 0.0},
               "planner": _runs(model, steps, cost, K, seeds, seq, method="auto", solver=solver)}
        windows = sorted({w for w in ((K, steps) if quick else (K, 2 * K, 4 * K, steps)) if 2 <= w <= steps})
        rec["windows"] = [dict(_runs(model, steps, cost, K, seeds, seq, window=w, tol=tol, solver=solver),
                               window=w, tol=tol)
                          for w in windows for tol in (PICARD_TOLS[1:2] if quick else PICARD_TOLS)]
        rec["parareal_pipelined"] = ([dict(_runs(model, steps, cost, K, seeds, seq, method="parareal_pipelined",
                                                 tol=tol, solver=solver), tol=tol)
                                      for tol in PARAREAL_TOLS[:1 if quick else None]]
                                     if "pipelined Parareal" not in skip else [])
        rec["staggered"] = ([dict(_runs(model, steps, cost, K, seeds, seq, method="staggered", window=K, tol=tol,
                                        solver=solver), tol=tol)
                             for tol in (PICARD_TOLS[1:2] if quick else PICARD_TOLS)]
                            if "staggered" in METHODS and K >= 2 else [])         # K cores, at least 2
        rec["chords"] = []
        if "CHORDS port" not in skip:
            hits = _chords(model, steps, K, seeds, seq)
            for h in hits:
                h["speedup"] = seq["sce"] / h["sce"]
            rec["chords"] = hits
            rec["chords_core0_err"] = hits[-1]["err"]      # core 0 is the sequential solution
        out["K"][K] = rec
        print(f"  {model} K={K}: planner {rec['planner']['speedup']:.2f}x", file=sys.stderr, flush=True)
    return out


def table(res: dict, level: float) -> tuple[list[str], dict]:
    """Markdown rows at one accuracy level and the speed-ups plotted (method -> [speed-up per K or None])."""
    Ks = sorted(res["K"])
    series = {m: [] for m in ("sequential", "planner", "best fixed window", "pipelined Parareal",
                              "staggered (K cores)", "CHORDS port", "CHORDS recommended stop")}
    errs = {m: [] for m in series}          # each cell's max |Δ| (data-range units), printed beside its speed-up
    for K in Ks:
        rec = res["K"][K]
        planner = rec["planner"] if rec["planner"]["err"] <= level else None
        chords = next((h for h in rec["chords"] if h["err"] <= level), None)
        rec_stop = _recommended(rec)
        picks = {"sequential": rec["sequential"], "planner": planner, "best fixed window": _best(rec["windows"], level),
                 "pipelined Parareal": _best(rec["parareal_pipelined"], level),
                 "staggered (K cores)": _best(rec["staggered"], level), "CHORDS port": chords,
                 "CHORDS recommended stop": rec_stop if rec_stop and rec_stop["err"] <= level else None}
        for m, r in picks.items():
            series[m].append(None if r is None else r["speedup"])
            errs[m].append(None if r is None else r["err"])
    for m in not_run(res.get("solver", "ddim")):    # not run for the solver: a row of dashes would read as "missed"
        del series[m]
    lines = ["| method | " + " | ".join(f"K={K}" for K in Ks) + " |", "|---|" + "---|" * len(Ks)]
    for m, v in series.items():
        lines.append(f"| {m} | " + " | ".join("–" if s is None else f"{s:.2f}x ({e:.1e})"
                                                for s, e in zip(v, errs[m])) + " |")
    return lines, series


def _recommended(rec: dict) -> dict | None:
    """The CHORDS port's recommended stop (the first core to finish after core 0's start: hit 1), None when the
    port did not run."""
    hits = rec["chords"]
    return hits[1] if len(hits) > 1 else (hits[-1] if hits else None)


def title(res: dict) -> str:
    return f"{res['model']} {solver_name(res.get('solver', 'ddim'))}-{res['steps']}"


def bound(res: dict) -> str:
    """The cost the figures use: ``compute-bound``, ``latency-bound``, or a measured curve's label."""
    return f"{res['cost']}-bound" if res["cost"] in ("compute", "latency") else f"cost {res['cost']}"


def describe(res: dict) -> list[str]:
    out = []
    for K, rec in sorted(res["K"].items()):
        p = rec["planner"]["plan"]
        if p is None:
            out.append(f"- K={K}: planner failed: {rec['planner'].get('error')}")
            continue
        fixed = ", ".join(f"W={r['window']}/tol {r['tol']:g}: {r['speedup']:.2f}x ({r['err']:.1e})"
                          for r in rec["windows"])
        rec_stop = _recommended(rec)
        chords = ("" if rec_stop is None else
                  f"; CHORDS recommended stop (hit 1): {rec_stop['speedup']:.2f}x at {rec_stop['err']:.1e}")
        out.append(f"- K={K}: planner chose {p['method']}{'' if p['window'] is None else ' W=%d' % p['window']} "
                   f"(predicted {p['speedup']:.2f}x, got {rec['planner']['speedup']:.2f}x"
                   f" at max|Δ| {rec['planner']['err']:.1e}); fixed: {fixed}{chords}")
    return out


def plot(results: list[dict], level: float, path: Path) -> list[str]:
    """Speed-up against K at ``level``, one panel per cost, one colour per method. Returns failed checks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 4), squeeze=False)
    fails = []
    for ax, res in zip(axes[0], results):
        Ks = sorted(res["K"])
        _, series = table(res, level)
        ymax = 1.0
        for (m, v), colour in zip(series.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            pts = [(K, s) for K, s in zip(Ks, v) if s is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", color=colour, label=m)
                ymax = max(ymax, max(s for _, s in pts))
        if res["cost"] == "compute":
            ax.plot(Ks, Ks, ":", color="grey", label="K (the compute-bound limit N / (N / K))")
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ks, [str(K) for K in Ks])
        ax.set_ylim(0, max(ymax, max(Ks)) * 1.08)
        ax.set_xlabel("devices K")
        ax.set_ylabel("speed-up N / SCE")
        ax.set_title(f"{title(res)}, {bound(res)}, max|Δ| ≤ {level:g} of range")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the axes: no point hidden
        lo, hi = ax.get_ylim()
        if not all(lo <= s <= hi for v in series.values() for s in v if s is not None):
            fails.append(f"plot {res['model']}: a point outside the y axis")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fails


def checks(res: dict) -> list[str]:
    fails = []
    for K, rec in res["K"].items():
        for r in [rec["planner"], *rec["windows"], *rec["parareal_pipelined"], *rec["staggered"]]:
            if "error" in r:
                fails.append(f"{res['model']} K={K}: {r['error']}")
        p = rec["planner"]
        if p["speedup"] < 1.0 - 1e-9:
            fails.append(f"{res['model']} K={K}: planner below sequential ({p['speedup']:.2f}x)")
        if p["err"] > LEVELS[0]:
            fails.append(f"{res['model']} K={K}: planner's max|Δ| {p['err']:.1e} above {LEVELS[0]:g} of range")
        # Core 0 takes paratime's DDIM steps; its network calls hold up to K rows, and a float32 network's
        # results depend on the batch size in the last bits (1e-6 here), hence not 0.
        if rec["chords"] and rec["chords_core0_err"] > CORE0_TOL:
            fails.append(f"{res['model']} K={K}: CHORDS core 0 differs from sequential by {rec['chords_core0_err']:.1e}"
                         f" of the data range")
    return fails


def calibrate(steps_list=(50, 100), windows=(2, 4, 8, 16, 32), solver: str = "ddim") -> None:
    """Measured Picard rounds and rows (digits, batch 1, default tolerance, 4 seeds) against the planner's rounds
    model (:func:`paratime.planner.picard_rows`; its stochastic variant for a stochastic solver)."""
    stochastic = bool(make_solver(solver).stochastic)
    print("| solver | N | W | measured rounds (min-max over 4 seeds) | predicted | measured rows (mean) | predicted |\n"
          "|---|---|---|---|---|---|---|")
    for N in steps_list:
        for W in (*(w for w in windows if w < N), N):
            s = make_sampler("digits", N, "latency", 1, window=W, solver=solver)
            stats = [s.sample(1, seed=0, first_sample=i, **_cond("digits", i)).stats for i in range(4)]
            r, rows = [st.rounds for st in stats], [st.nfe_total for st in stats]
            model = picard_rows(N, W, 2e-3, stochastic)
            print(f"| {solver_name(solver)} | {N} | {W} | {min(r)}-{max(r)} | {len(model)} | "
                  f"{statistics.mean(rows):.0f} | {sum(model)} |", flush=True)


# -- diffusers' real ParaDiGMS pipeline ----------------------------------------------------------------------------
class _RowLog:
    """Rows of every call of a module (forward pre-hook): the UNet's batch per call."""

    def __init__(self, module: torch.nn.Module):
        self.rows: list[int] = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.rows.append(int(args[0].shape[0])))


def paradigms(steps: int, devices: list[int], quick: bool = False) -> dict:
    """diffusers' ``StableDiffusionParadigmsPipeline`` (the real class) on the tiny SD pipeline of
    ``benchmarks/tiny_pipelines.py`` (untrained, from configs; guidance 5, so a call holds 2 rows per point), batch 1:
    SCE from the rows of each UNet call under the compute-bound curve, ``sum ceil(rows / K)``, against the sequential
    pipeline's, and max |Δ| of the latents against the sequential pipeline's, as a fraction of their range; swept over
    ``parallel`` in K, 2K, 4K, N over every K given (so each K is also offered the smaller K's windows, all at most
    4K or N) and tolerances 0.1, 0.01, 1e-3."""
    from diffusers import DDIMParallelScheduler, StableDiffusionParadigmsPipeline

    from paratime.bench.tiny_pipelines import prompt_embeddings, tiny_sd

    scheduler = DDIMParallelScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=False,
                                      steps_offset=1)
    pipe = tiny_sd(scheduler)
    para = StableDiffusionParadigmsPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=None,
                                            unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    para.set_progress_bar_config(disable=True)
    args = dict(num_inference_steps=steps, guidance_scale=5.0, height=64, width=64, output_type="latent",
                latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                **prompt_embeddings(pipe, batch=1))
    log = _RowLog(pipe.unet)
    try:
        ref = pipe(**args).images
        seq_rows, rng = list(log.rows), float(ref.abs().max())
        runs = {}
        for W in sorted({w for K in devices for w in (K, 2 * K, 4 * K, steps) if 2 <= w <= steps}):
            for tol in ((0.1,) if quick else (0.1, 0.01, 1e-3)):
                log.rows.clear()
                out = para(**args, parallel=W, tolerance=tol).images
                runs[(W, tol)] = (list(log.rows), float((out - ref).abs().max()) / rng)
    finally:
        log.handle.remove()
    out = {"model": "tiny SD (diffusers)", "steps": steps, "K": {}}
    for K in devices:
        seq = sum(-(-r // K) for r in seq_rows)
        rows = [{"window": W, "tol": tol, "speedup": seq / sum(-(-r // K) for r in rr), "err": err,
                 "rows_per_call": max(rr)} for (W, tol), (rr, err) in runs.items() if W <= max(2, 4 * K) or W == steps]
        out["K"][K] = rows
    return out


def paradigms_table(res: dict) -> list[str]:
    Ks = sorted(res["K"])
    lines = [f"| diffusers ParaDiGMS, tiny SD DDIM-{res['steps']} | " + " | ".join(f"K={K}" for K in Ks) + " |",
             "|---|" + "---|" * len(Ks)]
    for level in LEVELS:
        best = [_best(res["K"][K], level) for K in Ks]
        lines.append(f"| best at max\\|Δ\\| ≤ {level:g} of range | " + " | ".join(
            "–" if b is None else f"{b['speedup']:.2f}x (parallel={b['window']}, tol {b['tol']:g})" for b in best)
            + " |")
    return lines


# -- the real two-rank figure ---------------------------------------------------------------------------------------
def _rank(rank: int, port: int, steps: int, repeats: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        s = ParallelSampler("digits", steps=steps, method="auto", cost="measure", backend="torch", progress=False)
        s.sample(1, seed=0, labels=torch.tensor([3]))                     # warm-up (and the cost measurement)
        walls, comm, res = [], [], None
        for _ in range(repeats):
            dist.barrier()
            c0, t0 = s.backend.timings["comm_s"], time.perf_counter()
            res = s.sample(1, seed=0, labels=torch.tensor([3]))
            walls.append(time.perf_counter() - t0)
            comm.append(s.backend.timings["comm_s"] - c0)
        if rank == 0:
            torch.save({"walls": walls, "comm": comm, "samples": res.samples, "plan": res.stats.plan,
                        "predicted_wall_s": res.stats.predicted_wall_s, "cost": res.stats.cost,
                        "rounds": res.stats.rounds, "round_wall_s": res.stats.round_wall_s}, out)
    finally:
        dist.destroy_process_group()


def real(steps: int = 50, repeats: int = 7) -> list[str]:
    """2 gloo ranks x 1 thread, digits DDIM-``steps`` batch 1 under the planner, against sequential on one rank
    with one thread. Prints measured wall times (min / median / max) beside the planner's prediction."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    seq = ParallelSampler("digits", steps=steps, method="sequential", progress=False)
    seq.sample(1, seed=0, labels=torch.tensor([3]))
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref = seq.sample(1, seed=0, labels=torch.tensor([3]))
        walls.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        port = 29500 + os.getpid() % 1000
        mp.spawn(_rank, args=(port, steps, repeats, out), nprocs=2, join=True)
        r = torch.load(out)
    plan, par = r["plan"], r["walls"]
    err = float((r["samples"] - ref.samples).abs().max())
    fmt = lambda w: f"{min(w):.3f} / {statistics.median(w):.3f} / {max(w):.3f} s"
    print(f"digits DDIM-{steps}, batch 1; 1 thread per process; {repeats} repeats (min / median / max); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"sequential, 1 rank:            {fmt(walls)}  ({statistics.median(walls) / steps * 1e3:.1f} ms per step)")
    print(f"planner, 2 gloo ranks:         {fmt(par)}  ({plan['method']}"
          f"{'' if plan['window'] is None else ' W=%d' % plan['window']}, {r['rounds']} rounds, "
          f"{statistics.median(par) / r['rounds'] * 1e3:.1f} ms per round, all-gather waits "
          f"{fmt(r['comm'])}, max|Δ| {err:.1e})")
    print(f"measured speed-up (medians):   {statistics.median(walls) / statistics.median(par):.2f}x")
    print(f"planner's prediction:          {plan['speedup']:.2f}x "
          f"({plan['predicted_s']:.3f} s predicted: network and the work outside it, "
          f"{plan['predicted_s'] / r['rounds'] * 1e3:.1f} ms per "
          f"round; cost {r['cost']})")
    print(f"plan: {plan['reason']}")
    return [] if err <= 2e-3 else [f"real: max|Δ| {err:.1e} above 2e-3"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="10 steps, K = 1, 2, 4, 1 seed, windows K and N at one tolerance (the tests' run)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--solver", default="ddim", help="paratime's solver for every method (e.g. ddim, dpmpp_2m); the "
                   "CHORDS port runs for ddim only (one-step solvers), --real and --paradigms are DDIM's")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--models", default="digits,policy", help="comma-separated: digits (compute-bound), policy "
                   "(latency-bound)")
    p.add_argument("--out", default="bench_out", help="folder for devices.json and devices.png")
    p.add_argument("--calibrate", action="store_true", help="print the planner's rounds model against measurement "
                   "(DDIM: 50 and 100 steps; another --solver: --steps)")
    p.add_argument("--real", action="store_true", help="the 2-rank wall-clock figure (gloo, 1 thread per rank)")
    p.add_argument("--curve", default=None, metavar="FILE:NAME",
                   help="price every model's calls with a measured curve from gpu_curves.py's JSON, e.g. "
                   "benchmarks/h100_curves.json:'sd15-unet float16' (the planner sees it too)")
    p.add_argument("--paradigms", action="store_true",
                   help="also diffusers' StableDiffusionParadigmsPipeline on the tiny SD pipeline (rows per UNet call)")
    a = p.parse_args(argv)
    if a.steps < 4 or a.seeds < 1:
        p.error("--steps: at least 4; --seeds: at least 1")
    models = a.models.split(",")
    if not models or any(m not in MODELS for m in models):
        p.error(f"--models: unknown in {a.models!r}; allowed: {', '.join(MODELS)}")
    if a.solver not in SOLVERS:
        p.error(f"--solver: unknown {a.solver!r}; allowed: {', '.join(SOLVERS)}")
    if a.solver != "ddim":
        for flag in ("real", "paradigms"):
            if getattr(a, flag):
                p.error(f"--solver {a.solver}: --{flag} measures DDIM only")
    curve = None
    if a.curve is not None:
        path, sep, name = a.curve.rpartition(":")
        if not sep:
            p.error(f"--curve: expected FILE:NAME, got {a.curve!r}")
        try:
            table_ = json.loads(Path(path).read_text())["curves"][name]
            rows, secs = table_["rows"], table_["seconds"]
            if len(rows) != len(secs):
                raise ValueError(f"{len(rows)} rows and {len(secs)} seconds")
            curve = (f"{name} (measured)", dict(zip(rows, secs)))
            make_cost(curve[1])                              # the checks ParallelSampler(cost=) makes, up front
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--curve: cannot use curve {name!r} from {path!r}: {e}")
        for flag in ("real", "paradigms", "calibrate"):
            if getattr(a, flag):
                p.error(f"--curve: --{flag} does not use a curve")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.calibrate:
        calibrate(*(((50, 100),) if a.solver == "ddim" else ((a.steps,),)), solver=a.solver)
        return 0
    if a.real:
        fails = real(a.steps)
        for f in fails:
            print("FAILED:", f)
        return 1 if fails else 0
    out = Path(a.out)                                    # the outputs are checked before the work
    if importlib.util.find_spec("matplotlib") is None:   # the run measured for minutes, then failed to plot
        p.error("--out: devices.png needs matplotlib, an optional extra: pip install 'paratime[bench]'")
    if out.exists() and not out.is_dir():
        p.error(f"--out: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for f in ("devices.json", "devices.png"):
        if (out / f).exists() and not os.access(out / f, os.W_OK):
            p.error(f"--out: {out / f} is not writable")
    if not os.access(out, os.W_OK):
        p.error(f"--out: {out} is not writable")
    steps, seeds, Ks = (10, 1, [1, 2, 4]) if a.quick else (a.steps, a.seeds, [1, 2, 4, 8])
    t0 = time.perf_counter()
    results = [measure(m, steps, Ks, seeds, a.quick, a.solver, curve) for m in models]
    fails = [f for r in results for f in checks(r)]
    for level in LEVELS:
        for r in results:
            print(f"\n{title(r)}, {bound(r)}, batch 1, {seeds} seeds: speed-up N / SCE at "
                  f"max|Δ| ≤ {level:g} of the data range ({r['range']:.3g}; each cell's max|Δ| beside it)\n")
            print("\n".join(table(r, level)[0]))
    skipped = not_run(a.solver)
    if skipped:
        print(f"\nnot run for {a.solver}: " + "; ".join(f"the {m} ({why})" for m, why in skipped.items()
                                                        if m != "CHORDS recommended stop"))
    for r in results:
        print(f"\n{r['model']}:\n" + "\n".join(describe(r)))
    extra = {}
    if a.paradigms:
        extra = paradigms(steps, Ks, a.quick)
        print("\n" + "\n".join(paradigms_table(extra)))
    fails += plot(results, LEVELS[0], out / "devices.png")
    (out / "devices.json").write_text(json.dumps({"results": results, "levels": LEVELS, "paradigms": extra},
                                                 default=float, indent=1))
    print(f"\nwrote {out / 'devices.json'}, {out / 'devices.png'} ({time.perf_counter() - t0:.0f} s, "
          f"{torch.get_num_threads()} thread(s))")
    for f in fails:
        print("FAILED:", f)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
