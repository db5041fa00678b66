"""Lazy step noise (issue 24, item 3): a seeded run never stores its ``(N, B, *shape)`` step noise. Methods read
``noise[i, b]`` from a :class:`~paratime.noise.LazyNoise`, which draws those rows (the same bits as the table's),
and the constant-D path (Picard's guesses, the DDPM coarse jump of Parareal and the staggered method) draws only the
rows of its steps, a bounded chunk at a time. A caller's generator (and a pipeline's) keeps its tables."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import paratime.noise as noise_module
import paratime.sampler as sampler_module
import paratime.solvers as solvers
from paratime.bench.live_bytes import LiveBytes
from paratime import ParallelSampler
from paratime.config import SamplerConfig
from paratime.denoiser import Denoiser
from paratime.methods import Problem
from paratime.methods.window import model_frame_path
from paratime.noise import CORRECTOR, STEP, LazyNoise, PipelineNoise, draw_noise, step_noise, tabulates
from paratime.schedules import DiscreteVPSchedule
from paratime.solvers import constant_d_jump, make_solver

STEPS, BATCH = 120, 16                    # gmm: (B, 2) samples; a table is N * B * 2 numbers


def _tables(lazy):
    """A :class:`LazyNoise` (or a corrector's tuple of them) as the full tables ``draw_noise`` gives."""
    if isinstance(lazy, tuple):
        return tuple(_tables(n) for n in lazy)
    if not isinstance(lazy, LazyNoise):
        return lazy
    return draw_noise(lazy.seed, lazy.batch, lazy.row_shape, lazy.steps, lazy.stream, lazy.first_sample,
                      dtype=lazy.dtype, device=lazy.device)


class _Storages(TorchDispatchMode):
    """The byte sizes of the storages every op returns (views report their base's)."""

    def __init__(self):
        super().__init__()
        self.sizes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes.update(t.untyped_storage().nbytes() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stream, row_shape", [(STEP, (3, 5)), (CORRECTOR, (2, 3, 5))])
def test_lazy_rows_are_the_table_rows_bitwise(dtype, stream, row_shape):
    """Rows in any order, broadcast indices and ints give the table's rows, bit for bit."""
    steps, batch, first = 9, 6, 11
    lazy = LazyNoise(7, stream, first, steps, batch, row_shape, dtype, torch.device("cpu"))
    table = draw_noise(7, batch, row_shape, steps, stream, first, dtype=dtype)
    assert lazy.shape == table.shape and lazy.ndim == table.ndim
    g = torch.Generator().manual_seed(0)
    i, b = torch.randint(0, steps, (40,), generator=g), torch.randint(0, batch, (40,), generator=g)
    assert torch.equal(lazy[i, b], table[i, b])
    ii, bb = torch.randperm(steps, generator=g)[:4, None], torch.randperm(batch, generator=g)   # (4, 1), (B,)
    assert torch.equal(lazy[ii, bb], table[ii, bb])                                           # (4, B, *row)
    assert torch.equal(lazy[3, bb], table[3, bb]) and torch.equal(lazy[5, 2], table[5, 2])
    with pytest.raises(TypeError, match="noise\\[i, b\\]"):
        lazy[i.double(), b]


def test_step_noise_is_lazy_when_seeded_and_a_table_from_a_generator(monkeypatch):
    monkeypatch.setattr(noise_module, "SMALL_TABLE_ELEMENTS", 0)
    ddpm, lang = make_solver("ddpm"), SamplerConfig(solver="ddpm", corrector_snr=0.2).build_solver()
    kw = dict(dtype=torch.float64, device="cpu")
    z = step_noise(ddpm, 10, (4, 2), 3, None, 8, **kw)
    assert isinstance(z, LazyNoise) and (z.stream, z.first_sample, z.shape) == (STEP, 8, (10, 4, 2))
    z_pred, z_corr = step_noise(lang, 10, (4, 2), 3, None, 0, **kw)
    assert isinstance(z_corr, LazyNoise) and (z_corr.stream, z_corr.shape) == (CORRECTOR, (10, 4, 1, 2))
    gen = step_noise(ddpm, 10, (4, 2), 0, torch.Generator().manual_seed(0), 0, **kw)
    pipe = step_noise(ddpm, 10, (4, 2), 0, PipelineNoise(torch.Generator().manual_seed(0)), 0, **kw)
    assert isinstance(gen, torch.Tensor) and gen.shape == (10, 4, 2)
    assert isinstance(pipe, torch.Tensor) and torch.equal(gen, pipe)
    with pytest.raises(ValueError, match="first_sample"):
        step_noise(ddpm, 10, (4, 2), 3, None, -1, **kw)


def test_small_seeded_tables_are_drawn_whole_with_the_same_bits():
    """A table of at most SMALL_TABLE_ELEMENTS numbers (a policy's DDPM-100 chunk) is drawn in one call: N row
    draws of a few dozen torch calls each would cost more than the network; the bits are the lazy rows'."""
    kw = dict(dtype=torch.float32, device="cpu")
    small = step_noise(make_solver("ddpm"), 100, (1, 16, 2), 3, None, 0, **kw)
    assert isinstance(small, torch.Tensor) and tabulates(100, (1, 16, 2), None)
    assert not tabulates(100, (1, 4, 64, 64), None) and tabulates(100, (1, 4, 64, 64), torch.Generator())
    lazy = LazyNoise(3, STEP, 0, 100, 1, (16, 2), torch.float32, torch.device("cpu"))
    i = torch.arange(100)
    assert torch.equal(small[i, 0], lazy[i, 0])


@pytest.mark.parametrize("solver, method, options", [
    ("ddpm", "sequential", {}),
    ("ddpm", "picard", dict(window=10)),                      # init x0 over the grid, then the path fill
    ("euler_maruyama", "picard", dict(window=10, update="picard")),
    ("ddpm", "picard", dict(window=10, corrector_snr=0.2)),  # the corrector's own stream
    ("ddpm", "parareal", {}),                                # the DDPM coarse jump
    ("ddpm", "staggered", dict(window=4)),
])
def test_seeded_runs_hold_no_noise_table_and_equal_the_tabulated_run(monkeypatch, solver, method, options):
    """No storage as large as a noise table but Picard's trajectory, with the path's chunks cut to 3 steps (so
    chunks and their carries run); the sample is the tabulated run's, bit for bit, and (tol 0) the sequential one."""
    monkeypatch.setattr(solvers, "PATH_CHUNK_ELEMENTS", 3 * BATCH * 2)
    monkeypatch.setattr(noise_module, "SMALL_TABLE_ELEMENTS", 0)      # gmm's tables are small: make them lazy
    tol = {} if method == "sequential" else dict(tol=0.0)
    kw = dict(solver=solver, steps=STEPS, method=method, progress=False, **tol, **options)
    seen = []
    real = sampler_module.step_noise

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(sampler_module, "step_noise", spy)
    with _Storages() as storages:
        lazy = ParallelSampler("gmm", **kw).sample(BATCH, seed=5).samples
    noise = seen[-1] if isinstance(seen[-1], tuple) else (seen[-1],)
    assert all(n is None or isinstance(n, LazyNoise) for n in noise)
    table, traj = STEPS * BATCH * 2 * 8, (STEPS + 2) * BATCH * 2 * 8          # float64 bytes
    assert {s for s in storages.sizes if s >= table} <= ({traj} if method == "picard" else set())
    monkeypatch.setattr(sampler_module, "step_noise", lambda *a, **k: _tables(real(*a, **k)))
    assert torch.equal(ParallelSampler("gmm", **kw).sample(BATCH, seed=5).samples, lazy)
    if method != "sequential":
        seq = ParallelSampler("gmm", solver=solver, steps=STEPS, method="sequential", progress=False,
                              **{k: v for k, v in options.items() if k == "corrector_snr"}).sample(BATCH, seed=5)
        torch.testing.assert_close(lazy, seq.samples, rtol=0, atol=1e-9)


def test_generator_runs_keep_their_tables(monkeypatch):
    seen = []
    real = sampler_module.step_noise
    monkeypatch.setattr(sampler_module, "step_noise", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    ParallelSampler("gmm", solver="ddpm", steps=8, method="sequential", progress=False).sample(
        4, generator=torch.Generator().manual_seed(0))
    assert isinstance(seen[-1], torch.Tensor) and seen[-1].shape == (8, 4, 2)


def test_a_sequential_sd_size_run_holds_far_less_than_its_noise_table():
    """DDPM-1000 at Stable Diffusion's latent size (4x64x64, B = 1, float32): the table would be 62.5 MiB; the run's
    peak of live tensors (benchmarks/live_bytes.py) stays under an eighth of it."""
    den = Denoiser(lambda x, t, **c: 0.1 * x, DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02), "eps",
                   sample_shape=(4, 64, 64))
    sampler = ParallelSampler(den, solver="ddpm", steps=1000, method="sequential", state_dtype=torch.float32,
                              progress=False, kernels="torch")
    with LiveBytes() as live:
        sampler.sample(1, seed=0)
    table = 1000 * 4 * 64 * 64 * 4
    assert live.peak < table / 8, live.peak / 2**20


def test_memory_bound_counts_tables_only_for_a_generator():
    """The lazy bound leaves out the ``(N, B, *shape)`` tables (one per stream), and counts them with a generator."""
    shape, dev = (8, 4, 32, 32), torch.device("cpu")                       # N B D = 40 * 8 * 4096: lazy
    for opts, streams in ((dict(), 1), (dict(corrector_snr=0.2), 2)):
        for method in ("picard", "sequential"):
            cfg = SamplerConfig(solver="ddpm", steps=40, method=method, **opts)
            lazy = cfg.check_memory(shape, dev, torch.float64)
            tabulated = cfg.check_memory(shape, dev, torch.float64, generator=torch.Generator())
            assert tabulated - lazy == streams * 40 * 8 * 4096 * 8, (opts, method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_d_path_and_jump_stay_exact_through_consistency_steps(dtype):
    """Consistency steps (``x' = D + sigma' z``: a factor a = 0 every step) over 30 points in float32 too: the path
    from each start equals the solver's steps with D held (the old exp(-C) tables overflowed past a few steps), and
    the jump equals it at its target, in any chunks and batch."""
    solver = make_solver("consistency")
    sig = torch.logspace(math.log10(80.0), math.log10(0.5), 31, dtype=dtype)   # (N + 1,) decreasing, > 0
    N, B = 30, 3
    noise = LazyNoise(1, STEP, 0, N, B, (4,), dtype, torch.device("cpu"))
    x0 = torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    problem = Problem(sig, sig, torch.ones_like(sig), solver, lambda x, i, b: x0[b], noise)
    xs, x, b = [x0 * 80], x0 * 80, torch.arange(B)
    for n in range(N):                                                     # the solver's steps with D = x0
        x = problem.advance(x, torch.full((B,), n), b, x0)
        xs.append(x)
    ref = torch.stack(xs)                                                  # (N + 1, B, 4)
    e = torch.tensor([0, 3, 7])
    for chunk in (None, 4):
        got = model_frame_path(problem, ref[e, b], x0, e, b, N - 7, chunk=chunk)
        want = ref[(e + 1 + torch.arange(N - 7)[:, None]).clamp_max(N), b]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    j = torch.tensor([30, 20, 9])
    jump = constant_d_jump(solver, sig, noise, ref[e, b], x0, e, j, b, 30)
    torch.testing.assert_close(jump, ref[j, b], rtol=1e-5, atol=1e-5)
    alone = torch.cat([constant_d_jump(solver, sig, noise, ref[e[r:r + 1], b[r:r + 1]], x0[r:r + 1], e[r:r + 1],
                                       j[r:r + 1], b[r:r + 1], int(j[r] - e[r])) for r in range(B)])
    assert torch.equal(alone, jump)                                        # per row: span and batch change no bit


def test_noise_memory_benchmark_runs_with_its_defaults_but_a_small_latent(capsys):
    """``python -m paratime.bench.noise_memory`` end to end (its default DDPM-1000, batch 1; an 8x8 latent, above
    the small-table size): every method's row printed, and the rows-drawn runs hold less than the whole-table ones."""
    from paratime.bench import noise_memory

    threads = torch.get_num_threads()
    try:
        assert noise_memory.main(["--side", "8"]) == 0                 # sets one thread, as its command line says
    finally:
        torch.set_num_threads(threads)
    lines = [ln for ln in capsys.readouterr().out.splitlines()
             if ln.startswith("| ") and not ln.startswith(("| method", "|---"))]
    assert [ln.split()[1] for ln in lines] == [m for m, _, _ in noise_memory.RUNS]
    for ln in lines:
        rows_mib, tables_mib = (float(v) for v in ln.split("|")[2:4])
        assert rows_mib < tables_mib, ln
    with pytest.raises(SystemExit):
        noise_memory.main(["--side", "0"])
