"""Picard's update rules and initial guesses (issue 17): every ``update`` with every ``init`` / ``fill`` reaches the
sequential sample at tol 0 for every solver, with sliding, shared and max_rounds-capped windows; the round still
reads the device once; the guesses are exact where they claim to be; bad values name the argument."""

import pytest
import torch

from paratime.methods import Problem, sample_picard, sample_sequential
from paratime.methods.picard import UPDATES
from paratime.methods.window import model_frame_path

from test_picard_syncs import _problem       # tests/ is on sys.path

SOLVERS = ["ddim", "ddpm", "euler_maruyama", "heun", "dpmpp_2m"]
#: (window, init, fill, shared_window, max_rounds) on a 20-step grid
LAYOUTS = [(20, "x0", "path", False, None), (6, "noise", "path", True, None), (6, "x0", "copy", False, 4),
           (5, "x0", "path", False, None), (20, "auto", "path", False, 3), (8, "auto", "path", True, 5)]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("update", UPDATES)
def test_every_update_and_guess_at_tol_zero_equals_sequential(solver, update):
    x_T, problem, _ = _problem(solver, 20, batch=8)
    seq = sample_sequential(x_T, problem).x
    for window, init, fill, shared, max_rounds in LAYOUTS:
        out = sample_picard(x_T, problem, window, 0.0, max_rounds, shared, update=update, init=init, fill=fill)
        torch.testing.assert_close(out.x, seq, rtol=0, atol=1e-9, msg=lambda m: f"{window, init, fill}: {m}")
        assert all(out.extra["converged"]) or max_rounds is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_affine_scan_is_the_recurrence_with_restarts(dtype):
    """``_affine_scan_``'s closed form equals the recurrence ``y_k = A_k y_{k-1} + Y_k`` stepped one by one, with
    steps that forget their input (``A = 0``: the step to sigma = 0, every consistency step) anywhere, first and
    last included, and products down to 1e-17 between them."""
    from paratime.solvers import _affine_scan_

    gen = torch.Generator().manual_seed(0)
    for c in (1, 2, 3, 7, 32, 57):
        for zeros in (0.0, 0.15, 1.0):
            A = torch.rand(c, 3, generator=gen, dtype=torch.float64)
            A[torch.rand(c, 3, generator=gen) < zeros] = 0
            A[0, 1], A[-1, 2] = 0, 0
            Y = torch.randn(c, 3, 4, generator=gen, dtype=dtype)
            y, ref = torch.zeros(3, 4, dtype=torch.float64), []
            for k in range(c):
                y = A[k, :, None] * y + Y[k].double()
                ref.append(y)
            got = _affine_scan_(A.clone(), Y.clone())
            assert got.dtype == dtype
            bound = 1e-13 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got.double(), torch.stack(ref), rtol=bound, atol=bound * 4)


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "consistency"])
def test_constant_d_path_is_the_solver_with_d_held(solver):
    """For DDIM / DDPM / consistency steps the guess is exact when D is constant: it equals the sequential sampler
    run with a denoiser that returns a fixed x0, pre-drawn noise included, from any start point to any later point
    (a consistency step forgets its input: every step restarts the path)."""
    x_T, problem, _ = _problem(solver, 20, batch=3)
    x0 = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.1]], dtype=torch.float64)
    const = Problem(problem.sigmas, problem.noise_levels, problem.frame_scales, problem.solver,
                    lambda x, i, b: x0[b], problem.noise)
    # Sequential with D = x0 from x_T, every point kept (model frame).
    xs, x = [x_T], x_T
    b = torch.arange(3)
    for j in range(20):
        i = torch.full((3,), j)
        x = const.advance(x, i, b, x0, None)                  # the sequential sampler's step
        xs.append(x)
    ys = torch.stack([const.scale(v, torch.full((3,), j)) for j, v in enumerate(xs)])       # (21, 3, 2)
    e = torch.tensor([4, 0, 9])                                                          # (B,)
    pts = (e + 1 + torch.arange(13)[:, None]).clamp_max(20)      # (13, B): points e+1 .. e+13, past N repeat N
    for chunk in (None, 1, 5):                                   # chunks of the drawn noise rows change nothing
        got = model_frame_path(const, ys[e, b], x0, e, b, 13, chunk=chunk)
        torch.testing.assert_close(got, ys[pts, b], rtol=1e-9, atol=1e-9)


def test_bad_init_and_fill_name_the_argument():
    x_T, problem, _ = _problem("ddim", 10, batch=2)
    with pytest.raises(ValueError, match="init: unknown 'x1'; allowed"):
        sample_picard(x_T, problem, 5, init="x1")
    with pytest.raises(ValueError, match="fill: unknown 'zero'; allowed"):
        sample_picard(x_T, problem, 5, fill="zero")
    with pytest.raises(ValueError, match="update: unknown 'newton'; allowed: secant, picard"):
        sample_picard(x_T, problem, 5, update="newton")


def test_sampler_passes_init_and_fill_and_counts_the_path_rows():
    """``init`` and ``fill`` reach the Picard loop through ParallelSampler (the x0 guess is one more round, seen by
    the callback with B rows), and the memory bound counts the constant-D path's noise rows (a window's worth)."""
    from paratime import ParallelSampler
    from paratime.config import SamplerConfig

    seen, seen_b = [], []
    kw = dict(solver="ddpm", steps=40, window=10, tol=0.0, progress=False)
    a = ParallelSampler("gmm", init="x0", **kw).sample(8, seed=0, callback=seen.append)
    b = ParallelSampler("gmm", init="noise", fill="copy", **kw).sample(8, seed=0, callback=seen_b.append)
    # x0: a first round of one call per sample at x_T; noise: the first round is already the window (10 points each)
    assert seen[0].rows == 8 and seen[1].rows == 80 and seen_b[0].rows == 80
    assert len(seen) == a.stats.rounds and len(seen_b) == b.stats.rounds
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=1e-9)      # tol 0: both the sequential sample
    with_path = SamplerConfig(solver="ddpm", steps=40, window=10)
    without = SamplerConfig(solver="ddpm", steps=40, window=10, init="noise", fill="copy")
    shape, dev = (8, 2), torch.device("cpu")
    extra = with_path.check_memory(shape, dev, torch.float64) - without.check_memory(shape, dev, torch.float64)
    assert extra == 10 * 8 * 2 * 8                    # the path's noise rows: one more (W, B, 2) float64 buffer
    ode = SamplerConfig(solver="ddim", steps=40, window=10)
    assert with_path.uses_noise_path(with_path.build_solver()) and not ode.uses_noise_path(ode.build_solver())


def test_a_secant_correction_far_larger_than_picards_change_falls_back_to_picard():
    """The secant's triangular solve compounds each pair's gain down the window: gains of 9.9 per point (each under
    SAFEGUARD, so each pair is used) give sample 0 a correction about 100x Picard's change, which the per-sample
    safeguard replaces by Picard's increments; sample 1 (gains 0.5) keeps its secant correction."""
    from paratime.methods.updates import SAFEGUARD, _secant_increment

    W, B = 4, 2
    gain = torch.tensor([9.9, 0.5], dtype=torch.float64)
    assert float(gain.max()) < SAFEGUARD
    dy = torch.full((W, B, 1), 0.1, dtype=torch.float64)
    old = torch.zeros(W, B, 1, dtype=torch.float64)
    new_pic = torch.cumsum(dy, 0)                                      # Picard's values from a start at 0
    hist_y = torch.zeros(W, B, 1, dtype=torch.float64)
    y_win = hist_y + 1.0                                               # s = 1 at every point
    hist_dy = dy - gain[None, :, None]                                 # u = gain: |u| / |s| under SAFEGUARD
    ok = torch.ones(W, B, dtype=torch.bool)
    inc, _ = _secant_increment(dy, new_pic, old, y_win, hist_y, hist_dy, ok)
    assert torch.equal(inc[:, 0], dy[:, 0])                            # sample 0: Picard's increments
    assert not torch.allclose(inc[:, 1], dy[:, 1])                     # sample 1: its secant correction


def test_max_rounds_one_makes_no_x0_call():
    """max_rounds=1 leaves no round to read init='auto''s x0 guess: its call is not made (the run costs what
    sequential sampling does at most, N rounds, where it took N + 1)."""
    from paratime import ParallelSampler

    r = ParallelSampler("gmm", solver="ddim", steps=20, window=8, max_rounds=1, tol=0.01,
                        progress=False).sample(8, seed=0)
    assert r.stats.rounds <= 20, r.stats.rounds

