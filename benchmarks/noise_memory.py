"""Step noise drawn where it is used (issue 24): peak live tensor bytes, the time spent drawing noise before the first
network call (``stats.extra["noise_s"]``) and the wall time of seeded DDPM runs, with the noise drawn row by row
(:class:`paratime.noise.LazyNoise`, the default) and with whole ``(N, B, *shape)`` tables (what a caller's
``generator=`` still gets), on a Stable Diffusion-size latent.

    OMP_NUM_THREADS=1 python -m paratime.bench.noise_memory                 # 4x64x64, B 1, DDPM-1000, ~1 min
    OMP_NUM_THREADS=1 python -m paratime.bench.noise_memory --side 128 --batch 4

The network is ``0.1 x`` (the noise is what is measured); float32 states, torch kernels, one thread. Methods:
sequential, Picard with a window of 500 (init x0, path fill: the first 3 rounds), Parareal (2 iterations) and the
staggered method (8 cores, whole run); each after a warm-up run. Peak bytes are every tensor the run allocates and keeps
(:class:`paratime.bench.live_bytes.LiveBytes`); the table column is one ``(N, B, *shape)`` float32 table.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from paratime import ParallelSampler
from paratime import noise as noise_module
from paratime.bench.live_bytes import LiveBytes
from paratime.denoiser import Denoiser
from paratime.schedules import DiscreteVPSchedule

STEPS = 1000
#: (method, options, rounds measured: None for the whole run)
RUNS = (("sequential", {}, None), ("picard", {"window": 500}, 3), ("parareal", {}, 2),
        ("staggered", {"window": 8}, None))


class _Enough(Exception):
    """Raised from the round callback once the measured rounds are done."""


def _run(sampler: ParallelSampler, batch: int, rounds: int | None) -> float:
    """Sample (the first ``rounds`` rounds only, when given); returns ``noise_s`` (nan for a run cut short)."""
    def stop(info):
        if rounds is not None and info.round >= rounds:
            raise _Enough

    try:
        return sampler.sample(batch, seed=0, callback=stop).stats.extra["noise_s"]
    except _Enough:
        return float("nan")


def measure(side: int, batch: int, lazy: bool) -> list[dict]:
    """One row per method of :data:`RUNS`: ``method, rounds`` (measured; None: the whole run), ``peak_mib, noise_s,
    wall_s``; ``lazy`` False draws whole tables
    (every table counts as small, :func:`paratime.noise.tabulates`). Each method runs three times: a warm-up, the
    timed run, and the run under :class:`LiveBytes` (whose dispatch hook slows every op) for the peak."""
    den = Denoiser(lambda x, t, **cond: 0.1 * x, DiscreteVPSchedule.from_betas("linear", STEPS, 1e-4, 0.02), "eps",
                   sample_shape=(4, side, side))
    rows = []
    limit = noise_module.SMALL_TABLE_ELEMENTS if lazy else float("inf")
    with mock.patch.object(noise_module, "SMALL_TABLE_ELEMENTS", limit):
        for method, options, rounds in RUNS:
            sampler = ParallelSampler(den, solver="ddpm", steps=STEPS, method=method, state_dtype=torch.float32,
                                      progress=False, kernels="torch", **options)
            _run(sampler, batch, rounds)
            t0 = time.perf_counter()
            noise_s = _run(sampler, batch, rounds)
            wall = time.perf_counter() - t0
            with LiveBytes() as live:
                _run(sampler, batch, rounds)
            rows.append({"method": method, "rounds": rounds, "peak_mib": live.peak / 2**20, "noise_s": noise_s,
                         "wall_s": wall})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="noise_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=64, help="latent side (4 x side x side; default 64, SD 1.5)")
    ap.add_argument("--batch", type=int, default=1, help="samples (default 1)")
    args = ap.parse_args(argv)
    if args.side < 1 or args.batch < 1:
        ap.error("--side, --batch: must be >= 1")
    torch.set_num_threads(1)
    table = STEPS * args.batch * 4 * args.side**2 * 4 / 2**20
    print(f"DDPM-{STEPS}, latent 4x{args.side}x{args.side}, batch {args.batch}, float32; one noise table "
          f"{table:.1f} MiB")
    print("| method (measured) | peak MiB: rows drawn where used | whole tables | noise before the first call, s: "
          "rows | tables | wall s: rows | tables |")
    print("|---|---|---|---|---|---|---|")
    lazy, whole = measure(args.side, args.batch, True), measure(args.side, args.batch, False)
    for a, b in zip(lazy, whole):
        measured = "whole run" if a["rounds"] is None else f"{a['rounds']} rounds"
        label = f"{a['method']} ({measured})"
        noise = (f"{a['noise_s']:.3f} | {b['noise_s']:.3f}" if a["noise_s"] == a["noise_s"] else "– | –")
        print(f"| {label} | {a['peak_mib']:.1f} | {b['peak_mib']:.1f} | {noise} | {a['wall_s']:.2f} | "
              f"{b['wall_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
