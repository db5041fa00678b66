"""Behaviour of the staggered cores (paratime/methods/staggered.py) that mutation testing found unpinned: every
sample a core produces (not only the returned one) against CHORDS's port, a sample's iterates, tick rows and reported
changes being independent of its batch, the per-sample tolerance in the returned sample's own units, the stop rule's
bound tol / 4 at its boundary, the tolerance in force when no comparison ran, and the reported change of a tick whose
samples were all done before its last sample; and pipelined Parareal's frontier test, which only a start right after
the accepted frontier may pass (paratime/methods/parareal.py)."""

import math

import pytest
import torch

from paratime.methods import sample_staggered
from paratime.methods.common import Problem
from paratime.methods.staggered import _Hierarchy, _SampleStop

from test_picard_syncs import _problem       # tests/ is on sys.path

F64 = torch.float64


def _with_rounds(problem: Problem) -> tuple[Problem, list]:
    infos: list = []
    return Problem(**{**problem.__dict__, "on_round": infos.append}), infos


# -- the hierarchy against CHORDS's port -----------------------------------------------------------------------------
@pytest.mark.parametrize("starts", [(0, 5, 6, 15), (0, 2, 4, 8, 10, 12, 14, 16), (0, 1, 2, 3), (0, 10, 19)])
def test_every_sample_of_the_hierarchy_is_the_chords_ports(starts):
    """Run to the end (every core finished), the cores produce the samples CHORDS's port produces
    (benchmarks/chords_ref.py, with the solver's jump as F and G: a one-step DDIM jump is the DDIM step): the
    coarse shoot to N from the last core's first point and each core's sample, through its Parareal corrections,
    at the same ticks and with the same values (the returned sample at a tolerance is one of them)."""
    from benchmarks.chords_ref import run_chords

    N, B = 20, 3
    x_T, problem, _ = _problem("ddim", N, batch=B)
    b = torch.arange(B)

    def jump(x, d, t, s):
        return problem.solver.jump(x, d, torch.full((B,), t), torch.full((B,), s), b, None, problem.sigmas)

    def score(points):
        return [problem.evaluate(x, torch.full((B,), t), b) for t, x in points]

    hierarchy, ours, tick = _Hierarchy(problem, x_T, starts), [], 0
    while hierarchy.live:
        tick += 1
        ours += [(tick, core, x) for core, x in hierarchy.tick(hierarchy.ar_b, B)]
    ref = run_chords(N, x_T, score, starts, jump, criterion="core_index", index=10 ** 6)   # no stop: every core
    theirs = [(h.tick, -1 if h.k == 0 else starts.index(N - h.k), h.x) for h in ref.hits]
    ours, theirs = sorted(ours, key=lambda h: h[:2]), sorted(theirs, key=lambda h: h[:2])
    assert [h[:2] for h in ours] == [h[:2] for h in theirs] and len(ours) == len(starts) + 1
    for (t, core, x), (_, _, y) in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12, msg=lambda m: f"core {core} at tick {t}: {m}")


# -- a sample's iterates do not depend on its batch --------------------------------------------------------------------
@pytest.mark.parametrize("solver, tol_scale", [("ddim", 1.0), ("dpmpp_2m", None)])
def test_a_samples_staggered_run_does_not_depend_on_its_batch(solver, tol_scale):
    """Samples leave the ticks when they are returned (8 cores on 20 steps, tol 0.2: samples returned at different
    ticks), so later ticks evaluate the open samples' rows only. Each sample's result, tick, core and tolerance are
    those of the same sample run alone; each tick's rows are the open samples' rows of their own runs (the live cores
    are data-independent); each tick's reported change is the largest of the open samples' own (nan if none)."""
    x_T, problem, _ = _problem(solver, 20, batch=6)
    problem, infos = _with_rounds(problem)
    out = sample_staggered(x_T, problem, 8, 0.2, tol_scale=tol_scale)
    assert len(set(out.sample_rounds.tolist())) > 1, out.sample_rounds    # the test needs samples leaving early
    rows = [0] * out.rounds
    changes = [[] for _ in range(out.rounds)]
    for s in range(6):
        alone_problem, alone_infos = _with_rounds(problem)
        alone = sample_staggered(x_T[s:s + 1], alone_problem, 8, 0.2, tol_scale=tol_scale)
        torch.testing.assert_close(out.x[s], alone.x[0], rtol=0, atol=1e-12)
        assert int(out.sample_rounds[s]) == int(alone.sample_rounds[0]) == alone.rounds
        assert out.extra["sample_core"][s] == alone.extra["sample_core"][0]
        assert out.extra["tol_abs"][s] == pytest.approx(alone.extra["tol_abs"][0], rel=1e-12)
        for t, info in enumerate(alone_infos):
            rows[t] += info.rows
            changes[t].append(info.final_change)
    assert out.extra["tick_rows"] == [info.rows for info in infos] == rows
    for t, info in enumerate(infos):
        finite = [c for c in changes[t] if not math.isnan(c)]
        expected = max(finite) if finite else float("nan")
        assert info.final_change == pytest.approx(expected, rel=1e-12, nan_ok=True), t


def test_each_samples_own_scale_is_its_returned_sample():
    """``tol_scale=None``: a sample's tolerance is relative to its own returned sample, ``tol_abs[b] = tol *
    max|x_b|`` and ``data_scale[b] = max|x_b|``, also for samples returned before others (later samples do not
    change a returned sample's tolerance) and not the max-abs of the sample before it."""
    x_T, problem, _ = _problem("ddim", 20, batch=6)
    out = sample_staggered(x_T, problem, 8, 0.1, tol_scale=None)
    assert len(set(out.sample_rounds.tolist())) > 1, out.sample_rounds
    own = out.x.abs().flatten(1).amax(1)
    assert out.extra["tol_abs"] == pytest.approx((0.1 * own).tolist(), rel=1e-12)
    assert out.extra["data_scale"] == pytest.approx(own.tolist(), rel=1e-12)


# -- the stop rule -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("move, done", [(0.25, True), (0.3, False)])
def test_a_quiet_sample_moves_by_at_most_a_quarter_of_tol(move, done):
    """The documented rule: a sample is returned when its last two samples each moved by <= tol / 4 (tol 1,
    ``tol_scale`` 2: tol / 4 = 0.5 in the samples' units). Moves of exactly tol / 4 are quiet (binary fractions,
    so no rounding), moves of 0.3 tol are not."""
    x = torch.zeros(2, 3, dtype=F64)
    stop = _SampleStop(x, 1.0, 2.0)
    y = torch.full_like(x, 5.0)
    stop.take([(3, y.clone())])                     # the first sample has nothing to compare with
    for core in (2, 1):
        y = y + move * 2.0
        stop.take([(core, y.clone())])
    assert stop.done.tolist() == [done, done]
    assert stop.read()[0] == [done, done]


@pytest.mark.parametrize("cores, starts", [(1, None), (2, (0, 18))])
def test_the_tolerance_in_force_when_core_zero_returns_before_a_comparison(cores, starts):
    """One core, or two whose samples (the shoot and core 1's) are never two quiet ones: core 0 returns every sample,
    the tolerance in force is still ``tol * tol_scale`` (``tol_abs``) and the data scale ``tol_scale``; with each
    sample's own scale (``tol_scale=None``), its returned sample's max-abs (it read 1.0, the absolute unit)."""
    x_T, problem, _ = _problem("ddim", 20, batch=3)
    out = sample_staggered(x_T, problem, cores, 1e-9, starts, tol_scale=2.0)
    assert out.extra["sample_core"] == [0] * 3
    assert out.extra["tol_abs"] == pytest.approx([2e-9] * 3, rel=1e-12)
    assert out.extra["data_scale"] == pytest.approx([2.0] * 3, rel=1e-12)
    own = sample_staggered(x_T, problem, cores, 1e-9, starts, tol_scale=None)
    scale = own.x.abs().flatten(1).amax(1).tolist()
    assert own.extra["sample_core"] == [0] * 3 and min(abs(s - 1) for s in scale) > 0.1
    assert own.extra["data_scale"] == pytest.approx(scale, rel=1e-12)
    assert own.extra["tol_abs"] == pytest.approx([1e-9 * s for s in scale], rel=1e-12)


def test_a_ticks_change_is_the_largest_over_the_samples_that_found_one_open(monkeypatch):
    """Starts 0-4-5-6 on 10 steps: the shoot at tick 4, then cores 3, 2 and 1 all reach N at tick 7. A tolerance
    every sample meets returns core 2's sample (two quiet samples after the shoot); core 1's, later in the tick, finds
    no open sample. The tick's reported change is the largest over the samples that found one open, each against
    the sample before it (cores 3's and 2's: it was nan, core 1's none), never -inf."""
    hits_seen = []
    take = _SampleStop.take

    def record(self, hits):
        hits_seen.extend(h.clone() for _, h in hits)
        return take(self, hits)

    monkeypatch.setattr(_SampleStop, "take", record)
    x_T, problem, _ = _problem("ddim", 10, batch=2)
    problem, infos = _with_rounds(problem)
    out = sample_staggered(x_T, problem, 4, 1e9, (0, 4, 5, 6))
    assert out.extra["hit_ticks"] == [(-1, 4), (3, 7), (2, 7), (1, 7)]
    assert out.extra["sample_core"] == [2, 2] and out.rounds == 7
    shoot, core3, core2, _ = hits_seen
    want = max(float((core3 - shoot).abs().max()), float((core2 - core3).abs().max()))
    assert infos[-1].final_change == pytest.approx(want, rel=1e-12) and want > 0
    assert math.isnan(infos[3].final_change)                           # the shoot: nothing before it to compare
    assert all(math.isnan(i.final_change) or i.final_change >= 0 for i in infos)


@pytest.mark.parametrize("solver", ["heun", "ddim"])
def test_a_core_starts_from_a_jump_off_the_point_before_its_first_step(solver):
    """Core 1 starts at ``starts[1]`` from G(x_T, D(x_T), 0 -> starts[1]), the jump off core 0's first point (not
    off its fine step, which for Heun is not on the constant-D path), and the coarse shoot is G from core 1's first
    point to N: with starts 0-7 the shoot is two jumps from x_T, computed here from the solver's jump directly."""
    N, B, s = 20, 3, 7
    x_T, problem, _ = _problem(solver, N, batch=B)
    b = torch.arange(B)

    def jump(x, t, to):
        d = problem.evaluate(x, torch.full((B,), t), b)
        return problem.solver.jump(x, d, torch.full((B,), t), torch.full((B,), to), b, None, problem.sigmas)

    hierarchy = _Hierarchy(problem, x_T, (0, s))
    hits = hierarchy.tick(hierarchy.ar_b, B) + hierarchy.tick(hierarchy.ar_b, B)    # the shoot at tick 2
    assert [core for core, _ in hits] == [-1]
    torch.testing.assert_close(hits[0][1], jump(jump(x_T, 0, s), s, N), rtol=0, atol=1e-12)


# -- pipelined Parareal: only the start after the accepted frontier is tested ------------------------------------------
def test_pipelined_parareal_tests_only_the_start_after_the_frontier():
    """A start whose iterates settle while its predecessor is not final is not accepted. The fine map is the identity
    (D(x) = x: every DDIM step keeps x, so the sequential sample is x_T); a user coarse predictor is exact on slice 0
    and gives 0 on the others. Iteration 1 makes start 1 exact (x_T) but start 3 is F(u[2][0]) = 0 = u[3][0]: unmoved,
    wrong, and two starts past the frontier; the frontier test at start 2 (u[2][1] = x_T against 0) fails, so the
    fine solves carry the frontier through every slice and the sample is the sequential one."""
    from paratime.methods import sample_sequential
    from paratime.methods.parareal import sample_parareal_pipelined
    from paratime.solvers import make_solver

    N, B = 12, 2
    sig = torch.linspace(20.0, 0.5, N + 1, dtype=F64)
    x = torch.randn(B, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 20
    ones = torch.ones_like(sig)
    problem, infos = _with_rounds(Problem(sig, ones, ones, make_solver("ddim"), lambda xr, i, b: xr.clone()))

    def coarse(u, s_from, s_to):                  # exact on slice 0 (the identity), a constant 0 on the others
        return u.clone() if bool((s_from == sig[0]).all()) else torch.zeros_like(u)

    seq = sample_sequential(x, problem).x
    torch.testing.assert_close(seq, x, rtol=0, atol=0)
    infos.clear()                                 # the sequential sampler's rounds
    out = sample_parareal_pipelined(x, problem, slices=4, tol=1e-3, coarse=coarse)
    torch.testing.assert_close(out.x, seq, rtol=0, atol=1e-12)
    frontier = [int(i.begin[0]) for i in infos]
    assert frontier == sorted(frontier) and set(frontier) == {0, 3, 6, 9, 12}   # one slice at a time


def test_own_scale_at_a_tolerance_reads_once_after_the_last_tick():
    """``tol_scale=None`` with tol > 0: the returned samples' scales are already in ``tol_abs`` (read with the stop
    flags), so after the last tick the run reads once (``tol_abs``), not again for the own max-abs (tol 0 only)."""
    from test_picard_syncs import SyncCounter

    x_T, problem, _ = _problem("ddim", 20, batch=3)
    counter, after = SyncCounter(), []

    def on_round(info):
        after.append(counter.count)

    with counter:
        sample_staggered(x_T, Problem(**{**problem.__dict__, "on_round": on_round}), 4, 0.1, tol_scale=None)
        end = counter.count
    assert end == after[-1] + 1, counter.names[after[-1]:]    # tol_abs: the one read after the loop


def test_a_done_samples_reported_begin_is_n_and_an_open_ones_core_zeros_point():
    """RoundInfo.begin: a sample once done reports N (its first unconverged point), an open one the point core 0 (the
    sequential solver) has reached, the tick itself; the run here ends before core 0 reaches N."""
    N = 10
    x_T, problem, _ = _problem("ddim", N, batch=2)
    problem, infos = _with_rounds(problem)
    out = sample_staggered(x_T, problem, 4, 1e9, (0, 4, 5, 6))
    assert out.rounds < N and [i.round for i in infos] == list(range(1, out.rounds + 1))
    for info in infos:
        done = [int(r) <= info.round for r in out.sample_rounds]
        assert info.begin.tolist() == [N if d else info.round for d in done], info
    assert infos[-1].begin.tolist() == [N, N]
