"""``paratime likelihood``: log-likelihood and bits/dim through the probability-flow ODE, sequentially and with a
parallel method, on data whose answer means something.

``digits``: scikit-learn's held-out digits (the 70/30 split of :meth:`paratime.digits_eval.DigitsJudge.real_baseline`;
the diffusion model itself was trained on all 1,797 images), the same images with their pixels shuffled, and uniform
noise on the same 17 grey levels, all in [-1, 1]; bits/dim with a bin of 2/16 (17 levels). ``gmm``: exact draws of the
mixture, beside their analytic log-density.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

from .methods.likelihood import DIVERGENCES, FLOW_METHODS, FLOW_SOLVERS, likelihood_grid
from .sampler import ParallelSampler

__all__ = ["add_likelihood_parser", "check_likelihood_args", "run_likelihood", "digits_sets", "mixture_log_density",
           "DIGITS_SETS", "DIGITS_LEVELS"]

DIGITS_SETS = ("real", "shuffled", "uniform")
DIGITS_LEVELS = 17          # scikit-learn's digits take the values 0..16


def digits_sets(count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``(count, 1, 8, 8)`` float64 images in [-1, 1] per set of :data:`DIGITS_SETS`.

    Raises:
        ValueError: ``count`` outside ``[1, 540]`` (the held-out split's size).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    _, held_out, _, _ = train_test_split(d.data, d.target, test_size=0.3, random_state=seed)
    if not isinstance(count, int) or not 1 <= count <= len(held_out):
        raise ValueError(f"--samples: must be an integer in [1, {len(held_out)}], got {count!r}")
    real = torch.tensor(held_out[:count], dtype=torch.float64) / 8.0 - 1.0            # (count, 64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(count, 64, generator=g), 1)                        # one permutation per image
    uniform = torch.randint(0, DIGITS_LEVELS, (count, 64), generator=g).double() / 8.0 - 1.0
    shape = (count, 1, 8, 8)
    return {"real": real.reshape(shape), "shuffled": real.gather(1, perm).reshape(shape),
            "uniform": uniform.reshape(shape)}


def add_likelihood_parser(sub) -> argparse.ArgumentParser:
    """Add the ``likelihood`` subcommand to the subparsers ``sub`` (``paratime``'s); returns its parser."""
    p = sub.add_parser("likelihood", help="log-likelihood / bits per dimension through the probability-flow ODE")
    from .schedules import SPACINGS

    p.add_argument("--model", default="digits", help=f"one of {', '.join(LIKELIHOOD_MODELS)}")
    p.add_argument("--sets", default=None, help=f"digits: comma-separated sets of {', '.join(DIGITS_SETS)} "
                                                "(default: all)")
    p.add_argument("--samples", type=int, default=64, help="images (or gmm draws) per set")
    p.add_argument("--solver", default=FLOW_SOLVERS[0], help=f"one of {', '.join(FLOW_SOLVERS)}")
    p.add_argument("--steps", type=int, default=100, help="ODE steps")
    p.add_argument("--spacing", default="karras", help=f"grid spacing, one of {', '.join(SPACINGS)} (karras "
                                                       f"reaches t = 0)")
    p.add_argument("--method", default="picard", help=f"one of {', '.join(FLOW_METHODS)}")
    p.add_argument("--tol", type=float, default=None,
                   help=f"picard: bound on the max |change| of the flow's end state (absolute: x_T and the "
                        f"log-density change over sqrt(n), i.e. up to tol sqrt(n) nats); parareal: each slice's "
                        f"change in units of the noise level (default {DEFAULT_FLOW_TOL}; not with --method "
                        f"sequential)")
    p.add_argument("--window", type=int, default=None, help="Picard window (default: steps)")
    p.add_argument("--divergence", default="hutchinson", help=f"one of {', '.join(DIVERGENCES)}")
    p.add_argument("--probes", type=int, default=None, help="Hutchinson probes per sample (default: 1; "
                                                            "hutchinson only)")
    p.add_argument("--dequantize", action=argparse.BooleanOptionalAction, default=None,
                   help="digits: uniform dequantisation, so bits/dim bound the discrete NLL (default: on; digits "
                        "only)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the sequential solve and report rounds and the bits/dim difference (default: on, "
                        "except with --method sequential, where it does not apply)")
    p.add_argument("--repeats", type=int, default=1, help="runs per method, for wall-clock min / median")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="split, probe and dequantisation seed")
    p.add_argument("--json", default=None, help="write the record as JSON here (default: none)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show each solve's progress (rounds, residual, ETA) on stderr")
    return p


def check_likelihood_args(args) -> ParallelSampler:
    """Every ``likelihood`` option checked (and the defaults that depend on others filled in) before any data is
    loaded or solved; returns the sampler. An option that does not apply (``--sets`` with gmm, ``--probes`` with the
    exact divergence, ``--window`` without Picard) is an error.

    Raises:
        ValueError, TypeError: naming the flag.
    """
    from .config import check_int

    if args.model not in LIKELIHOOD_MODELS:
        raise ValueError(f"--model: the likelihood command knows {', '.join(LIKELIHOOD_MODELS)}, got {args.model!r}")
    check_int("--samples", args.samples, 1, DIGITS_HELD_OUT if args.model == "digits" else None)
    check_int("--repeats", args.repeats, 1)
    check_int("--threads", args.threads, 1, none=True)
    check_int("--seed", args.seed, 0)
    if args.compare and args.method == "sequential":
        raise ValueError("--compare: applies only to a parallel --method (the sequential solve is the comparison)")
    args.compare = args.method != "sequential" if args.compare is None else args.compare
    if args.solver not in FLOW_SOLVERS:
        raise ValueError(f"--solver: the likelihood ODE takes {', '.join(FLOW_SOLVERS)}, got {args.solver!r}")
    if args.divergence not in DIVERGENCES:
        raise ValueError(f"--divergence: unknown {args.divergence!r}; allowed: {', '.join(DIVERGENCES)}")
    if args.probes is not None and args.divergence != "hutchinson":
        raise ValueError(f"--probes: applies only to --divergence hutchinson, not {args.divergence!r}")
    check_int("--probes", args.probes, 1, none=True)
    if args.model != "digits":
        for flag, value in (("--sets", args.sets), ("--dequantize", args.dequantize)):
            if value is not None:
                raise ValueError(f"{flag}: applies only to --model digits, not {args.model!r}")
    else:
        if args.sets is not None:
            wanted = args.sets.split(",")
            bad = [s for s in wanted if s not in DIGITS_SETS]
            if bad or not wanted:
                raise ValueError(f"--sets: unknown {bad[0]!r}; allowed: {', '.join(DIGITS_SETS)}")
            if len(set(wanted)) != len(wanted):
                raise ValueError(f"--sets: each set once, got {args.sets!r}")
    if args.method not in FLOW_METHODS:
        raise ValueError(f"--method: the likelihood ODE takes {', '.join(FLOW_METHODS)}, got {args.method!r}")
    if args.window is not None and args.method != "picard":
        raise ValueError(f"--window: applies only to --method picard, not {args.method!r}")
    if args.tol is not None and args.method == "sequential":
        raise ValueError("--tol: applies only to the parallel methods, not --method sequential")
    if args.tol is None and args.method != "sequential":
        args.tol = DEFAULT_FLOW_TOL
    opts = {k: v for k, v in (("tol", args.tol), ("window", args.window)) if v is not None}
    sampler = ParallelSampler(args.model, steps=args.steps, method=args.method, spacing=args.spacing, progress=False,
                              **opts)
    likelihood_grid(sampler.denoiser.schedule, args.steps, args.spacing)    # --steps within the model's grid
    return sampler


def mixture_log_density(mix, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``log p_sigma(x)`` of a :class:`~paratime.zoo.GaussianMixture` smoothed by ``N(0, sigma^2 I)``: the mixture of
    ``N(mu_k, (s_k^2 + sigma^2) I)``. ``x`` ``(B, dim)`` -> ``(B,)``."""
    var = mix.stds[None] ** 2 + sigma**2                                    # (1, K)
    d2 = ((x[:, None] - mix.means[None]) ** 2).sum(-1)                      # (B, K)
    logp = mix.weights.log()[None] - 0.5 * d2 / var - 0.5 * mix.dim * torch.log(2 * math.pi * var)
    return torch.logsumexp(logp, 1)


LIKELIHOOD_MODELS = ("digits", "gmm")
DEFAULT_FLOW_TOL = 0.1          # --tol of the parallel methods (Picard: absolute, Parareal: noise-level units)
DIGITS_HELD_OUT = 540           # images in the held-out split (30% of 1,797)


def _data(args) -> tuple[dict[str, torch.Tensor], dict]:
    """The data sets and the options that declare their range."""
    if args.model == "digits":
        sets = digits_sets(args.samples, args.seed)
        wanted = args.sets.split(",") if args.sets else list(DIGITS_SETS)
        return {s: sets[s] for s in wanted}, {"data_range": (-1.0, 1.0), "levels": DIGITS_LEVELS,
                                              "dequantize": args.dequantize is not False}
    if args.model == "gmm":
        from .models import load_model

        mix = load_model("gmm").network.gmm
        return {"gmm": mix.sample(args.samples, torch.Generator().manual_seed(args.seed))[0]}, {}
    raise ValueError(f"--model: the likelihood command knows digits and gmm, got {args.model!r}")


def _probes(args) -> int | None:
    """Hutchinson probes per sample: ``--probes`` (default 1); None for the exact divergence."""
    return (args.probes or 1) if args.divergence == "hutchinson" else None


def _run(sampler: ParallelSampler, x: torch.Tensor, method: str, repeats: int, args, opts: dict,
         progress: bool | None = None) -> dict:
    """One method on one set, ``repeats`` times: figures of the last run, wall clock min / median over all
    (``progress``: default ``--progress``)."""
    walls = []
    # --seed also splits the digits; the likelihood draws with it only where it draws (probes, dequantisation)
    draws = args.divergence == "hutchinson" or bool(opts.get("dequantize"))
    for _ in range(repeats):
        r = sampler.log_likelihood(x, solver=args.solver, steps=args.steps, method=method,
                                   divergence=args.divergence, seed=args.seed if draws else None,
                                   progress=args.progress if progress is None else progress,
                                   **({"probes": _probes(args)} if _probes(args) else {}), **opts)
        walls.append(r.stats.wall_s)
    bpd = r.bits_per_dim
    return {"method": method, "rounds": r.stats.rounds, "iterations": r.stats.iterations, "nfe": r.stats.nfe,
            "wall_min_s": min(walls), "wall_median_s": statistics.median(walls), "nats": float(r.nats.mean()),
            "bits_per_dim": float(bpd.mean()), "bits_per_dim_se": float(bpd.std() / math.sqrt(bpd.numel()))
            if bpd.numel() > 1 else 0.0, "sigma_min": r.sigma_min, "_bpd": bpd, "_nats": r.nats}


def run_likelihood(args, emit: Callable[[str], None] = lambda line: None,
                   sampler: ParallelSampler | None = None) -> dict:
    """Run ``paratime likelihood``; ``emit`` receives the table's lines. Returns the JSON record. ``sampler``: the one
    :func:`check_likelihood_args` returned for these ``args`` (the command line checks them first); None checks them
    here.

    Raises:
        ValueError, TypeError: a bad option, naming it.
    """
    sampler = check_likelihood_args(args) if sampler is None else sampler
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sets, opts = _data(args)
    methods = ["sequential", args.method] if args.compare and args.method != "sequential" else [args.method]
    units = {"picard": "absolute: flow end state, nats / sqrt(n)", "sequential": None}.get(args.method, "noise level")
    rec = {"model": args.model, "solver": args.solver, "steps": args.steps, "tol": args.tol, "tol_units": units,
           "divergence": args.divergence, "probes": _probes(args),
           "samples": args.samples, "spacing": args.spacing, "threads": torch.get_num_threads(),
           "repeats": args.repeats, **{k: v for k, v in opts.items() if k != "data_range"}, "sets": {}}
    tol = f"{args.tol} ({units})" if units else f"{args.tol}"
    emit(f"model={args.model} solver={args.solver} steps={args.steps} tol={tol} divergence={args.divergence}"
         f" samples={args.samples} threads={torch.get_num_threads()} repeats={args.repeats}"
         + (f" levels={opts['levels']} dequantize={opts['dequantize']}" if opts else ""))
    emit(f"{'set':>9}  {'method':>18}  {'rounds':>6}  {'NFE/sample':>10}  {'wall min s':>10}  {'median s':>8}  "
         f"{'bits/dim':>16}  {'max |d bpd|':>11}")
    for m in methods:       # untimed and unreported: the first solve carries one-time costs (allocator, caches)
        _run(sampler, next(iter(sets.values()))[:2], m, 1, args, opts, progress=False)
    t0 = time.perf_counter()
    for name, x in sets.items():
        rows = [_run(sampler, x, m, args.repeats, args, opts) for m in methods]
        ref = rows[0]
        for row in rows:
            row["max_abs_bpd_diff"] = float((row["_bpd"] - ref["_bpd"]).abs().max())
        for row in rows:
            emit(f"{name:>9}  {row['method']:>18}  {row['rounds']:>6}  {row['nfe']:>10.1f}  "
                 f"{row['wall_min_s']:>10.3f}  {row['wall_median_s']:>8.3f}  "
                 f"{row['bits_per_dim']:>8.3f} ± {row['bits_per_dim_se']:<5.3f}  {row['max_abs_bpd_diff']:>11.2e}")
        if name == "gmm":
            from .models import load_model

            exact = mixture_log_density(load_model("gmm").network.gmm, x, ref["sigma_min"])
            rec["analytic_nats"] = float(exact.mean())
            rec["max_abs_nats_error"] = float((ref["_nats"] - exact).abs().max())
            emit(f"analytic log p (sigma_min={ref['sigma_min']:.3g}): {float(exact.mean()):.4f} nats/sample; "
                 f"{ref['method']} ODE max |error| {rec['max_abs_nats_error']:.3g} nats")
        for row in rows:
            del row["_bpd"], row["_nats"]
        rec["sets"][name] = rows
    if len(methods) == 2:
        seq_rounds = sum(rows[0]["rounds"] for rows in rec["sets"].values())
        par_rounds = sum(rows[1]["rounds"] for rows in rec["sets"].values())
        ratio = (f"{seq_rounds / par_rounds:.1f}x fewer" if par_rounds <= seq_rounds else
                 f"{par_rounds / seq_rounds:.1f}x more")
        emit(f"rounds: {args.method} {par_rounds} vs sequential {seq_rounds} ({ratio})")
    rec["total_s"] = time.perf_counter() - t0
    return rec
