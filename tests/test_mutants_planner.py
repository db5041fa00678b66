"""Exact answers for the planner, the cost curve and the memory bound, each worked out by hand in its comments: the
windows compared, the rounds model's rows on small grids and on the module docstring's table, the predicted SCE of
every candidate on a synthetic curve, the curve's interpolation and chunk prices, the measured curve's median and
running maximum on a fake clock, the cache's key, and the bytes a request holds counted tensor by tensor."""

import weakref

import pytest
import torch

import paratime.cost as cost_module
from paratime.backends import memory
from paratime.cost import CostCurve, chunk_rows, chunked_cost, make_cost, measure_cost, measure_rows, round_cost
from paratime.planner import (ALONE, candidates, picard_rows, plan_sampling, predict_parareal, predict_picard,
                              predict_sequential, rounds_cap, window_candidates)

TOL = 2e-3
COMPUTE = CostCurve((1, 2), (1.0, 2.0), "compute")       # c(r) = r
LATENCY = CostCurve((1, 2), (1.0, 1.0), "latency")       # c(r) = 1


def test_windows_are_k_times_powers_of_two_below_the_cap_then_the_cap():
    # rounds_cap = min(N, max(100, N // 2)): 150 -> 100, 201 -> 100, 202 -> 101, 50 -> 50.
    assert [rounds_cap(n) for n in (50, 150, 201, 202, 1000)] == [50, 100, 100, 101, 500]
    assert window_candidates(50, 1) == [2, 4, 8, 16, 32, 50]          # at least 2: a window of 1 is sequential
    assert window_candidates(64, 4) == [4, 8, 16, 32, 64]             # the cap once, when a power reaches it
    assert window_candidates(250, 3) == [3, 6, 12, 24, 48, 96, 125]
    assert window_candidates(8, 16) == [8]
    # method="picard" compares Picard's windows only, whatever methods the caller lists.
    assert candidates(10, 2, "picard", methods=("sequential",)) == [
        (f"picard W={w}", "picard", w) for w in (2, 4, 8, 10)]


def test_small_sliding_and_whole_grid_rounds_by_hand():
    # N = 8, W = 4: the guess call (1 row); the start advances 1, 1, 1 (SLIDE_STALL rounds after the guess's), then
    # (W + 1) / 2 = 2.5: starts 1, 2, 3, 5.5, four full windows; 5.5 + 4 >= 8 holds the last point. The tail starts
    # at N - floor(5.5) = 3 points and shrinks by 0.65 while >= 1: 3, 1.95, 1.2675 -> rows 3, 2, 1.
    assert picard_rows(8, 4, TOL) == [1, 4, 4, 4, 4, 3, 2, 1]
    # N = 10, W = 10: no guess; STALL_ROUNDS rounds of 10, 9, 8, 7; then (10 - 4) * 0.9 = 5.4 shrinking by 0.65
    # while >= max(1, 0.1 * 10): 5.4, 3.51, 2.2815, 1.483 -> 5, 4, 2, 1.
    assert picard_rows(10, 10, TOL) == [10, 9, 8, 7, 5, 4, 2, 1]
    # tol 0: one point a round, the guess first for 1 < W < N; the whole grid narrows by one a round.
    assert picard_rows(5, 2, 0.0) == [1, 2, 2, 2, 2, 1]
    assert picard_rows(4, 4, 0.0) == [4, 3, 2, 1]
    # A window of one point: starts 1, 2, 3, 4 while it misses the last point, then the tail of exactly 1 point.
    assert picard_rows(5, 1, TOL) == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("steps, windows, rounds, rows", [
    (50, (2, 4, 8, 16, 32, 50), (36, 24, 18, 14, 13, 9), (70, 88, 115, 147, 216, 297)),
    (100, (2, 4, 8, 16, 32, 100), (69, 44, 29, 20, 16, 10), (136, 168, 203, 240, 312, 622)),
    (20, (2, 4, 8, 16, 20), (16, 12, 11, 11, 9), (30, 40, 60, 89, 110))])
def test_rounds_model_is_the_documented_table(steps, windows, rounds, rows):
    """The planner module's docstring states the modelled rounds and rows beside the measured ones (DDIM-50,
    DDIM-100, DPM++(2M)-20): the fitted constants and the model must give exactly those figures."""
    got = [picard_rows(steps, w, TOL) for w in windows]
    assert [len(r) for r in got] == list(rounds) and [sum(r) for r in got] == list(rows)


def test_every_candidate_is_predicted_at_its_hand_counted_calls():
    # Compute-bound, N = 4, B = 1, K = 2, tol 0: each call of M rows costs ceil(M / 2).
    plan = plan_sampling(COMPUTE, 4, 1, 2, 0.0)
    # sequential: 4 calls of 1 row: 4. Picard W=2: rows 1, 2, 2, 2, 1 -> 1 each: 5. W=4: 4, 3, 2, 1 -> 2+2+1+1 = 6.
    # Parareal: S = 2 slices of 2 steps; the coarse sweep 2 x c(1); iteration 1: both slices' two fine steps
    # (2 rows: 1 each) and a sweep of 2 calls; iteration 2: the last slice's 2 fine steps and 1 sweep call: 2+4+3.
    assert plan.candidates == pytest.approx({"sequential": 4, "picard W=2": 5, "picard W=4": 6, "parareal": 9})
    assert (plan.method, plan.window, plan.predicted_sce, plan.baseline_sce) == ("sequential", None, 4, 4)
    # Batch 3 on 2 devices, Heun (2 calls a step, the step to sigma = 0 one): sequential is 4 steps x 2 calls of
    # ceil(3 / 2) = 2 less the last step's second call: 7 calls x 2 = 14; on one device 7 x 3 = 21.
    heun = plan_sampling(COMPUTE, 4, 3, 2, 0.0, evals=2, last_evals=1)
    assert heun.sequential_sce == 14 and heun.baseline_sce == 21
    # Picard W=4 at tol 0: rounds 4, 3, 2, 1 rows a sample (the last holds the grid's last point each round), 2
    # calls each, the second without the last point's row: (4, 3), (3, 2), (2, 1), (1, 0) rows x 3 samples,
    # ceil(/ 2): 6+5, 5+3, 3+2, 2 = 26.
    assert heun.candidates["picard W=4"] == 26


def test_parareal_prices_the_slices_still_solving_and_never_below_zero():
    # N = 9: S = 3 slices of 3; tol 0 takes 3 iterations. Latency-bound (every call 1): the coarse sweep 3; then
    # iterations over 3, 2, 1 active slices: 3 fine calls and as many sweep calls as active slices: 3 + 6 + 5 + 4.
    assert predict_parareal(LATENCY, 9, 1, 1, 0.0) == 18
    # Above tol 0 the iterations are PARAREAL_ITERATIONS = 4, capped at S = 3: the same calls.
    assert predict_parareal(LATENCY, 9, 1, 1, TOL) == 18
    # Above tol 0 the accepted prefix grows evenly over the iterations: N = 25, S = 5 slices of 5, 4 iterations
    # solve the last ceil(5 (4 - k) / 4) = 5, 4, 3, 2 slices: 5 + (5 + 5) + (5 + 4) + (5 + 3) + (5 + 2).
    assert predict_parareal(LATENCY, 25, 1, 1, TOL) == 39
    # A stochastic solver's 7 iterations (PARAREAL_ITERATIONS_SDE), N = 64, S = 8 slices of 8: the last
    # ceil(8 (7 - k) / 7) = 8, 7, 6, 5, 4, 3, 2 slices: 8 + 7 x 8 + 35; a deterministic one's 4: 8 + 4 x 8 + 20.
    assert predict_parareal(LATENCY, 64, 1, 1, TOL, stochastic=True) == 99
    assert predict_parareal(LATENCY, 64, 1, 1, TOL) == 60
    # last_evals above evals is evals (as predict_sequential and predict_picard read it).
    assert predict_parareal(COMPUTE, 9, 2, 1, 0.0, evals=1, last_evals=2) == predict_parareal(COMPUTE, 9, 2, 1, 0.0)
    # A measured overhead below -c(1) prices each call at 0, never below (as predict_sequential and predict_picard).
    assert predict_parareal(LATENCY, 9, 1, 1, 0.0, overhead=-5.0) == 0.0
    assert predict_picard(LATENCY, 9, 3, 1, 1, 0.0, overhead=-5.0) == 0.0


def test_the_plan_reports_its_prediction_in_the_curves_units():
    # The same compute-bound shape in seconds (c(1) = 0.5 s): SCE unchanged, predicted_s = SCE x 0.5 s.
    seconds = CostCurve((1, 2), (0.5, 1.0), "table")
    plan = plan_sampling(seconds, 4, 1, 2, 0.0, overhead={"sequential": 0.25}, methods=("sequential",))
    # sequential: 4 calls of c(1) + 0.25 = 0.75 s -> 3 s = 6 SCE; overhead_s is the curve's unit, 0.25 s.
    assert (plan.predicted_sce, plan.predicted_s, plan.overhead_s) == (6, 3.0, 0.25)
    # One device alone: its baseline is the network's time alone without ALONE's own overhead: 4 SCE.
    assert plan.baseline_sce == 4


def test_sequential_is_never_skipped_and_float_ties_go_to_it():
    # skip names every candidate but sequential: it stays, its prediction the baseline (N = 4 calls of 1 row).
    every = [label for label, *_ in candidates(4, 2)]
    plan = plan_sampling(COMPUTE, 4, 1, 2, 0.0, skip=every)
    assert list(plan.candidates) == ["sequential"] and plan.method == "sequential" and plan.predicted_sce == 4
    # Sequential spread over 2 devices pays c(1) + 0.2 = 0.1 + 0.2 a call, each device alone c(2) = 0.3: equal up
    # to float rounding (0.1 + 0.2 > 0.3 in binary), a tie that goes to sequential, listed first.
    curve = CostCurve((1, 2), (0.1, 0.3))
    tie = plan_sampling(curve, 10, 2, 2, 0.0, alone=True, overhead={"sequential": 0.2, ALONE: 0.0},
                        methods=("sequential",))
    assert tie.candidates["sequential"] > tie.candidates[ALONE]                # 30.0 against 29.999999999999993
    assert tie.candidates["sequential"] == pytest.approx(tie.candidates[ALONE], rel=1e-12)
    assert tie.method == "sequential" and not tie.alone


def test_a_call_of_no_rows_is_not_priced_even_with_overhead():
    # Heun, N = 1, B = 1: the only step is the step to sigma = 0, its second call skipped: 1 call, not 2 of which
    # one is empty (an empty call would still pay the overhead).
    assert predict_sequential(LATENCY, 1, 1, 1, evals=2, overhead=1.0, last_evals=1) == 2.0


def test_cost_curve_interpolates_clamps_and_reads_zero_rows():
    c = CostCurve((1, 2, 4), (1.0, 3.0, 4.0))
    # Between points: c(3) = 3 + (4 - 3) (3 - 2) / (4 - 2); past the last along its slope: c(8) = 4 + 0.5 x 4.
    assert (c(1), c(2), c(3), c(4), c(8)) == (1.0, 3.0, 3.5, 4.0, 6.0)
    assert c(0) == 0.0 and c(-3) == 0.0
    assert CostCurve((1,), (2.0,))(7) == 2.0                          # one point: flat
    with pytest.raises(ValueError, match="row counts must increase"):
        CostCurve((1, 2, 2), (1.0, 2.0, 3.0))                        # a repeated row count: no slope between them
    # A falling table extrapolates below 0: a call never costs <= 0 (1e-12).
    assert CostCurve((1, 2), (2.0, 1.0))(10) == 1e-12


def test_chunks_and_buckets_are_priced_at_the_calls_run():
    c = CostCurve((1, 2, 4), (1.0, 1.5, 2.0))
    # 7 rows at most 3 a call: 3 + 3 + 1 -> 2 c(3) + c(1) = 2 x 1.75 + 1.
    assert chunked_cost(c, 7, 3) == 4.5
    assert chunked_cost(c, 6, 3) == 3.5                               # no remainder: no third call
    # buckets (1, 2, 4) with limit 3: chunks of the largest bucket at or under 3, 2: 2 + 2 + 2 + 1 -> 3 c(2) + c(1).
    assert chunk_rows(3, (1, 2, 4)) == 2 and chunked_cost(c, 7, 3, (1, 2, 4)) == 5.5
    # buckets (2, 4) with limit 4: 7 = 4 + 3, the 3 padded to 4: 2 c(4); limit None: chunks of the largest bucket.
    assert chunk_rows(4, (2, 4)) == 4 and chunked_cost(c, 7, 4, (2, 4)) == 4.0
    assert chunk_rows(None, (2, 4)) == 4 and chunked_cost(c, 7, None, (2, 4)) == 4.0
    # buckets (2, 4) with limit 1: no bucket fits, chunks of the smallest (2): 2 + 2 + 2 + 1 padded to 2 -> 4 c(2).
    assert chunk_rows(1, (2, 4)) == 2 and chunked_cost(c, 7, 1, (2, 4)) == 6.0
    # One chunk is padded too: 3 rows in (2, 4) run as 4 and cost c(4); exactly a bucket's rows, that bucket's.
    assert chunked_cost(c, 3, None, (2, 4)) == 2.0 and chunked_cost(c, 2, None, (2, 4)) == 1.5
    # Spread first: 7 rows on 2 devices is 4 a device, then chunked by 3: c(3) + c(1).
    assert round_cost(c, 7, 2, 3) == 2.75


def test_tables_and_callables_are_tabulated_as_given():
    assert make_cost({4: 2.0, 1: 1.0, 2: 1.5}).rows == (1, 2, 4)      # a dict in any key order
    f = lambda r: 1.0 + r
    assert make_cost(f, max_rows=100).rows == (1, 2, 4, 8, 16, 32, 64, 100)


def test_a_measured_curve_is_the_running_maximum_of_medians(monkeypatch):
    """A fake clock: each timed call of r rows advances it by the next of its durations, so the curve is exact."""
    durations = {1: [3.0, 1.0, 2.0], 2: [1.5, 1.5, 9.0], 4: [5.0, 4.0, 6.0]}
    clock, timed = [0.0], {r: iter(d) for r, d in durations.items()}
    state = {"warm": set(), "untimed": True}

    def call(r):
        if r not in state["warm"]:                # the warm-up call
            state["warm"].add(r)
            return
        if not state["untimed"]:                  # the timed call follows an untimed one of the same rows
            clock[0] += next(timed[r])
        state["untimed"] = not state["untimed"]

    monkeypatch.setattr(cost_module.time, "perf_counter", lambda: clock[0])
    curve = measure_rows(call, torch.device("cpu"), rows=(1, 2, 4), repeats=3)
    # medians 2, 1.5, 5; the running maximum: 2, 2, 5.
    assert curve.seconds == (2.0, 2.0, 5.0)


@pytest.mark.parametrize("field", ["device", "dtype", "shape", "rows", "variant"])
def test_the_measured_curve_is_cached_per_field(monkeypatch, field):
    calls = []
    monkeypatch.setattr(cost_module, "measure_rows",
                        lambda call, device, rows, repeats: calls.append(1) or CostCurve(rows, (1.0,) * len(rows)))
    monkeypatch.setattr(cost_module, "_CACHE", {})
    net = torch.nn.Identity()
    key = dict(device=torch.device("cpu"), dtype=torch.float32, shape=(3,), rows=(1, 2), variant=())
    other = {"device": torch.device("meta"), "dtype": torch.float16, "shape": (4,), "rows": (1, 2, 4),
             "variant": ("guided",)}[field]
    first = measure_cost(net, None, **key)
    assert measure_cost(net, None, **key) is first and len(calls) == 1
    measure_cost(net, None, **(key | {field: other}))
    assert len(calls) == 2


def test_a_cache_entry_is_served_only_to_the_network_it_holds(monkeypatch):
    """An entry under this network's id whose weak reference holds another network (a freed model's id reused) is
    not served."""
    monkeypatch.setattr(cost_module, "_CACHE", {})
    key = dict(device=torch.device("cpu"), dtype=None, shape=(2,), rows=(1, 2))
    other, net = torch.nn.Identity(), torch.nn.Identity()
    curve = CostCurve((1, 2), (1.0, 2.0))
    cost_module._CACHE[(id(net), "cpu", None, (2,), (1, 2), ())] = (weakref.ref(other), curve)
    assert cost_module.cached_cost(net, **key) is None
    cost_module._CACHE[(id(net), "cpu", None, (2,), (1, 2), ())] = (weakref.ref(net), curve)
    assert cost_module.cached_cost(net, **key) is curve


def _nbytes(*shapes, dtype):
    return sum(torch.empty(s, dtype=dtype, device="meta").nbytes for s in shapes)


@pytest.mark.parametrize("window", [3, 10, 25])
def test_request_bytes_are_the_tensors_a_picard_request_holds(window):
    B, sample, N, dtype = 2, (3, 4, 4), 10, torch.float64
    W = min(window, N)
    held = [(N + 1, B, *sample)] * 2                  # the trajectory and a history solver's D buffer
    noise = [(N, B, *sample)] * 3                     # three pre-drawn noise tables
    buffers = [(W, B, *sample)] * 5
    need = memory.request_bytes((B, *sample), N, dtype, noise_draws=3, window=window, buffers=5, point_buffers=1)
    assert need == _nbytes(*held, *noise, *buffers, dtype=dtype)


def test_request_bytes_of_a_method_without_a_trajectory():
    # 7 kept states, its largest call of 25 rows (not capped at N), one noise table and a jump's 1000 bytes.
    B, sample, N, dtype = 2, (3, 4), 10, torch.float32
    need = memory.request_bytes((B, *sample), N, dtype, noise_draws=1, window=25, buffers=4, held=7,
                                extra_bytes=1000)
    assert need == _nbytes(*[(B, *sample)] * 7, (N, B, *sample), *[(25, B, *sample)] * 4, dtype=dtype) + 1000


def test_max_batch_is_the_fraction_of_free_memory_over_bytes_per_row():
    assert memory.max_batch_for(999, 10) == 49                        # floor(0.5 x 999 / 10) = floor(49.95)
    assert memory.max_batch_for(999, 10, fraction=1.0) == 99
    assert memory.max_batch_for(10**12, 1) == memory.CUDA_MAX_BATCH
    assert memory.max_batch_for(10**12, 1, cap=7) == 7
    assert memory.max_batch_for(-5, 1) == 1


def test_bytes_per_row_and_the_derived_max_batch_from_the_allocators_counters(monkeypatch):
    """The CUDA allocator's counters faked: 1,000 bytes held before, a peak of 1,000 + 8 x 300 in the call."""
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 1000)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: 1000 + 8 * 300)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (60_000, 10**9))
    assert memory.measure_rows(lambda: "out", 8, "cuda") == ("out", 300.0)
    assert memory.default_max_batch("cuda", 300.0) == 100             # 0.5 x 60,000 / 300


def test_noise_tables_and_the_draw_and_jump_chunks():
    from paratime.noise import _CHUNK_PAIRS
    from paratime.solvers import PATH_CHUNK_ELEMENTS, LangevinCorrected, make_solver

    assert [memory.noise_draws(make_solver(n)) for n in ("ddim", "ddpm", "heun")] == [0, 1, 0]
    assert memory.noise_draws(LangevinCorrected(base=make_solver("ddpm"), corrector_steps=2)) == 3
    assert memory.noise_draws(LangevinCorrected(base=make_solver("ddim"), corrector_steps=2)) == 2
    assert memory.table_draw_bytes(100) == 32 * 100
    assert memory.table_draw_bytes(10 * _CHUNK_PAIRS) == 32 * 2 * _CHUNK_PAIRS
    # A jump holds span x rows elements, at most a chunk, but at least one step of the rows.
    assert memory.jump_bytes(10, 5) == 32 * 50
    assert memory.jump_bytes(10, 10 * PATH_CHUNK_ELEMENTS) == 32 * PATH_CHUNK_ELEMENTS
    assert memory.jump_bytes(2 * PATH_CHUNK_ELEMENTS, 3) == 32 * 2 * PATH_CHUNK_ELEMENTS


def test_footprints_of_the_methods_without_a_trajectory():
    """The counts stated in method_footprint's docstring, at N = 16 (S = 4 slices of 4 steps) and K = 3 cores."""
    from paratime.solvers import make_solver

    ddim, dpm = make_solver("ddim"), make_solver("dpmpp_2m")           # history depth 0 and 1
    F = memory.Footprint
    assert memory.method_footprint("sequential", 16, ddim, 3, None) == F(2, 1, 0, 0)
    assert memory.method_footprint("sequential", 16, dpm, 3, None) == F(3, 1, 0, 0)
    assert memory.method_footprint("parareal", 16, ddim, 3, None) == F(4 * 5, 4, 1, 4)
    assert memory.method_footprint("parareal", 16, dpm, 3, None) == F(4 * 5 + 2 * 4, 4, 1, 4)
    assert memory.method_footprint("parareal_pipelined", 16, ddim, 3, None) == F(3 * 4 + 2, 2 * 4 + 1, 4, 4)
    assert memory.method_footprint("staggered", 16, ddim, 3, None) == F(6 * 3 + 3, 3, 1, 16)
    assert memory.method_footprint("staggered", 16, dpm, 3, None) == F(7 * 3 + 3, 3, 1, 16)
    assert memory.guidance_buffers(make_solver("heun")) == 4
    # The module docstring's table of a Picard round's window buffers, by solver kind (rows) and update (columns).
    table = {"ddim": (14, 15, 23), "heun": (16, 17, 23), "dpmpp_2m": (22, 23, 29)}
    assert {n: tuple(memory.window_buffers(u, make_solver(n)) for u in ("picard", "secant", "anderson"))
            for n in table} == table
    assert [memory.solver_kind(make_solver(n)) for n in ("ddim", "heun", "dpmpp_2m")] == \
        ["one_call", "two_calls", "history"]


def test_parareal_is_a_candidate_from_four_steps():
    """``method="auto"`` prices Parareal from N = 4, where the default two slices hold two steps each; at N = 3 the
    slices are 2 and 1 (a one-step slice is its own coarse jump), and it is no candidate."""
    from paratime.methods.parareal import slice_bounds

    assert slice_bounds(3, None).diff().tolist() == [2, 1] and slice_bounds(4, None).diff().tolist() == [2, 2]
    assert "parareal" not in [label for label, _, _ in candidates(3, 2)]
    assert "parareal" in [label for label, _, _ in candidates(4, 2)]
