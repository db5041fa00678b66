"""Behaviour of the Picard methods' pieces that mutation testing found unpinned (paratime/methods/window.py, stops.py,
updates.py, picard.py): input checks of the stop rule and the sampler, the final rule's error estimate and exact
stillness, absolute units, the secant's per-point safeguard, Anderson on a point without history, a window wider
than the grid, the rounds after ``max_rounds``, the reported residual and final change, and the window's data-frame
change and fill."""

import dataclasses
import math

import pytest
import torch

from paratime.methods import Problem, sample_picard, sample_sequential
from paratime.methods.stops import make_stop
from paratime.methods.updates import _anderson_values, _secant_increment
from paratime.methods.window import SlidingWindow
from paratime.solvers import make_solver

from test_picard_syncs import _problem       # tests/ is on sys.path

F64 = torch.float64


# -- input checks ----------------------------------------------------------------------------------------------------
def test_make_stop_refuses_a_nan_tol_a_zero_scale_and_scales_where_they_do_not_apply():
    with pytest.raises(ValueError, match="tol, accept_tol: must be >= 0"):
        make_stop("final", float("nan"))
    with pytest.raises(ValueError, match="tol, accept_tol: must be >= 0"):
        make_stop("final", 0.1, accept_tol=float("nan"))
    with pytest.raises(ValueError, match="scale: must be > 0"):
        make_stop("final", 0.1, scale=0.0)
    with pytest.raises(ValueError, match="absolute units"):
        make_stop("final", 0.1, scale=2.0, relative=False)
    for kw in (dict(scale=2.0), dict(relative=True)):
        with pytest.raises(ValueError, match="^scale: applies only to stop='final'"):
            make_stop("paradigms", 0.1, **kw)
    assert make_stop("final", 0.1, scale=None).scale is None          # each sample's own scale is allowed


def test_sample_picard_refuses_unknown_tol_units():
    x_T, problem, _ = _problem("ddim", 10, batch=2)
    with pytest.raises(ValueError, match="tol_units: unknown 'percent'"):
        sample_picard(x_T, problem, 5, tol_units="percent")


# -- the final stop rule alone -----------------------------------------------------------------------------------------
def _stops_at(rule, changes, window_moved=0.0):
    """The 0-based round at which ``rule`` stops one sample given its final point's changes, or None."""
    like = torch.zeros(2, dtype=F64)
    rule.start(1, like)
    no = torch.zeros(1, dtype=torch.bool)
    for k, moved in enumerate(changes):
        if bool(rule(no, torch.tensor([moved], dtype=F64), like[:1, None], torch.tensor([window_moved], dtype=F64))):
            return k
    return None


def test_a_quiet_but_slowly_contracting_final_point_is_not_returned():
    """Quiet (<= 2 tol, shrinking) but contracting by ~0.95 a round: the changes still to come sum to ~20x the last,
    far over tol, so the error estimate keeps the sample; a fast contraction of the same start stops it."""
    plateau = (1.0, 0.19, 0.18, 0.17, 0.16, 0.15)
    assert _stops_at(make_stop("final", 0.1, update="picard"), plateau) is None
    assert _stops_at(make_stop("final", 0.1, update="picard"), (1.0, 0.19, 0.01, 0.0005)) == 2


@pytest.mark.parametrize("update", ["secant", "picard"])
def test_a_final_point_that_sits_exactly_still_is_returned(update):
    """Changes of exactly 0 (0 / 0 is no contraction ratio) count as converged: the sample stops at the second still
    round instead of running until every point is accepted."""
    assert _stops_at(make_stop("final", 0.1, update=update), (0.5, 0.0, 0.0, 0.0, 0.0)) == 2


def test_absolute_units_do_not_scale_acceptance_by_the_initial_noise():
    """``relative=False`` (tol_units="absolute"): acceptance stays accept * n_j on a VE model (initial noise 80);
    data units divide it by the noise scale."""
    final = torch.zeros(1, 2, dtype=F64)
    noise = torch.tensor(80.0, dtype=F64)
    absolute, data = make_stop("final", 0.1, relative=False), make_stop("final", 0.1, relative=True)
    absolute.start(1, final, noise)
    data.start(1, final, noise)
    torch.testing.assert_close(absolute.accept_scale(final), torch.ones(1, dtype=F64))
    torch.testing.assert_close(data.accept_scale(final), torch.full((1,), 1 / 80, dtype=F64))


def test_the_amplification_guard_rolls_a_sample_back_once_and_never_at_tol_zero():
    """A window of the whole grid that stretches errors past the limit rolls the sample back and tightens its
    acceptance 100x, once: a second stretch leaves it be (no endless rollbacks). At tol 0 (the exact fixed point)
    nothing is rolled back."""
    rule = make_stop("final", 0.1, accept_tol=1e-3)
    rule.start(2, torch.zeros(2, dtype=F64))
    gain, active = torch.tensor([1e3, 1.0], dtype=F64), torch.ones(2, dtype=torch.bool)
    assert rule.amplified(gain, active).tolist() == [True, False]
    torch.testing.assert_close(rule.accept_scale(torch.zeros(2, 2, dtype=F64)), torch.tensor([0.01, 1.0], dtype=F64))
    assert rule.amplified(gain, active).tolist() == [False, False]
    assert (rule.tight < 1).tolist() == [True, False]
    exact = make_stop("final", 0.0, accept_tol=1e-3)
    exact.start(2, torch.zeros(2, dtype=F64))
    assert exact.amplified(gain, active).tolist() == [False, False]


def test_a_sliding_window_rolls_a_sample_back_once_too():
    """A sliding window (tol 0.1, accept 1e-3: limit a sixth of the margin 100, 16.7): a gain of 50 rolls sample 0
    back, 20 sample 1; rolled back once (to the grid's start), neither is again, past the whole margin included;
    inactive samples never are. The acceptance tightens 100x once."""
    rule = make_stop("final", 0.1, accept_tol=1e-3, sliding=True)
    rule.start(3, torch.zeros(3, dtype=F64))
    assert rule.gain_limit == pytest.approx(100 / 6)
    active = torch.tensor([True, True, False])
    assert rule.amplified(torch.tensor([50.0, 20.0, 1e3], dtype=F64), active).tolist() == [True, True, False]
    assert rule.amplified(torch.tensor([101.0, 1e3, 1e3], dtype=F64), active).tolist() == [False, False, False]
    assert (rule.tight < 1).tolist() == [True, True, False]
    torch.testing.assert_close(rule.accept_scale(torch.zeros(3, 2, dtype=F64)),
                               torch.tensor([0.01, 0.01, 1.0], dtype=F64))


# -- update rules --------------------------------------------------------------------------------------------------
def _secant_case(u1):
    """Two window points, one sample, one feature: point 1's secant pair stretches by ``u1`` (|s| = 1)."""
    col = lambda *v: torch.tensor(v, dtype=F64).reshape(2, 1, 1)       # noqa: E731
    dy, old = col(0.3, -0.2), col(0.5, 0.5)
    new = old + col(0.1, 1.0)                                          # Picard's changes 0.1 and 1.0
    y_win, hist_y = col(1.0, 2.0), col(0.0, 1.0)                       # s = 1 at both points
    hist_dy = dy - col(0.0, u1)                                        # u = (0, u1)
    ok = torch.ones(2, 1, dtype=torch.bool)
    inc, _ = _secant_increment(dy, new, old, y_win, hist_y, hist_dy, ok)
    return inc.flatten() - dy.flatten()                                # the secant's corrections


def test_the_secant_drops_a_points_rank_one_term_when_it_stretches_more_than_tenfold():
    """|u_j| <= 10 |s_j| or no rank-1 term at that point (c_1 = s_1 . delta_1 / |s_1|^2 = 0.1): at u = 5 the
    correction is u c = 0.5; at u = 20 (> 10) none, though the sample-wide safeguard (10 x Picard's largest change,
    1.0) would let 2.0 through."""
    torch.testing.assert_close(_secant_case(5.0), torch.tensor([0.0, 0.5], dtype=F64))
    torch.testing.assert_close(_secant_case(20.0), torch.zeros(2, dtype=F64))


def test_anderson_keeps_accelerating_after_a_point_without_residual_history():
    """Point 0's residual did not change (dR = 0: an all-zero normal matrix, regularised by 1, so it takes Picard's
    value); point 1 still takes its Anderson step instead of the whole sample falling back to Picard."""
    W, B = 2, 1
    old = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]], dtype=F64)                    # (W, B, D)
    new = old + torch.tensor([[[0.2, -0.1]], [[0.5, 0.3]]], dtype=F64)              # R = new - old
    R = new - old
    hist_x = (old - torch.tensor([[[0.1, 0.1]], [[0.2, -0.1]]], dtype=F64))[None]  # dX = (0.1, 0.1), (0.2, -0.1)
    hist_r = (R - torch.tensor([[[0.0, 0.0]], [[0.3, 0.1]]], dtype=F64))[None]     # dR = 0, (0.3, 0.1)
    ok = torch.ones(1, W, B, dtype=torch.bool)
    out = _anderson_values(new, old, hist_x, hist_r, ok)
    dR, dX = torch.tensor([0.3, 0.1], dtype=F64), torch.tensor([0.2, -0.1], dtype=F64)
    G = float(dR @ dR)
    gamma = float(dR @ R[1, 0]) / (G * (1 + 1e-3))
    torch.testing.assert_close(out[0], new[0])
    torch.testing.assert_close(out[1, 0], new[1, 0] - gamma * (dX + dR))


# -- the sampler -----------------------------------------------------------------------------------------------------
def test_a_window_wider_than_the_grid_is_a_window_of_the_whole_grid():
    """Loose acceptance re-opens the last window (every point accepted while the final point moved): a window of 14
    points on 10 steps re-opens at point 0, deciding exactly as a window of 10."""
    x_T, problem, _ = _problem("ddim", 10, batch=4)
    seq = sample_sequential(x_T, problem).x
    whole = sample_picard(x_T, problem, 10, 1e-3, accept_tol=1e3)
    wider = sample_picard(x_T, problem, 14, 1e-3, accept_tol=1e3)
    assert wider.rounds == whole.rounds
    torch.testing.assert_close(wider.x, whole.x, rtol=0, atol=0)
    assert float((wider.x - seq).abs().max()) <= 1e-3


def _rounds_seen(problem, x_T, window, tol, **kw):
    seen = []
    out = sample_picard(x_T, dataclasses.replace(problem, on_round=seen.append), window, tol, **kw)
    return out, seen


def test_after_max_rounds_each_sample_evaluates_one_point_a_round():
    x_T, problem, _ = _problem("ddim", 20, batch=2)
    out, seen = _rounds_seen(problem, x_T, 5, 1e-3, max_rounds=3)
    assert out.rounds > 4 and not all(out.extra["converged"])
    assert [i.rows for i in seen[1:3]] == [10, 10]                   # rounds 2-3: the full window of both samples
    assert all(i.rows <= 2 for i in seen[3:]), [i.rows for i in seen]


def test_a_sample_finishing_at_round_max_rounds_is_converged():
    x_T, problem, _ = _problem("ddim", 20, batch=4)
    free = sample_picard(x_T, problem, 5, 1e-3)
    last = int(max(free.sample_rounds))
    capped = sample_picard(x_T, problem, 5, 1e-3, max_rounds=last)
    assert capped.sample_rounds.tolist() == free.sample_rounds.tolist()
    assert capped.extra["converged"] == [True] * 4
    torch.testing.assert_close(capped.x, free.x, rtol=0, atol=0)
    assert sample_picard(x_T, problem, 5, 1e-3, max_rounds=last - 1).extra["converged"].count(False) >= 1


def test_residual_and_final_change_are_nan_where_the_round_has_none():
    """RoundInfo: the residual is nan in a round whose only row steps to the final point (noise level 0), and the
    final change is nan exactly while the final point lies outside the window (``begin + W < N``)."""
    N, W = 10, 3
    x_T, problem, _ = _problem("ddim", N, batch=1)
    out, seen = _rounds_seen(problem, x_T, W, 1e-3)
    assert math.isnan(seen[0].residual)                             # the x0 guess's round
    begins = [int(i.begin[0]) for i in seen]
    outside = inside = 0
    for prev, info in zip(begins, seen[1:]):
        if prev == N:
            continue
        if prev == N - 1:
            assert info.rows == 1 and math.isnan(info.residual), (prev, info)
        else:
            assert math.isfinite(info.residual), (prev, info)
        assert math.isnan(info.final_change) == (prev + W < N), (prev, info)
        outside, inside = outside + (prev + W < N), inside + (prev + W >= N)
    assert N - 1 in begins and outside and inside                    # every case happened


# -- the sliding window ----------------------------------------------------------------------------------------------
def _ve_problem():
    sig = torch.tensor([80.0, 5.0, 0.5, 0.0], dtype=F64)
    return Problem(sig, sig.clone(), torch.ones(4, dtype=F64), make_solver("ddim"), None)


@pytest.mark.parametrize("s", [1.0, 2.0])
def test_a_window_points_change_is_taken_in_the_data_frame(s):
    """VE frame: a change c of a point at sigma counts c s / sqrt(s^2 + sigma^2) in the window's change (the final
    point's change stays in the sample's units)."""
    win = SlidingWindow(_ve_problem(), torch.zeros(1, 1, dtype=F64))
    rows = win.pack(3, False)
    new = rows.old + torch.tensor([1.0, 0.0, 0.25], dtype=F64).reshape(3, 1, 1)   # points 1 (sigma 5), 2, 3 (0)
    moved, window_moved = win.write(rows, new, new, torch.zeros(1, dtype=torch.long), torch.tensor([s], dtype=F64))
    torch.testing.assert_close(window_moved, torch.tensor([max(s / math.hypot(s, 5.0), 0.25)], dtype=F64))
    torch.testing.assert_close(moved, torch.tensor([0.25], dtype=F64))


def test_a_point_held_past_the_cap_is_no_convergence():
    """A window point held at its previous value (past the stop rule's cap, ``reset``) has not converged: its change
    reads inf, in the final point's change (the stop's ``moved``) and in the window's, while the same unchanged
    points without ``reset`` read 0."""
    win = SlidingWindow(_ve_problem(), torch.zeros(1, 1, dtype=F64), measure_window=True)
    rows = win.pack(3, False)
    held = rows.old.clone()                                                          # nothing moved
    scale = torch.tensor([1.0], dtype=F64)
    moved, window_moved = win.write(rows, held, held, torch.zeros(1, dtype=torch.long), scale)
    assert moved.tolist() == [0.0] and window_moved.tolist() == [0.0]
    rows = win.pack(3, False)
    reset = torch.tensor([[False], [False], [True]])                                 # (W, B): the final point held
    moved, window_moved = win.write(rows, held, held, torch.zeros(1, dtype=torch.long), scale, reset=reset)
    assert moved.tolist() == [math.inf] and window_moved.tolist() == [math.inf]


def test_the_copy_fill_guesses_every_point_that_enters_the_window():
    """fill="copy": after a slide by 2 of a 4-point window at 0 (old end 4), the window reads points 2 .. 6; the
    entering points 5 and 6 take point 4's value, and point 7 (outside) keeps its own."""
    _, problem, _ = _problem("ddim", 10, batch=1)
    win = SlidingWindow(problem, torch.zeros(1, 2, dtype=F64))
    win.traj[:, 0] = torch.arange(12, dtype=F64)[:, None]
    rows = win.pack(4, False)
    win.slide(rows, torch.tensor([2]), "copy", None)
    assert win.traj[:, 0, 0].tolist()[:9] == [0.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 7.0, 8.0]


def test_a_rolled_back_sample_restarts_its_secant_history_and_its_final_change(monkeypatch):
    """The amplification guard's rollback (forced on sample 0 in the first round with a window gain): the moved
    window's slots drop their secant pairs (they belong to other points now) and the stop rule reads the round's
    final change as inf (its quiet count restarts); sample 1, not rolled back, keeps both."""
    import paratime.methods.stops as stops
    import paratime.methods.updates as updates

    events = []
    amplified, stop, update = stops.FinalPointStop.amplified, stops.FinalPointStop.__call__, updates.UpdateRule.__call__

    def forced(self, gain, active):
        first = not any(e[0] == "back" for e in events)
        back = amplified(self, torch.where((torch.arange(2) == 0) & first, math.inf, gain), active)
        events.append(("back", back.clone()))
        return back

    def stop_spy(self, done, moved, *args, **kw):
        events.append(("moved", moved.clone()))
        return stop(self, done, moved, *args, **kw)

    def update_spy(self, *args, **kw):
        events.append(("history", None if self.last is None else self.last[2].clone()))
        return update(self, *args, **kw)

    monkeypatch.setattr(stops.FinalPointStop, "amplified", forced)
    monkeypatch.setattr(stops.FinalPointStop, "__call__", stop_spy)
    monkeypatch.setattr(updates.UpdateRule, "__call__", update_spy)
    x_T, problem, _ = _problem("ddim", 20, batch=2)
    out = sample_picard(x_T, problem, 20, 1e-3)
    assert out.extra["rolled_back"].tolist() == [True, False]
    at = [e[0] for e in events].index("back")
    assert events[at][1].tolist() == [True, False]
    moved = next(e[1] for e in events[at:] if e[0] == "moved")
    assert math.isinf(moved[0]) and math.isfinite(moved[1])
    history = next(e[1] for e in events[at:] if e[0] == "history")
    assert not history[:, 0].any() and history[:, 1].any()
