"""Gaps a mutation run over ``ParallelSampler`` (``paratime/sampler.py``), the records (``results.py``), the progress
display (``progress.py``) and the evaluator (``evaluator.py``) found: each test here failed on a hand-made mutant the
rest of the suite let through, and is anchored on an exact answer (a count, an identity, a message naming the
argument)."""

import dataclasses
import io
import sys
import time
from pathlib import Path

import pytest
import torch

from paratime import Denoiser, ParallelSampler, VESchedule
from paratime.backends import make_backend

sys.path.insert(0, str(Path(__file__).parent))
from dist_helper import capped_gmm, run_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one intra-op thread (conftest)


def _raw(x, t, **cond):                                # a raw eps-network: predicts no noise
    return torch.zeros_like(x)


class _Net(torch.nn.Module):
    """A raw eps-network with float32 weights."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x, t, **cond):
        return self.lin(x)


def test_a_users_network_is_cast_on_a_copy_never_in_place():
    """``dtype=`` on a network the caller owns converts a copy of its weights; the caller's module keeps its own dtype
    (only a model loaded by name, which nobody else holds, is cast in place)."""
    net = _Net()
    s = ParallelSampler(net, schedule=VESchedule(), prediction="eps", dtype=torch.float64, steps=2, progress=False)
    assert next(net.parameters()).dtype == torch.float32
    assert s.denoiser.network is not net and next(s.denoiser.network.parameters()).dtype == torch.float64


def test_a_backend_the_caller_made_is_not_closed_when_binding_fails():
    """A bind that fails (max_batch=1 under classifier-free guidance) closes a backend the sampler made, never one
    the caller passed in and still holds."""
    backend = make_backend("local", max_batch=1)
    closed = []
    backend.close = lambda: closed.append(True)
    guided = Denoiser(_raw, VESchedule(), "eps", guidance=3.0, uncond_fn=lambda c: c)
    with pytest.raises(ValueError, match="^max_batch:"):
        ParallelSampler(guided, steps=2, backend=backend, progress=False)
    assert closed == []


def test_noise_s_holds_the_noise_alone_and_plan_s_the_planning(monkeypatch):
    """``extra["plan_s"]`` is the planning's time, ``extra["noise_s"]`` the noise's alone (without the planning the
    noise draw waited on), and ``wall_s`` holds the noise: a plan held up 1 s and a noise draw held up 0.5 s show
    in plan_s and in noise_s and wall_s respectively."""
    import paratime.sampler as sampler_module

    s = ParallelSampler("gmm", steps=4, method="sequential", progress=False)
    plan, noise = s._plan, sampler_module.initial_noise

    def slow_plan(*a, **kw):
        time.sleep(1.0)
        return plan(*a, **kw)

    def slow_noise(*a, **kw):
        time.sleep(0.5)
        return noise(*a, **kw)

    monkeypatch.setattr(s, "_plan", slow_plan)
    monkeypatch.setattr(sampler_module, "initial_noise", slow_noise)
    st = s.sample(2, seed=0).stats
    assert st.extra["plan_s"] >= 1.0
    assert 0.5 <= st.extra["noise_s"] < 1.0 <= st.extra["plan_s"]
    assert st.wall_s >= st.extra["noise_s"]


@pytest.mark.parametrize("overhead, per_round", [(0.25, 0.26), (-1.0, 0.0)])
def test_predicted_seconds_add_the_runs_measured_overhead_to_each_call(monkeypatch, overhead, per_round):
    """With a measured curve and the method given, each round's predicted seconds are its call's ``c(rows)`` plus
    the run's measured work outside the network (never below 0): sequential ddim makes one call of B rows a step."""
    from paratime.cost import CostCurve

    s = ParallelSampler("gmm", steps=4, method="sequential", cost="measure", progress=False)
    monkeypatch.setattr(ParallelSampler, "_cost_curve", lambda self, shape, cond: CostCurve((1, 64), (0.01, 0.01),
                                                                                            "measured"))
    monkeypatch.setattr(s, "overheads", lambda *a, **k: {"run": overhead})
    st = s.sample(2, seed=0).stats
    assert st.round_predicted_s == pytest.approx([per_round] * 4, abs=1e-12)
    assert st.predicted_wall_s == pytest.approx(4 * per_round, abs=1e-12) and st.sce == 4.0


@pytest.mark.parametrize("options", [dict(tol_units="data"), dict(data_scale=2.0)])
def test_parareal_is_no_candidate_for_a_tol_in_data_units(options):
    """Parareal reads ``tol`` in noise-level units: the planner does not consider it for a tolerance given in data
    units (without one, it does)."""
    def planned(**kw):
        s = ParallelSampler("gmm", steps=12, method="auto", cost="latency", progress=False, **kw)
        return set(s.sample(2, seed=0).stats.plan["candidates"])

    assert any(label.startswith("parareal") for label in planned())
    assert not any(label.startswith("parareal") for label in planned(**options))


def test_a_stochastic_solver_is_planned_with_the_stochastic_parareal_iterations():
    """The planner prices Parareal with more iterations for a solver that draws noise each step: the sampler's plan
    for ddpm is the planner's with ``stochastic=True`` (76 sequential call equivalents deterministic, 123 here)."""
    from paratime.cost import make_cost
    from paratime.planner import plan_sampling

    s = ParallelSampler("gmm", solver="ddpm", steps=100, method="auto", cost="latency", progress=False)
    got = s.sample(2, seed=0).stats.plan["candidates"]["parareal"]
    want = [plan_sampling(make_cost("latency"), 100, 2, 1, s.config.tol_in_force, last_evals=1,
                          stochastic=stochastic).candidates["parareal"] for stochastic in (True, False)]
    assert got == want[0] != want[1]


def test_a_plans_measured_overhead_is_in_its_predicted_seconds(monkeypatch):
    """With ``method="auto"`` and a measured curve, each call's predicted seconds are ``c(rows)`` plus the chosen
    plan's measured work outside the network: on a flat curve, calls x (c + overhead)."""
    from paratime.cost import CostCurve

    s = ParallelSampler("gmm", steps=12, method="auto", cost="measure", progress=False)
    monkeypatch.setattr(ParallelSampler, "_cost_curve", lambda self, shape, cond: CostCurve((1, 64), (0.01, 0.01),
                                                                                            "measured"))
    monkeypatch.setattr(s, "overheads", lambda shape, cond, curve, plans, limit=None: {p[0]: 0.25 for p in plans})
    st = s.sample(2, seed=0).stats
    assert st.plan["overhead_s"] == 0.25
    assert st.predicted_wall_s == pytest.approx(st.rounds * 0.26, abs=1e-12)


@pytest.mark.parametrize("max_batch, overhead", [(None, 0.485), (1, 0.48)])
def test_overhead_is_the_median_gap_beyond_the_curve_after_the_first_call(monkeypatch, max_batch, overhead):
    """``overheads``: each timed call's gap to the next less the curve's time for its rows, the median over the calls
    after the first (the first pays for the run's start): gaps of 5, 0.3, 0.5 and 0.9 s over calls of 2 rows, at
    c(2) = 0.015 s give 0.485; with at most 1 row a call (the backend's ``max_batch``) a call is 2 c(1) = 0.02 s."""
    import paratime.sampler as sampler_module
    from paratime.cost import CostCurve

    monkeypatch.setattr(sampler_module, "call_gaps", lambda run, device: [(5.0, 2), (0.3, 2), (0.5, 2), (0.9, 2)])
    s = ParallelSampler("gmm", steps=4, method="sequential", progress=False,
                        backend_options=None if max_batch is None else dict(max_batch=max_batch))
    curve = CostCurve((1, 2), (0.01, 0.015), "measured")
    assert s.overheads((2, 2), {}, curve, [("run", "sequential", None)]) == {"run": pytest.approx(overhead, abs=1e-12)}


def test_each_timed_candidate_keeps_its_own_overhead(monkeypatch):
    """The candidates timed keep their own work outside the network (only those left untimed get the largest):
    sequential timed at 0 s beside Picard windows at 1 s a call is planned with 0 s."""
    from paratime.cost import CostCurve

    s = ParallelSampler("gmm", steps=12, method="auto", cost="measure", progress=False)
    monkeypatch.setattr(ParallelSampler, "_cost_curve", lambda self, shape, cond: CostCurve((1, 64), (0.01, 0.01),
                                                                                            "measured"))
    monkeypatch.setattr(s, "overheads", lambda shape, cond, curve, plans, limit=None:
                        {p[0]: 0.0 if p[1] == "sequential" else 1.0 for p in plans})
    plan = s.sample(2, seed=0).stats.plan
    assert plan["method"] == "sequential" and plan["overhead_s"] == 0.0


def test_sequential_sampling_is_always_timed_as_the_baseline(monkeypatch):
    """Sequential sampling, the plan's baseline, is timed for its work outside the network even when its network time
    alone is far behind the best (50 calls against Picard W=50's few on a flat curve)."""
    from paratime.cost import CostCurve

    s = ParallelSampler("gmm", steps=50, method="auto", cost="measure", progress=False)
    monkeypatch.setattr(ParallelSampler, "_cost_curve", lambda self, shape, cond: CostCurve((1, 64), (0.01, 0.01),
                                                                                            "measured"))
    timed = []
    monkeypatch.setattr(s, "overheads", lambda shape, cond, curve, plans, limit=None:
                        timed.extend(p[1] for p in plans) or {p[0]: 0.0 for p in plans})
    plan = s.sample(2, seed=0).stats.plan
    assert plan["candidates"]["sequential"] > 2 * min(plan["candidates"].values())      # far behind the best
    assert "sequential" in timed


def test_a_guided_models_candidates_are_fitted_at_twice_the_rows(monkeypatch):
    """Under classifier-free guidance each row runs twice: the candidates that fit the device are those whose guided
    memory bound fits (with memory just short of a guided window of 32, the planner picks 16, not 32, whose unguided
    bound would fit and whose run's own check then fails)."""
    import paratime.backends.memory as memory

    guided = Denoiser(_raw, VESchedule(), "eps", guidance=3.0, uncond_fn=lambda c: c)
    s = ParallelSampler(guided, steps=50, cost="latency", progress=False)
    need = {w: s._candidate("picard", w).check_memory((64, 2), s.device, s.state_dtype, s.solver, guided=True)
            for w in (16, 32)}
    assert need[32] > s._candidate("picard", 32).check_memory((64, 2), s.device, s.state_dtype, s.solver, guided=False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need[32] - 1)
    assert s.sample((64, 2), seed=0).stats.plan["window"] == 16


def test_a_guided_run_that_fits_only_unguided_is_refused(monkeypatch):
    """The run's own memory check counts the guided rows too: Picard W=32 with memory just short of its guided bound
    (its unguided one fits) is refused before any work."""
    import paratime.backends.memory as memory

    guided = Denoiser(_raw, VESchedule(), "eps", guidance=3.0, uncond_fn=lambda c: c)
    s = ParallelSampler(guided, steps=50, method="picard", window=32, progress=False)
    need = s._candidate("picard", 32).check_memory((64, 2), s.device, s.state_dtype, s.solver, guided=True)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    with pytest.raises(memory.DeviceMemoryError):
        s.sample((64, 2), seed=0)


def test_record_rounds_by_hand():
    """``record_rounds`` on 4 calls of 4, 4, 2 and 6 rows over K = 2 devices (2, 2, 1 and 3 rows each), marks after
    calls 2, 2 (a round without a call) and 3, the last call a round of its own, on c = (2, 3, 4, 5) s at 1..4 rows
    with 0.5 s outside the network a call: rounds of [2, 2], [1] and [3] device rows, SCE 6/2, 2/2, 4/2, wall 1.0,
    1.5 (from the last round with a call) and 1.5 s, predicted 2 x 3.5, 2.5 and 4.5 s. At most 2 rows a call, the
    last round's 3 rows run as 2 + 1: c(2) + c(1) = 5 s."""
    from paratime.cost import CostCurve, make_cost
    from paratime.results import SampleStats, record_rounds

    def record(curve, **kw):
        st = SampleStats("picard", "ddim", 4, "local", 2, None, 0.0)
        record_rounds(st, [4, 4, 2, 6], [(2, 1.0), (2, 1.5), (3, 2.5)], 4.0, curve, 2, **kw)
        return st

    table = CostCurve((1, 2, 3, 4), (2.0, 3.0, 4.0, 5.0), "table")
    st = record(table, overhead=0.5)
    assert st.round_device_rows == [4, 1, 3] and st.round_sce == [3.0, 1.0, 2.0] and st.sce == 6.0
    assert st.round_wall_s == [1.0, 1.5, 1.5]
    assert st.round_predicted_s == [7.0, 2.5, 4.5] and st.predicted_wall_s == 14.0
    assert st.cost == table.describe() and st.plan is None
    st = record(table, overhead=-2.5)                       # a call's predicted seconds never below 0
    assert st.round_predicted_s == [1.0, 0.0, 1.5]
    st = record(table, limit=2)
    assert st.round_sce == [3.0, 1.0, 2.5] and st.round_predicted_s == [6.0, 2.0, 5.0]
    st = record(make_cost("latency"))                       # not in seconds: no predicted seconds
    assert st.round_sce == [2.0, 1.0, 1.0] and st.round_predicted_s == [] and st.predicted_wall_s is None


def test_a_picard_sampler_plans_each_window_with_its_own_memory(monkeypatch):
    """``method="picard"`` with ``window="auto"``: each window the planner considers is fitted at its own width (with
    memory for a window of 16, it plans 16)."""
    import paratime.backends.memory as memory

    s = ParallelSampler("gmm", steps=50, method="picard", cost="latency", progress=False)
    fixed = ParallelSampler("gmm", steps=50, method="picard", window=16, progress=False)
    need = fixed.config.check_memory((64, 2), fixed.device, fixed.state_dtype, fixed.solver)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    assert s.sample(64, seed=0).stats.plan["window"] == 16


def test_a_generators_noise_tables_count_in_the_memory_bound(monkeypatch):
    """With ``generator=`` a stochastic solver's step noise is drawn up front as whole tables: the memory check counts
    them (memory just short of that bound refuses the call, and fits the seeded one, whose 50 x 1024 x 2 elements are
    drawn row by row)."""
    import paratime.backends.memory as memory

    s = ParallelSampler("gmm", solver="ddpm", steps=50, method="sequential", progress=False)
    need = {g: s.config.check_memory((1024, 2), s.device, s.state_dtype, s.solver, generator=g)
            for g in (None, torch.Generator())}
    with_tables = max(need.values())
    assert with_tables > need[None]
    monkeypatch.setattr(memory, "available_bytes", lambda device: with_tables - 1)
    with pytest.raises(memory.DeviceMemoryError):
        s.sample(1024, generator=torch.Generator().manual_seed(0))
    s.sample(1024, seed=0)


def test_round_progress_follows_the_slowest_sample_and_passes_each_round_on(monkeypatch):
    """The bar stands at the slowest sample's first unconverged point, shows the round and a finite residual, and the
    user's callback gets every round; off a terminal the closing line says where it stopped, and after an error no
    line is written."""
    from paratime.methods import RoundInfo
    from paratime.progress import RoundProgress

    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    seen = []
    first, second = RoundInfo(1, torch.tensor([3, 5]), 4, 0.5), RoundInfo(2, torch.tensor([8, 6]), 4, float("nan"))
    with RoundProgress(10, "rounds", show=True, callback=seen.append) as progress:
        progress(first)
        assert progress.bar.n == 3 and progress.bar.postfix == {"round": 1, "residual": "0.5"}
        progress(second)
        assert progress.bar.n == 6 and progress.bar.postfix == {"round": 2}       # no residual to show
    assert seen == [first, second]
    assert err.getvalue().startswith("rounds: 6/10 pt (60%), round=2, elapsed ") and err.getvalue().count("\n") == 1
    err.truncate(0)
    with pytest.raises(KeyboardInterrupt), RoundProgress(10, "rounds", show=True) as progress:
        progress(first)
        raise KeyboardInterrupt
    assert err.getvalue() == ""


def test_a_progress_line_over_no_work_has_no_percentage():
    """``LineProgress`` with a total of 0 (nothing to do) writes its line without a percentage (a division by 0)."""
    from paratime.progress import LineProgress

    out = io.StringIO()
    bar = LineProgress(0, "empty", "it", out, clock=lambda: 0.0)
    bar.close()
    assert out.getvalue() == "empty: 0/0 it, elapsed 0s\n"


def test_stats_to_dict_is_flat_and_json_text_cleans_tuples():
    """``SampleStats.to_dict`` lifts ``extra`` to the top level; ``json_text`` writes a non-finite number as null
    inside a tuple as well as a list."""
    import json

    from paratime.results import SampleStats, json_text

    d = SampleStats("sequential", "ddim", 4, "local", 1, None, 0.0, extra={"noise_s": 0.5}).to_dict()
    assert d["noise_s"] == 0.5 and "extra" not in d
    assert json.loads(json_text({"a": (1.0, float("nan")), "b": [float("inf")]})) == {"a": [1.0, None], "b": [None]}


def test_training_step_shows_the_mean_loss_every_few_steps():
    """``training_step`` advances the bar one step and, at the 0-based steps 0, every, 2 every, ... (as the training
    loops count them), shows the mean of the last ``every`` losses (of the 1st loss; of the 2nd to 4th)."""
    from paratime.progress import training_step

    class Bar:
        def __init__(self):
            self.n, self.shown = 0, []

        def set_postfix(self, **kw):
            self.shown.append((self.n + 1, kw["loss"]))

        def update(self, n):
            self.n += n

    bar, losses = Bar(), []
    for it in range(6):
        losses.append(float(it + 1))
        training_step(bar, losses, it, 3)
    assert bar.n == 6 and bar.shown == [(1, "1.0000"), (4, "3.0000")]
    training_step(None, losses, 3, 3)                     # no display: nothing to do


def test_a_non_finite_output_names_the_first_offending_sample_by_its_global_index():
    """A network that turns NaN below model time 500 (step 5 of 10) for samples 2 and 3 only: the error names step 5,
    its model time and sample 2 of the call, as its global index ``first_sample + 2``."""
    from paratime import NonFiniteOutputError
    from paratime.zoo import ring_gmm

    model = ring_gmm()

    def net(x, t, flag):
        out = model.network(x, t)
        return torch.where(((t < 500) & (flag > 0))[:, None], torch.full_like(out, float("nan")), out)

    s = ParallelSampler(net, steps=10, method="sequential", schedule=model.schedule, prediction="eps", progress=False)
    t5 = float(s.grid.model_times[5])
    with pytest.raises(NonFiniteOutputError, match=rf"^network output is not finite at step 5 \(sigma=.*, model time="
                       rf"{t5:.6g}\), sample 12$"):
        s.sample((4, 2), seed=0, first_sample=10, flag=torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_stats_per_sample_match_what_the_network_and_the_rounds_saw():
    """Picard with samples finishing at different rounds: per sample, the rows the network evaluated for it (counted
    through a per-sample conditioning) are ``nfe`` on average and ``nfe_total`` in all, and the round at which the
    callback first saw it done (``begin == N``) is its ``sample_rounds`` entry; the rounds reported are
    ``iterations`` and the tolerance in force is ``tol``."""
    from paratime.zoo import ring_gmm

    model, B, N = ring_gmm(), 8, 100
    counts = torch.zeros(B, dtype=torch.long)

    def net(x, t, idx):
        counts.index_add_(0, idx.long(), torch.ones(len(idx), dtype=torch.long))
        return model.network(x, t)

    infos = []
    s = ParallelSampler(net, steps=N, method="picard", window=20, tol=0.1, schedule=model.schedule, prediction="eps",
                        progress=False)
    st = s.sample((B, 2), seed=0, idx=torch.arange(B, dtype=torch.float64), callback=infos.append).stats
    done = [next(r for r, info in enumerate(infos, start=1) if int(info.begin[i]) == N) for i in range(B)]
    assert len(set(done)) > 1                                # samples finish at different rounds
    assert st.sample_rounds == done and st.iterations == len(infos)
    assert st.nfe_total == int(counts.sum()) and st.nfe == float(counts.sum()) / B
    assert st.tol == s.config.tol_in_force == 0.1 and st.converged == [True] * B and st.window == 20


def test_stats_count_heun_steps_as_iterations_and_report_the_default_tol():
    """Sequential Heun over 4 steps: 4 iterations, 7 network calls (the step to sigma = 0 makes one); Picard without
    ``tol=`` reports the default tolerance in force, not None."""
    st = ParallelSampler("gmm", solver="heun", steps=4, method="sequential", progress=False).sample(2, seed=0).stats
    assert st.iterations == 4 and st.rounds == 7
    s = ParallelSampler("gmm", steps=4, method="picard", progress=False)
    assert s.config.tol is None and s.sample(2, seed=0).stats.tol == s.config.tol_in_force > 0


def test_stats_fields_of_the_stopping_rule_and_the_backend():
    """Sequential sampling reports every sample converged; Picard's final-point rule reports its tolerance units and,
    per sample, whether it was rolled back (host booleans), the ParaDiGMS rule neither units nor scale; the
    backend's bytes moved are passed on."""
    seq = ParallelSampler("gmm", steps=4, method="sequential", progress=False)
    st = seq.sample(3, seed=0).stats
    assert st.converged == [True] * 3 and st.tol_units is None
    assert st.extra["comm_bytes"] == seq.backend.timings["comm_bytes"]
    st = ParallelSampler("gmm", steps=8, method="picard", stop="final", progress=False).sample(3, seed=0).stats
    assert st.tol_units == "data" and len(st.tol_abs) == 3
    assert isinstance(st.extra["rolled_back"], list) and all(isinstance(r, bool) for r in st.extra["rolled_back"])
    st = ParallelSampler("gmm", steps=8, method="picard", stop="paradigms", progress=False).sample(3, seed=0).stats
    assert st.tol_units is None and st.data_scale is None


def test_a_calls_progress_overrides_the_samplers(capsys):
    """``sample(progress=...)`` overrides the sampler's ``progress`` for that call, both ways."""
    ParallelSampler("gmm", steps=4, method="sequential", progress=True).sample(2, seed=0, progress=False)
    assert capsys.readouterr().err == ""
    ParallelSampler("gmm", steps=4, method="sequential", progress=False).sample(2, seed=0, progress=True)
    assert capsys.readouterr().err.startswith("sequential/ddim: 4/4 pt (100%)")


def test_decode_feeds_a_module_decoder_its_own_dtype():
    """A decoder module with float32 weights decodes the float64 latents of a CPU sampler cast to float32."""
    decoder = torch.nn.Linear(2, 2)
    s = ParallelSampler("gmm", steps=4, method="sequential", decoder=decoder, progress=False)
    latents = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(s.decode(latents, batch=2), decoder(latents.float()))


def test_the_backend_forgets_a_calls_conditioning_when_it_ends():
    """``sample`` places the conditioning on the backend for its run and releases it at the end (a backend held on
    to the last call's tensors)."""
    def net(x, t, flag):
        return torch.zeros_like(x)

    s = ParallelSampler(net, steps=2, method="sequential", schedule=VESchedule(), prediction="eps", progress=False)
    s.sample((2, 2), seed=0, flag=torch.ones(2))
    assert s.backend._cond == {}


def test_cost_auto_off_cuda_plans_on_the_latency_curve():
    """``cost="auto"`` off CUDA takes the ``latency`` curve (c(r) = 1) without timing anything: sequential sampling
    of 12 steps is 12 sequential call equivalents at any batch."""
    st = ParallelSampler("gmm", steps=12, method="auto", progress=False).sample(8, seed=0).stats
    assert st.cost.startswith("latency") and st.plan["candidates"]["sequential"] == 12.0


@pytest.mark.parametrize("method", ["parareal", "parareal_pipelined"])
def test_a_users_coarse_propagators_calls_count_in_the_rounds(method):
    """``stats.rounds`` is the sequential depth in network calls: with ``coarse=`` (a user's propagator, e.g. a
    distilled model) it is the fine calls the network saw plus the coarse calls the propagator saw, both counted here
    where they are made."""
    from paratime.zoo import ring_gmm

    model, fine, coarse_seen = ring_gmm(), [], []

    def network(x, *args, _net=model.network, **kw):
        fine.append(1)
        return _net(x, *args, **kw)

    def coarse(x, sigma_from, sigma_to):             # a plain DDIM jump with D = 0 (its quality does not matter)
        coarse_seen.append(1)
        return x * (sigma_to / sigma_from).reshape(-1, *([1] * (x.ndim - 1)))

    s = ParallelSampler(dataclasses.replace(model, network=network), solver="ddim", steps=16, method=method,
                        coarse=coarse, tol=1e-3, progress=False)
    res = s.sample(3, seed=0)
    assert coarse_seen and fine
    assert res.stats.rounds == len(fine) + len(coarse_seen)


# -- each rank alone (the planner's "sequential, 1 device") under torch.distributed: 2 gloo ranks ---------------------

ALONE_RANKS = '''
import dataclasses, os, sys, torch
sys.path.insert(0, {here!r})
from dist_helper import capped_gmm
from paratime import ParallelSampler
from paratime.backends.torch_dist import TorchDistributedBackend

torch.set_num_threads(1)
real, seen = ParallelSampler._outside_seconds, []


def timed(self, shape, cond, curve, method, window, alone, limit=None):
    # The real timing run, on the backend it names (counted), then the gather made dear: each rank alone is the plan.
    before = self.backend.calls
    real(self, shape, cond, curve, method, window, alone, limit)
    seen.append((alone, self.backend.calls - before))
    return 0.0 if alone else 1.0


ParallelSampler._outside_seconds = timed
with TorchDistributedBackend(timeout_s=60, max_batch=2) as be:
    s = ParallelSampler(capped_gmm(2), steps=8, method="auto", cost="measure", progress=False, backend=be)
    first = s.sample(4, seed=1)
    other = dataclasses.replace(s.denoiser, network=lambda x, t, _net=s.denoiser.network: 0.5 * _net(x, t))
    be.bind(other)                              # the backend re-bound: its next call evaluates the new denoiser
    again = s.sample(4, seed=1)
    if be.rank == 0:
        torch.save(dict(seen=seen, plan=first.stats.plan, rows=first.stats.round_device_rows, first=first.samples,
                        again=again.samples, again_plan=again.stats.plan, calls=be.calls), "rank0.pt")
'''


def test_each_rank_alone_samples_the_whole_batch_on_its_own_backend(tmp_path):
    """Planned alone (2 gloo ranks, ``max_batch=2`` behind a network that refuses wider calls), each rank samples
    the batch of 4 by itself: its timing run and its sample make no call through the distributed backend, the run
    equals one process's sequential run with ``max_batch=2`` (samples, and 4 rows per device each round: one device,
    not 2), and after the backend is re-bound to another denoiser the next sample evaluates that one."""
    script, out = tmp_path / "rank.py", tmp_path / "rank0.pt"
    script.write_text(ALONE_RANKS.format(here=str(Path(__file__).parent)))
    logs = run_ranks(script, timeout=120, cwd=tmp_path)
    assert out.exists(), logs
    got = torch.load(out)
    assert got["plan"]["alone"] and got["plan"]["method"] == "sequential" and got["again_plan"]["alone"], got["plan"]
    alone = [calls for is_alone, calls in got["seen"] if is_alone]
    assert alone == [0] and all(calls > 0 for is_alone, calls in got["seen"] if not is_alone), got["seen"]
    assert got["calls"] == sum(calls for _, calls in got["seen"])        # the samples: none through the backend
    den = capped_gmm(2)
    ref = ParallelSampler(den, steps=8, method="sequential", progress=False, backend_options={"max_batch": 2})
    r = ref.sample(4, seed=1)
    assert torch.equal(got["first"], r.samples)
    assert got["rows"] == r.stats.round_device_rows == [4] * 8
    other = dataclasses.replace(den, network=lambda x, t, _net=den.network: 0.5 * _net(x, t))
    ref2 = ParallelSampler(other, steps=8, method="sequential", progress=False, backend_options={"max_batch": 2})
    want = ref2.sample(4, seed=1).samples
    assert not torch.equal(want, r.samples) and torch.equal(got["again"], want)
