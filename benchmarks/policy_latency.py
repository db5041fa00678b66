"""Per-chunk latency of the embedded diffusion policy (DDPM-100, batch 1, one process): paratime's sequential
sampler, paratime's Picard, and diffusers' ParaDiGMS loop (:func:`paratime.bench.suite.paradigms_loop` with
``DDPMParallelScheduler``) on the same policy network, the same window and the same tolerance. The loop is timed
without the pipeline around it; on the first chunk it is checked against diffusers' real
``StableDiffusionParadigmsPipeline`` class (the same rounds and the same chunk, or the script exits 1). Each
implementation's max |Δ| is printed beside its speed-up: Picard against paratime's sequential chunk of the same seed,
the loop against its own sequential run (window 1: it draws its step noise from its own generator).

    python benchmarks/policy_latency.py [--threads 1] [--chunks 20] [--reps 3] [--window 100] [--tol 0.1]

Threads are set explicitly (``OMP_NUM_THREADS`` and ``torch.set_num_threads``; default 1: a policy call is
dispatch-bound, a second thread only adds synchronisation). Each chunk (an observation met where a controller
re-plans, see :func:`paratime.policy_eval.latency_observations`) is sampled ``reps`` times per implementation,
interleaved so that load from other processes hits all of them alike; min, median and max of the per-chunk wall
time are printed with rounds (sequential network calls) and NFE (time-point evaluations per sample).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="policy_latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (default 1)")
    ap.add_argument("--chunks", type=int, default=20, help="observations (action chunks) timed (default 20)")
    ap.add_argument("--reps", type=int, default=3, help="repeats per chunk and implementation (default 3)")
    ap.add_argument("--window", type=int, default=None, help="Picard / ParaDiGMS window (default: the eval's)")
    ap.add_argument("--tol", type=float, default=None, help="Picard / ParaDiGMS tolerance (default: the eval's)")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.chunks < 1 or args.reps < 1:
        raise SystemExit("--threads, --chunks, --reps: must be >= 1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from diffusers import DDPMParallelScheduler

    from paratime.bench.suite import paradigms_loop
    from paratime.noise import INITIAL, draw_noise
    from paratime.policy_eval import POLICY_METHODS, latency_observations, policy_sampler
    from paratime.zoo.policy import TRAIN_TIMESTEPS, load_policy_model

    window = POLICY_METHODS["picard"]["window"] if args.window is None else args.window
    tol = POLICY_METHODS["picard"]["tol"] if args.tol is None else args.tol
    model = load_policy_model()
    samplers = {"paratime sequential": policy_sampler("sequential", model),
                "paratime Picard": policy_sampler("picard", model, window=window, tol=tol)}
    # The policy's schedule and x0 clipping (clip_x0=1, diffusers' clip_sample) in diffusers' parallel DDPM scheduler.
    scheduler = DDPMParallelScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                                      clip_sample=True, clip_sample_range=model.clip_x0)
    observations = latency_observations(args.chunks)

    def paradigms(obs, seed, parallel=window):
        net = lambda x, t: model.network(x, t, obs=obs.expand(x.shape[0], -1))  # noqa: E731
        x_T = draw_noise(seed, 1, model.sample_shape, None, INITIAL, dtype=torch.float32)
        with torch.no_grad():
            return paradigms_loop(net, scheduler, x_T, 100, parallel, tol, torch.Generator().manual_seed(seed))

    def run(name, obs, seed):
        t0 = time.perf_counter()
        if name == "diffusers ParaDiGMS":
            x, rounds, nfe = paradigms(obs, seed)
        else:
            res = samplers[name].sample(1, seed=seed, obs=obs[None])
            x, rounds, nfe = res.samples, res.stats.rounds, res.stats.nfe
        return time.perf_counter() - t0, rounds, nfe, x

    def anchor(obs, seed) -> bool:
        """The loop against diffusers' real class on one chunk: the same rounds and the same chunk."""
        from paratime.bench.rounds_at_accuracy import loop_is_the_class

        x_T = draw_noise(seed, 1, model.sample_shape, None, INITIAL, dtype=torch.float32)
        same, line = loop_is_the_class(model, scheduler, x_T, 100, window, tol, cond={"obs": obs[None]}, seed=seed)
        print(line)
        return same

    names = [*samplers, "diffusers ParaDiGMS"]
    anchored = anchor(observations[0], 0)
    for name in names:                                   # warm-up
        run(name, observations[0], 0)
    rec = {n: {"wall": [], "rounds": [], "nfe": [], "err": [0.0]} for n in names}
    for i, obs in enumerate(observations):
        # Each chunk's references: paratime's sequential chunk (Picard's), the loop's own sequential run.
        ref = {"paratime Picard": run("paratime sequential", obs, i)[3], "diffusers ParaDiGMS": paradigms(obs, i, 1)[0]}
        for _ in range(args.reps):
            for name in names:                          # interleaved: load hits every implementation alike
                w, r, n, x = run(name, obs, i)
                rec[name]["wall"].append(w)
                rec[name]["rounds"].append(r)
                rec[name]["nfe"].append(n)
                if name in ref:
                    rec[name]["err"].append(float((x.reshape(ref[name].shape).double()
                                                   - ref[name].double()).abs().max()))
    print(f"policy DDPM-100, batch 1, 1 process, torch threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}), window {window}, tol {tol}, "
          f"{args.chunks} chunks x {args.reps} repeats; wall per chunk in ms")
    seq_med = statistics.median(rec["paratime sequential"]["wall"])
    pdg_med = statistics.median(rec["diffusers ParaDiGMS"]["wall"])
    rows = [("implementation", "min", "median", "max", "rounds", "NFE", "max |Δ|", "vs sequential", "vs ParaDiGMS")]
    for name in names:
        w = rec[name]["wall"]
        med = statistics.median(w)
        rows.append((name, f"{1000 * min(w):.1f}", f"{1000 * med:.1f}", f"{1000 * max(w):.1f}",
                     f"{statistics.median(rec[name]['rounds']):.0f}", f"{statistics.median(rec[name]['nfe']):.0f}",
                     f"{max(rec[name]['err']):.1e}", f"{seq_med / med:.2f}x", f"{pdg_med / med:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(wd) for c, wd in zip(r, widths)))
    print("rounds and NFE: medians over chunks; max |Δ|: over every chunk (actions in [-1, 1]); speed-ups: ratio of "
          "median walls")
    return 0 if anchored else 1


if __name__ == "__main__":
    sys.exit(main())
