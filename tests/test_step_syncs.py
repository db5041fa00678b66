"""Host syncs in the step maps, counted on CPU with the counter of tests/test_picard_syncs.py: the solvers that make a
second network call on some rows only (``heun``, ``plms``, the Langevin corrector) size it from the rows' host steps
and read nothing back; the DDPM coarse jump loops over a host bound (Parareal's iterations with it:
tests/test_gpu_grade.py). Each sync-free path gives the same bits and the
same network rows (NFE) as the device-read fallback, which is the code these paths replace."""


import pytest
import torch

from test_picard_syncs import SyncCounter       # tests/ is on sys.path (rootdir-relative test modules)

from paratime.methods import Problem, sample_picard, sample_sequential
from paratime.methods.parareal import coarse_jump, sample_parareal
from paratime.noise import INITIAL, draw_noise, step_noise
from paratime.solvers import LangevinCorrected, make_solver
from paratime.zoo import ring_gmm

N, B = 12, 3
#: Rows of one step map call: every kind of row at once (step 0, the middle, the step to sigma = 0), unsorted.
STEPS = [0, 5, N - 1, 1, N - 1, 0, N - 2, 3]
SAMPLES = [0, 1, 2, 2, 0, 1, 1, 0]


def _solver(name):
    if name.startswith("langevin+"):
        return LangevinCorrected(make_solver(name.split("+")[1]), snr=0.2, corrector_steps=2)
    return make_solver(name)


def _rig(name, steps=N, batch=B, end=0.0):
    """The mixture's exact denoiser on a grid ending at sigma = ``end``; ``calls`` records each call's (i, b)."""
    model = ring_gmm()
    grid = model.schedule.grid(steps, None)
    sig = grid.sigmas.to(torch.float64).clone()
    if end > 0:
        sig[-1] = end
    solver = _solver(name)
    noise = step_noise(solver, steps, (batch, 2), 0, None, 0, torch.float64, torch.device("cpu"))
    calls = []

    def evaluate(x, i, b):
        calls.append((i.clone(), b.clone()))
        return model(x, sig[i], grid.model_times[i])

    return solver, sig, noise, evaluate, calls


def _rows(solver, sig, noise, evaluate, steps=STEPS, samples=SAMPLES):
    """Inputs of one step map call over rows at ``steps`` of ``samples``."""
    g = torch.Generator().manual_seed(1)
    i, b = torch.tensor(steps), torch.tensor(samples)
    x = torch.randn(len(steps), 2, generator=g, dtype=torch.float64) * sig[i, None]
    den = evaluate(x, i, b)
    prev = None
    if solver.uses_history:
        prev = tuple(torch.randn(len(steps), 2, generator=g, dtype=torch.float64) for _ in range(solver.history_depth))
        prev = prev[0] if solver.history_depth == 1 else prev
    if isinstance(noise, tuple):
        z = tuple(None if n is None else n[i, b] for n in noise)
    else:
        z = None if noise is None else noise[i, b]
    return (x, i, b, den, prev, z, sig, evaluate)


def _same_calls(a, b):
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


@pytest.mark.parametrize("name", ["heun", "plms", "langevin+heun", "langevin+ddpm", "langevin+plms"])
@pytest.mark.parametrize("end", [0.0, 0.02])
def test_step_map_with_host_steps_reads_nothing(name, end):
    """0 syncs in a step map call given the rows' host steps (after the grid's one read of whether its last step
    reaches sigma = 0), with the same dx bits and the same network rows as the device-read fallback."""
    solver, sig, noise, evaluate, calls = _rig(name, end=end)
    args = _rows(solver, sig, noise, evaluate)
    calls.clear()
    ref = solver.increment(*args)                                  # fallback: rows found on the device
    ref_calls = list(calls)
    with SyncCounter() as first:
        calls.clear()
        got = solver.increment(*args, host_steps=STEPS)
    assert torch.equal(got, ref) and _same_calls(calls, ref_calls)
    with SyncCounter() as again:
        solver.increment(*args, host_steps=STEPS)
    assert again.count == 0, again.names
    # The first call may read, once per grid, whether the step into point N reaches sigma = 0 (PLMS never asks).
    assert first.count == (0 if name == "plms" else 1), first.names
    assert sum(len(i) for i, _ in ref_calls) > 0                # the rows did take second calls


@pytest.mark.parametrize("name, step, extra_rows", [
    ("heun", 3, B), ("heun", N - 1, 0), ("plms", 0, B), ("plms", 4, 0), ("langevin+heun", N - 1, 0)])
def test_rows_all_at_one_step_take_all_or_no_second_calls(name, step, extra_rows):
    """One host int for rows all at one step (the sequential sampler): the second call takes every row, without a
    gather, or none; bits and rows as the fallback."""
    solver, sig, noise, evaluate, calls = _rig(name)
    solver._takes_last_step(sig)                                    # the grid's one read, made up front
    args = _rows(solver, sig, noise, evaluate, [step] * B, list(range(B)))
    calls.clear()
    ref = solver.increment(*args)
    ref_calls = list(calls)
    calls.clear()
    with SyncCounter() as c:
        got = solver.increment(*args, host_steps=step)
    assert c.count == 0, c.names
    assert torch.equal(got, ref) and _same_calls(calls, ref_calls)
    assert sum(len(i) for i, _ in calls) == extra_rows * (2 if name.startswith("langevin") else 1)


@pytest.mark.parametrize("name", ["heun", "plms", "langevin+ddim"])
def test_fallback_without_host_steps_reads_once(name):
    """Without host steps the rows are found with one nonzero per second call (the code this replaces made two:
    ``bool(any())`` and ``nonzero``)."""
    solver, sig, noise, evaluate, _ = _rig(name)
    args = _rows(solver, sig, noise, evaluate)
    with SyncCounter() as c:
        solver.increment(*args)
    assert c.names == ["nonzero"]


def test_host_steps_must_give_one_step_per_row():
    solver, sig, noise, evaluate, _ = _rig("heun")
    with pytest.raises(ValueError, match="host_steps"):
        solver.increment(*_rows(solver, sig, noise, evaluate), host_steps=STEPS[:-1])


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m_sde"])
def test_ddpm_jump_reads_nothing_and_equals_the_fine_steps(name):
    """The DDPM coarse jump over stretches of different lengths (one ending at sigma = 0): 0 syncs with the host
    bound and without it (bounded by N), the same bits either way, and the fine DDPM steps under a constant D."""
    solver, sig, noise, _, _ = _rig(name)
    g = torch.Generator().manual_seed(3)
    i, j = torch.tensor([0, 2, 5, 9, 4]), torch.tensor([3, 9, 6, N, 4])
    b = torch.tensor([0, 1, 2, 0, 1])
    x = torch.randn(5, 2, generator=g, dtype=torch.float64) * sig[i, None]
    D = torch.randn(5, 2, generator=g, dtype=torch.float64)
    with SyncCounter() as c:
        got = solver.jump(x, D, i, j, b, noise, sig, span=7)
        unbounded = solver.jump(x, D, i, j, b, noise, sig)
    assert c.count == 0, c.names
    assert torch.equal(got, unbounded)
    # Reference: the fine DDPM steps from i to j with D held (the first order step of the SDE solver is DDPM's).
    ddpm = make_solver("ddpm")
    ref = x.clone()
    for r in range(5):
        for n in range(int(i[r]), int(j[r])):
            n_, b_ = torch.tensor([n]), b[r:r + 1]
            ref[r:r + 1] += ddpm.increment(ref[r:r + 1], n_, b_, D[r:r + 1], None, noise[n_, b_], sig, None)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_coarse_jump_passes_the_host_span():
    solver, sig, noise, evaluate, _ = _rig("ddpm")
    problem = Problem(sig, sig, torch.ones_like(sig), solver, evaluate, noise)
    x, D, b = torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64), torch.arange(3)
    i, j = torch.full((3,), 2), torch.full((3,), 6)
    with SyncCounter() as c:
        got = coarse_jump(problem, x, D, i, j, b, span=4)
    assert c.count == 0 and torch.equal(got, solver.jump(x, D, i, j, b, noise, sig))
    # the span bounds the noise rows the constant-D jump draws (solvers.constant_d_jump): a longer one adds only
    # exact zeros, the same bits
    assert torch.equal(coarse_jump(problem, x, D, i, j, b, span=9), got)


# -- whole runs: the methods pass their host steps through Problem.advance / Problem.step_to -----------------------


def _per_round():
    """A counter, the list of its counts per round, and the ``on_round`` that fills it."""
    counter, counts = SyncCounter(), []

    def on_round(info):
        counts.append(counter.count)
        counter.count = 0

    return counter, counts, on_round


@pytest.mark.parametrize("name", ["heun", "plms", "langevin+heun"])
def test_sequential_run_reads_at_most_the_grid_once(name):
    """A sequential run passes each step as a host int: no read but the grid's one, and the NFE of before."""
    solver, sig, noise, evaluate, calls = _rig(name)
    x_T = draw_noise(0, B, (2,), None, INITIAL) * float(sig[0])
    counter, per_step, on_round = _per_round()
    problem = Problem(sig, sig, torch.ones_like(sig), solver, evaluate, noise, on_round)
    with counter:
        sample_sequential(x_T, problem)
    # counter.count: what ran after the last step's report, counted too; PLMS never reads the grid's end
    assert sum(per_step) + counter.count <= (name != "plms") and len(per_step) == N, (per_step, counter.names)
    nfe = {"heun": 2 * N - 1, "plms": N + 1, "langevin+heun": 2 * N - 1 + 2 * (N - 1)}[name]
    assert sum(len(i) for i, _ in calls) == B * nfe             # no extra rows: the same NFE as before


@pytest.mark.parametrize("name", ["heun", "plms"])
def test_picard_round_reads_once(name):
    """Picard's rows come from its host copy of the window starts: its one read a round, plus the grid's once."""
    solver, sig, noise, evaluate, _ = _rig(name)
    x_T = draw_noise(0, B, (2,), None, INITIAL) * float(sig[0])
    counter, per_round, on_round = _per_round()
    problem = Problem(sig, sig / 10, torch.ones_like(sig), solver, evaluate, noise, on_round)
    with counter:
        out = sample_picard(x_T, problem, 5, 0.0, init="noise")   # no x0 round: every round reads
    assert out.rounds >= 3 and min(per_round) == 1, (per_round, counter.names)
    assert sum(per_round) <= out.rounds + (name != "plms"), (per_round, counter.names)
    assert counter.count == 0, counter.names                # nothing read after the last round's report
    seq = sample_sequential(x_T, Problem(sig, sig, torch.ones_like(sig), solver, evaluate, noise)).x
    torch.testing.assert_close(out.x, seq, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["heun", "langevin+heun"])
def test_parareal_heun_iteration_reads_once(name):
    """Sweep Parareal with a two-call solver: the fine ticks pass their host steps, so an iteration reads once."""
    solver, sig, noise, evaluate, _ = _rig(name, steps=20)
    x_T = draw_noise(0, B, (2,), None, INITIAL) * float(sig[0])
    marks = []

    def counted(x, i, b):
        marks.append(counter.count)
        return evaluate(x, i, b)

    counter = SyncCounter()
    with counter:
        out = sample_parareal(x_T, Problem(sig, sig, torch.ones_like(sig), solver, counted, noise), slices=4, tol=0.0)
    assert counter.count - marks[0] <= out.rounds + 1, counter.names[marks[0]:]       # + the grid's one read
    seq = sample_sequential(x_T, Problem(sig, sig, torch.ones_like(sig), solver, evaluate, noise)).x
    torch.testing.assert_close(out.x, seq, rtol=0, atol=1e-9)
