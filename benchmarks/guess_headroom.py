"""How much better the entering points' guesses must be (issue 21): digits Picard with each point that enters a
sliding window guessed at ``seq + (guess - seq) / F``, ``seq`` the sequential trajectory of the same noise (an
oracle: it costs a sequential run), one row per factor ``F``.

    OMP_NUM_THREADS=1 python benchmarks/guess_headroom.py                      # DDIM-50, 16 samples, W = 2, 4, 8
    OMP_NUM_THREADS=1 python benchmarks/guess_headroom.py --tol 0.03 --factors 1,4,10,inf

``F = 1`` is today's guess (the path fill, unchanged: the runs are the default sampler's), ``inf`` the exact value.
Per window: a sample's mean rounds, N / rounds (the speed-up on W compute-bound devices, one call a round) and the
worst max |Δ| against the sequential samples. Samples ``0 .. seeds - 1`` (seed 0, label ``i % 10``) in one batch:
each sample has its own window, so the batch decides as each sample alone. Instrumentation only:
:meth:`SlidingWindow.slide` is wrapped, and restored after. About 1 min a factor on one thread. Deterministic.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager

import torch

from paratime import ParallelSampler
from paratime.methods import window as window_module


@contextmanager
def oracle_guesses(factor: float):
    """Within the block, every Picard run's entering guesses move ``1 / factor`` of the way from the path fill's to
    the sequential trajectory's values (``factor`` 1: unchanged; inf: exact)."""
    cls = window_module.SlidingWindow
    init, slide = cls.__init__, cls.slide

    def init_seq(self, problem, y, measure_window=True):
        init(self, problem, y, measure_window)
        B = y.shape[0]
        b = torch.arange(B, device=y.device)
        x, ys = problem.scale(y, torch.zeros(B, dtype=torch.long, device=y.device), inverse=True), [y.clone()]
        for n in range(problem.steps):                                   # the sequential trajectory, model frame
            i = torch.full((B,), n, dtype=torch.long, device=y.device)
            x = problem.advance(x, i, b, problem.evaluate(x, i, b), host_steps=n)
            ys.append(problem.scale(x, i + 1))
        self.seq_traj = torch.stack(ys)                                  # (N + 1, B, *shape)

    def slide_to(self, rows, stride, fill, den_last):
        old_end = self.begin + rows.counts
        slide(self, rows, stride, fill, den_last)
        if not window_module.reads_entries(rows.W, self.N):
            return
        p = (old_end + 1 + rows.k).clamp_max(self.N)                     # (W, B) the slots' points
        entering = (old_end + 1 + rows.k <= (self.begin + rows.W).clamp_max(self.N)) & self._active
        ref = self.seq_traj[p, self.ar_b[None]]
        guess = ref if math.isinf(factor) else ref + (self.traj[p, self.ar_b[None]] - ref) / factor
        self.traj[torch.where(entering, p, self._sink), self.ar_b[None]] = guess

    if factor != 1:
        cls.__init__, cls.slide = init_seq, slide_to
    try:
        yield
    finally:
        cls.__init__, cls.slide = init, slide


def headroom(factor: float, windows=(2, 4, 8), tol: float | None = None, steps: int = 50,
             seeds: int = 16) -> list[dict]:
    """One row per window: ``window``, ``rounds`` (a sample's mean), ``speedup`` (N / rounds), ``err`` (the worst
    max |Δ| against the sequential samples)."""
    kw = dict(steps=steps, progress=False)
    cond = {"labels": torch.arange(seeds) % 10}
    seq = ParallelSampler("digits", method="sequential", **kw).sample(seeds, seed=0, **cond).samples
    rows = []
    for W in windows:
        sampler = ParallelSampler("digits", method="picard", window=W, **({} if tol is None else {"tol": tol}), **kw)
        with oracle_guesses(factor):
            res = sampler.sample(seeds, seed=0, **cond)
        rounds = sum(res.stats.sample_rounds) / seeds
        rows.append({"window": W, "rounds": rounds, "speedup": steps / rounds,
                     "err": float((res.samples - seq).abs().max())})
    return rows


def _factor(text: str) -> float:
    value = float(text)
    if not value >= 1:
        raise ValueError(f"a factor must be >= 1 (or inf), got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", default="1,2,4,10,30,inf", help="comma-separated F >= 1 (inf: exact guesses)")
    ap.add_argument("--windows", default="2,4,8")
    ap.add_argument("--tol", type=float, default=None, help="Picard's tol (default: the sampler's)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=16, help="samples 0 .. seeds - 1")
    args = ap.parse_args(argv)
    try:
        factors = [_factor(f) for f in args.factors.split(",")]
        windows = [int(w) for w in args.windows.split(",")]
    except ValueError as err:
        ap.error(f"--factors / --windows: {err}")
    if args.steps < 3 or any(not 2 <= w < args.steps for w in windows):
        ap.error("--windows: sliding windows, 2 <= W < --steps (and --steps >= 3)")
    if args.seeds < 1:
        ap.error("--seeds: at least 1")
    torch.set_num_threads(1)
    print(f"digits DDIM-{args.steps}, {args.seeds} samples, tol {args.tol if args.tol is not None else 'default'}: "
          f"entering guesses at seq + (guess - seq) / F\n")
    print("| F | " + " | ".join(f"W={w}: rounds / N/rounds / max |Δ|" for w in windows) + " |")
    print("|---|" + "---|" * len(windows))
    for f in factors:
        rows = headroom(f, windows, args.tol, args.steps, args.seeds)
        print(f"| {f:g} | " + " | ".join(f"{r['rounds']:.2f} / {r['speedup']:.2f}x / {r['err']:.1e}" for r in rows)
              + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
