"""Picard iteration over a sliding window (ParaDiGMS, Shih et al. 2023), with per-sample windows.

For each sample, with window start p (the first point not yet accepted) and window size W, one round is:

    1. evaluate D at the window points x_p .. x_{p+W-1}           (one batched call over every sample's window)
    2. dx_j = step(x_j, D_j, j) for every window point              (the solver's step map, data-parallel in j)
    3. x_{j+1}^new = x_p + sum_{i=p..j} dx_i                        (cumulative sum from the window start)
    4. point j+1 is converged when  rms(x_{j+1}^new - x_{j+1}^old) <= tol * n_{j+1}
    5. if the first c window outputs converged, accept c + 1 of them: each new value was computed from states that
       were already accepted (so at least one point, x_{p+1}^new, which is one exact step from x_p); slide the
       window start there and fill the new slots with the latest value at the old window end.

The iteration runs on the model's frame ``x_native = frame_scale * x`` (VP latents, as ParaDiGMS): the solver step
is taken in the VE frame and its result mapped back.

``n_j`` is ParaDiGMS's noise level: the standard deviation (in the model's frame, so for VP models the change is
measured on ``sqrt(alpha_bar) * x``) of the noise DDPM adds on the step leaving point j, ``sqrt(beta_tilde)``;
it is 0 at the last point, which is accepted once the points before it are. Because every round accepts at least one
point, a sample finishes within N rounds, and with ``tol = 0`` the result is the sequential one to float rounding.
Samples have their own window start: a sample that has finished stops costing evaluations.

Shapes: ``traj`` is ``(N + 1, B, *shape)``; window tensors are ``(W, B, ...)`` with ``k`` the offset in the window;
evaluation rows are the valid ``(k, b)`` pairs, flattened.
"""

from __future__ import annotations

import torch

from paratime.kernels import picard_update

from .common import Outcome, Problem, RoundInfo

__all__ = ["sample_picard"]


def sample_picard(x: torch.Tensor, problem: Problem, window: int, tol: float, max_rounds: int | None = None,
                  shared_window: bool = False) -> Outcome:
    """Sample with sliding-window Picard iteration.

    Args:
        x: ``(B, *shape)`` initial state (VE frame).
        problem: the trajectory to compute.
        window: W, time points evaluated per sample per round.
        tol: tolerance in units of the noise level (ParaDiGMS's ``tolerance``); 0 runs to the exact fixed point.
        max_rounds: Picard rounds before the window shrinks to 1 point (the sequential sampler) for what is left;
            None: no limit (at most N rounds are ever needed).
        shared_window: slide one window for the whole batch, by the smallest stride of any sample (diffusers'
            ParaDiGMS pipeline). Converged samples then keep being refined: more NFE, smaller differences from the
            sequential sample for the same tolerance.
    Returns:
        :class:`Outcome`; ``rounds`` counts rounds, ``residuals`` the worst residual per round.
    """
    N, B, dev = problem.steps, x.shape[0], x.device
    solver = problem.solver
    ar_b = torch.arange(B, device=dev)
    # The trajectory lives in the model's frame (ParaDiGMS iterates on VP latents): there the state barely moves
    # at high noise, while the VE-frame state shrinks by sigma_{i+1}/sigma_i per step, which Picard would have to
    # undo one window point per round.
    x = problem.scale(x, torch.zeros(B, dtype=torch.long, device=dev))
    traj = x.unsqueeze(0).repeat(N + 1, *([1] * x.ndim))            # (N+1, B, *shape), initial guess x_T
    den_buf = torch.zeros_like(traj[:N]) if solver.uses_history else None
    thresholds = tol * problem.noise_levels                           # (N+1,)
    begin = torch.zeros(B, dtype=torch.long, device=dev)
    done_round = torch.zeros(B, dtype=torch.long, device=dev)
    residuals: list[float] = []
    rounds = 0
    while bool((begin < N).any()):
        W = window if max_rounds is None or rounds < max_rounds else 1
        k = torch.arange(W, device=dev)[:, None]                     # (W, 1)
        active = begin < N                                            # (B,)
        pts = begin[None] + k                                         # (W, B) point index of each window slot
        valid = (pts < N) & active[None]
        kk, bb = valid.nonzero(as_tuple=True)                         # rows: (M,) each
        jj = pts[kk, bb]

        # 1. Evaluate the denoiser at every window point of every active sample (one batched call).
        x_rows = problem.scale(traj[jj, bb], jj, inverse=True)       # (M, *shape), VE frame
        den_rows = problem.evaluate(x_rows, jj, bb)
        prev_rows = None
        if solver.uses_history:
            # D at the previous point: the neighbouring window slot, or the buffer at the window start.
            den_win = torch.zeros_like(traj[:W])
            den_win[kk, bb] = den_rows
            first = den_buf[(begin - 1).clamp_min(0), ar_b].unsqueeze(0)
            prev_rows = torch.cat([first, den_win[:-1]])[kk, bb]
            den_buf[jj, bb] = den_rows

        # 2.-3. Step increments, cumulative sum from each sample's window start.
        dx = torch.zeros_like(traj[:W])                               # (W, B, *shape)
        x_next = x_rows + problem.increment(x_rows, jj, bb, den_rows, prev_rows)
        dx[kk, bb] = problem.scale(x_next, jj + 1) - traj[jj, bb]     # the step in the model's frame
        tgt = (pts + 1).clamp_max(N)
        # new: (W, B, *shape), points begin+1+k; err: (W, B) rms change (fused kernel or torch reference).
        new, err = picard_update(traj[begin, ar_b], dx, traj[tgt, ar_b[None]])

        # 4. Convergence per point. If the old values of the first c points converged, the new values of the first
        #    c + 1 points were all computed from accepted states: accept them (ParaDiGMS's ``1 + ind``).
        ok = (err <= thresholds[tgt]) & valid
        fail = torch.cat([~ok, torch.ones_like(ok[:1])])
        stride = torch.minimum(fail.int().argmax(0) + 1, valid.sum(0))
        if shared_window:
            stride = torch.where(active, stride[active].min(), 0)
        traj[jj + 1, bb] = new[kk, bb]

        # 5. Slide; new slots start from the latest value at the old window end.
        old_end = begin + valid.sum(0)
        begin = begin + stride
        p = old_end[None] + 1 + k
        fill = (p <= (begin + W).clamp_max(N)[None]) & active[None]
        kf, bf = fill.nonzero(as_tuple=True)
        traj[p[kf, bf], bf] = traj[old_end[bf], bf]

        rounds += 1
        done_round = torch.where(active & (begin >= N), rounds, done_round)
        level = problem.noise_levels[tgt][valid]
        moved = err[valid][level > 0] / level[level > 0]
        residuals.append(float(moved.max()) if moved.numel() else float("nan"))
        problem.report(RoundInfo(rounds, begin.clone(), int(jj.numel()), residuals[-1]))
    converged = (done_round <= max_rounds) if max_rounds is not None else torch.ones_like(begin, dtype=torch.bool)
    x_final = problem.scale(traj[N], torch.full((B,), N, device=dev), inverse=True)
    return Outcome(x_final, rounds, residuals, done_round, {"converged": [bool(c) for c in converged]})
