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
from paratime.cost import CostCurve, make_cost
from paratime.planner import (picard_rows, plan_sampling, predict_picard, predict_sequential, rounds_cap,
                              window_candidates)

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
    # The cheapest candidate, up to float rounding (predictions within 1e-9 tie, and a tie goes to sequential).
    assert plan.predicted_sce == pytest.approx(min(plan.candidates.values()), rel=1e-9)
    assert plan.sequential_sce == pytest.approx(predict_sequential(curve, steps, batch, devices) / curve(1))
    if plan.method == "picard":
        assert plan.predicted_sce == pytest.approx(
            predict_picard(curve, steps, plan.window, batch, devices, tol) / curve(1))


def test_rounds_model():
    """Every point is evaluated: the window's starts cover the grid; at tol 0 one new point per round."""
    for steps, window in ((50, 4), (50, 50), (100, 8), (7, 3)):
        rows = picard_rows(steps, window, TOL)
        assert max(rows) == min(window, steps) and len(rows) < steps + 5
        assert len(picard_rows(steps, window, 0.0)) == steps + (window < steps)
    assert window_candidates(50, 4) == [4, 8, 16, 32, 50]
    assert window_candidates(1000, 8)[-1] == 500


@pytest.mark.parametrize("kw,err", [(dict(devices=0), ValueError), (dict(batch=True), ValueError),
                                    (dict(method="parareal"), ValueError)])
def test_planner_refuses_bad_input(kw, err):
    args = dict(curve=make_cost("compute"), steps=10, batch=1, devices=2, tol=TOL) | kw
    with pytest.raises(err, match=next(iter(kw))):
        plan_sampling(**args)


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
    assert st_.plan["predicted_sce"] >= st_.sce          # the rounds model is conservative here


def test_default_window_is_planned_and_shown(capsys):
    """method="picard" (default) with window="auto" (default): the planner picks the window; the bar says so."""
    s = ParallelSampler("gmm", steps=16, cost="compute", backend=Spread(2), progress=True)
    st_ = s.sample(1, seed=0).stats
    assert st_.method == "picard" and st_.window == 2 and st_.plan["window"] == 2
    err = capsys.readouterr().err
    assert "picard W=2" in err and "plan:" in err


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


def test_ranks_plan_alike_from_a_measured_curve(tmp_path):
    """Each of 2 gloo ranks measures its own cost curve (timings differ); they agree on the slowest rank's curve
    before planning, so both run the same plan and return the same samples."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
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
    assert a["cost"].startswith("measured") and a["cost"] == b["cost"] and a["plan"] == b["plan"]
    assert a["plan"]["devices"] == 2 and a["sce"] == b["sce"]
    assert torch.equal(a["samples"], b["samples"])
