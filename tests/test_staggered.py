"""The staggered-cores method (CHORDS's hierarchy, issue 21): at tol 0 it is the sequential sample for every solver
(core 0 is the sequential solver, the others only change when a sample is returned); with a tolerance it returns a
sample before core 0 does, within the tolerance; one batched call per tick of at most K rows per sample and at most
one host read per tick; bad options name the argument."""

import pytest
import torch

from paratime import ParallelSampler
from paratime.methods import RoundInfo, sample_sequential, sample_staggered
from paratime.methods.staggered import default_starts
from paratime.solvers import SOLVERS

from test_picard_syncs import SyncCounter, _problem       # tests/ is on sys.path

#: (cores, starts) on a 20-step grid: one core (sequential), CHORDS's default schedule at 3 and 8 cores, a
#: hand-made one, and a core on every point
LAYOUTS = [(1, None), (3, None), (8, None), (4, (0, 5, 6, 15)), (20, None)]


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_at_tol_zero_equals_sequential(solver):
    x_T, problem, _ = _problem(solver, 20, batch=4)
    seq = sample_sequential(x_T, problem).x
    for cores, starts in LAYOUTS:
        out = sample_staggered(x_T, problem, cores, 0.0, starts)
        torch.testing.assert_close(out.x, seq, rtol=0, atol=1e-12, msg=lambda m: f"{cores, starts}: {m}")
        assert out.rounds == 20 and out.extra["sample_core"] == [0] * 4


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "heun"])
def test_tolerance_returns_before_core_zero_within_tol(solver):
    """At tol 6e-2 (absolute; each quiet sample must move by <= tol / 4) every sample is returned by a later core,
    before tick N, within tol of the sequential sample."""
    x_T, problem, _ = _problem(solver, 20, batch=6)
    seq = sample_sequential(x_T, problem).x
    out = sample_staggered(x_T, problem, 8, 6e-2)
    assert all(c > 0 for c in out.extra["sample_core"]) and int(out.sample_rounds.max()) < 20
    assert float((out.x - seq).abs().max()) <= 6e-2


def test_one_call_per_tick_of_the_live_cores_and_one_read():
    """Each tick evaluates every live core's point of every open sample in one call (<= K rows per sample), and
    reads the device at most once (after a tick that returned a sample)."""
    x_T, problem, calls = _problem("ddim", 20, batch=3)
    counter, per_tick, rows = SyncCounter(), [], []

    def on_round(info: RoundInfo):
        per_tick.append(counter.count)
        rows.append(info.rows)
        counter.count = 0

    calls["mode"] = counter
    problem = type(problem)(**{**problem.__dict__, "on_round": on_round})
    with counter:
        out = sample_staggered(x_T, problem, 4, 1e-3)
    assert len(calls["syncs"]) == out.rounds                         # one network call per tick
    assert max(per_tick) <= 1 and rows == out.extra["tick_rows"]
    assert max(rows) <= 4 * 3 and rows[0] == 3                         # core 0 alone on the first tick


def test_default_starts_are_chords_schedule():
    assert default_starts(8, 50) == (0, 2, 4, 8, 16, 24, 32, 40)       # CHORDS's published schedule
    for cores, steps in [(1, 5), (4, 50), (8, 10), (10, 10), (12, 100)]:
        s = default_starts(cores, steps)
        assert len(s) == cores and s[0] == 0 and all(a < b for a, b in zip(s, s[1:])) and s[-1] < steps


def test_sampler_runs_staggered_with_guidance_and_equals_sequential():
    y = torch.tensor([3, 7])
    kw = dict(steps=12, guidance=2.0, progress=False)
    seq = ParallelSampler("digits", method="sequential", **kw).sample(2, labels=y)
    par = ParallelSampler("digits", method="staggered", window=4, tol=0.0, **kw).sample(2, labels=y)
    torch.testing.assert_close(par.samples, seq.samples, rtol=0, atol=1e-5)
    assert par.stats.iterations == 12 and par.stats.extra["cores"] == 4


@pytest.mark.parametrize("kw, match", [
    (dict(cores=0), "cores: must be an integer in"), (dict(cores=21), "cores: must be an integer in"),
    (dict(cores=2.0), "cores: must be an integer in"),
    (dict(cores=3, starts=(1, 2, 3)), "starts: must be 3 strictly increasing"),
    (dict(cores=3, starts=(0, 2, 2)), "starts: must be 3 strictly increasing"),
    (dict(cores=3, starts=(0, 2)), "starts: must be 3 strictly increasing"),
    (dict(cores=2, starts=(0, 20)), "starts: must be 2 strictly increasing"),
    (dict(cores=2, tol=-1.0), "tol: must be a number >= 0"),
    (dict(cores=2, tol_scale=0.0), "tol_scale: must be a number > 0 or None"),
])
def test_bad_options_name_the_argument(kw, match):
    x_T, problem, _ = _problem("ddim", 20, batch=2)
    with pytest.raises(ValueError, match=match):
        sample_staggered(x_T, problem, **kw)


def test_default_window_is_one_core_per_device_and_at_least_two():
    """window="auto" (the default): CHORDS' rule, K = the backend's devices, at least 2 (one core is sequential)."""
    res = ParallelSampler("gmm", steps=10, method="staggered", progress=False).sample(2, seed=0)
    assert res.stats.window == 2 and res.stats.extra["cores"] == 2
    res = ParallelSampler("gmm", steps=10, method="staggered", backend="local", progress=False,
                          window=5).sample(2, seed=0)
    assert res.stats.window == 5 and res.stats.extra["cores"] == 5
    # More cores than steps: one per step, reported (the README's promise, as Picard's window).
    res = ParallelSampler("gmm", steps=10, method="staggered", window=30, progress=False).sample(2, seed=0)
    assert res.stats.window == 10 and res.stats.extra["cores"] == 10


@pytest.mark.parametrize("kw, name", [(dict(stop="paradigms"), "stop"), (dict(update="picard"), "update"),
                                      (dict(accept_tol=1e-3), "accept_tol"), (dict(init="x0"), "init"),
                                      (dict(fill="copy"), "fill"), (dict(shared_window=True), "shared_window"),
                                      (dict(max_rounds=3), "max_rounds"), (dict(slices=2), "slices")])
def test_picard_and_parareal_options_are_refused(kw, name):
    with pytest.raises(ValueError, match=f"^{name}: applies only to method="):
        ParallelSampler("gmm", steps=10, method="staggered", progress=False, **kw)


def test_same_hits_as_the_chords_port():
    """Against CHORDS's port (benchmarks/chords_ref.py, itself checked against the original) with the solver's
    jump as its F and G (a one-step DDIM jump is the DDIM step): every core finishes at the same tick, and the core
    returned at a loose tolerance (the second hit after the shoot) is the port's, through its Parareal
    corrections."""
    from benchmarks.chords_ref import run_chords

    x_T, problem, _ = _problem("ddim", 20, batch=3)
    b = torch.arange(3)

    def jump(x, d, t, s):
        return problem.solver.jump(x, d, torch.full((3,), t), torch.full((3,), s), b, None, problem.sigmas)

    def score(points):
        return [problem.evaluate(x, torch.full((3,), t), b) for t, x in points]

    for cores, starts in [(8, None), (2, (0, 5)), (4, (0, 5, 6, 15))]:
        ours = sample_staggered(x_T, problem, cores, 0.0, starts)
        starts = ours.extra["starts"]
        ref = run_chords(20, x_T, score, starts, jump, criterion="core_index", index=cores)
        # the port lists same-tick hits in core order, this method newest core first
        assert sorted(ours.extra["hit_ticks"]) == sorted((-1 if h.k == 0 and h is ref.hits[0] else
                                                          starts.index(20 - h.k), h.tick) for h in ref.hits)
    loose = sample_staggered(x_T, problem, 3, 1e9, (0, 5, 10))    # samples: shoot, core 2, core 1 (returned)
    ref = run_chords(20, x_T, score, (0, 5, 10), jump, criterion="core_index", index=3)
    assert loose.extra["sample_core"] == [1] * 3 and [h.k for h in ref.hits] == [0, 10, 15, 20]
    torch.testing.assert_close(loose.x, ref.hits[2].x, rtol=0, atol=1e-12)


def test_stats_at_tol_zero_give_each_samples_data_scale_as_picard_does():
    """``tol_units="data"`` at tol 0: the stats gave ``data_scale`` None per sample (Picard gives each sample's)."""
    kw = dict(steps=10, tol=0, progress=False)
    pic = ParallelSampler("gmm", window=4, **kw).sample(3, seed=0).stats
    stg = ParallelSampler("gmm", method="staggered", window=3, **kw).sample(3, seed=0).stats
    assert stg.tol_units == pic.tol_units == "data"
    assert stg.data_scale == pytest.approx(pic.data_scale, rel=1e-12) and all(v > 0 for v in stg.data_scale)
    absolute = ParallelSampler("gmm", method="staggered", window=3, tol_units="absolute", **kw).sample(3, seed=0)
    assert absolute.stats.data_scale == [1.0] * 3


def test_default_starts_are_valid_for_every_core_count():
    """Every cores in 1..steps gets starts the method accepts (strictly increasing from 0, below steps): the last
    start rounding up to steps must move down (mutation testing, stop 47)."""
    from paratime.methods.staggered import _check_starts, default_starts

    for steps in range(1, 60):
        for cores in range(1, steps + 1):
            assert _check_starts(default_starts(cores, steps), cores, steps)


# -- the stop rule's quiet samples in a row, and the most exact core of a tick (mutation testing, stop 47) -------

def test_staggered_stop_needs_quiet_samples_in_a_row_not_in_total():
    from paratime.methods.staggered import QUIET_HITS, QUIET_SCALE, _SampleStop

    assert QUIET_HITS == 2
    tol = 1.0
    quiet, loud = 0.5 * QUIET_SCALE * tol, 4 * QUIET_SCALE * tol
    x = torch.zeros(2, 3, dtype=torch.float64)
    stop = _SampleStop(x, tol, 1.0)
    y = torch.full_like(x, 7.0)
    # sample 1 of the batch moves quiet, loud, quiet, quiet; sample 0 quiet every time (the batch's own reference)
    moves = [(quiet, quiet), (loud, quiet), (quiet, quiet), (quiet, quiet)]
    done = []
    stop.take([(5, y.clone())])                      # the first sample has nothing to compare with
    for core, (m1, m0) in zip((4, 3, 2, 1), moves):
        y = y + torch.tensor([[m0], [m1]], dtype=torch.float64)
        stop.take([(core, y.clone())])
        done.append(stop.done.tolist())
    # sample 0: quiet twice in a row after its second comparison; sample 1: its loud move resets the count, so it
    # needs two more quiet ones (not one: two quiet in total are not two in a row)
    assert [d[0] for d in done] == [False, True, True, True]
    assert [d[1] for d in done] == [False, False, False, True]
    assert stop.core.tolist() == [3, 1]              # each sample kept the candidate it was done with



def test_staggered_same_tick_samples_keep_the_most_exact_core():
    """Starts 0-5-6 on 10 DDIM steps: cores 1 and 2 stand on the same point from tick 3 on and both reach N at tick 6.
    D depends on the step only, so the fine steps and a one-step coarse jump are exact maps with the same slope:
    core 1, corrected at tick 6 from core 0's exact point 5, ends on the sequential sample; core 2, corrected from
    core 1's uncorrected point 9, ends off it by core 1's coarse start error. With a tolerance every sample meets,
    the stop rule returns the second sample after the coarse shoot (tick 3): the last one of tick 6, core 1."""
    from paratime.methods import sample_sequential, sample_staggered
    from paratime.methods.common import Problem
    from paratime.solvers import make_solver

    N, B = 10, 3
    g = torch.Generator().manual_seed(0)
    sig = torch.linspace(20.0, 0.5, N + 1, dtype=torch.float64)
    x = torch.randn(B, 2, generator=g, dtype=torch.float64) * 20
    c = torch.randn(N, B, 2, generator=g, dtype=torch.float64) * 3       # D at step i of sample b: c[i, b]
    ones = torch.ones_like(sig)
    prob = Problem(sig, ones, ones, make_solver("ddim"), lambda xr, i, b: c[i, b])
    seq = sample_sequential(x, prob).x
    out = sample_staggered(x, prob, cores=3, starts=(0, 5, 6), tol=1e6)
    assert out.extra["hit_ticks"] == [(-1, 3), (2, 6), (1, 6)]           # later core first within a tick
    assert out.extra["sample_core"] == [1] * B
    assert out.rounds == 6
    torch.testing.assert_close(out.x, seq, rtol=0, atol=1e-9)            # core 1's sample: the sequential one
