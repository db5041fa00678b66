"""The cost model: named, tabulated and callable curves, measurement and its cache, and the per-round cost figures
the sampler records (rows per device, SCE, predicted beside measured wall)."""

import math
import time

import pytest
import torch

import paratime.sampler as sampler_module
from benchmarks.devices import Spread
from paratime import ParallelSampler, SamplerConfig
from paratime.cost import call_gaps, make_cost, measure_cost, measure_rows
from paratime.planner import candidates
from paratime.results import SampleStats, record_rounds


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
                                     ({1: -1.0}, ValueError), ({1: float("nan")}, ValueError), (3.0, TypeError),
                                     ({True: 1.0, 2: 2.0}, ValueError), ({1: True}, TypeError)])
def test_bad_cost_is_refused_naming_the_option(bad, err):
    with pytest.raises(err, match="cost"):
        SamplerConfig(cost=bad)


def test_measurement_times_each_row_count_and_is_cached():
    import paratime.cost as cost_module

    seen = []
    curve = measure_rows(lambda r: seen.append(r), torch.device("cpu"), rows=(1, 2, 4), repeats=2)
    # a warm-up each, then two rounds interleaved, each timed call after an untimed one of its rows
    assert seen == [1, 2, 4] + [1, 1, 2, 2, 4, 4] * 2
    assert curve.name == "measured" and curve.rows == (1, 2, 4) and all(s > 0 for s in curve.seconds)
    assert list(curve.seconds) == sorted(curve.seconds)             # never cheaper with more rows
    net, calls = torch.nn.Linear(2, 2), []
    a = measure_cost(net, calls.append, torch.device("cpu"), torch.float32, (2,), rows=(1, 2), repeats=1)
    n = len(calls)
    assert measure_cost(net, calls.append, torch.device("cpu"), torch.float32, (2,), rows=(1, 2), repeats=1) is a
    assert len(calls) == n                                # served from the cache
    for other in (dict(shape=(3,)), dict(dtype=torch.float64), dict(device=torch.device("meta")),
                  dict(variant=(True,))):             # another sample shape, dtype, device or call: measured again
        kw = dict(device=torch.device("cpu"), dtype=torch.float32, shape=(2,)) | other
        n = len(calls)
        measure_cost(net, calls.append, kw.pop("device"), kw.pop("dtype"), kw.pop("shape"), rows=(1, 2), repeats=1,
                     **kw)
        assert len(calls) > n, other
    # A network that was freed is never served its curve: a new one may reuse its id(). Its entry is moved to the
    # new network's id, as a reused id would find it.
    gone = torch.nn.Linear(2, 2)
    measure_cost(gone, calls.append, torch.device("cpu"), torch.float32, (2,), rows=(1, 2), repeats=1)
    ident = id(gone)
    del gone
    key = next(k for k in cost_module._CACHE if k[0] == ident)
    assert cost_module._CACHE[key][0]() is None                   # the weak reference died with the network
    reused = torch.nn.Linear(2, 2)
    cost_module._CACHE[(id(reused), *key[1:])] = cost_module._CACHE.pop(key)
    assert cost_module.cached_cost(reused, *key[1:]) is None


def test_a_guided_sampler_is_not_served_the_unguided_curve(monkeypatch):
    """Classifier-free guidance runs two rows per sample on the same network: a guided and an unguided sampler of
    one network each measure their own curve (the cache served the first's to both)."""
    import paratime.cost as cost_module
    from benchmarks.equivalence_sweep import guided_ring

    den, y, timed, real = guided_ring(), torch.tensor([0, 3]), [], cost_module.measure_rows
    monkeypatch.setattr(cost_module, "measure_rows", lambda *a, **k: timed.append(1) or real(*a, **k))
    for guidance in (3.0, None, 3.0):
        ParallelSampler(den, steps=4, method="sequential", cost="measure", guidance=guidance,
                        progress=False).sample(2, seed=0, labels=y)
    assert len(timed) == 2                    # guided, unguided; the second guided sampler is served the first's


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


def test_stats_add_up_every_call_of_a_round():
    """Heun makes two calls a step: a sequential round's rows per device are both calls' (ceil(B / K) each), the
    step to sigma = 0 one call."""
    workers, batch = 3, 4
    st = ParallelSampler("gmm", steps=6, solver="heun", method="sequential", cost="compute", progress=False,
                         backend=Spread(workers)).sample(batch, seed=0).stats
    per_call = math.ceil(batch / workers)
    assert st.round_device_rows == [2 * per_call] * 5 + [per_call]
    assert st.sce == pytest.approx(sum(st.round_device_rows))


def test_measured_cost_on_the_state_device():
    s = ParallelSampler("gmm", steps=8, method="sequential", cost="measure", progress=False)
    st = s.sample(2, seed=0).stats
    assert st.cost.startswith("measured") and st.predicted_wall_s > 0
    assert len(st.round_predicted_s) == st.rounds == 8


def test_call_gaps_time_each_call_to_the_next():
    """A method's run timed call by call: the run stops at the start of call ``calls + 1``; each gap holds the call
    and the work after it (a known pause is its floor) and the call's rows; a lone call has no gap."""
    made, pause = [], 0.002

    def run(stamp):
        for k in range(50):
            stamp(k + 1)
            made.append(k)
            time.sleep(pause)

    gaps = call_gaps(run, torch.device("cpu"), calls=5)
    assert made == [0, 1, 2, 3, 4]                                     # the 6th call's stamp ended the run
    assert [r for _, r in gaps] == [1, 2, 3, 4, 5] and all(t >= pause for t, _ in gaps)
    assert call_gaps(lambda stamp: stamp(1), torch.device("cpu")) == []


def test_round_predictions_add_the_work_outside_the_network():
    """Each round's predicted seconds: its calls' c(rows per device) plus the measured overhead per call (the SCE,
    network time only, unchanged)."""
    curve, stats = make_cost({1: 1.0, 2: 3.0}), SampleStats(method="picard", solver="ddim", steps=3,
                                                    backend="local", workers=1, window=2, tol=0.0)
    record_rounds(stats, [2, 2, 1], [(1, 0.1), (3, 0.3)], 0.3, curve, 1, overhead=0.5)
    assert stats.round_predicted_s == pytest.approx([3.0 + 0.5, 3.0 + 1.0 + 2 * 0.5])
    assert stats.round_sce == pytest.approx([3.0, 4.0]) and stats.predicted_wall_s == pytest.approx(8.5)
    # a negative overhead (the curve overstating the calls) lowers each call's prediction, never below 0
    low = SampleStats(method="picard", solver="ddim", steps=3, backend="local", workers=1, window=2, tol=0.0)
    record_rounds(low, [2, 2, 1], [(1, 0.1), (3, 0.3)], 0.3, curve, 1, overhead=-2.0)
    assert low.round_predicted_s == pytest.approx([1.0, 1.0 + 0.0]) and low.round_sce == stats.round_sce


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_measured_plans_price_each_candidates_work_outside_the_network(monkeypatch, solver):
    """With a measured curve the sampler runs every candidate for a few calls once per batch shape and options
    (cached), takes each call's time beyond the curve's as its work outside the network and plans with it; the
    plan says so."""
    runs, real = [], sampler_module.call_gaps
    monkeypatch.setattr(sampler_module, "call_gaps", lambda *a, **k: runs.append(1) or real(*a, **k))
    s = ParallelSampler("gmm", steps=12, solver=solver, method="auto", cost="measure", progress=False)
    st = s.sample(2, seed=0).stats
    timed = {k[0] for k in s._overhead_cache}
    # one run each, two where its timed calls brought new shapes (test_a_call_shapes_first_call_is_not_priced_...)
    assert len(timed) <= len(runs) <= 2 * len(timed) and "sequential" in timed <= set(st.plan["candidates"])
    assert set(st.plan["candidates"]) == {label for label, *_ in candidates(12, 1)}
    assert math.isfinite(st.plan["overhead_s"]) and "outside the network" in st.plan["reason"]
    assert len(st.round_predicted_s) == len(st.round_sce) and st.predicted_wall_s > 0
    assert st.extra["plan_s"] > 0
    n = len(runs)
    again = s.sample(2, seed=1).stats
    assert len(runs) == n and again.extra["plan_s"] < st.extra["plan_s"]            # cached: nothing timed again
    s.sample(3, seed=1)
    assert len(runs) > n                                                              # another batch: timed again


@pytest.mark.parametrize("method,options", [("picard", dict(window=4)), ("sequential", {}), ("parareal", {}),
                                            ("parareal_pipelined", {}), ("staggered", dict(window=3))])
def test_a_given_method_with_a_measured_curve_predicts_its_overhead_too(method, options):
    """No plan (the method given): the run's own work outside the network is still measured (the timing run works
    for every method) and counted in the predicted seconds."""
    s = ParallelSampler("gmm", steps=12, method=method, cost="measure", progress=False, **options)
    st = s.sample(2, seed=0).stats
    over = [v for k, v in s._overhead_cache.items() if k[0] == "run"]
    assert st.plan is None and len(over) == 1 and math.isfinite(over[0])
    assert st.predicted_wall_s > 0 and len(st.round_predicted_s) == len(st.round_sce)


def test_a_call_shapes_first_call_is_not_priced_as_work_outside_the_network(monkeypatch):
    """A new call shape's first call pays once (the allocator grows, kernels are picked for it): on an H100 an
    SD-1.5 UNet's Picard W=50, whose rounds shrink to a new shape each, was predicted at 3.6 s where it ran in 1.0 s.
    Here each row count's first call sleeps 50 ms; a timing run whose timed calls bring new shapes is made again and
    the second one timed, so the work outside the network is the method's own (well under the sleep; timed cold,
    every gap of a shrinking window paid it); a run of one shape is made once."""
    import time as time_module

    from paratime import Denoiser
    from paratime.cost import CostCurve

    seen = set()

    def network(x, t):
        if x.shape[0] not in seen:
            seen.add(x.shape[0])
            time_module.sleep(0.05)
        return torch.zeros_like(x)

    den = Denoiser.from_callable(network, sample_shape=(2,))
    curve = CostCurve((1, 64), (1e-4, 1e-4), "measured")
    monkeypatch.setattr(ParallelSampler, "_cost_curve", lambda self, shape, cond: curve)
    runs, real = [], sampler_module.call_gaps

    def recorded(*a, **k):
        runs.append(real(*a, **k))
        return runs[-1]

    monkeypatch.setattr(sampler_module, "call_gaps", recorded)
    s = ParallelSampler(den, steps=12, method="picard", window=12, tol=0.0, cost="measure", progress=False)
    s.sample(1, seed=0)
    over = [v for k, v in s._overhead_cache.items() if k[0] == "run"]
    assert len(over) == 1 and over[0] < 0.02, over
    # The whole-grid window's calls shrink: a new shape each, so the run was made again and the second one timed.
    assert len(runs) == 2 and [r for _, r in runs[0]] == [r for _, r in runs[1]]
    assert len({r for _, r in runs[0]}) > 2
    # Sequential sampling's calls are all one shape: one run, no second.
    runs.clear()
    seq = ParallelSampler(den, steps=12, method="sequential", cost="measure", progress=False)
    seq.sample(1, seed=0)
    assert len(runs) == 1 and len({r for _, r in runs[0]}) == 1


def test_only_candidates_near_the_best_are_timed(monkeypatch):
    """Sequential sampling and the candidates whose network time alone is within TIMED_SPAN of the best are timed;
    the others are priced with the largest work outside the network timed (never timed themselves)."""
    from paratime.cost import CostCurve
    from paratime.planner import TIMED_SPAN, picard_rows, plan_sampling

    curve = CostCurve((1, 64), (1e-3, 64e-3), "measured")                        # compute-bound, in seconds
    s = ParallelSampler("gmm", steps=40, method="auto", cost="measure", progress=False)
    monkeypatch.setattr(ParallelSampler, "_cost_curve", lambda self, shape, cond: curve)
    timed = []
    monkeypatch.setattr(ParallelSampler, "_outside_seconds",
                        lambda self, shape, cond, curve, method, window, alone, limit: timed.append(window) or 2e-4)
    plan = s.sample(4, seed=0).stats.plan
    tol = s.config.tol_in_force
    bare = plan_sampling(curve, 40, 4, 1, tol).candidates
    near = {k for k, v in bare.items() if k == "sequential" or v <= TIMED_SPAN * min(bare.values())}
    assert len(timed) == len(near) < len(bare)
    for label, sce in plan["candidates"].items():       # every candidate priced with 0.2 c(1) a call outside
        if label.startswith("picard W="):
            calls = len(picard_rows(40, int(label.split("=")[1]), tol))
            assert sce == pytest.approx(bare[label] + 0.2 * calls)
        assert sce > bare[label]
    assert plan["candidates"]["sequential"] == pytest.approx(bare["sequential"] + 0.2 * 40)


def test_measurement_stops_short_of_device_memory_and_the_backends_limit():
    """A row count whose call runs out of device memory ends the curve before it (1 row must fit); the sampler never
    times a call wider than the backend's rows per call in force (its measurement is not chunked)."""
    def call(r):
        if r > 4:
            raise torch.cuda.OutOfMemoryError(f"{r} rows")

    assert measure_rows(call, torch.device("cpu"), rows=(1, 2, 4, 8, 16), repeats=1).rows == (1, 2, 4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        measure_rows(lambda r: call(r * 8), torch.device("cpu"), rows=(1, 2), repeats=1)
    s = ParallelSampler("gmm", steps=8, method="sequential", cost="measure", progress=False,
                        backend_options={"max_batch": 8})
    cost = s.sample(2, seed=0).stats.cost
    assert cost.startswith("measured [1:1, 2:") and " 8:" in cost and "16:" not in cost


@pytest.mark.parametrize("cost, per_call", [("latency", 2.0), ("compute", 4.0), ({1: 1.0, 2: 1.5, 4: 2.0}, 3.0)])
def test_calls_split_by_max_batch_cost_their_chunks(cost, per_call):
    """A call whose rows exceed max_batch runs as chunks back to back: 4 rows at max_batch 2 cost two 2-row calls
    (latency-bound: 2 SCE a step, not 1; a table: 2 c(2) / c(1)); rounds still count the method's calls."""
    s = ParallelSampler("gmm", steps=10, method="sequential", cost=cost, progress=False,
                        backend_options={"max_batch": 2})
    st = s.sample(4, seed=0).stats
    assert st.rounds == 10 and st.sce == pytest.approx(10 * per_call)
    assert st.round_sce == pytest.approx([per_call] * 10)


def test_nfe_is_exact_in_double_precision():
    """nfe = nfe_total / B exactly (a float32 mean gave 32.16666793823242 for 193 / 6)."""
    st = ParallelSampler("gmm", steps=20, window=5, progress=False).sample(6, seed=0).stats
    assert st.nfe == st.nfe_total / 6


def test_the_kernels_load_when_the_sampler_is_built_not_in_a_timed_call():
    """The kernels' module (and Triton) loaded inside the first sample()'s timed noise draw: 0.14 s of a 0.15 s gmm
    run, so --compare printed a speed-up of 0.015. Now the sampler's construction loads it."""
    import subprocess
    import sys

    code = ("import sys\nfrom paratime import ParallelSampler\nParallelSampler('gmm', steps=4, progress=False)\n"
            "import importlib.util\n"
            "print(importlib.util.find_spec('triton') is None or 'paratime.kernels.picard' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "True", r.stderr[-2000:]


def test_a_table_cost_is_not_timed_so_every_process_plans_alike(monkeypatch):
    """The README's advice for samples that repeat across processes: ``cost=`` a measured table (here the H100's
    SD-1.5 fp16 curve, in seconds) plans with no timing run at all, so two samplers choose the same window and give
    the same sample bit for bit."""
    import json
    from pathlib import Path

    runs, real = [], sampler_module.call_gaps
    monkeypatch.setattr(sampler_module, "call_gaps", lambda *a, **k: runs.append(1) or real(*a, **k))
    data = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "h100_curves.json").read_text())
    c = data["curves"]["sd15-unet float16"]
    table = dict(zip(c["rows"], c["seconds"]))
    a, b = (ParallelSampler("digits", steps=50, method="auto", cost=table, progress=False).sample(1, seed=0)
            for _ in range(2))
    assert runs == [] and a.stats.plan == b.stats.plan and a.stats.plan["method"] == "picard"
    assert torch.equal(a.samples, b.samples)
    assert a.stats.predicted_wall_s > 0 and a.stats.cost.startswith("table")


@pytest.mark.parametrize("window", [5, "auto"])
def test_rounds_are_priced_with_the_ranks_agreed_rows_per_call(monkeypatch, window):
    """Under torch.distributed a call runs as chunks of the smallest rows per call over the ranks (the rank with the
    smallest waits longest), and the plan prices it so; the stats price the rounds alike, not with this rank's own
    limit. Another rank whose device holds 2 rows a call is simulated through the ranks' agreement (a maximum of
    each value: -2 for the negated limit)."""
    monkeypatch.setattr(ParallelSampler, "_agree", lambda self, values: [max(v, -2.0) for v in values])
    s = ParallelSampler("gmm", steps=12, window=window, tol=1e-3, cost="latency", progress=False)
    rounds = []
    st = s.sample(3, seed=0, callback=rounds.append).stats
    assert s.backend.batch_limit() > 2                    # this rank's own limit would price each round at 1
    assert st.round_sce == pytest.approx([math.ceil(info.rows / 2) for info in rounds])
    assert max(st.round_sce) > 1


def test_a_callable_is_priced_at_the_rows_the_planner_prices():
    """A callable is tabulated far past the 64 rows a measurement times: c(r) = max(1, r / 128) was read flat past
    64 rows, so a window of 100 on a batch of 8 (800 rows a round) was priced at 1 a round and planned."""
    f = lambda r: max(1.0, r / 128)
    c = make_cost(f)
    for r in (512, 800, 4096):
        assert c(r) == pytest.approx(f(r), rel=0.01)
    s = ParallelSampler("gmm", steps=100, cost=f, progress=False)
    st = s.sample(8, seed=0).stats
    assert st.window < 100                                    # the whole grid is not the cheapest under f
    assert st.round_sce == pytest.approx([f(r) for r in st.round_device_rows], rel=0.01)
