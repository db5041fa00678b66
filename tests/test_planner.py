"""The planner on synthetic cost curves: compute-bound picks a window of about K, latency-bound a wide window, a
batch that fills the devices picks data-parallel sequential, never slower than sequential by its own prediction;
and the sampler runs, records and shows the plan."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from benchmarks.devices import Spread
from paratime import ParallelSampler, SamplerConfig
from paratime.cost import CostCurve, chunked_cost, make_cost, round_cost
from paratime.methods.parareal import slice_bounds
from paratime.planner import (ALONE, PARAREAL_ITERATIONS_SDE, SDE_SLIDE_STALL, SDE_STALL_ROUNDS,
                              SEQUENTIAL_MARGIN, SLIDE_STALL, STALL_ROUNDS, candidates, picard_rows, plan_sampling,
                              predict_parareal, predict_picard, predict_sequential, rounds_cap, window_candidates)

TOL = 2e-3


@pytest.mark.parametrize("devices", [2, 4, 8])
@pytest.mark.parametrize("steps", [50, 100])
def test_compute_bound_picks_a_window_of_the_devices(devices, steps):
    plan = plan_sampling(make_cost("compute"), steps, 1, devices, TOL)
    assert plan.method == "picard" and plan.window == devices
    assert plan.predicted_sce < plan.sequential_sce


@pytest.mark.parametrize("devices", [1, 4])
def test_latency_bound_picks_the_widest_window(devices):
    plan = plan_sampling(make_cost("latency"), 50, 1, devices, TOL)
    assert plan.method == "picard" and plan.window == rounds_cap(50) == 50


@pytest.mark.parametrize("batch,devices", [(4, 4), (8, 4), (16, 8), (3, 1)])
def test_a_batch_that_fills_the_devices_runs_sequential(batch, devices):
    plan = plan_sampling(make_cost("compute"), 50, batch, devices, TOL)
    assert plan.method == "sequential" and plan.window is None
    assert plan.predicted_sce == plan.sequential_sce
    # The speed-up's baseline is one device sampling the whole batch: N calls of B rows.
    assert plan.baseline_sce == pytest.approx(50 * batch)
    assert plan.speedup == pytest.approx(50 * batch / plan.predicted_sce)


@pytest.mark.parametrize("solver,evals", [("ddim", 1), ("heun", 2)])
@pytest.mark.parametrize("workers,batch", [(1, 1), (1, 2), (4, 1), (3, 2)])
def test_parareal_at_tol_zero_is_predicted_at_the_calls_it_makes(solver, evals, workers, batch):
    """At tol 0 Parareal accepts one slice an iteration, so its calls are known: the prediction equals the
    sampler's own SCE (the model priced every slice in every iteration, 1.5-2x the calls made). Heun's step to
    sigma = 0 makes one call."""
    curve = make_cost("compute")
    for steps in (16, 23):
        s = ParallelSampler("gmm", steps=steps, solver=solver, method="parareal", tol=0.0, cost="compute",
                            progress=False, backend=Spread(workers))
        measured = s.sample(batch, seed=0).stats.sce
        assert predict_parareal(curve, steps, batch, workers, 0.0, evals, last_evals=1) == pytest.approx(measured)


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
@pytest.mark.parametrize("workers,batch", [(1, 1), (4, 1)])
def test_parareal_above_tol_zero_is_never_predicted_below_its_calls(solver, workers, batch):
    """Above tol 0 the prediction assumes PARAREAL_ITERATIONS (PARAREAL_ITERATIONS_SDE for a stochastic solver,
    whose start after the converged prefix is accepted only when exact): it may be pessimistic, never optimistic,
    so the planner does not choose Parareal over sequential sampling on a gain it will not make (gmm DDPM-100 on 4
    devices: 127 SCE measured, 116 predicted with DDIM's iterations)."""
    curve = make_cost("compute")
    s = ParallelSampler("gmm", steps=100, solver=solver, method="parareal", cost="compute", progress=False,
                        backend=Spread(workers))
    st = s.sample(batch, seed=0).stats
    predicted = predict_parareal(curve, 100, batch, workers, st.tol, 1, last_evals=1, stochastic=s.solver.stochastic)
    assert st.sce <= predicted <= 2 * st.sce


def test_tol_zero_is_exact_only_sequentially():
    """At tol 0 Picard advances one point per round (model), so on any curve sequential wins or ties."""
    for curve in ("latency", "compute"):
        assert plan_sampling(make_cost(curve), 30, 1, 4, 0.0).method == "sequential"


curves = st.lists(st.floats(0.05, 10.0), min_size=2, max_size=7).map(
    lambda inc: CostCurve(tuple(2 ** k for k in range(len(inc))),
                          tuple(float(sum(inc[:k + 1])) for k in range(len(inc))), "table"))


@settings(max_examples=60, deadline=None)
@given(curve=curves, steps=st.integers(1, 300), batch=st.integers(1, 16), devices=st.integers(1, 16),
       tol=st.sampled_from([0.0, 1e-3, 2e-3, 0.1]))
def test_never_slower_than_sequential_by_its_own_prediction(curve, steps, batch, devices, tol):
    plan = plan_sampling(curve, steps, batch, devices, tol)
    assert plan.predicted_sce <= plan.sequential_sce
    # The cheapest candidate, a parallel one counted SEQUENTIAL_MARGIN times, up to float rounding (predictions
    # within 1e-9 tie, and a tie goes to sequential).
    weight = {k: 1.0 if k == "sequential" else SEQUENTIAL_MARGIN for k in plan.candidates}
    chosen = plan.predicted_sce * (1.0 if plan.method == "sequential" else SEQUENTIAL_MARGIN)
    assert chosen == pytest.approx(min(v * weight[k] for k, v in plan.candidates.items()), rel=1e-9)
    if plan.method != "sequential":
        assert plan.predicted_sce * SEQUENTIAL_MARGIN <= plan.sequential_sce * (1 + 1e-9)
    assert plan.sequential_sce == pytest.approx(predict_sequential(curve, steps, batch, devices) / curve(1))
    if plan.method == "picard":
        assert plan.predicted_sce == pytest.approx(
            predict_picard(curve, steps, plan.window, batch, devices, tol) / curve(1))


def test_work_outside_the_network_is_priced_per_call():
    """A latency-bound curve picks the widest window for free rounds; the same rounds, each call dear outside the
    network (a window's engine work, a gather), make sequential sampling the plan."""
    curve = make_cost("latency")
    free = plan_sampling(curve, 50, 1, 4, TOL)
    assert free.method == "picard" and free.overhead_s == 0.0
    over = {label: 5.0 for label, *_ in candidates(50, 4)} | {"sequential": 0.0}
    dear = plan_sampling(curve, 50, 1, 4, TOL, overhead=over)
    assert dear.method == "sequential" and dear.overhead_s == 0.0
    for w in (4, 8, 50):
        label = f"picard W={w}"
        assert dear.candidates[label] == pytest.approx(predict_picard(curve, 50, w, 1, 4, TOL, overhead=5.0))
        assert dear.candidates[label] == pytest.approx(free.candidates[label] + 5.0 * len(picard_rows(50, w, TOL)))
    with pytest.raises(ValueError, match="overhead"):
        plan_sampling(curve, 50, 1, 4, TOL, overhead={"sequential": float("nan")})
    # A measured overhead below -c(1) prices a call at 0, never below: the plan says so (a ZeroDivisionError before).
    free_calls = plan_sampling(curve, 10, 1, 1, TOL, overhead={"sequential": -1.0})
    assert free_calls.predicted_sce == 0 and "no time" in free_calls.reason


def test_each_device_alone_is_a_candidate_where_it_can_run():
    """Sequential sampling on each device by itself (an SPMD backend's ranks): c(B) a step and no gather. It ties
    with spreading one sample (sequential, listed first, wins), and wins when the per-call gather is dear."""
    curve = make_cost("compute")
    tie = plan_sampling(curve, 20, 1, 2, 0.0, alone=True)
    assert ALONE in tie.candidates and tie.method == "sequential" and not tie.alone
    dear = plan_sampling(curve, 20, 3, 2, 0.0, alone=True, overhead={"sequential": 4.0, ALONE: 0.0})
    assert dear.alone and dear.method == "sequential" and dear.predicted_sce == pytest.approx(20 * 3)
    assert dear.sequential_sce == pytest.approx(20 * (2 + 4))
    assert ALONE not in plan_sampling(curve, 20, 3, 1, 0.0, alone=True).candidates       # one device: nothing to add
    assert ALONE not in plan_sampling(curve, 20, 3, 2, 0.0).candidates                   # not where it cannot run


def test_rounds_model():
    """Every point is evaluated: the window's starts cover the grid; at tol 0 one new point per round."""
    for steps, window in ((50, 4), (50, 50), (100, 8), (7, 3)):
        rows = picard_rows(steps, window, TOL)
        assert max(rows) == min(window, steps) and len(rows) < steps + 5
        assert len(picard_rows(steps, window, 0.0)) == steps + (window < steps)
    assert window_candidates(50, 4) == [4, 8, 16, 32, 50]
    assert window_candidates(1000, 8)[-1] == 500


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 400), window=st.integers(1, 400))
def test_rounds_model_shape(steps, window):
    """A sliding window: the guess call, full windows while its start stalls then advances (W + 1) / 2 a round,
    then a shrinking tail; the whole grid: N, N - 1, ... then a shrinking tail. Never more rounds than exactness
    needs, and wider windows never take more rounds."""
    window = min(window, steps)
    rows = picard_rows(steps, window, TOL)
    body = rows[1:] if window < steps else rows
    assert all(1 <= r <= window for r in body) and all(a >= b for a, b in zip(body, body[1:]))
    assert len(rows) <= len(picard_rows(steps, window, 0.0)) == steps + (1 < window < steps)
    if window < steps:
        assert rows[0] == 1 and body[0] == window
        assert sum(r == window for r in body) >= min(SLIDE_STALL, steps - window)     # the stall's full windows
        if window > 1:
            assert len(picard_rows(steps, min(steps, window * 2), TOL)) <= len(rows) + 1
    else:
        assert body[:min(steps, STALL_ROUNDS)] == [steps - k for k in range(min(steps, STALL_ROUNDS))]


@pytest.mark.parametrize("kw,err", [
    (dict(devices=0), ValueError), (dict(batch=True), ValueError), (dict(method="parareal"), ValueError),
    # a bad tol planned silently; a label not among the candidates was ignored; skips that left no candidate
    # raised a bare IndexError; methods without any the planner compares too
    (dict(tol=-1.0), ValueError), (dict(tol=float("nan")), ValueError), (dict(tol="0.1"), ValueError),
    (dict(skip=["picard W=3"]), ValueError),
    (dict(skip=["picard W=2", "picard W=4", "picard W=8", "picard W=10"], method="picard"), ValueError),
    (dict(methods=("staggered",)), ValueError)])
def test_planner_refuses_bad_input(kw, err):
    args = dict(curve=make_cost("compute"), steps=10, batch=1, devices=2, tol=TOL) | kw
    with pytest.raises(err, match=f"^{next(iter(kw))}: "):
        plan_sampling(**args)


def test_the_planner_compares_only_the_methods_it_is_given():
    """methods=("sequential",) planned Picard windows all the same."""
    assert list(plan_sampling(make_cost("compute"), 10, 1, 2, TOL, methods=("sequential",)).candidates) == \
        ["sequential"]
    assert "parareal" not in plan_sampling(make_cost("compute"), 10, 1, 2, TOL, methods=("sequential", "picard")
                                           ).candidates


@pytest.mark.parametrize("window,err", [("wide", ValueError), (0, ValueError), (True, TypeError), (2.0, TypeError)])
def test_bad_window_is_refused(window, err):
    with pytest.raises(err, match="window"):
        SamplerConfig(window=window)


def test_method_auto_is_accepted_and_unknown_lists_it():
    assert SamplerConfig(method="auto").method == "auto"
    with pytest.raises(ValueError, match="method: .*auto"):
        SamplerConfig(method="magic")


def _digits(**kw):
    return ParallelSampler("digits", steps=20, progress=False, **kw)


def test_sampler_runs_the_plan_batch_fills_the_devices():
    """Batch 4 on 4 compute-bound devices: the plan is sequential, and its samples are sequential's exactly."""
    res = _digits(method="auto", cost="compute", backend=Spread(4)).sample(4, seed=1)
    ref = _digits(method="sequential").sample(4, seed=1)
    assert res.stats.method == "sequential" and res.stats.plan["method"] == "sequential"
    assert "sequential" in res.stats.plan["reason"] and res.stats.plan["devices"] == 4
    assert torch.equal(res.samples, ref.samples)
    assert res.stats.sce == res.stats.plan["predicted_sce"] == 20


def test_sampler_runs_the_plan_one_sample_on_devices():
    """Batch 1 on 4 compute-bound devices: Picard with a window of 4; within tol of sequential; stats filled."""
    res = _digits(method="auto", cost="compute", backend=Spread(4)).sample(1, seed=2)
    ref = _digits(method="sequential").sample(1, seed=2)
    st_ = res.stats
    assert (st_.method, st_.window) == ("picard", 4) == (st_.plan["method"], st_.plan["window"])
    assert (res.samples - ref.samples).abs().max() <= TOL
    assert st_.round_device_rows and max(st_.round_device_rows) == 1 and st_.sce == len(st_.round_sce) < 20
    # The rounds model within a round of the measurement here (DDIM-20, window 4: 12 predicted, 13 measured).
    assert abs(st_.plan["predicted_sce"] - st_.sce) <= 1


def test_default_window_is_planned_and_shown(capsys):
    """method="picard" (default) with window="auto" (default): the planner picks the window; the bar says so."""
    s = ParallelSampler("gmm", steps=16, cost="compute", backend=Spread(2), progress=True)
    st_ = s.sample(1, seed=0).stats
    assert st_.method == "picard" and st_.window == 2 and st_.plan["window"] == 2
    err = capsys.readouterr().err
    assert "picard W=2" in err and "plan:" in err and "compute cost)" in err


def test_an_assumed_cost_curve_is_shown_as_assumed(capsys):
    """cost="auto" (default) off CUDA plans on the latency curve without timing it: the bar says the prediction rests
    on an assumption (``paratime eval-digits`` on 2 CPU cores: 10x predicted, 14 s for Picard against 1 s
    sequential, the digits U-Net being compute-bound there)."""
    ParallelSampler("gmm", steps=16, progress=True).sample(1, seed=0)
    err = capsys.readouterr().err
    assert "latency cost assumed, cost='measure' times it)" in err, err
    ParallelSampler("gmm", steps=16, cost="latency", progress=True).sample(1, seed=0)
    err = capsys.readouterr().err
    assert "plan:" in err and "latency cost)" in err and "assumed" not in err, err


RANK_SCRIPT = """
import os, sys, torch
import torch.distributed as dist
from paratime import ParallelSampler
torch.set_num_threads(1)
dist.init_process_group("gloo")
s = ParallelSampler("digits", steps=10, method="auto", cost="measure", backend="torch", progress=False)
r = s.sample(1, seed=4, labels=torch.tensor([7]))
torch.save({"plan": r.stats.plan, "cost": r.stats.cost, "samples": r.samples, "sce": r.stats.sce},
           os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pt"))
dist.destroy_process_group()
"""


ALONE_SCRIPT = RANK_SCRIPT.replace('dist.init_process_group("gloo")', """dist.init_process_group("gloo")
from paratime.planner import ALONE
# The measured work outside the network, replaced: the gather made dear, so that each rank alone is the plan.
ParallelSampler.overheads = lambda self, shape, cond, curve, plans, limit=None: {
    label: 0.0 if label == ALONE else 1.0 for label, *_ in plans}""").replace(
    '"sce": r.stats.sce}', '"sce": r.stats.sce, "backend_calls": s.backend.calls}')


SHORT_SCRIPT = RANK_SCRIPT.replace('dist.init_process_group("gloo")', """dist.init_process_group("gloo")
import paratime.cost as cost
if dist.get_rank() == 1:      # rank 1's device holds calls of at most 8 rows (its measurement stops there)
    measure = cost.measure_rows
    cost.measure_rows = lambda call, device, rows, repeats=5: measure(call, device, rows[:4], repeats)""")


# Rank 1's calls hold at most 2 rows, rank 0's 8 (a limit derived from each device's free memory can differ): the
# ranks plan with the smaller, so they run the same plan (assumed latency curve: no measurement to agree on).
LIMIT_SCRIPT = RANK_SCRIPT.replace('steps=10, method="auto", cost="measure", backend="torch"',
                                  '''steps=16, method="auto", cost="latency", backend="torch",
                      backend_options={"max_batch": 2 if int(os.environ["RANK"]) == 1 else 8}''')


# Rank 1's device cannot hold the window the ranks would plan (its free memory is less): neither rank plans it.
FITS_SCRIPT = LIMIT_SCRIPT.replace('backend_options={"max_batch": 2 if int(os.environ["RANK"]) == 1 else 8}',
                                   "backend_options={}").replace('dist.init_process_group("gloo")', """
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    fits = ParallelSampler._fits
    ParallelSampler._fits = lambda self, shape, method, window: window != 16 and fits(self, shape, method, window)""")


@pytest.mark.parametrize("script", [RANK_SCRIPT, ALONE_SCRIPT, SHORT_SCRIPT, LIMIT_SCRIPT, FITS_SCRIPT],
                         ids=["measured", "alone", "short", "limit", "fits"])
def test_ranks_plan_alike_from_a_measured_curve(tmp_path, script):
    """Each of 2 gloo ranks measures its own cost curve and work outside the network (timings differ); they agree
    on the slowest rank's before planning, so both run the same plan and return the same samples. Planned alone,
    each rank samples by itself (no call through the distributed backend) and gets the sequential sample."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1"))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a["cost"] == b["cost"] and a["plan"] == b["plan"]
    assert a["cost"].startswith("latency" if script in (LIMIT_SCRIPT, FITS_SCRIPT) else "measured")
    assert a["plan"]["devices"] == 2 and a["sce"] == b["sce"]
    assert torch.equal(a["samples"], b["samples"])
    if script is LIMIT_SCRIPT:         # planned with rank 1's limit, which plans otherwise than rank 0's would
        latency = CostCurve((1, 2), (1.0, 1.0), "latency")
        plans = [plan_sampling(latency, 16, 1, 2, 2e-3, alone=True, limit=lim) for lim in (2, 8)]
        assert plans[0].window != plans[1].window or plans[0].method != plans[1].method
        assert (a["plan"]["method"], a["plan"]["window"]) == (plans[0].method, plans[0].window)
    if script is FITS_SCRIPT:          # rank 0 alone would plan the whole grid (latency-bound, no limit)
        latency = CostCurve((1, 2), (1.0, 1.0), "latency")
        assert plan_sampling(latency, 16, 1, 2, 2e-3, alone=True).window == 16 != a["plan"]["window"]
    if script is SHORT_SCRIPT:         # the ranks agree on the row counts both could time
        assert a["cost"].startswith("measured [1:1,") and " 8:" in a["cost"] and "16:" not in a["cost"]
    if script is ALONE_SCRIPT:
        ref = ParallelSampler("digits", steps=10, method="sequential", progress=False).sample(
            1, seed=4, labels=torch.tensor([7]))
        assert a["plan"]["alone"] and a["plan"]["method"] == "sequential"
        assert a["backend_calls"] == b["backend_calls"] == 0
        assert torch.equal(a["samples"], ref.samples)


def test_candidates_that_cannot_fit_the_device_are_not_planned(monkeypatch):
    """Latency-bound, the widest window wins; with memory for windows up to 16 only, the planner picks 16 (the wide
    ones are neither timed nor planned) instead of failing the chosen plan's memory check."""
    import paratime.backends.memory as memory

    s = ParallelSampler("gmm", steps=50, cost="latency", progress=False)
    need = {w: s._candidate("picard", w).check_memory((64, 2), s.device, s.state_dtype, s.solver)
            for w in (16, 32, 50)}
    assert need[16] < need[32] < need[50]
    assert s.sample(64, seed=0).stats.plan["window"] == 50
    monkeypatch.setattr(memory, "available_bytes", lambda device: need[16])
    plan = s.sample(64, seed=0).stats.plan
    assert plan["window"] == 16 and not {"picard W=32", "picard W=50"} & set(plan["candidates"])
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)           # nothing fits: the error names it
    with pytest.raises(memory.DeviceMemoryError, match=r"^shape, steps: \(64, 2\) over 50 steps needs .* but only"):
        s.sample(64, seed=0)


def test_a_limit_on_rows_per_call_is_priced():
    # Latency-bound: a call of any width costs c(1), so the whole grid wins; with at most 4 rows a call, a window of
    # W rows costs ceil(W / 4) calls a round and the wide window loses its advantage.
    latency = CostCurve((1, 2), (1.0, 1.0), "latency")
    free = plan_sampling(latency, 50, 1, 1, 2e-3)
    capped = plan_sampling(latency, 50, 1, 1, 2e-3, limit=4)
    assert free.window == 50 and capped.window is not None and capped.window < free.window
    rows = picard_rows(50, capped.window, 2e-3)
    assert capped.candidates[f"picard W={capped.window}"] == pytest.approx(
        sum(chunked_cost(latency, r, 4) for r in rows))
    assert predict_picard(latency, 50, 50, 1, 1, 2e-3, limit=4) == pytest.approx(
        sum(-(-r // 4) for r in picard_rows(50, 50, 2e-3)))
    # Spread over K devices first, then chunked on each.
    assert round_cost(latency, 20, 2, limit=4) == 3.0 and round_cost(latency, 20, 2) == 1.0
    with pytest.raises(ValueError, match="limit"):
        plan_sampling(latency, 50, 1, 1, 2e-3, limit=0)


def test_the_sampler_plans_with_its_backends_max_batch():
    """A latency-bound curve with at most 4 rows a call: the sampler plans a narrower window than without the limit,
    and the plan's prediction counts the chunks."""
    kw = dict(steps=20, progress=False, cost="latency")
    free = ParallelSampler("digits", **kw).sample(1, seed=0).stats
    capped = ParallelSampler("digits", backend_options={"max_batch": 4}, **kw).sample(1, seed=0).stats
    assert free.window == 20 and capped.window < 20, (free.window, capped.window)
    latency = CostCurve((1, 2), (1.0, 1.0), "latency")
    assert capped.plan["predicted_sce"] == pytest.approx(predict_picard(latency, 20, capped.window, 1, 1, 2e-3,
                                                                        limit=4))


def test_fixed_shapes_are_priced_and_a_first_call_plans_with_the_limit_it_will_derive(monkeypatch):
    """buckets=: no chunk above the largest bucket, each padded to the smallest that holds it (10 rows, buckets
    (4, 8): a chunk of 8 and one of 2 padded to 4). Without max_batch the backend derives its limit at its first
    call; off CUDA that is a known constant, so the first sample() plans with it as the second does."""
    import paratime.backends.memory as memory

    compute = CostCurve((1, 2), (1.0, 2.0), "compute")
    assert chunked_cost(compute, 10, None, (4, 8)) == 12.0
    # A chunk is padded up to a bucket, so it is the largest bucket at or under the limit (limit 5: chunks of 4,
    # not of 5 padded to 8), the smallest bucket under it (a derived limit of 3: chunks of 4, padding 2 to 4).
    latency = CostCurve((1, 2), (1.0, 1.0), "latency")
    assert chunked_cost(latency, 10, 5, (4, 8)) == 3.0 and chunked_cost(latency, 10, None, (4, 8)) == 2.0
    assert chunked_cost(compute, 10, 3, (4, 8)) == 12.0
    assert chunked_cost(compute, 0, None, (4, 8)) == 0.0
    kw = dict(steps=20, progress=False, cost="latency")
    bucketed = ParallelSampler("digits", backend_options={"buckets": (4,)}, **kw).sample(1, seed=0).stats
    assert bucketed.window < 20 and bucketed.sce == pytest.approx(sum(bucketed.round_sce))
    monkeypatch.setattr(memory, "CPU_MAX_BATCH", 4)
    s = ParallelSampler("digits", **kw)
    first, second = s.sample(1, seed=0).stats, s.sample(1, seed=0).stats
    assert first.window == second.window == bucketed.window < 20


def test_a_limit_derived_at_the_first_call_is_derived_before_the_first_plan(monkeypatch):
    """On CUDA without max_batch the backend derives its rows per call at its first call. The first sample() planned
    before that, with no limit (a cost table: a window of 20 predicted at 9 s, priced at 147 s by its own stats), and
    the next call of the same sampler planned with it, another method. The limit is now derived before the plan.
    Simulated on the CPU: the limit unknown until a call derives it (as on CUDA), derived at 2 rows."""
    import paratime.backends.base as base

    own = base.Backend.batch_limit
    monkeypatch.setattr(base.Backend, "batch_limit", lambda self, device=None: own(self, None))
    monkeypatch.setattr(base, "default_max_batch", lambda device, per_row=None: 2)
    s = ParallelSampler("gmm", steps=20, method="auto", cost={1: 1.0, 64: 1.01}, progress=False)
    assert s.backend.batch_limit() is None
    first, second = s.sample(4, seed=0).stats, s.sample(4, seed=0).stats
    assert s.backend.batch_limit() == 2
    assert first.plan == second.plan
    assert first.plan["predicted_s"] == pytest.approx(first.predicted_wall_s)   # sequential: exact


@pytest.mark.parametrize("solver, options", [("heun", {}), ("ddpm", dict(corrector_snr=0.2))])
def test_a_step_to_sigma_zero_is_priced_at_the_calls_it_makes(solver, options):
    """Heun's second call and a Langevin corrector skip the step to sigma = 0, and Picard's initial guess is one
    call whatever the solver: the plan priced every call of a round twice (sequential Heun-10: 80 SCE predicted, 76
    in its stats). Sequential sampling is predicted exactly; Picard at tol 0 on the stochastic solver too (one point
    a round: the rounds model is exact there)."""
    from paratime.planner import predict_picard, predict_sequential

    compute = make_cost("compute")
    kw = dict(solver=solver, steps=10, cost="compute", progress=False, **options)
    seq = ParallelSampler("gmm", method="sequential", **kw)
    evals = seq.solver.evals_per_step
    assert evals >= 2 and float(seq.grid.sigmas[-1]) == 0
    assert seq.sample(3, seed=0).stats.sce == predict_sequential(compute, 10, 3, 1, evals, last_evals=1) == 57
    planned = ParallelSampler("gmm", method="auto", **kw).sample(3, seed=0).stats
    assert planned.plan["sequential_sce"] == 57 * 1.0                    # the sampler passes last_evals
    if solver == "ddpm":
        for window in (4, 10):
            st = ParallelSampler("gmm", window=window, tol=0.0, **kw).sample(3, seed=0).stats
            assert st.sce == predict_picard(compute, 10, window, 3, 1, 0.0, evals, last_evals=1)


@pytest.mark.parametrize("solver", ["plms", "dpmpp_3m"])
def test_auto_with_a_multistep_solver_leaves_parareal_out(solver):
    """Parareal carries one previous D across a slice: with a solver reading more, method="auto" planned it as a
    candidate, and building that candidate's config raised (the refusal moved into the config); it is no candidate."""
    res = ParallelSampler("gmm", solver=solver, steps=12, method="auto", progress=False).sample(2, seed=0)
    assert res.stats.method in ("sequential", "picard")
    assert res.stats.plan["candidates"] and not any(k.startswith("parareal") for k in res.stats.plan["candidates"])


# -- Parareal's prediction: capped at its slices, priced for a stochastic solver (mutation testing, stop 47) ----

@pytest.mark.parametrize("stochastic", [False, True])
def test_parareal_is_never_predicted_above_its_slices_iterations(stochastic):
    """Parareal takes at most S iterations (one exact slice each), so above tol 0 the assumed iterations are capped
    at S: with fewer slices than the assumed iterations the prediction is tol 0's, the calls it makes."""
    curve = make_cost("compute")
    for steps in (9, 16, 30, 100):
        S = len(slice_bounds(steps, None)) - 1
        exact = predict_parareal(curve, steps, 2, 4, 0.0, last_evals=1, stochastic=stochastic)
        above = predict_parareal(curve, steps, 2, 4, 0.1, last_evals=1, stochastic=stochastic)
        assert above <= exact
        if S <= (PARAREAL_ITERATIONS_SDE if stochastic else 4):
            assert above == pytest.approx(exact)


def test_the_plan_prices_parareal_with_a_stochastic_solvers_iterations():
    curve = make_cost("compute")
    kw = dict(steps=100, batch=1, devices=4, tol=0.1)
    ode = plan_sampling(curve, **kw).candidates["parareal"]
    sde = plan_sampling(curve, **kw, stochastic=True).candidates["parareal"]
    unit = curve(1)
    assert ode == pytest.approx(predict_parareal(curve, 100, 1, 4, 0.1) / unit)
    assert sde == pytest.approx(predict_parareal(curve, 100, 1, 4, 0.1, stochastic=True) / unit)
    assert sde > ode                  # 10 slices: 7 iterations assumed against 4


@pytest.mark.parametrize("value", [1, "yes", None])
def test_the_planner_refuses_a_stochastic_flag_that_is_not_a_bool(value):
    with pytest.raises(TypeError, match="^stochastic: "):
        plan_sampling(make_cost("compute"), 10, 1, 2, 2e-3, stochastic=value)


# -- Picard's rounds model for a stochastic solver (issue 21: the default is never slower than sequential) ----------

@pytest.mark.parametrize("steps,batch,cost,devices", [(20, 1, "compute", 4), (10, 16, "latency", 1),
                                                      (10, 16, "latency", 4), (50, 1, "latency", 1)])
def test_a_stochastic_solvers_plan_never_measures_slower_than_sequential(steps, batch, cost, devices):
    """gmm DDPM, seed 0: the deterministic rounds model chose Picard W = 4 in the first three cells (predicted 12 and
    8 rounds), which measured 23 SCE against sequential's 20 and 12 rounds against 10. The stochastic variant must
    choose a plan that measures at most sequential's SCE, and still a window where one wins clearly (the last cell:
    W = 32, about 4x)."""
    def run(method):
        s = ParallelSampler("gmm", steps=steps, solver="ddpm", method=method, cost=cost, progress=False,
                            backend=Spread(devices))
        return s.sample(batch, seed=0).stats

    seq, auto = run("sequential"), run("auto")
    assert auto.sce <= seq.sce
    if steps == 50:
        assert auto.method == "picard" and 2 * auto.sce < seq.sce


def test_small_stochastic_rounds_by_hand():
    # N = 12, W = 4: the guess call; the start advances 1 for SDE_SLIDE_STALL = 6 rounds (starts 1 .. 6), then
    # (W + 2) / 3 = 2: start 8, and 8 + 4 >= 12 holds the last point: seven full windows. The tail starts at
    # 12 - 8 = 4 points and shrinks by 0.8 while >= 1: 4, 3.2, 2.56, 2.048, 1.638, 1.311, 1.049.
    assert picard_rows(12, 4, TOL, stochastic=True) == [1, 4, 4, 4, 4, 4, 4, 4, 4, 3, 3, 2, 2, 1, 1]
    # N = 18, W = 18: no guess; SDE_STALL_ROUNDS = 15 rounds of 18 .. 4; then (18 - 15) * 0.9 = 2.7 shrinking by 0.8
    # while >= max(1, 0.1 * 18) = 1.8: 2.7, 2.16.
    assert picard_rows(18, 18, TOL, stochastic=True) == [*range(18, 3, -1), 3, 2]
    # N = 19, W = 3: starts 1 .. 6, then 5 / 3 a round to 16 exactly, where 16 + 3 holds the last point: twelve full
    # windows, then 3, 2.4, 1.92, 1.536, 1.229. Float thirds miss 16: just under it the tail starts at 4 points,
    # wider than the window; just over a step, a thirteenth window.
    assert picard_rows(19, 3, TOL, stochastic=True) == [1, *[3] * 12, 3, 2, 2, 2, 1]
    # tol 0 is exact whatever the solver: one point a round.
    assert picard_rows(7, 3, 0.0, stochastic=True) == picard_rows(7, 3, 0.0)


@pytest.mark.parametrize("steps, windows, rounds, rows", [
    (20, (2, 4, 8, 16, 20), (20, 19, 19, 18, 19), (37, 61, 100, 140, 208)),
    (50, (2, 4, 8, 16, 32, 50), (43, 34, 28, 24, 23, 24), (83, 121, 172, 243, 363, 781)),
    (100, (2, 4, 8, 16, 32, 64, 100), (80, 59, 43, 33, 28, 27, 25), (157, 221, 292, 380, 510, 756, 1735))])
def test_stochastic_rounds_model_is_the_documented_table(steps, windows, rounds, rows):
    """The planner module's docstring states the stochastic variant's modelled rounds and rows beside the measured
    ones (digits DDPM-20, -50, -100: 19, 16, 14, 13, 15 rounds measured at N = 20, ...)."""
    got = [picard_rows(steps, w, TOL, stochastic=True) for w in windows]
    assert [len(r) for r in got] == list(rounds) and [sum(r) for r in got] == list(rows)


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 400), window=st.integers(1, 400))
def test_stochastic_rounds_model_shape(steps, window):
    """The stochastic variant keeps the model's shape (full windows, then a shrinking tail never wider than the
    window) and never predicts fewer rounds or rows than the deterministic model (it errs pessimistic)."""
    window = min(window, steps)
    rows, ode = picard_rows(steps, window, TOL, stochastic=True), picard_rows(steps, window, TOL)
    body = rows[1:] if 1 < window < steps else rows
    assert all(1 <= r <= window for r in body) and all(a >= b for a, b in zip(body, body[1:]))
    assert len(rows) >= len(ode) and sum(rows) >= sum(ode)
    if window < steps:
        assert sum(r == window for r in body) >= min(SDE_SLIDE_STALL, steps - window)
    else:
        assert body[:min(steps, SDE_STALL_ROUNDS)] == [steps - k for k in range(min(steps, SDE_STALL_ROUNDS))]


def test_the_plan_prices_picard_with_a_stochastic_solvers_rounds():
    """c(r) = 1: each candidate costs its rounds, the stochastic variant's for a stochastic solver."""
    curve = make_cost("latency")
    for stochastic in (False, True):
        plan = plan_sampling(curve, 50, 1, 4, TOL, stochastic=stochastic)
        for w in window_candidates(50, 4):
            rounds = len(picard_rows(50, w, TOL, stochastic))
            assert plan.candidates[f"picard W={w}"] == predict_picard(curve, 50, w, 1, 4, TOL,
                                                                      stochastic=stochastic) == rounds
    assert plan.window == 32 and plan.predicted_sce == 23        # the whole grid's 24 rounds lose by one
