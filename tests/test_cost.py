"""The cost model: named, tabulated and callable curves, measurement and its cache, and the per-round cost figures
the sampler records (rows per device, SCE, predicted beside measured wall)."""

import math

import pytest
import torch

from benchmarks.devices import Spread
from paratime import ParallelSampler, SamplerConfig
from paratime.cost import make_cost, measure_cost, measure_rows


def test_named_curves_are_the_limits():
    compute, latency = make_cost("compute"), make_cost("latency")
    for r in (1, 2, 3, 7, 64):
        assert compute(r) == r and latency(r) == 1
    # SCE = c(ceil(rows / K)) / c(1): compute-bound ceil(rows / K), latency-bound 1.
    assert [compute.sce(m, 4) for m in (1, 4, 5, 9)] == [math.ceil(m / 4) for m in (1, 4, 5, 9)]
    assert {latency.sce(m, 4) for m in (1, 5, 100)} == {1.0}


def test_table_interpolates_and_extrapolates_along_the_last_slope():
    table = {1: 1.0, 2: 1.5, 4: 2.0}
    c = make_cost(table)
    for r, v in table.items():
        assert c(r) == v
    assert c(3) == pytest.approx((1.5 + 2.0) / 2)
    slope = (2.0 - 1.5) / (4 - 2)
    assert c(10) == pytest.approx(2.0 + slope * 6)


def test_a_callable_is_tabulated_at_its_own_values():
    f = lambda r: 0.5 + 0.25 * r ** 0.5
    c = make_cost(f, max_rows=32)
    assert c.rows == (1, 2, 4, 8, 16, 32)
    for r in c.rows:
        assert c(r) == f(r)


@pytest.mark.parametrize("bad,err", [("magic", ValueError), ({0: 1.0}, ValueError), ({2: 1.0}, ValueError),
                                     ({1: -1.0}, ValueError), ({1: float("nan")}, ValueError), (3.0, TypeError)])
def test_bad_cost_is_refused_naming_the_option(bad, err):
    with pytest.raises(err, match="cost"):
        SamplerConfig(cost=bad)


def test_measurement_times_each_row_count_and_is_cached():
    seen = []
    curve = measure_rows(lambda r: seen.append(r), torch.device("cpu"), rows=(1, 2, 4), repeats=2)
    assert seen == [1, 2, 4] * 3                          # a warm-up each, then two timed rounds, interleaved
    assert curve.name == "measured" and curve.rows == (1, 2, 4) and all(s > 0 for s in curve.seconds)
    assert list(curve.seconds) == sorted(curve.seconds)             # never cheaper with more rows
    net, calls = torch.nn.Linear(2, 2), []
    a = measure_cost(net, calls.append, torch.device("cpu"), torch.float32, (2,), rows=(1, 2), repeats=1)
    n = len(calls)
    assert measure_cost(net, calls.append, torch.device("cpu"), torch.float32, (2,), rows=(1, 2), repeats=1) is a
    assert len(calls) == n                                # served from the cache
    measure_cost(net, calls.append, torch.device("cpu"), torch.float32, (3,), rows=(1, 2), repeats=1)
    assert len(calls) > n                                 # another sample shape: measured again


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("cost", ["compute", "latency", {1: 2.0, 4: 5.0, 16: 11.0}])
def test_stats_count_rows_per_device_and_sce(workers, cost):
    rounds = []
    s = ParallelSampler("gmm", steps=12, window=5, tol=1e-3, cost=cost, progress=False, backend=Spread(workers))
    st = s.sample(4, seed=0, callback=rounds.append).stats
    curve = make_cost(cost)
    per_device = [math.ceil(info.rows / workers) for info in rounds]     # one network call per Picard round
    assert st.round_device_rows == per_device
    assert st.round_sce == pytest.approx([curve(r) / curve(1) for r in per_device])
    assert st.sce == pytest.approx(sum(st.round_sce))
    assert len(st.round_wall_s) == len(rounds) and sum(st.round_wall_s) <= st.wall_s
    if isinstance(cost, dict):        # a table is in seconds: the prediction beside the measurement
        assert st.round_predicted_s == pytest.approx([curve(r) for r in per_device])
        assert st.predicted_wall_s == pytest.approx(sum(st.round_predicted_s))
    else:
        assert st.predicted_wall_s is None and st.round_predicted_s == []
    assert st.plan is None and st.window == 5              # a given window is not planned


def test_measured_cost_on_the_state_device():
    s = ParallelSampler("gmm", steps=8, method="sequential", cost="measure", progress=False)
    st = s.sample(2, seed=0).stats
    assert st.cost.startswith("measured") and st.predicted_wall_s > 0
    assert len(st.round_predicted_s) == st.rounds == 8
