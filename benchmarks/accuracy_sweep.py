"""Does the final-point rule keep its promise? (issue 17): for each tolerance, the default Picard (secant update,
``stop="final"``) against the sequential sampler on the same noise: max |Δ|, the 99th percentile of the per-sample
max |Δ|, the samples over tol, rounds and NFE; every row with max |Δ| > tol is flagged.

    python benchmarks/accuracy_sweep.py                                    # every case below, ~30 min on 1 thread
    python benchmarks/accuracy_sweep.py --cases gmm-ddim100,mix3-ddpm100 --json sweep.json
    python benchmarks/accuracy_sweep.py --cases digits-ddim100 --tols 1e-2,1e-3

Cases (``SWEEP_CASES``, full window): ``gmm`` DDIM-100, DDPM-100 and the multistep DPM++(2M), DPM++(3M) and PLMS
at 100 steps with 4,000 samples; ``mix3`` (the 3-D anisotropic mixture with weights 0.6 / 0.3 / 0.1 of
``tests/test_accuracy.py``) DDIM-100, DDPM-100 and DPM++(2M)-100 with 4,000 samples; ``digits`` DDIM-100 with 64
samples (data in [-1, 1]). Sliding windows (the ``-w`` cases: the planner's window on K compute-bound devices is
K): gmm and mix3 DDPM-100, mix3 DDIM-100 and DPM++(2M)-100 with window 8, digits DDIM-50 with window 4 and DDPM-50
(64 samples) with windows 4 and 8; on coarse 20-step
grids, mix3 DDIM and DPM++(2M), gmm DPM++(2M) and digits DPM++(2M) with window 8; on 50-step grids, mix3 DDIM and
DPM++(2M) with window 8. ``--updates all`` sweeps every
update rule. |Δ| is in data units (the returned sample's); a
sample's error is its max over features, compared with the tolerance in force for it (``SampleStats.tol_abs``:
``tol`` times its data scale, issue 25); the margin column gives the worst and the median error / that tolerance.

To explain a flagged row, the table gives three more things. "switched": the samples that end with another label
than their sequential twin (the mixture's mode, by the responsibilities at sigma 0; the digit's class, by the
logistic regression of :class:`paratime.digits_eval.DigitsJudge`): a sample near a boundary between modes can cross
it at a small change of its trajectory, and its error is then the distance between the modes. "worst": the worst
sample, the round it finished and its sensitivity (how far its sequential sample moves per unit change of its
initial noise, with its rank in the batch; the header gives the batch's median and p99). "accept 10x stricter": the
worst samples (up to ``DIAGNOSED``) rerun alone with a flat ``accept_tol`` 10x below the default's base level: if their
error then drops under tol, it came from points accepted (frozen) with errors the trajectory later amplified; if not,
from the final-point rule stopping early. Flat: a deterministic solver's stricter tail is not stricter still (a whole
grid's last quarter stays at tol / 300; a sliding window's last half goes from tol / 100 to tol / 300, 3.3x), so a
late-accepted point's share of an error is ruled out less firmly than an early one's. Threads: ``--threads``
(default 1); every number printed is deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from paratime.bench.rounds_at_accuracy import Case, sample
from paratime.bench.scoring import sample_errors
from paratime.denoiser import Denoiser
from paratime.methods.picard import UPDATES, default_accept_tol
from paratime.solvers import make_solver
from paratime.models import load_model
from paratime.zoo.gmm import mixture_3d

TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
DIAGNOSED = 8              # worst samples over tol rerun with a stricter window-slide tolerance, per row
SWEEP_CASES = {"gmm-ddim100": Case("gmm", "ddim", 100, None, 4000),
               "gmm-ddpm100": Case("gmm", "ddpm", 100, None, 4000),
               "mix3-ddim100": Case("mix3", "ddim", 100, None, 4000),
               "mix3-ddpm100": Case("mix3", "ddpm", 100, None, 4000),
               "digits-ddim100": Case("digits", "ddim", 100, None, 64),
               # Multistep solvers (issue 25): the final point of a history-carrying step map.
               "gmm-dpmpp2m100": Case("gmm", "dpmpp_2m", 100, None, 4000),
               "gmm-dpmpp3m100": Case("gmm", "dpmpp_3m", 100, None, 4000),
               "gmm-plms100": Case("gmm", "plms", 100, None, 4000),
               "mix3-dpmpp2m100": Case("mix3", "dpmpp_2m", 100, None, 4000),
               # Sliding windows of a few points, the planner's choice on K compute-bound devices (window = K):
               # there acceptance drives the slide, and its frozen errors reach the final point.
               "gmm-ddpm100-w8": Case("gmm", "ddpm", 100, 8, 4000),
               "mix3-ddpm100-w8": Case("mix3", "ddpm", 100, 8, 4000),
               "digits-ddpm50-w4": Case("digits", "ddpm", 50, 4, 64),
               "digits-ddpm50-w8": Case("digits", "ddpm", 50, 8, 64),
               "mix3-ddim100-w8": Case("mix3", "ddim", 100, 8, 4000),
               "mix3-dpmpp2m100-w8": Case("mix3", "dpmpp_2m", 100, 8, 4000),
               "digits-ddim50-w4": Case("digits", "ddim", 50, 4, 64),
               # Coarse grids: larger steps stretch a change more per point (the guard's gain span follows the grid).
               "mix3-ddim20-w8": Case("mix3", "ddim", 20, 8, 4000),
               "mix3-dpmpp2m20-w8": Case("mix3", "dpmpp_2m", 20, 8, 4000),
               "gmm-dpmpp2m20-w8": Case("gmm", "dpmpp_2m", 20, 8, 4000),
               "digits-dpmpp2m20-w8": Case("digits", "dpmpp_2m", 20, 8, 64),
               # 50-step grids: the gain span is 4 points there (8% of the grid).
               "mix3-ddim50-w8": Case("mix3", "ddim", 50, 8, 4000),
               "mix3-dpmpp2m50-w8": Case("mix3", "dpmpp_2m", 50, 8, 4000)}


BUILDERS: dict[str, Callable[[], Denoiser]] = {"mix3": mixture_3d}


def build(model: str | Denoiser) -> Denoiser:
    """A case's model as a :class:`Denoiser`: a builder here, else a registered model."""
    if isinstance(model, Denoiser):
        return model
    return BUILDERS[model]() if model in BUILDERS else load_model(model)


def labeller(model: Denoiser) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``labels(x (B, *shape)) -> (B,)``: the mixture mode (``network.gmm``), or the digit class for 8x8 digits;
    None for other models."""
    gmm = getattr(model.network, "gmm", None)
    if gmm is not None:
        return lambda x: gmm.responsibilities(x.reshape(len(x), -1), torch.zeros(len(x))).argmax(1)
    if tuple(model.sample_shape or ()) == (1, 8, 8):
        from paratime.digits_eval import DigitsJudge, _to_features

        clf = DigitsJudge().clf
        return lambda x: torch.as_tensor(clf.predict(_to_features(x)))
    return None


def sensitivity(case: Case, seed: int = 0) -> torch.Tensor:
    """``(B,)`` how much each sequential sample moves per unit change of its initial noise: ``max |x_0(x_T + eps d)
    - x_0(x_T)| / eps`` along a seeded random direction ``d`` of max-abs 1, the same step noise (``eps`` 1e-6 in
    float64, 1e-3 in lower precision). A large value marks a sample whose trajectory amplifies small errors, as one
    that passes close to a boundary between modes does."""
    from paratime.noise import INITIAL, draw_noise

    x_T = draw_noise(seed, case.batch, tuple(case.model.sample_shape), None, INITIAL)        # float64
    d = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(seed), dtype=x_T.dtype)
    d = d / d.reshape(len(d), -1).abs().amax(1).reshape(-1, *[1] * (d.ndim - 1))
    base = sample(case, case.batch, seed, noise=x_T, method="sequential").samples
    eps = 1e-6 if base.dtype == torch.float64 else 1e-3
    moved = sample(case, case.batch, seed, noise=x_T + eps * d, method="sequential").samples
    return (moved - base).abs().reshape(case.batch, -1).amax(1).double() / eps


def accuracy_sweep(case: Case, tols=TOLS, seed: int = 0, **options) -> list[dict]:
    """Picard at each tolerance against the sequential samples of ``case``.

    Args:
        case: the model (a name, a :data:`BUILDERS` key or a :class:`Denoiser`), solver, steps, window, batch.
        tols: tolerances, each one run. seed: the noise seed. options: more sampler options (``update``, ``stop``,
            ``accept_tol``, ...; default: the sampler's).
    Returns:
        One row per tol: ``tol, max_abs_diff, p99_abs_diff`` (of the per-sample max |Δ|), ``over`` (samples with
        max |Δ| > tol), ``switched`` (samples whose label differs from the sequential one's; None without a
        labeller), ``switched_over`` (of those over tol), ``rounds, nfe``, ``mean_rounds`` (the rounds a sample took,
        averaged), ``rolled_back`` (samples the amplification guard rolled back), ``flagged`` (max |Δ| > tol), ``worst``
        (up to :data:`DIAGNOSED` samples over tol, worst first, as ``(index, max |Δ|, round it finished,
        sensitivity, its rank in the batch)``, see :func:`sensitivity`), ``sensitivity_median, sensitivity_p99``
        (over the batch) and ``strict_accept_max_abs_diff`` (the largest error of those samples rerun with a 10x
        stricter window-slide tolerance, :func:`_strict_accept`; None when no sample is over tol).
    """
    model = build(case.model)
    # A case without a window runs the whole grid, given explicitly (left to the planner, it ran W = 2 on 4,000
    # samples where the README's table said full window).
    case = replace(case, model=model, window=case.window or case.steps)
    label = labeller(model)
    with torch.no_grad():
        ref = sample(case, case.batch, seed, method="sequential").samples
        ref_labels = label(ref) if label else None
        gain = sensitivity(case, seed)                                                    # (B,)
        rank = torch.empty(case.batch, dtype=torch.long)
        rank[gain.argsort(descending=True)] = torch.arange(case.batch)                  # 0: the most sensitive
        rows = []
        for tol in tols:
            res = sample(case, case.batch, seed, tol=tol, **options)
            if res.stats.window != case.window:
                raise RuntimeError(f"the sweep ran window {res.stats.window}, not the case's {case.window}")
            # Per sample: max |Δ| and that over the tolerance in force, in the sample's units (tol times its data
            # scale; tol itself where the rule does not scale it); the margin is the worst ratio.
            err, ratio = sample_errors(res.samples, ref, res.stats.tol_abs or tol)          # (B,), (B,)
            over = ratio > 1
            switched = label(res.samples) != ref_labels if label else None              # (B,) bool
            worst = err.argsort(descending=True)[:int(over.sum())][:DIAGNOSED].tolist()
            rows.append({"tol": tol, "max_abs_diff": float(err.max()), "p99_abs_diff": float(err.quantile(0.99)),
                         "max_rel": float(ratio.max()), "median_rel": float(ratio.median()),
                         "over": int(over.sum()), "switched": None if switched is None else int(switched.sum()),
                         "switched_over": None if switched is None else int((switched & over).sum()),
                         "rounds": res.stats.rounds, "nfe": res.stats.nfe, "flagged": bool(over.any()),
                         "window": res.stats.window,
                         "mean_rounds": sum(res.stats.sample_rounds) / case.batch,
                         "rolled_back": sum(res.stats.extra.get("rolled_back", [])),
                         "worst": [(b, float(err[b]), res.stats.sample_rounds[b], float(gain[b]), int(rank[b]))
                                   for b in worst],
                         "sensitivity_median": float(gain.median()), "sensitivity_p99": float(gain.quantile(0.99)),
                         "strict_accept_max_abs_diff": _strict_accept(case, ref, worst, tol, seed, options)})
    return rows


def _strict_accept(case: Case, ref: torch.Tensor, idx: list[int], tol: float, seed: int, options: dict):
    """The largest error of samples ``idx`` rerun alone (their noise depends on the sample index only) with a flat
    window-slide tolerance 10x below the run's base level (its tail: only 1x on a deterministic whole grid's last
    quarter, 3.3x on a sliding window's last half; see the module docstring); None without samples (or with
    ``accept_tol`` given). Below tol: the excess came from points accepted (frozen) too early, not from the
    final-point stop."""
    if not idx or "accept_tol" in options:
        return None
    solver = make_solver(case.solver)
    full = case.window is None or case.window >= case.steps
    # The run's default acceptance, 10x stricter (flat: a deterministic whole grid's tail, already tol / 300 in the
    # run, stays at that level here):
    accept = default_accept_tol(tol, stochastic=solver.stochastic, sliding=not full) / 10
    errs = [float((sample(case, 1, seed, tol=tol, accept_tol=accept, first_sample=b, **options).samples[0]
                   - ref[b]).abs().max()) for b in idx]
    return max(errs)


def to_markdown(name: str, case: Case, rows: list[dict]) -> str:
    gains = f"sensitivity median {rows[0]['sensitivity_median']:.3g}, p99 {rows[0]['sensitivity_p99']:.3g}"
    lines = [f"{name} (batch {case.batch}, window {case.window or case.steps}; {gains})", "",
             "| tol | max abs Δ | p99 abs Δ | margin: max (median) Δ / tol in force | samples over tol | "
             "switched (of them over tol) | rounds (per sample) | NFE | rolled back | flag | "
             "worst: sample, its rounds, sensitivity (rank) | over-tol samples, accept 10x stricter: max abs Δ |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        switched = "n/a" if r["switched"] is None else f"{r['switched']} ({r['switched_over']})"
        flag = f"**max Δ > tol ({r['max_rel']:.1f}x)**" if r["flagged"] else ""
        worst = ""
        if r["worst"]:
            b, _, rounds, gain, rank = r["worst"][0]
            worst = f"#{b}, {rounds}, {gain:.3g} (rank {rank + 1} of {case.batch})"
        strict = "" if r["strict_accept_max_abs_diff"] is None else f"{r['strict_accept_max_abs_diff']:.2e}"
        lines.append(f"| {r['tol']:g} | {r['max_abs_diff']:.2e} | {r['p99_abs_diff']:.2e} | "
                     f"{r['max_rel']:.3f} ({r['median_rel']:.3f}) | {r['over']} | "
                     f"{switched} | {r['rounds']} ({r['mean_rounds']:.1f}) | {r['nfe']:.1f} | {r['rolled_back']} | "
                     f"{flag} | {worst} | {strict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="accuracy_sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--cases", default="all", help=f"comma-separated of {', '.join(SWEEP_CASES)}, or 'all'")
    ap.add_argument("--tols", default=",".join(f"{t:g}" for t in TOLS), help="comma-separated tolerances")
    ap.add_argument("--batch", type=int, default=None, help="samples for every case (default: each case's)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", default=None, help="also write every row to this file (after each case)")
    ap.add_argument("--updates", default="secant", help=f"comma-separated update rules of {', '.join(UPDATES)}, "
                    "or 'all': each case is swept once per rule (default: the sampler's, secant)")
    args = ap.parse_args(argv)
    names = list(SWEEP_CASES) if args.cases == "all" else args.cases.split(",")
    for n in names:
        if n not in SWEEP_CASES:
            ap.error(f"--cases: unknown {n!r}; allowed: {', '.join(SWEEP_CASES)}, all")
    try:
        tols = [float(t) for t in args.tols.split(",")]
    except ValueError:
        ap.error(f"--tols: expected comma-separated numbers, got {args.tols!r}")
    if (args.batch is not None and args.batch < 1) or args.threads < 1 or args.seed < 0:
        ap.error("--batch, --threads: must be >= 1; --seed: >= 0")
    updates = list(UPDATES) if args.updates == "all" else args.updates.split(",")
    for u in updates:
        if u not in UPDATES:
            ap.error(f"--updates: unknown {u!r}; allowed: {', '.join(UPDATES)}, all")
    torch.set_num_threads(args.threads)
    out = []
    for n in names:
        case = SWEEP_CASES[n] if args.batch is None else replace(SWEEP_CASES[n], batch=args.batch)
        for u in updates:
            rows = accuracy_sweep(case, tols, args.seed, update=u)
            print(to_markdown(f"{n}, update {u}", case, rows), flush=True)
            out.append({"case": n, "update": u, "model": case.model, "solver": case.solver, "steps": case.steps,
                        "seed": args.seed, "batch": case.batch, "window": case.window or case.steps, "rows": rows})
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
