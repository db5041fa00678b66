"""Digits bits/dim through the probability-flow ODE: sequential against Picard (issue 16).

    OMP_NUM_THREADS=1 python benchmarks/likelihood.py [--samples 64] [--steps 100] [--threads 1] [--repeats 3]
    (every option of `paratime likelihood`; --exact-samples N adds an exact-trace row on N real images)
    OMP_NUM_THREADS=1 python benchmarks/likelihood.py --convergence [--samples 64]

``--convergence`` (issue 23): the ring ``gmm``'s discretisation error against its closed-form density, sequential,
at 25 / 50 / 100 / 200 / 400 steps on every grid spacing, for Euler (the sampler's DDIM) and Heun, under its DDPM
schedule and under rectified flow (velocity prediction, its ``linspace`` grid); prints the mean
|error| in nats and the ratio of each doubling, and exits 1 when a ratio falls below 0.75 * 2^order.

Sets: scikit-learn's held-out digits (the 70/30 split of `paratime eval-digits`; the diffusion model itself was trained
on all 1,797 images), the same images with shuffled pixels, and uniform noise on the same 17 levels. Prints, per set
and method: rounds (sequential network calls), NFE per sample, wall clock min / median over the repeats (the first
run of each method included: wall times on the shared CPU are noisy), mean bits/dim with its standard error over the
images (uniform dequantisation, bin 2/16), and the largest per-image |bits/dim difference| from the sequential solve.
Torch threads are set explicitly (default 1, stated in the header line).
"""

from __future__ import annotations

import argparse
import sys

from paratime.likelihood_cli import add_likelihood_parser, run_likelihood


LADDER = (25, 50, 100, 200, 400)
SPACINGS = ("trailing", "linspace", "leading", "karras")
FLOW_SPACINGS = ("linspace",)      # karras on a flow grid: at order from 100 steps only (README)
ORDERS = {"euler": 1, "heun": 2}


def ring_models() -> list[tuple[str, object, tuple[str, ...]]]:
    """The ring mixture under its DDPM schedule (``gmm``) and under rectified flow (velocity prediction), with the
    spacings each takes."""
    from paratime.denoiser import Denoiser
    from paratime.schedules import FlowSchedule
    from paratime.zoo import ring_gmm

    vp = ring_gmm()
    flow = FlowSchedule()
    rf = Denoiser(vp.network.gmm.network(flow, "flow"), flow, "flow", dtype=vp.dtype, sample_shape=vp.sample_shape)
    return [("vp", vp, SPACINGS), ("flow", rf, FLOW_SPACINGS)]


def convergence(samples: int = 64, ladder: tuple[int, ...] = LADDER, emit=print) -> bool:
    """The convergence table (module notes). Returns whether every doubling shrank the error at the order."""
    import torch

    from paratime import ParallelSampler
    from paratime.likelihood_cli import mixture_log_density

    ok = True
    emit(f"ring gmm, {samples} points, sequential, torch threads {torch.get_num_threads()}: mean |error| in nats "
         f"(delta + log p_sigma_max(x_T) - log p_sigma_min(x)), and the ratio of each doubling")
    emit("| schedule | solver | spacing | " + " | ".join(f"{n} steps" for n in ladder) + " | ratios |")
    emit("|---|---|---|" + "---|" * len(ladder) + "---|")
    for kind, model, spacings in ring_models():
        mix = model.network.gmm
        x, _ = mix.sample(samples, torch.Generator().manual_seed(0))
        for solver, order in ORDERS.items():
            for spacing in spacings:
                errors = []
                for steps in ladder:
                    r = ParallelSampler(model, spacing=spacing, method="sequential", progress=False).log_likelihood(
                        x, solver=solver, steps=steps)
                    disc = r.delta + mixture_log_density(mix, r.latents, r.sigma_max) - mixture_log_density(
                        mix, x, r.sigma_min)
                    errors.append(float(disc.abs().mean()))
                ratios = [a / b for a, b in zip(errors, errors[1:])]
                ok &= min(ratios) >= 0.75 * 2 ** order
                emit(f"| {kind} | {solver} | {spacing} | "
                     + " | ".join(f"{e:.2e}" for e in errors) + " | " + ", ".join(f"{q:.2f}" for q in ratios) + " |")
    return ok


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--convergence" in argv:
        pre = argparse.ArgumentParser(prog="benchmarks/likelihood.py --convergence")
        pre.add_argument("--convergence", action="store_true")
        pre.add_argument("--samples", type=int, default=64, help="data points (default 64)")
        pre.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
        args = pre.parse_args(argv)
        if args.samples < 1 or args.threads < 1:
            pre.error(f"--samples, --threads: must be >= 1, got {args.samples}, {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
        ok = convergence(args.samples)
        if not ok:
            print("FAILED: a doubling shrank the error by less than 0.75 * 2^order", file=sys.stderr)
            sys.exit(1)
        return {"converged": ok}
    ap = argparse.ArgumentParser(prog="benchmarks/likelihood.py")
    p = add_likelihood_parser(ap.add_subparsers(dest="command"))
    p.add_argument("--exact-samples", type=int, default=0, help="also the exact trace on this many real images")
    args = ap.parse_args(["likelihood", "--threads", "1", "--repeats", "3", *argv])   # later flags win
    rec = {"hutchinson": run_likelihood(args, emit=print)}
    if args.exact_samples:
        exact = argparse.Namespace(**{**vars(args), "divergence": "exact", "samples": args.exact_samples,
                                      "sets": "real", "repeats": 1})
        print()
        rec["exact"] = run_likelihood(exact, emit=print)
    return rec


if __name__ == "__main__":
    main()
