"""What ``ParallelSampler.sample`` returns: the samples and what they cost."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from .cost import CostCurve, chunked_cost, device_rows
from .planner import Plan

__all__ = ["SampleStats", "SampleResult", "record_rounds", "json_text"]


@dataclass
class SampleStats:
    """What a ``sample`` call cost.

    Attributes:
        rounds: sequential depth in the method's network calls (Heun's two calls per step count twice; a call
            whose rows per device exceed ``max_batch`` runs as chunks back to back and counts once here, while
            ``sce`` and the per-round figures count its chunks).
        iterations: method iterations (Picard rounds, Parareal iterations, steps for ``sequential``).
        nfe: time-point evaluations per sample, averaged over the batch.
        nfe_total: time-point evaluations over the whole batch.
        wall_s: seconds spent sampling, drawing the noise included (``extra["noise_s"]``: that part alone), the
            planner's measurements not (``extra["plan_s"]``: a cost curve and candidates' timing runs, once per
            batch shape and options, then cached).
        residuals: worst residual per iteration, in units of the noise level (compare with ``tol``); pipelined
            Parareal: one per acceptance test at its frontier, which a tick can hold several of or none.
        sample_rounds: per sample, the iteration at which it finished (a Picard round, a Parareal iteration;
            pipelined Parareal: the tick), in the units of ``iterations``, not of ``rounds``.
        converged: per sample, whether it finished inside Picard's tolerance test (False: it reached
            ``max_rounds`` and was finished sequentially, which is exact).
        tol_units: the units of ``tol`` under the final-point rule: ``data`` (relative to the data scale) or
            ``absolute``; None where ``tol`` is in noise-level units (``stop="paradigms"``, Parareal) or unused.
        data_scale: per sample, the scale ``tol`` was relative to (the model's declared one, or the sample's own
            max-abs at its last round; 1 for absolute units); None without the final-point rule.
        tol_abs: per sample, the tolerance in force in the returned sample's units (``tol * data_scale``).
        plan: what the planner chose and why (:meth:`paratime.planner.Plan.to_dict`), or None when the method and
            window were given.
        cost: the cost curve the figures below use (:meth:`paratime.cost.CostCurve.describe`).
        sce: sequential call equivalents of the whole call, ``sum over calls of c(ceil(rows / K)) / c(1)``
            (``K = workers``; a call above ``max_batch`` rows a device: its chunks' costs); sequential sampling of
            a batch that fits one call costs ``N c(ceil(B / K)) / c(1)``: ``N`` for one sample at any K, or on the
            compute-bound and latency-bound curves' batch of K or fewer (under ``cost="measure"``, the measured
            curve's ratio).
        round_device_rows: per round (an iteration of the method, with its calls: a Parareal iteration's fine and
            coarse calls, Heun's two calls a step), the rows each device evaluated (``ceil(rows / K)`` summed over
            the round's network calls). round_sce: per round, its SCE. round_wall_s: per round, the measured
            seconds (the host clock between round reports). round_predicted_s: per round, the cost model's
            seconds: the curve's for each call's rows plus, with a measured curve, each call's measured work
            outside the network (:meth:`paratime.ParallelSampler.overheads`); empty when the curve is not in
            seconds (the named ``compute`` / ``latency`` curves).
        predicted_wall_s: the cost model's seconds for the whole call (None when the curve is not in seconds).
    """

    method: str
    solver: str
    steps: int
    backend: str
    workers: int
    window: int | None
    tol: float
    rounds: int = 0
    iterations: int = 0
    nfe: float = 0.0
    nfe_total: int = 0
    wall_s: float = 0.0
    residuals: list[float] = field(default_factory=list)
    sample_rounds: list[int] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    comm_s: float = 0.0
    tol_units: str | None = None
    data_scale: list[float] | None = None
    tol_abs: list[float] | None = None
    plan: dict | None = None
    cost: str = ""
    sce: float = 0.0
    round_device_rows: list[int] = field(default_factory=list)
    round_sce: list[float] = field(default_factory=list)
    round_wall_s: list[float] = field(default_factory=list)
    round_predicted_s: list[float] = field(default_factory=list)
    predicted_wall_s: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def record_rounds(stats: SampleStats, call_rows: list[int], marks: list[tuple[int, float]], wall: float,
                  curve: CostCurve, devices: int, plan: Plan | None = None, overhead: float = 0.0,
                  limit: int | None = None, buckets: tuple[int, ...] | None = None) -> None:
    """Fill ``stats``' per-round cost figures from the rows of each network call, the round marks and the curve.

    Args:
        stats: filled in place. call_rows: rows of each network call, in order. marks: per round, ``(calls made
            so far, seconds since the start)``; calls after the last mark form one more round. wall: the solve's
            seconds. curve: ``c(r)``. devices: K. plan: the planner's choice, or None. overhead: the seconds of
            each call's work outside the network (measured with a measured curve, else 0; negative where the
            curve overstates the calls), added to each call's predicted seconds (a call never below 0; not to the
            SCE, which counts network time only). limit: the rows per network call on a device (``max_batch`` in
            force), or None: a call's share above it runs as chunks back to back, each padded to the smallest of
            ``buckets`` that holds it (the backend's fixed shapes, or None; :func:`~paratime.cost.chunked_cost`).
    """
    marks = list(marks)
    if not marks or marks[-1][0] < len(call_rows):
        marks.append((len(call_rows), wall))
    unit, seconds = curve(1), curve.name in ("measured", "table")
    start, t_prev = 0, 0.0
    for end, t in marks:
        if end == start:                    # a report without a call (a method's bookkeeping round)
            continue
        per_device = [device_rows(m, devices) for m in call_rows[start:end]]
        costs = [chunked_cost(curve, r, limit, buckets) for r in per_device]
        cost = sum(costs)
        stats.round_device_rows.append(sum(per_device))
        stats.round_sce.append(cost / unit)
        stats.round_wall_s.append(t - t_prev)
        if seconds:
            stats.round_predicted_s.append(sum(max(0.0, c + overhead) for c in costs))
        start, t_prev = end, t
    stats.sce = float(sum(stats.round_sce))
    stats.predicted_wall_s = float(sum(stats.round_predicted_s)) if seconds else None
    stats.cost = curve.describe()
    stats.plan = None if plan is None else plan.to_dict()


@dataclass
class SampleResult:
    """``samples``: ``(B, *shape)`` in the model's frame (decoded if a decoder was given); ``stats``: the cost."""

    samples: torch.Tensor
    stats: SampleStats
    latents: torch.Tensor | None = None


def json_text(rec) -> str:
    """``rec`` as standard JSON: NaN and infinities (a round without a residual) become null, tuples lists
    (``json.dumps`` would write the bare ``NaN`` that strict parsers, jq or a browser's, refuse)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(rec), indent=2, allow_nan=False)
