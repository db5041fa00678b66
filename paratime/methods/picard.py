"""Picard iteration over a sliding window (ParaDiGMS, Shih et al. 2023), with per-sample windows, an accelerated
(secant) update and a stopping rule on the returned sample's error.

Notation (the model's frame, ``y = frame_scale * x``; VP latents as in ParaDiGMS): points ``y_0 .. y_N``, the step
map ``F_j(y) = y + dy_j(y)``, the window start ``p`` (the last accepted point), window size ``W``, slot ``k`` of the
window holds point ``p + k`` and produces the new value of point ``p + k + 1``. One round, for every active sample:

    1. evaluate D at the window points y_p .. y_{p+W-1}             (one batched call over every sample's window)
    2. dy_j = F_j(y_j) - y_j for every window point                  (the solver's step map, data-parallel in j)
    3. update the window:
         picard   y_{j+1}^new = y_p + sum_{i=p..j} dy_i              (Newton with the Jacobian of F_j taken as I)
         secant   y_{j+1}^new = y_p + sum_{i=p..j} (dy_i + u_i c_i)  (Jacobian I + u_i s_i^T / |s_i|^2, see below)
    4. accept: point j+1 is converged when  rms(y_{j+1}^new - y_{j+1}^old) <= a * n_{j+1}  (``n``: ParaDiGMS's noise
       level, the std of the noise DDPM adds when leaving the point; 0 at the end); if the first c window outputs
       converged, the first c + 1 new values were computed from accepted states: slide the window start there and
       fill the new slots with the latest value at the old window end (secant: the change tested is Picard's, the
       cumulative one-step defect, and accepted points take Picard's values: exact steps from converged points)
    5. stop the sample:
         paradigms   when every point is accepted (``a = tol``: ParaDiGMS's tolerance and rule)
         final       when its final point y_N moved by <= tol / 2 (max-abs, data units) in each of the last two rounds,
                     or every point is accepted (``a = accept_tol``, default tol / 30: an accepted point is frozen,
                     so its error must stay well below the target)

Secant update (a Broyden rank-1 model of each step's Jacobian from that point's last two evaluations): with the
previous evaluation of point j at ``h_j`` with increment ``dh_j``, ``s_j = y_j - h_j`` and ``u_j = dy_j - dh_j``,
``F_j(y) ~ F_j(y_j) + (I + u_j s_j^T / |s_j|^2)(y - y_j)``. The Newton recurrence along the window,
``y_{j+1}^new = F_j(y_j) + J_j (y_j^new - y_j)``, is ``c_j = s_j . (y_j^new - y_j) / |s_j|^2`` with
``y_j^new - y_j = delta_j + sum_{l<j} u_l c_l`` (``delta_j``: Picard's change of point j): a unit lower-triangular
system ``(I - L) c = r``, ``L_jl = s_j . u_l / |s_j|^2`` (l < j), ``r_j = s_j . delta_j / |s_j|^2``, solved per sample.
Safeguards: a point's rank-1 term is used only if ``|u_j| <= 10 |s_j|`` (so its correction is at most 10x the Picard
one), and a sample falls back to Picard for the round if its secant change exceeds 10x its Picard change. The first
window point is always one exact step from the accepted start, so at ``tol = 0`` both updates reach the sequential
sample to float rounding within N rounds.

Host syncs: the row count of the next network call depends on where each window starts, so the host reads one
small packed tensor per round (window starts, done flags, residuals); nothing else in the loop reads the device.
Every decision is a function of the state through elementwise ops, max-abs reductions (exact in any order) and the
deterministic Picard kernel, so every rank of an SPMD backend decides the same.

Shapes: ``traj`` is ``(N + 2, B, *shape)`` (row N + 1 is a sink for masked writes); window tensors are
``(W, B, ...)``; evaluation rows are the valid ``(k, b)`` pairs, flattened, sample-major.
"""

from __future__ import annotations

import logging

import torch

from paratime.kernels import picard_update

from ..solvers import history_rows

from .common import Outcome, Problem, RoundInfo

__all__ = ["sample_picard", "STOPS", "UPDATES", "DEFAULT_TOL", "default_accept_tol"]

log = logging.getLogger("paratime")

STOPS = ("final", "paradigms")
UPDATES = ("secant", "picard")
#: tolerance used when none is given: max |sample - sequential sample| for ``final``; ParaDiGMS's for ``paradigms``
DEFAULT_TOL = {"final": 2e-3, "paradigms": 0.1}
QUIET_ROUNDS, QUIET_SCALE = 2, 0.5
SAFEGUARD = 10.0   # largest accepted ratio of a secant correction to the Picard one


def default_accept_tol(tol: float) -> float:
    """The window-slide tolerance (noise-level units) of the ``final`` rule: ``tol / 30``. An accepted point is
    frozen, and its error reaches the final point amplified (up to ~5x on ``gmm`` DDIM-100 for a sample near a mode
    boundary, and the secant iterates' cumulative defect underestimates their error up to ~3x more), so acceptance
    must be stricter than the target; measured on ``gmm`` and the 3-D mixture of ``tests/test_accuracy.py``."""
    return tol / 30


def _secant_increment(dy, new_pic, old, y_win, hist_y, hist_dy, hist_ok):
    """The secant update's increments ``dy_j + u_j c_j`` for one round.

    Args:
        dy: ``(W, B, *shape)`` Picard increments at the window points (0 at invalid slots).
        new_pic, old: ``(W, B, *shape)`` Picard's new and the old values of the points they update.
        y_win: ``(W, B, *shape)`` the states they were evaluated at.
        hist_y, hist_dy: ``(W, B, *shape)`` each point's previous evaluation state and increment.
        hist_ok: ``(W, B)`` whether that previous evaluation exists (and the slot is valid).
    Returns:
        ``(W, B, *shape)`` increments to accumulate from the window start.
    """
    W, B = dy.shape[:2]
    d, yw, hy, hd = (t.reshape(W, B, -1) for t in (dy, y_win, hist_y, hist_dy))
    change = (new_pic - old).reshape(W, B, -1)                            # Picard's change of points p+1 .. p+W
    s, u = yw - hy, d - hd                                                # (W, B, D)
    ss, uu = s.pow(2).sum(-1), u.pow(2).sum(-1)                           # (W, B)
    use = (hist_ok & (ss > 0) & (uu <= SAFEGUARD**2 * ss))[..., None]     # (W, B, 1)
    zero = d.new_zeros(())
    s_hat = torch.where(use, s / ss[..., None], zero)
    u = torch.where(use, u, zero)
    # (I - L) c = r per sample, L strictly lower triangular; r_j = s_hat_j . delta_j with delta_0 = 0 and
    # delta_j = change_{j-1} (the same change at points p .. p+W-1).
    r = torch.cat([zero.expand(1, B), (s_hat[1:] * change[:-1]).sum(-1)]).T[..., None]   # (B, W, 1)
    # L[b, j, l] = s_hat_j . u_l; the unit lower-triangular solve reads only the strictly lower part of -L.
    neg_L = torch.bmm(s_hat.transpose(0, 1), u.permute(1, 2, 0)).neg_()  # (B, W, W)
    c = torch.linalg.solve_triangular(neg_L, r, upper=False, unitriangular=True)[..., 0].T   # (W, B)
    corr = u * c[..., None]                                               # (W, B, D)
    # Per-sample fallback to Picard when the secant change of any point exceeds SAFEGUARD x the largest Picard one.
    pic_change = change.abs().amax((0, 2))                                                 # (B,)
    sec_change = corr.cumsum(0).abs().amax((0, 2))                                         # (B,)
    sane = (sec_change <= SAFEGUARD * pic_change) & torch.isfinite(sec_change)
    return (d + torch.where(sane[:, None], corr, zero)).reshape(dy.shape)


def sample_picard(x: torch.Tensor, problem: Problem, window: int, tol: float | None = None,
                  max_rounds: int | None = None, shared_window: bool = False, *, stop: str = "final",
                  update: str = "secant", accept_tol: float | None = None) -> Outcome:
    """Sample with sliding-window Picard iteration.

    Args:
        x: ``(B, *shape)`` initial state (VE frame).
        problem: the trajectory to compute.
        window: W, time points evaluated per sample per round.
        tol: ``stop="final"``: the bound on the returned sample's distance to the sequential sample (max-abs
            over features, in the units of the returned sample) that the stopping rule aims at: a sample is returned
            once its final point moved by <= tol / 2 in each of two successive rounds; ``stop="paradigms"``: ParaDiGMS's tolerance in units of the noise
            level. 0 runs to the exact fixed point (the sequential sample). None: ``DEFAULT_TOL[stop]``.
        max_rounds: rounds before the window shrinks to 1 point (the sequential sampler) for what is left;
            None: no limit (at most N rounds are ever needed).
        shared_window: slide one window for the whole batch, by the smallest stride of any sample (diffusers'
            ParaDiGMS pipeline).
        stop: ``final`` (default) or ``paradigms`` (see the module docstring).
        update: ``secant`` (default) or ``picard``.
        accept_tol: ``stop="final"``: the window-slide tolerance in noise-level units; None:
            :func:`default_accept_tol`. Ignored by ``paradigms`` (which slides at ``tol``).
    Returns:
        :class:`Outcome`; ``rounds`` counts rounds, ``residuals`` the worst ParaDiGMS residual per round,
        ``sample_rounds`` the round each sample finished (CPU), ``extra["converged"]`` per sample whether it
        finished before ``max_rounds``.
    Raises:
        ValueError: an unknown ``stop`` or ``update``, or a negative ``tol`` / ``accept_tol``.
    """
    if stop not in STOPS:
        raise ValueError(f"stop: unknown {stop!r}; allowed: {', '.join(STOPS)}")
    if update not in UPDATES:
        raise ValueError(f"update: unknown {update!r}; allowed: {', '.join(UPDATES)}")
    tol = DEFAULT_TOL[stop] if tol is None else float(tol)
    if not tol >= 0 or (accept_tol is not None and not accept_tol >= 0):
        raise ValueError(f"tol, accept_tol: must be >= 0, got {tol!r}, {accept_tol!r}")
    N, B, dev = problem.steps, x.shape[0], x.device
    solver = problem.solver
    if stop == "final":
        accept = default_accept_tol(tol) if accept_tol is None else float(accept_tol)
    else:
        accept = tol
    ar_b = torch.arange(B, device=dev)
    ar_b1 = ar_b[None]                                                # (1, B)
    # The trajectory lives in the model's frame (ParaDiGMS iterates on VP latents): there the state barely moves
    # at high noise, while the VE-frame state shrinks by sigma_{i+1}/sigma_i per step, which Picard would have to
    # undo one window point per round.
    x = problem.scale(x, torch.zeros(B, dtype=torch.long, device=dev))
    traj = x.unsqueeze(0).repeat(N + 2, *([1] * x.ndim))            # (N+2, B, *shape), initial guess x_T
    den_buf = torch.zeros_like(traj[:N]) if solver.uses_history else None
    hist = None             # secant: (y, dy, ok) of each window slot's point's last evaluation, shifted with the window
    # Per point (N+1,): the acceptance threshold, the noise level and the level to divide by (1 where it is 0).
    lvl = problem.noise_levels
    levels = torch.stack([accept * lvl, lvl, torch.where(lvl > 0, lvl, torch.ones_like(lvl))])    # (3, N+1)
    begin = torch.zeros(B, dtype=torch.long, device=dev)              # window start: the last accepted point
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    quiet = torch.zeros(B, dtype=torch.long, device=dev)              # successive rounds the final point moved <= tol
    inf = torch.tensor(float("inf"), dtype=traj.dtype, device=dev)
    sink = torch.tensor(N + 1, device=dev)                            # row that masked writes go to
    feat = tuple(range(1, x.ndim))                                    # feature dimensions of (B, *shape)
    aranges: dict[int, torch.Tensor] = {}                             # arange(n) per window shape, made once
    # Host copies, refreshed by the one read per round.
    begin_h, done_h, done_round = [0] * B, [False] * B, [0] * B
    residuals: list[float] = []
    rounds = 0
    while not all(done_h):
        W = window if max_rounds is None or rounds < max_rounds else 1
        if W not in aranges:
            aranges[W], aranges[W + 1] = torch.arange(W, device=dev), torch.arange(W + 1, device=dev)
        k = aranges[W][:, None]                                       # (W, 1)
        active = ~done                                                # (B,)
        # Rows, sample-major: M is known on the host, so no device read is needed to build them.
        M = sum(min(W, N - p) for p, d in zip(begin_h, done_h) if not d)
        counts = (N - begin).clamp_max(W) * active                    # (B,) window points of each sample
        valid = k < counts                                            # (W, B)
        bb = torch.repeat_interleave(ar_b, counts, output_size=M)     # (M,)
        kk = torch.arange(M, device=dev) - (counts.cumsum(0) - counts)[bb]
        jj = begin[bb] + kk
        # The window's points p .. p+W (clamped to N) in one gather: y_win = points p+k, old = the points they update.
        idx = (begin + aranges[W + 1][:, None]).clamp_max(N)          # (W+1, B)
        win = traj[idx, ar_b1]                                        # (W+1, B, *shape)
        start, y_win, old, tgt = win[0], win[:W], win[1:], idx[1:]    # tgt: (W, B) the point each slot updates

        # 1. Evaluate the denoiser at every window point of every active sample (one batched call).
        y_rows = y_win[kk, bb]                                        # (M, *shape), model frame
        x_rows = problem.scale(y_rows, jj, inverse=True)              # VE frame
        den_rows = problem.evaluate(x_rows, jj, bb)
        prev_rows = None
        if solver.uses_history:
            # History at the previous points: this round's neighbouring window slots, or the buffer before the
            # window start (solver.history_value: D itself for dpmpp, the eps prediction for plms).
            den_buf[jj, bb] = solver.history_value(x_rows, den_rows, jj, problem.sigmas)
            prev_rows = history_rows(den_buf, jj, bb, solver.history_depth)

        # 2. Step increments in the model's frame.
        dy = torch.zeros_like(y_win)                                  # (W, B, *shape)
        x_next = x_rows + problem.increment(x_rows, jj, bb, den_rows, prev_rows)
        dy[kk, bb] = problem.scale(x_next, jj + 1) - y_rows

        # 3. Picard update: new (W, B, *shape) at points begin+1+k, err (W, B) rms change (fused kernel or
        #    reference). err, the Picard change (the cumulative one-step defect from the window start), also
        #    decides acceptance under the secant update: a small secant change does not imply a small defect.
        new, err = picard_update(start, dy, old)
        new_sec = new
        if update == "secant":
            if hist is not None:          # no previous evaluation anywhere in the first round: Picard's values
                dy_sec = _secant_increment(dy, new, old, y_win, hist[0][:W], hist[1][:W], hist[2][:W] & valid)
                new_sec, _ = picard_update(start, dy_sec, old, want_err=False)
            hist = (y_win, dy, valid)

        # 4. Acceptance. If the old values of the first c points converged, the new values of the first c + 1
        #    points were all computed from accepted states (ParaDiGMS's ``1 + ind``).
        thr, lvl, lvl_div = levels[:, tgt]                            # (W, B) each
        ok = (err <= thr) & valid
        stride = torch.minimum(ok.int().cumprod(0).sum(0) + 1, counts)   # 1 + the leading converged points
        if shared_window:
            smallest = torch.where(active, stride, N + 1).min()
            stride = torch.where(active, smallest, 0)
        if new_sec is not new:
            # Accepted points take Picard's values (exact steps from converged points), the rest the secant ones.
            new = torch.where((k < stride).reshape(W, B, *([1] * (new.ndim - 2))), new, new_sec)
        traj[torch.where(valid, tgt, sink), ar_b1] = new
        # Change of the final point (max-abs: exact in any reduction order), inf while it is outside the window.
        to_end = N - 1 - begin                                        # (B,) slot that updates point N, if < W
        k_end = to_end.clamp(0, W - 1)
        moved = (new[k_end, ar_b] - old[k_end, ar_b]).abs().amax(feat)
        moved = torch.where(active & (to_end < W), moved, inf)

        # Slide; new slots start from the latest value at the old window end (masked writes go to the sink row).
        old_end = begin + counts
        begin = begin + stride
        p = old_end + 1 + k                                           # (W, B)
        fill = (p <= (begin + W).clamp_max(N)) & active
        traj[torch.where(fill, p, sink), ar_b1] = traj[old_end, ar_b][None].expand_as(new)
        if hist is not None:
            src = k + stride                                          # (W, B) slot the point came from
            keep = src < W
            src = src.clamp_max(W - 1)
            hist = (hist[0][src, ar_b1], hist[1][src, ar_b1], hist[2][src, ar_b1] & keep)

        # 5. Stop.
        done = done | (begin >= N)
        if stop == "final" and tol > 0:
            quiet = torch.where(moved <= tol * QUIET_SCALE, quiet + 1, 0)
            done = done | (quiet >= QUIET_ROUNDS)
        rounds += 1
        ratio = torch.where(valid & (lvl > 0), err / lvl_div, -inf).amax()
        # The round's one device read: window starts (N once done), the worst residual, the final point's change.
        state = torch.cat([torch.where(done, N, begin).to(traj.dtype), ratio.view(1).to(traj.dtype),
                           torch.where(active, moved, -inf).amax().view(1)]).tolist()
        begin_h = [int(v) for v in state[:B]]
        for b in range(B):
            if begin_h[b] >= N and not done_h[b]:
                done_h[b], done_round[b] = True, rounds
        residuals.append(state[B] if state[B] > float("-inf") else float("nan"))
        problem.report(RoundInfo(rounds, torch.tensor(begin_h), M, residuals[-1],
                                 state[B + 1] if state[B + 1] < float("inf") else float("nan")))
    converged = [max_rounds is None or r <= max_rounds for r in done_round]
    log.debug("picard (%s update, %s rule, tol %g, accept %g): %d rounds", update, stop, tol, accept, rounds)
    x_final = problem.scale(traj[N], torch.full((B,), N, device=dev), inverse=True)
    return Outcome(x_final, rounds, residuals, torch.tensor(done_round), {"converged": converged})
