"""The planner: which method and window sample fastest on K devices, by the cost model's predicted wall time.

Given N steps, a batch of B samples, K devices (the backend's workers), a cost curve ``c(r)``
(:mod:`paratime.cost`), the solver's network calls per step ``e`` and the tolerance, each candidate's wall time is
predicted as the sum over its rounds of ``e * c(ceil(rows / K))`` (the round's rows spread over the devices), in
units of ``c(1)``, i.e. in sequential call equivalents (SCE):

- ``sequential`` (data-parallel over the batch): ``N`` rounds of ``B`` rows: ``N e c(ceil(B / K))``. The right
  answer when the batch fills the devices (``B >= K``) and the cost is compute-bound.
- ``picard`` with window ``W``: the rounds model below; the window is chosen among ``K, 2K, 4K, ...`` and the
  rounds-sized cap ``min(N, max(100, N // 2))`` (wider windows buy under 9% of the rounds for 1.5x the evaluations,
  ``benchmarks/window_sweep.py``), never a window above the cap.
- ``parareal`` (``S = round(sqrt(N))`` slices, one coarse jump each): an initial coarse sweep of ``S`` calls of ``B``
  rows, then per iteration ``ceil(N / S)`` fine calls of ``B S`` rows and a sweep of ``S`` calls of ``B`` rows, for
  :data:`PARAREAL_ITERATIONS` iterations (``S`` at ``tol = 0``: exactness needs every slice).

**Rounds model of Picard** (per sample, stated once here and used by the planner and the benchmarks): every round
evaluates the window's ``min(W, N - p)`` points from the window start ``p``, and the start advances by
``a(W) = max(1, W ** ADVANCE_EXPONENT)`` points per round (the first window point is always exact, so at least 1;
at ``tol = 0`` exactly 1: a fixed point needs every point once after its predecessor is exact); a window narrower
than N first spends one call of B rows on the constant-D initial guess (``init="x0"``), and the final-point stop rule
spends :data:`STOP_ROUNDS` more rounds of the last width. At ``tol = 0`` the model is exact on the digits U-Net
(DDIM-20 / DDIM-50: N + 1 rounds for every W < N, N for W = N, measured). ``ADVANCE_EXPONENT`` was fitted on the
digits U-Net, DDIM-50 / DDIM-100 at the default tolerance (``benchmarks/devices.py --calibrate`` prints measured
against predicted rounds, 4 seeds: DDIM-50 W = 2, 4, 8, 16, 32, 50: 37, 25-26, 17-18, 13-14, 11-12, 10-11
measured, 40, 29, 21, 16, 13, 10 predicted; DDIM-100 W = 2, 4, 8, 16, 32, 100: 70-72, 45-47, 28-30, 19-20, 14-15,
11-12 measured, 74, 52, 37, 27, 20, 12 predicted): it over-predicts the rounds of mid-size windows (and matches
the full window to a round), the safe side, as a wrong prediction then only makes the planner prefer narrower
windows or sequential sampling.

The plan never predicts slower than sequential sampling under ``method="auto"``: sequential is always a candidate
and wins ties (it is exact by construction). Every input is a host number, so every rank of an SPMD backend plans
the same from the same curve (the sampler makes the curve agree across ranks before planning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .cost import CostCurve, round_cost

__all__ = ["Plan", "plan_sampling", "picard_rows", "predict_picard", "predict_sequential", "predict_parareal",
           "window_candidates", "rounds_cap", "ADVANCE_EXPONENT", "STOP_ROUNDS", "PARAREAL_ITERATIONS"]

#: Picard's window start advances by W ** ADVANCE_EXPONENT points per round (see the module docstring)
ADVANCE_EXPONENT = 0.55
#: rounds the final-point stop rule spends once the window holds the last point
STOP_ROUNDS = 4
#: Parareal iterations assumed at a tolerance > 0 (capped at the number of slices)
PARAREAL_ITERATIONS = 3


@dataclass(frozen=True)
class Plan:
    """What the planner chose and why.

    Attributes:
        method: the method to run. window: Picard's window (None for other methods).
        predicted_sce: the chosen plan's predicted wall time in sequential call equivalents (units of ``c(1)``).
        sequential_sce: sequential sampling's prediction on the same devices. devices: K. batch: B.
        reason: one sentence: what was chosen, its prediction against sequential and the runner-up.
        candidates: predicted SCE of every candidate considered, by label (``picard W=8``, ``sequential``, ...).
        cost: the cost curve's description. predicted_s: the prediction in the curve's units (seconds when measured).
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

    @property
    def speedup(self) -> float:
        """Predicted speed-up over one device's sequential sampling of the batch: ``N e c(B) / predicted``."""
        return self.sequential_sce / self.predicted_sce if self.predicted_sce > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"method": self.method, "window": self.window, "predicted_sce": self.predicted_sce,
                "sequential_sce": self.sequential_sce, "devices": self.devices, "batch": self.batch,
                "reason": self.reason, "candidates": dict(self.candidates), "cost": self.cost,
                "predicted_s": self.predicted_s}


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


def picard_rows(steps: int, window: int, tol: float) -> list[int]:
    """Per sample, the predicted rows of each Picard round (the rounds model of the module docstring).

    Returns:
        One row count per round, the initial-guess call (1 row) first when ``window < steps``.
    """
    a = 1.0 if tol == 0 else max(1.0, window ** ADVANCE_EXPONENT)
    rows, p = ([1] if window < steps else []), 0.0
    while p < steps:
        rows.append(min(window, steps - math.floor(p)))
        p += a
    return rows + [rows[-1]] * (STOP_ROUNDS if tol > 0 else 0)


def _sum_cost(curve: CostCurve, rows_per_sample: list[int], batch: int, devices: int, evals: int) -> float:
    return evals * sum(round_cost(curve, r * batch, devices) for r in rows_per_sample)


def predict_sequential(curve: CostCurve, steps: int, batch: int, devices: int, evals: int = 1) -> float:
    """Sequential sampling's predicted time (curve units): ``N e c(ceil(B / K))``."""
    return _sum_cost(curve, [1] * steps, batch, devices, evals)


def predict_picard(curve: CostCurve, steps: int, window: int, batch: int, devices: int, tol: float,
                   evals: int = 1) -> float:
    """Picard's predicted time (curve units) with window ``window`` (:func:`picard_rows`)."""
    return _sum_cost(curve, picard_rows(steps, window, tol), batch, devices, evals)


def predict_parareal(curve: CostCurve, steps: int, batch: int, devices: int, tol: float, evals: int = 1) -> float:
    """Parareal's predicted time (curve units) with the default slices (module docstring)."""
    S = max(1, round(math.sqrt(steps)))
    iters = S if tol == 0 else min(S, PARAREAL_ITERATIONS)
    sweep = S * round_cost(curve, batch, devices)
    fine = math.ceil(steps / S) * evals * round_cost(curve, batch * S, devices)
    return sweep + iters * (fine + sweep)


def plan_sampling(curve: CostCurve, steps: int, batch: int, devices: int, tol: float, *, method: str = "auto",
                  evals: int = 1, methods: tuple[str, ...] = ("sequential", "picard", "parareal")) -> Plan:
    """Choose the method (``method="auto"``) and Picard's window by predicted wall time.

    Args:
        curve: the cost curve. steps: N. batch: B. devices: K. tol: the tolerance in force (0: exact).
        method: ``auto`` (compare every candidate), or ``picard`` (choose its window only).
        evals: the solver's network calls per step. methods: the registered methods that may be candidates.
    Returns:
        :class:`Plan`.
    Raises:
        ValueError: non-positive steps, batch or devices; a method other than ``auto`` or ``picard``.
    """
    for name, v in (("steps", steps), ("batch", batch), ("devices", devices), ("evals", evals)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
    if method not in ("auto", "picard"):
        raise ValueError(f"method: the planner chooses for 'auto' or 'picard' (its window), got {method!r}")
    unit = curve(1)
    seq = predict_sequential(curve, steps, batch, devices, evals) / unit
    cands: dict[str, tuple[float, str, int | None]] = {}
    if method == "auto" and "sequential" in methods:
        cands["sequential"] = (seq, "sequential", None)
    for w in window_candidates(steps, devices):
        cands[f"picard W={w}"] = (predict_picard(curve, steps, w, batch, devices, tol, evals) / unit, "picard", w)
    if method == "auto" and "parareal" in methods and steps >= 4:
        cands["parareal"] = (predict_parareal(curve, steps, batch, devices, tol, evals) / unit, "parareal", None)
    # Fewest SCE; ties go to sequential (exact by construction), then to the narrower window (fewer evaluations).
    order = sorted(cands, key=lambda k: (round(cands[k][0], 9), list(cands).index(k)))
    best, runner = order[0], (order[1] if len(order) > 1 else None)
    sce, chosen, window = cands[best]
    why = (f"{best}: predicted {sce:.1f} SCE against sequential's {seq:.1f} on {devices} device(s), batch {batch} "
           f"({seq / sce:.2f}x)")
    if runner is not None:
        why += f"; next {runner} at {cands[runner][0]:.1f}"
    why += f"; cost {curve.name}"
    return Plan(chosen, window, sce, seq, devices, batch, why, {k: v[0] for k, v in cands.items()},
                curve.describe(), sce * unit)
