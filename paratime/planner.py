"""The planner: which method and window sample fastest on K devices, by the cost model's predicted wall time.

Given N steps, a batch of B samples, K devices (the backend's workers), a cost curve ``c(r)``
(:mod:`paratime.cost`), the solver's network calls per step ``e`` and the tolerance, each candidate's wall time is
predicted as the sum over its rounds of ``e * c(ceil(rows / K))`` (the round's rows spread over the devices), in
units of ``c(1)``, i.e. in sequential call equivalents (SCE); a device's share above the backend's ``max_batch``
runs as chunks back to back, each costed (:func:`~paratime.cost.chunked_cost`):

- ``sequential`` (data-parallel over the batch): ``N`` rounds of ``B`` rows: ``N e c(ceil(B / K))``. The right
  answer when the batch fills the devices (``B >= K``) and the cost is compute-bound.
- ``picard`` with window ``W``: the rounds model below; the window is chosen among ``K, 2K, 4K, ...`` and the
  rounds-sized cap ``min(N, max(100, N // 2))`` (wider windows buy under 9% of the rounds for 1.5x the evaluations,
  ``benchmarks/window_sweep.py``), never a window above the cap.
- ``parareal`` (``S = round(sqrt(N))`` slices, one coarse jump each): an initial coarse sweep of ``S`` calls of ``B``
  rows, then per iteration the fine steps of the slices not yet accepted, in lockstep (``B`` rows per such slice),
  and a sweep of one call of ``B`` rows per such slice. ``S`` iterations at ``tol = 0``, each accepting one slice
  (exact: the sampler's calls); above it :data:`PARAREAL_ITERATIONS`, over which the accepted slices grow evenly.

**Rounds model of Picard** (per sample, stated once here and used by the planner and the benchmarks): a window narrower
than N first spends one call of B rows on the constant-D initial guess (``init="x0"``); while the window does not hold
the last point it evaluates ``W`` points a round, and its start advances one point a round for the first
:data:`SLIDE_STALL` rounds (the converged front forms) and ``a(W) = (W + 1) / 2`` points a round after; once it holds
the last point its width shrinks by :data:`TAIL_SHRINK` a round (acceptance at the front, the final-point stop rule at
the end) until under one point. A window of the whole grid spends :data:`STALL_ROUNDS` rounds on nearly all of it (N, N
- 1, ... rows), then shrinks from :data:`FULL_TAIL` ``[0]`` of the points left and stops under ``FULL_TAIL[1] N`` points
(the quiet final point ends the whole window). At ``tol = 0`` each round advances exactly one point (a fixed point needs
every point once after its predecessor is exact; exact on the digits U-Net, DDIM-20 / DDIM-50: N + 1 rounds for every W
< N, N for W = N). The constants were fitted to measured rounds and rows (digits U-Net, batch 1, 4 seeds, default
tolerance; ``python -m paratime.bench.devices --calibrate [--solver dpmpp_2m --steps 20]`` prints the table; re-measured
with sliding windows accepting at ``tol / 30``, a deterministic solver's last half at ``tol / 100``, and the stop
rule's carried test): DDIM-50 W = 2, 4, 8, 16, 32, 50: 37-38, 25-26, 16-17, 12-13, 10-11, 9-10 rounds of 74, 95, 118,
160, 212, 299 rows measured, 36, 24, 18, 14, 13, 9 of 70, 88, 115, 147, 216, 297 modelled; DDIM-100 W = 2, 4, 8, 16,
32, 100: 71-72, 46-48, 28-30, 18-19, 14, 10-11 of 141, 180, 217, 263, 337, 630 measured, 69, 44, 29, 20, 16, 10 of 136,
168, 203, 240, 312, 622 modelled; DPM++(2M)-20 W = 2, 4, 8, 16, 20: 17, 13-14, 10-12, 8-10, 7-9 of 32, 46, 65, 85, 110
measured, 16, 12, 11, 11, 9 of 30, 40, 60, 89, 110 modelled. The model before this one (an advance of ``W ** 0.55``
from the first round and four stop rounds at the last width) put the whole grid's rows 30-35% low (206 of 292, 499 of
617, 70 of 107) and mid-size windows' rounds 20-40% high (DDIM-100 W = 16: 27 of 19), which made the widest window look
cheapest wherever rows cost anything.

**Its stochastic variant** (a ``stochastic`` solver: DDPM, Euler ancestral, Euler-Maruyama, ...; the step noise slows
the converged front): the same rounds with a stall of :data:`SDE_SLIDE_STALL` rounds, an advance of
``a(W) = 1 + (W - 1) / SDE_ADVANCE = (W + 2) / 3`` after it, a tail shrinking by :data:`SDE_TAIL_SHRINK` a round (the
whole grid's too) and a whole grid's stall of :data:`SDE_STALL_ROUNDS` rounds. Fitted the same way on digits DDPM
(``--calibrate --solver ddpm --steps 20``, and ``--steps 50``, ``--steps 100``; W = 64 from a run of its own),
pessimistic in rounds where it errs (in rows within 0.96-1.2x): DDPM-20 W = 2, 4, 8, 16, 20: 19, 16, 14, 13, 15
rounds of 36, 55, 83, 141, 191 rows measured, 20, 19, 19, 18, 19 of 37, 61, 100, 140, 208 modelled; DDPM-50 W = 2, 4, 8,
16, 32, 50: 42-43, 32, 23-24, 19, 17, 19-20 of 82, 119, 162, 233, 357, 715 measured, 43, 34, 28, 24, 23, 24 of 83, 121,
172, 243, 363, 781 modelled; DDPM-100 W = 2, 4, 8, 16, 32, 64, 100: 78-79, 55-56, 37-38, 27, 21-22, 19-20, 21-22 of 154,
214, 276, 362, 509, 790, 1696 measured, 80, 59, 43, 33, 28, 27, 25 of 157, 221, 292, 380, 510, 756, 1735 modelled. Euler
ancestral measures the same rounds; on gmm (16 seeds; DDPM, Euler ancestral, Euler-Maruyama) the model is 0.98-2.2x the
mean rounds, 0.95-1.6x the rows, and a seed can run long (DDPM-20 W = 4: 15-16 rounds, one seed 23). The deterministic
model put stochastic runs' rounds 0.46-0.90x low (DDPM-100 W = 100: 10 rounds of 622 rows against 21-22 of 1696), and
``method="auto"`` then chose windows that measured slower than sequential (gmm DDPM-10, batch 16, W = 4: 12 rounds
against 10; gmm DDPM-20, W = 4 on K = 4 at ``c(r) = r``: 23 against 20). On a short grid the variant prices a narrow
window at about sequential's rounds, so sequential wins there by the margin below.

The plan never predicts slower than sequential sampling under ``method="auto"``: sequential is always a candidate
and wins unless a parallel plan is predicted :data:`SEQUENTIAL_MARGIN` times faster (it is exact by construction,
and a prediction's error is about that size).

**Work outside the network.** A cost curve holds network time only. With a measured curve the sampler also measures,
per candidate, each call's work outside the network (``overhead``, :meth:`ParallelSampler.overheads`, a few calls of
the candidate on the real network and backend, less the curve): the method's own work on its window between two
calls (timed on a null network: about 1.2-3 ms a round for Picard on the project's CPU, 0.05 ms a step for
sequential), the backend's dispatch and gather and the wait for the slowest rank (1-4 ms a call for 2 gloo ranks
there). On a GPU with a large model both are small beside ``c(1)``; on a CPU or with a small model (a policy) they
decide: unpriced, the planner predicted 2.25-3x for a window of 50 on 2 gloo ranks that measured 0.6x. Under an SPMD
backend sequential sampling also runs on every rank by itself (:data:`ALONE`, no communication) when that is
predicted faster than spreading the batch.

Every input is a host number, so every rank of an SPMD backend plans the same from the same curve and overheads (the
sampler makes them agree across ranks before planning).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from fractions import Fraction

from .backends.base import check_buckets
from .cost import CostCurve, round_cost
from .methods.parareal import slice_bounds
from .methods.window import reads_entries

__all__ = ["Plan", "plan_sampling", "candidates", "picard_rows", "predict_picard", "predict_sequential",
           "predict_parareal", "window_candidates", "rounds_cap", "ALONE", "SEQUENTIAL_MARGIN", "TIMED_SPAN",
           "SLIDE_STALL", "STALL_ROUNDS", "TAIL_SHRINK", "FULL_TAIL", "SDE_SLIDE_STALL", "SDE_ADVANCE",
           "SDE_TAIL_SHRINK", "SDE_STALL_ROUNDS", "PARAREAL_ITERATIONS", "PARAREAL_ITERATIONS_SDE"]

#: rounds a sliding window's start advances one point each before it advances (W + 1) / 2 a round
SLIDE_STALL = 3
#: rounds a window of the whole grid spends on nearly all of it before its start moves
STALL_ROUNDS = 4
#: once the window holds the last point, its width shrinks by this factor per round
TAIL_SHRINK = 0.65
#: a window of the whole grid after its stall: the tail's first width (of the points left) and its last (of N)
FULL_TAIL = (0.9, 0.1)
#: a stochastic solver's rounds model (module docstring): rounds its sliding window's start advances one point each
SDE_SLIDE_STALL = 6
#: a stochastic solver's sliding window then advances a(W) = 1 + (W - 1) / SDE_ADVANCE = (W + 2) / 3 points a round
#: (a deterministic solver's (W + 1) / 2: its divisor is 2)
SDE_ADVANCE = 3
#: a stochastic solver's tail: its width's shrink a round (the sliding window's and the whole grid's)
SDE_TAIL_SHRINK = 0.8
#: a stochastic solver's window of the whole grid: the rounds it spends on nearly all of it
SDE_STALL_ROUNDS = 15
#: Parareal iterations assumed at a tolerance > 0 (capped at the number of slices; gmm and digits, DDIM-16 to -100 at
#: tol 2e-3: 3-4, 1e-2: 3-4, 0.1: 2-3)
PARAREAL_ITERATIONS = 4
#: the same for a stochastic solver, whose starts are accepted after two iterations in a row within their threshold and
#: the start after the converged prefix only when exact (gmm DDPM-50 and -100 at the default tol, batch 1 and 8: 6
#: and 7; digits: 5-6)
PARAREAL_ITERATIONS_SDE = 7
#: a parallel plan is chosen over sequential sampling only when predicted this many times faster: the rounds model
#: and a measured curve are good to about 25% (the window of 50 on 2 gloo ranks, digits DDIM-50: 0.062 s predicted,
#: 0.076-0.095 s measured), so a predicted gain below 10% is not one to give up exactness for
SEQUENTIAL_MARGIN = 1.1
#: with a measured curve, the candidates timed for their work outside the network: sequential sampling and those
#: whose network time alone is within this factor of the best (a window of 100 on a batch of 16 would time 16,000
#: rows for a plan 4x behind; the others get the largest work outside the network timed)
TIMED_SPAN = 2.0
#: the label of sequential sampling on each device by itself (see :func:`candidates`)
ALONE = "sequential, 1 device"


@dataclass(frozen=True)
class Plan:
    """What the planner chose and why.

    Attributes:
        method: the method to run. window: Picard's window (None for other methods).
        predicted_sce: the chosen plan's predicted wall time in sequential call equivalents (units of ``c(1)``).
        sequential_sce: sequential sampling's prediction on the same devices (the batch spread over them).
        devices: K. batch: B.
        reason: one sentence: what was chosen, its prediction against sequential and the runner-up.
        candidates: predicted SCE of every candidate considered, by label (``picard W=8``, ``sequential``, ...).
        cost: the cost curve's description. predicted_s: the prediction in the curve's units (seconds when measured).
        overhead_s: the chosen plan's work per network call outside the network, in the curve's units (0 when not
            measured), counted in ``predicted_sce``. alone: the plan is :data:`ALONE` (method ``sequential``, run
            on every device by itself). baseline_sce: one device sampling the batch sequentially by itself, the
            speed-up's baseline (its measured overhead, else the network's time alone).
    """

    method: str
    window: int | None
    predicted_sce: float
    sequential_sce: float
    devices: int
    batch: int
    reason: str
    candidates: dict = field(default_factory=dict)
    cost: str = ""
    predicted_s: float = 0.0
    overhead_s: float = 0.0
    alone: bool = False
    baseline_sce: float | None = None

    @property
    def speedup(self) -> float:
        """Predicted speed-up over one device's sequential sampling of the batch: ``baseline_sce / predicted``."""
        base = self.sequential_sce if self.baseline_sce is None else self.baseline_sce
        return base / self.predicted_sce if self.predicted_sce > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"method": self.method, "window": self.window, "predicted_sce": self.predicted_sce,
                "sequential_sce": self.sequential_sce, "devices": self.devices, "batch": self.batch,
                "reason": self.reason, "candidates": dict(self.candidates), "cost": self.cost,
                "predicted_s": self.predicted_s, "overhead_s": self.overhead_s, "alone": self.alone,
                "baseline_sce": self.baseline_sce, "speedup": self.speedup}


def rounds_cap(steps: int) -> int:
    """The widest window the planner considers: ``min(N, max(100, N // 2))`` (sized for rounds)."""
    return min(steps, max(100, steps // 2))


def window_candidates(steps: int, devices: int) -> list[int]:
    """Windows the planner compares: ``K, 2K, 4K, ...`` below the cap, and the cap itself (at least 2 each)."""
    cap = rounds_cap(steps)
    out, w = [], max(2, devices)
    while w < cap:
        out.append(w)
        w *= 2
    return out + [cap]


def _picard_rounds(steps: int, window: int, tol: float, stochastic: bool = False) -> list[tuple[int, bool | None]]:
    """Per sample, each Picard round's rows (the rounds model of the module docstring, its stochastic variant for a
    ``stochastic`` solver) and whether its window holds the grid's last point; the initial-guess call (1 row, one
    evaluation whatever the solver) first as ``(1, None)`` when the window reads it
    (:func:`~paratime.methods.window.reads_entries`)."""
    rounds: list[tuple[int, bool | None]] = [(1, None)] if reads_entries(window, steps) else []
    if tol == 0:                                  # one point a round
        return rounds + [(min(window, steps - k), k + window >= steps) for k in range(steps)]
    stall, stall_full, shrink = (SDE_SLIDE_STALL, SDE_STALL_ROUNDS, SDE_TAIL_SHRINK) if stochastic else (
        SLIDE_STALL, STALL_ROUNDS, TAIL_SHRINK)
    # The stochastic advance (W + 2) / 3 is kept exact: float thirds sum to just under a whole point (the window
    # would then hold the last point with its start a point short, and its tail would start wider than the window).
    advance = Fraction(window - 1, SDE_ADVANCE) + 1 if stochastic else (window + 1) / 2
    start = Fraction(0) if stochastic else 0.0
    while start + window < steps:                 # sliding: the window does not hold the last point yet
        start += 1 if len(rounds) <= stall else advance
        rounds.append((window, False))
    width, end = float(steps - math.floor(start)), 1.0
    if window >= steps:                           # the whole grid: the front forms first
        rounds += [(steps - k, True) for k in range(min(stall_full, steps))]
        width, end = (steps - stall_full) * FULL_TAIL[0], max(1.0, steps * FULL_TAIL[1])
    while width >= end:
        rounds.append((max(1, round(width)), True))
        width *= shrink
    return rounds


def picard_rows(steps: int, window: int, tol: float, stochastic: bool = False) -> list[int]:
    """Per sample, the predicted rows of each Picard round (the rounds model of the module docstring; its stochastic
    variant for a ``stochastic`` solver).

    Returns:
        One row count per round, the initial-guess call (1 row) first when ``1 < window < steps``.
    """
    return [rows for rows, _ in _picard_rounds(steps, window, tol, stochastic)]


def _calls(rounds: list[tuple[int, bool | None]], evals: int, last_evals: int) -> list[int]:
    """Per sample, the rows of each network call of ``rounds`` (``(rows, holds the last point)``; None: a call of
    its own): a solver of ``evals`` evaluations a step makes ``evals`` calls a round, the ``j``-th without the last
    point's row when ``j >= last_evals`` (the step to sigma = 0 evaluates ``last_evals`` times: Heun's second call
    and a Langevin corrector's skip it, as the samplers do)."""
    out = []
    for rows, last in rounds:
        if last is None:
            out.append(rows)
            continue
        out += [rows - (1 if last and j >= last_evals else 0) for j in range(evals)]
    return [r for r in out if r > 0]


def _sum_cost(curve: CostCurve, calls: list[int], batch: int, devices: int, overhead: float, limit: int | None,
              buckets: tuple[int, ...] | None) -> float:
    return sum(max(0.0, round_cost(curve, r * batch, devices, limit, buckets) + overhead) for r in calls)


def predict_sequential(curve: CostCurve, steps: int, batch: int, devices: int, evals: int = 1,
                       overhead: float = 0.0, limit: int | None = None,
                       buckets: tuple[int, ...] | None = None, last_evals: int | None = None) -> float:
    """Sequential sampling's predicted time (curve units): ``N e (c(ceil(B / K)) + o)``, ``o`` the work of a call
    outside the network (:func:`plan_sampling`'s ``overhead``), the last step evaluated ``last_evals`` times (None:
    ``e``); a device's share above ``limit`` rows runs as chunks, padded to ``buckets``
    (:func:`~paratime.cost.chunked_cost`)."""
    rounds = [(1, k == steps - 1) for k in range(steps)]
    return _sum_cost(curve, _calls(rounds, evals, evals if last_evals is None else last_evals), batch, devices,
                     overhead, limit, buckets)


def predict_picard(curve: CostCurve, steps: int, window: int, batch: int, devices: int, tol: float,
                   evals: int = 1, overhead: float = 0.0, limit: int | None = None,
                   buckets: tuple[int, ...] | None = None, last_evals: int | None = None,
                   stochastic: bool = False) -> float:
    """Picard's predicted time (curve units) with window ``window`` (:func:`picard_rows`, the stochastic variant for a
    ``stochastic`` solver; ``evals`` calls a round, the last point's row in ``last_evals`` of them, the initial guess
    one call), ``overhead`` per call, chunks of at most ``limit`` rows a device padded to ``buckets``."""
    calls = _calls(_picard_rounds(steps, window, tol, stochastic), evals, evals if last_evals is None else last_evals)
    return _sum_cost(curve, calls, batch, devices, overhead, limit, buckets)


def predict_parareal(curve: CostCurve, steps: int, batch: int, devices: int, tol: float, evals: int = 1,
                     overhead: float = 0.0, limit: int | None = None,
                     buckets: tuple[int, ...] | None = None, last_evals: int | None = None,
                     stochastic: bool = False) -> float:
    """Parareal's predicted time (curve units) with the default slices (module docstring), ``overhead`` per call,
    the grid's last step evaluated ``last_evals`` times (None: ``evals``), chunks of at most ``limit`` rows a device
    padded to ``buckets``, and :data:`PARAREAL_ITERATIONS_SDE` iterations above tol 0 for a ``stochastic``
    solver."""
    last_evals = evals if last_evals is None else min(last_evals, evals)
    lengths = slice_bounds(steps, None).diff().tolist()                # fine steps per slice (host)
    S = len(lengths)
    iters = S if tol == 0 else min(S, PARAREAL_ITERATIONS_SDE if stochastic else PARAREAL_ITERATIONS)

    def call(rows: int) -> float:
        return max(0.0, round_cost(curve, rows, devices, limit, buckets) + overhead)

    total = S * call(batch)                                             # the initial coarse sweep
    for k in range(iters):
        # Iteration k solves the slices from the first unaccepted one on (the last `active`), in lockstep: fine step
        # m has the rows of those longer than m; then a coarse sweep over them. At tol 0 one slice is accepted an
        # iteration (exact); above it the accepted prefix grows about evenly over the iterations.
        active = lengths[S - math.ceil(S * (iters - k) / iters):]
        for m in range(max(active)):
            rows = batch * sum(n > m for n in active)
            # The grid's last step (the last slice's) makes last_evals calls; the other slices' rows make evals.
            short = batch if m == active[-1] - 1 else 0
            total += last_evals * call(rows) + (evals - last_evals) * (call(rows - short) if rows > short else 0.0)
        total += len(active) * call(batch)
    return total


def candidates(steps: int, devices: int, method: str = "auto",
               methods: tuple[str, ...] = ("sequential", "picard", "parareal"),
               alone: bool = False) -> list[tuple[str, str, int | None]]:
    """The plans :func:`plan_sampling` compares, as ``(label, method, window)``: sequential (data-parallel over the
    devices, and with ``alone`` and ``K > 1`` also :data:`ALONE`: every device sampling the whole batch by itself,
    no communication), Picard at each of :func:`window_candidates` and Parareal (``method="auto"``), or Picard's
    windows only (``method="picard"``)."""
    out = [("sequential", "sequential", None)] if method == "auto" and "sequential" in methods else []
    if out and alone and devices > 1:
        out.append((ALONE, "sequential", None))
    if method == "picard" or "picard" in methods:
        out += [(f"picard W={w}", "picard", w) for w in window_candidates(steps, devices)]
    # From 4 steps the default slices (round(sqrt(N)) = 2) hold two steps each; below, a slice of one step is its
    # own coarse jump (N = 3: slices of 2 and 1), and Parareal only adds the coarse sweep's calls to the fine ones.
    if method == "auto" and "parareal" in methods and steps >= 4:
        out.append(("parareal", "parareal", None))
    return out


def plan_sampling(curve: CostCurve, steps: int, batch: int, devices: int, tol: float, *, method: str = "auto",
                  evals: int = 1, methods: tuple[str, ...] = ("sequential", "picard", "parareal"),
                  overhead: dict[str, float] | None = None, alone: bool = False,
                  skip: tuple[str, ...] | list[str] = (), limit: int | None = None,
                  buckets: tuple[int, ...] | None = None, last_evals: int | None = None,
                  stochastic: bool = False) -> Plan:
    """Choose the method (``method="auto"``) and Picard's window by predicted wall time.

    Args:
        curve: the cost curve. steps: N. batch: B. devices: K. tol: the tolerance in force (0: exact).
        method: ``auto`` (compare every candidate), or ``picard`` (choose its window only).
        evals: the solver's network calls per step. methods: the registered methods that may be candidates.
        last_evals: the calls of the grid's last step (1 for a step to sigma = 0, which a second Heun call or a
            Langevin corrector skips; None: ``evals``).
        overhead: per candidate label (:func:`candidates`), the time of each network call's work outside the
            network in the curve's units: the method's own work on its window between two calls and the backend's
            dispatch and gather (the sampler measures it with a measured curve, :meth:`ParallelSampler.overheads`,
            as each call's time beyond the curve's: negative where the curve, timed on its own, ran slower than the
            candidate's calls do; a call never predicts below 0); None or a missing label: 0, the pure cost-curve
            prediction.
        alone: whether every device can sample the whole batch by itself (an SPMD backend, where each rank holds
            the model): then :data:`ALONE` is a candidate, which pays ``c(B)`` a step and no communication; it
            wins where the backend's per-call gather costs more than spreading the batch saves.
        skip: candidate labels not to consider (the sampler's: those whose memory bound does not fit the device);
            sequential sampling is never skipped (its prediction is the baseline).
        limit: the most rows of one network call on a device (the backend's ``max_batch`` in force; None: no
            limit): a device's share above it runs as chunks back to back, each at its own cost
            (:func:`~paratime.cost.chunked_cost`), so a wide window is priced at the calls it really makes.
        buckets: the backend's fixed shapes (``buckets=``), or None: no chunk exceeds the largest and each costs
            the smallest bucket that holds it.
        stochastic: whether the solver draws noise each step (Picard's windows then converge more slowly, the
            rounds model's stochastic variant; Parareal takes more iterations, :func:`predict_parareal`).
    Returns:
        :class:`Plan`.
    Raises:
        ValueError: non-positive steps, batch or devices; a tol that is not a finite number >= 0; a method other
            than ``auto`` or ``picard``; ``methods`` without one the planner compares; a ``skip`` label that is not
            a candidate, or skips that leave none.
    """
    for name, v in (("steps", steps), ("batch", batch), ("devices", devices), ("evals", evals),
                    ("limit", 1 if limit is None else limit), ("last_evals", 1 if last_evals is None else last_evals)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf:
        raise ValueError(f"tol: must be a finite number >= 0, got {tol!r}")
    if not isinstance(stochastic, bool):
        raise TypeError(f"stochastic: expected True or False, got {stochastic!r}")
    if method not in ("auto", "picard"):
        raise ValueError(f"method: the planner chooses for 'auto' or 'picard' (its window), got {method!r}")
    every = candidates(steps, devices, method, methods, alone)
    labels = [c[0] for c in every]
    if not labels:
        raise ValueError(f"methods: none of {tuple(methods)} is one the planner compares (sequential, picard, "
                         f"parareal)")
    unknown = [x for x in skip if x not in labels]
    if unknown:
        raise ValueError(f"skip: {unknown} are not candidates here; the candidates: {labels}")
    if "sequential" not in labels and set(labels) <= set(skip):        # sequential is never skipped
        raise ValueError(f"skip: leaves no candidate of {labels}")
    unit, over = curve(1), dict(overhead or {})
    if any(not math.isfinite(v) for v in over.values()):
        raise ValueError(f"overhead: every value must be a finite number, got {over}")
    chunks = dict(limit=limit, buckets=None if buckets is None else check_buckets(buckets))
    if last_evals is not None and last_evals > evals:
        raise ValueError(f"last_evals: at most evals ({evals}), got {last_evals}")
    chunks_last = dict(chunks, last_evals=last_evals)
    seq = predict_sequential(curve, steps, batch, devices, evals, over.get("sequential", 0.0), **chunks_last) / unit
    cands: dict[str, tuple[float, str, int | None]] = {}
    for label, name, w in every:
        if label in skip and label != "sequential":
            continue
        o = over.get(label, 0.0)
        if label == ALONE:
            sce = predict_sequential(curve, steps, batch, 1, evals, o, **chunks_last) / unit
        elif name == "sequential":
            sce = seq
        elif name == "picard":
            sce = predict_picard(curve, steps, w, batch, devices, tol, evals, o, stochastic=stochastic,
                                 **chunks_last) / unit
        else:
            sce = predict_parareal(curve, steps, batch, devices, tol, evals, o, stochastic=stochastic,
                                   **chunks_last) / unit
        cands[label] = (sce, name, w)

    def rank(label: str) -> tuple[float, int]:
        # Fewest SCE, a parallel plan's counted SEQUENTIAL_MARGIN times; ties go to sequential (exact by
        # construction), then to the narrower window (fewer evaluations).
        sce, name, _ = cands[label]
        return round(sce * (1.0 if name == "sequential" else SEQUENTIAL_MARGIN), 9), list(cands).index(label)

    order = sorted(cands, key=rank)
    best, runner = order[0], (order[1] if len(order) > 1 else None)
    sce, chosen, window = cands[best]
    # One device alone: its measured calls where it was a candidate (ALONE; on one device, sequential itself),
    # else the network's time alone (another backend's dispatch is not one device's).
    base_over = over.get(ALONE, over.get("sequential", 0.0) if devices == 1 else 0.0)
    base = predict_sequential(curve, steps, batch, 1, evals, base_over, **chunks_last) / unit
    why = (f"{best}: predicted {sce:.1f} SCE against {base:.1f} for sequential sampling on one device, batch {batch} "
           f"({f'{base / sce:.2f}x' if sce > 0 else 'no time'} on {devices} device(s))")
    if runner is not None:
        why += f"; next {runner} at {cands[runner][0]:.1f}"
    why += f"; cost {curve.name}"
    if over:
        why += f", {over.get(best, 0.0) / unit:.2f} c(1) a call outside the network"
    return Plan(chosen, window, sce, seq, devices, batch, why, {k: v[0] for k, v in cands.items()},
                curve.describe(), sce * unit, over.get(best, 0.0), best == ALONE, base)
