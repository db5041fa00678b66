"""Picard iteration over a sliding window (ParaDiGMS, Shih et al. 2023), with per-sample windows, accelerated
(secant, Anderson) updates, initial guesses along the constant-D path and a stopping rule on the returned sample's
error.

Notation (the model's frame, ``y = frame_scale * x``; VP latents as in ParaDiGMS): points ``y_0 .. y_N``, the step
map ``F_j(y) = y + dy_j(y)``, the window start ``p`` (the last accepted point), window size ``W``, slot ``k`` of the
window holds point ``p + k`` and produces the new value of point ``p + k + 1``. One round, for every active sample:

    0. guess every point: init=noise   y_j = y_0                         (ParaDiGMS)
                          init=x0      one call D(y_0), then the constant-D path from y_0 (counted as a round)
                          init=auto    x0 when W < N, else noise (default)
    1. evaluate D at the window points y_p .. y_{p+W-1}             (one batched call over every sample's window)
    2. dy_j = F_j(y_j) - y_j for every window point                  (the solver's step map, data-parallel in j)
    3. update the window:
         picard   y_{j+1}^new = y_p + sum_{i=p..j} dy_i              (Newton with the Jacobian of F_j taken as I)
         secant   y_{j+1}^new = y_p + sum_{i=p..j} (dy_i + u_i c_i)  (Jacobian I + u_i s_i^T / |s_i|^2, see below)
         anderson y^new = y + R - (dX + dR) g, triangular              (ParaTAA, :mod:`.updates`)
    4. accept: point j+1 is converged when  rms(y_{j+1}^new - y_{j+1}^old) <= a * n_{j+1}  (``n``: ParaDiGMS's noise
       level, the std of the noise DDPM adds when leaving the point; 0 at the end; ``final``: ``a`` is stricter for
       a stochastic solver (more so in a sliding window) and on the late points of a deterministic solver's grid,
       :func:`default_accept_tol`); if the first c window
       outputs converged, the first c + 1 new values were computed from accepted states: slide the window start
       there and fill the new slots (fill=path: the constant-D path from the old window end, D held at this round's
       value at the last window point; fill=copy: the latest value at the old window end, ParaDiGMS) (accelerated
       updates: the change tested is Picard's, the cumulative one-step defect, and accepted points take Picard's
       values: exact steps from converged points)
    5. stop the sample:
         paradigms   when every point is accepted (``a = tol``: ParaDiGMS's tolerance and rule)
         final       when its final point y_N moved by <= 2 tol (max-abs, data units) in each of the last two rounds,
                     by no more than in the round before each (a change that grows is not quiet), with the error
                     estimated from their contraction <= tol and no point of its window moved by more than tol / 10
                     in the last round (the whole window quiet; under the secant update with a deterministic
                     solver, or by no more than y_N did, and one quiet round is enough after a contraction by
                     <= 0.3 a round), or every point is accepted (``a = accept_tol``,
                     default :func:`default_accept_tol`: an accepted point is frozen, so its error must stay well
                     below the target: tol / 30; tol / 300 on the last quarter of a deterministic solver's
                     whole grid and tol / 100 on the last half of its sliding window, tol / 300 on a
                     stochastic solver's whole grid and tol / 3000 on its sliding window). With any
                     update on per-sample windows, a sample whose window stretches its iterates' changes by
                     more than the acceptance's margin allows in a round (the largest product over 8% of the
                     grid's points, 2 to 8 consecutive, of ``|F(y) - F(y')| / |y - y'|`` from their last two
                     evaluations, above tol / (6 a) sliding (5), tol / (4 a) on the whole grid (7.5); a
                     trajectory crossing between modes, where points accepted earlier carry errors the end
                     amplifies hundreds of times) accepts 100x more strictly from then on and moves its window
                     start back to the grid's start, once
                     (:meth:`~paratime.methods.stops.FinalPointStop.amplified`,
                     :func:`~paratime.methods.stops.gain_limit`). A window point whose max-abs passes 100x the
                     largest of the sample's accepted points (an update whose model of the step is wrong, growing
                     geometrically) keeps its previous value and counts as moved by inf
                     (:meth:`~paratime.methods.stops.FinalPointStop.bound`)

Secant update (a Broyden rank-1 model of each step's Jacobian from that point's last two evaluations): with the
previous evaluation of point j at ``h_j`` with increment ``dh_j``, ``s_j = y_j - h_j`` and ``u_j = dy_j - dh_j``,
``F_j(y) ~ F_j(y_j) + (I + u_j s_j^T / |s_j|^2)(y - y_j)``. The Newton recurrence along the window,
``y_{j+1}^new = F_j(y_j) + J_j (y_j^new - y_j)``, is ``c_j = s_j . (y_j^new - y_j) / |s_j|^2`` with
``y_j^new - y_j = delta_j + sum_{l<j} u_l c_l`` (``delta_j``: Picard's change of point j): a unit lower-triangular
system ``(I - L) c = r``, ``L_jl = s_j . u_l / |s_j|^2`` (l < j), ``r_j = s_j . delta_j / |s_j|^2``, solved per sample.
Safeguards: a point's rank-1 term is used only if ``|u_j| <= 10 |s_j|`` (so its correction is at most 10x the Picard
one), and a sample falls back to Picard for the round if its secant change exceeds 10x its Picard change. The first
window point is always one exact step from the accepted start, so at ``tol = 0`` both updates reach the sequential
sample to float rounding within N rounds. Anderson keeps the same safeguard (per sample, on its change over
Picard's).

Constant-D path (``init="x0"``, ``fill="path"``, :func:`paratime.solvers.constant_d_path`): the trajectory the
solver would take from a point with D held at one value, which for DDIM / DDPM / Euler-Maruyama steps (linear in D
and the noise, ``x_{j+1} - D = a_j (x_j - D) + k_j z_j``) is closed-form and carries the pre-drawn noise; the others
take the DDIM path. A guess only: it changes where the iteration starts, never its fixed point.

Host syncs: the row count of the next network call depends on where each window starts, so the host reads one
small packed tensor per round (window starts, done flags, residuals); nothing else in the loop reads the device.
Every decision is a function of the state through elementwise ops, max-abs reductions (exact in any order) and the
deterministic Picard kernel, so every rank of an SPMD backend decides the same.

Pieces (shared with other methods): the update rules in :mod:`paratime.methods.updates` (:class:`UpdateRule`), the stop
rules in :mod:`paratime.methods.stops` (:func:`make_stop`), window management (packing rows, acceptance, writing, the
slide and its fill, the one host read) in :mod:`paratime.methods.window` (:class:`SlidingWindow`).

Shapes: ``traj`` is ``(N + 2, B, *shape)`` (row N + 1 is a sink for masked writes); window tensors are
``(W, B, ...)``; evaluation rows are the valid ``(k, b)`` pairs, flattened, sample-major.
"""

from __future__ import annotations

import logging

import torch

from ..checks import check_int
from .common import Outcome, Problem, RoundInfo
from .stops import DEFAULT_TOL, ROLLBACK, STOPS, FinalPointStop, default_accept_tol, make_stop
from .updates import UPDATES, UpdateRule, gain_span
from .window import SlidingWindow, acceptance_levels, model_frame_path, reads_entries, window_increments

__all__ = ["sample_picard", "STOPS", "UPDATES", "INITS", "FILLS", "DEFAULT_TOL", "default_accept_tol", "path_plan",
           "check_init"]

log = logging.getLogger("paratime")

INITS = ("auto", "noise", "x0")
FILLS = ("path", "copy")


def path_plan(init: str, fill: str, window: int, steps: int, max_rounds: int | None) -> tuple[str, bool]:
    """``(init, fill_reads_D)``: the initial guess in force (``auto``: ``x0`` when the window is shorter than the
    grid and wider than one point, whose rounds never read a guess, and ``max_rounds`` leaves it a round after the
    guess's own, else ``noise``) and whether the path fill runs (it reads D at the window end; only a window shorter
    than the grid and wider than one point reads what enters it: a window of 1, ``max_rounds``' included, computes
    its next point before reading it). Either one draws the constant-D path's noise rows
    (:func:`paratime.solvers.constant_d_path`; shared with the memory bound of
    :class:`paratime.config.SamplerConfig`)."""
    if init == "auto":
        init = "x0" if reads_entries(window, steps) and (max_rounds is None or max_rounds > 1) else "noise"
    return init, fill == "path" and reads_entries(window, steps)


def check_init(init: str, window: int | str, max_rounds: int | None) -> None:
    """Refuse ``init="x0"`` where no guess is read: on a window of one point, or after ``max_rounds=1`` (the guess's
    own round leaves a window of one point), its network call would be waste.

    Raises:
        ValueError: that case, naming ``init``.
    """
    if init == "x0" and (window == 1 or max_rounds == 1):
        given = "window=1" if window == 1 else "max_rounds=1 (a window of 1 after init's round)"
        raise ValueError(f"init: applies only to a window wider than one point; {given} steps each point from the "
                         f"accepted one before it and never reads a guess (init='x0' would add a network call)")


def sample_picard(x: torch.Tensor, problem: Problem, window: int, tol: float | None = None,
                  max_rounds: int | None = None, shared_window: bool = False, *, stop: str = "final",
                  update: str = "secant", accept_tol: float | None = None, init: str = "auto",
                  fill: str = "path", tol_scale: float | None = 1.0, tol_units: str | None = None) -> Outcome:
    """Sample with sliding-window Picard iteration.

    Args:
        x: ``(B, *shape)`` initial state (VE frame).
        problem: the trajectory to compute.
        window: W, time points evaluated per sample per round.
        tol: ``stop="final"``: the bound on the returned sample's distance to the sequential sample (max-abs
            over features) that the stopping rule aims at, in units of ``tol_scale``: a sample is returned once its
            final point moved by <= 2 tol, and by no more than the round before, in each of two successive rounds
            and the error estimated from their contraction is <= tol while no point of its window moved by more
            than tol / 10 in the last round (or, under the secant update with a deterministic solver, by more than
            the final point did; there one such round is enough after a contraction by <= 0.3 a round), or once
            every point is accepted and its final
            point moved by <= tol (:mod:`paratime.methods.stops`); ``stop="paradigms"``:
            ParaDiGMS's tolerance in units of the noise level. 0 runs to the exact fixed point (the sequential
            sample). None: ``DEFAULT_TOL[stop]``.
        max_rounds: rounds before the window shrinks to 1 point (the sequential sampler) for what is left;
            None: no limit (at most N rounds are ever needed).
        shared_window: slide one window for the whole batch, by the smallest stride of any sample (diffusers'
            ParaDiGMS pipeline).
        stop: ``final`` (default) or ``paradigms`` (see the module docstring).
        update: ``secant`` (default), ``picard`` or ``anderson`` (see the module docstring).
        accept_tol: ``stop="final"``: the window-slide tolerance in noise-level units; None:
            :func:`default_accept_tol` (stricter for a stochastic solver, more so in a sliding window, and on
            the last quarter of a deterministic solver's whole grid or the last half of its sliding window). An
            error with ``paradigms`` (which slides at ``tol``).
        init: the initial guess of every point: ``noise`` (x_T, ParaDiGMS), ``x0`` (one network call at x_T, then
            the constant-D path from there, carrying the pre-drawn noise; the call is a round of its own, counted),
            or ``auto`` (default): ``x0`` when the window is shorter than the grid and wider than one point, else
            ``noise`` (a full window's first round already evaluates every point at x_T, and a window of one point
            never evaluates a guess, so the extra call buys nothing there).
        fill: the guess of the points that enter a sliding window: ``path`` (default; the constant-D path from the
            old window end) or ``copy`` (the value at the old window end, ParaDiGMS). Read only where a window
            slides (W < N, or after ``max_rounds``); :class:`~paratime.config.SamplerConfig` refuses another.
        tol_scale: ``stop="final"``: the data scale ``tol`` and ``accept_tol`` are relative to: 1 (default) absolute
            units, a number (a model's declared scale), or None: each sample's own, the max-abs of its final point
            (:class:`~paratime.methods.stops.FinalPointStop`; acceptance, while a sliding window ends before N, that
            of D at the window end: the final point there holds its first guess), at most
            :data:`~paratime.methods.stops.TRUST_SCALE` x the largest max-abs of a point accepted so far (or the
            initial noise's std), so a window that diverges cannot loosen its own tolerance. tol_units: ``data``
            (acceptance relative to ``tol_scale`` and the initial noise's scale, a scale of 1 too) or ``absolute``;
            None: ``data`` unless ``tol_scale`` is 1.
    Returns:
        :class:`Outcome`; ``rounds`` counts rounds, ``residuals`` the worst ParaDiGMS residual per round,
        ``sample_rounds`` the round each sample finished (CPU), ``extra["converged"]`` per sample whether it
        finished by ``max_rounds``.
    Raises:
        ValueError: a ``window`` or ``max_rounds`` < 1, an unknown ``stop``, ``update``, ``init`` or ``fill``,
            ``init="x0"`` where no guess is read (``window=1`` or ``max_rounds=1``), a negative ``tol`` /
            ``accept_tol``, or an ``accept_tol`` with ``stop="paradigms"``. TypeError: a ``window`` or
            ``max_rounds`` that is not an integer.
    """
    check_int("window", window, 1)
    check_int("max_rounds", max_rounds, 1, none=True)
    if stop not in STOPS:
        raise ValueError(f"stop: unknown {stop!r}; allowed: {', '.join(STOPS)}")
    if init not in INITS:
        raise ValueError(f"init: unknown {init!r}; allowed: {', '.join(INITS)}")
    if fill not in FILLS:
        raise ValueError(f"fill: unknown {fill!r}; allowed: {', '.join(FILLS)}")
    check_init(init, window, max_rounds)
    if tol_units not in (None, "data", "absolute"):
        raise ValueError(f"tol_units: unknown {tol_units!r}; allowed: data, absolute (or None)")
    N, B, dev = problem.steps, x.shape[0], x.device
    stopper = make_stop(stop, tol, accept_tol, tol_scale, stochastic=problem.solver.stochastic, sliding=window < N,
                        update=update, relative=None if tol_units is None else tol_units == "data")
    levels = acceptance_levels(problem.noise_levels, stopper.accept, stopper.tail, stopper.tail_fraction,
                               sink=True)                                                               # (3, N+2)
    init, need_den = path_plan(init, fill, window, N, max_rounds)
    # The trajectory lives in the model's frame (ParaDiGMS iterates on VP latents): there the state barely moves at
    # high noise, while the VE-frame state shrinks by sigma_{i+1}/sigma_i per step, which Picard would have to undo
    # one window point per round.
    zeros = torch.zeros(B, dtype=torch.long, device=dev)
    y = problem.scale(x, zeros)
    # Every point guessed y_T (init=noise); the window's largest change only where the stop rule reads it.
    win = SlidingWindow(problem, y, measure_window=isinstance(stopper, FinalPointStop))
    noise0 = problem.sigmas[0] * problem.frame_scales[0]             # 0-d: the initial noise's std, model frame
    stopper.start(B, y, torch.where(torch.isfinite(noise0) & (noise0 > 0), noise0, torch.ones_like(noise0)))
    residuals: list[float] = []
    rounds = 0
    # The amplification guard (step 5): per-sample windows under the final rule (a shared window slides for the
    # whole batch: one sample cannot move it back).
    guard = isinstance(stopper, FinalPointStop) and not shared_window
    rule = UpdateRule(update, gain=guard, span=gain_span(N))          # the guard reads every rule's window gain
    # Each window start's position after a rollback, int(p * ROLLBACK) (N + 1,), made once (one gather a round): the
    # grid's start (a table, so a test can move it: at * 0.5, half the start, was the sliding window's of before)
    at = torch.arange(N + 1, device=dev)          # on the device (no copy from the host), in integers (MPS: no float64)
    rolled = (at * ROLLBACK).long() if guard else None
    if init == "x0":
        # 0. One call at x_T; every point from there with D held at its value (one round, counted).
        den_T = problem.evaluate(problem.scale(y, zeros, inverse=True), zeros, win.ar_b)
        # Written into the trajectory a bounded chunk of points at a time: no (N, B, *shape) temporary.
        model_frame_path(problem, y, den_T, zeros, win.ar_b, N, out=win.traj[1:N + 1])
        rounds = 1
        residuals.append(float("nan"))
        problem.report(RoundInfo(rounds, torch.tensor(win.begin_h), B, float("nan")))
    final = win.traj[N]               # (B, *shape) the final points: a view, written in place
    # Each sample's own data scale (tol_scale None) on a sliding window reads D at the window end while the window
    # ends before N (SlidingWindow.final_estimate: the final point there still holds its first guess), capped by the
    # accepted points' (each round's window starts, stopper.trust).
    follow = isinstance(stopper, FinalPointStop) and stopper.scale is None
    bounded = isinstance(stopper, FinalPointStop)     # the final rule caps the iterates (FinalPointStop.bound)
    while not win.all_done:
        W = window if max_rounds is None or rounds < max_rounds else 1
        # A window of one point reaches the final point from the accepted point before it alone: re-opening that
        # window (at N - 1 again) would compute the same value (a round of waste). A wider one re-opens at N - W, on
        # points whose values have moved since.
        from_last = win.begin >= N - 1 if W == 1 else None
        # 1-2. Evaluate D at the window points y_p .. y_{p+W-1} of every active sample (one batched call) and take
        #      the step increments dy_j = F_j(y_j) - y_j.
        estimate = follow and W < N       # windows that may end before N this round (host)
        rows = win.pack(W, need_den or estimate)
        dy, den_last = window_increments(problem, rows, win.den_buf, need_den or estimate)
        # 3. Update: Picard's values (W, B, *shape) at points p+1 .. p+W, their rms change err (W, B), the rule's.
        new, err, new_rule = rule(rows.start, dy, rows.old, rows.y_win, rows.valid)
        # 4. Accept the leading converged points, store, slide and guess the points that enter.
        scale_of = win.final_estimate(W, den_last) if estimate else final
        stopper.trust(rows.start)         # the window starts: accepted points, the cap on the own scale and iterates
        # Points past the cap (FinalPointStop.bound) keep their previous values; their change reads as inf
        new_rule, wild = stopper.bound(new_rule, rows.old) if bounded else (new_rule, None)
        stride, residual = win.accept(rows, err, levels, shared_window, stopper.accept_scale(scale_of))
        moved, window_moved = win.write(rows, new, new_rule, stride, stopper.scale_b, residual=rule.stalls,
                                        reset=wild)                                                       # (B,)
        win.slide(rows, stride, fill, den_last)
        shift = stride                    # each slot's history moves with its point (one rule.shift, below)
        if guard and rule.gain is not None:
            # A window that stretches the iterates' errors (a crossing between modes): the points accepted before
            # it carry errors sized for an ordinary trajectory. Move the window back and accept more strictly.
            back = stopper.amplified(rule.gain, win.active)
            win.begin = torch.where(back, rolled[win.begin], win.begin)
            shift = shift.masked_fill(back, W)       # their slots' history no longer applies: a shift by W clears it
            moved = moved.masked_fill(back, torch.inf)
        # 5. Stop: every point accepted, or the stop rule.
        win.done = stopper(win.done | (win.begin >= N), moved, final, window_moved, from_last)
        if stopper.reopen is not None:    # accepted to the end while the final point moved: the last window again
            win.begin = win.begin.masked_fill(stopper.reopen, max(N - W, 0))
            shift = shift.masked_fill(stopper.reopen, W)              # their slots' history no longer applies
        rule.shift(rows.k, shift)         # after the stride, a shift by W clears a slot's history whatever the stride
        rounds += 1
        residual, final_change = win.sync(rounds, residual, moved)    # the round's one device read
        residuals.append(residual)
        problem.report(RoundInfo(rounds, torch.tensor(win.begin_h), len(rows.host_steps), residual, final_change))
    converged = [max_rounds is None or r <= max_rounds for r in win.done_round]
    log.debug("picard (%s update, %s rule, %s init, %s fill, tol %g, accept %g): %d rounds", update, stop, init, fill,
              stopper.tol, stopper.accept, rounds)
    extra = {"converged": converged}
    if stop == "final":             # (B,) device tensors: the tolerance in force in the sample's units, its scale
        extra.update(tol_abs=stopper.tol_b, data_scale=stopper.scale_b)
        extra["rolled_back"] = stopper.tight < 1                      # (B,) bool: the amplification guard's
    return Outcome(win.final_state(), rounds, residuals, torch.tensor(win.done_round), extra)
