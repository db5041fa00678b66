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
         anderson y^new = y + R - (dX + dR) g, triangular              (ParaTAA, :func:`_anderson_values`)
    4. accept: point j+1 is converged when  rms(y_{j+1}^new - y_{j+1}^old) <= a * n_{j+1}  (``n``: ParaDiGMS's noise
       level, the std of the noise DDPM adds when leaving the point; 0 at the end; ``final``: ``a`` is stricter for
       a stochastic solver in a window of the whole grid, :func:`default_accept_tol`); if the first c window
       outputs converged, the first c + 1 new values were computed from accepted states: slide the window start
       there and fill the new slots (fill=path: the constant-D path from the old window end, D held at this round's
       value at the last window point; fill=copy: the latest value at the old window end, ParaDiGMS) (accelerated
       updates: the change tested is Picard's, the cumulative one-step defect, and accepted points take Picard's
       values: exact steps from converged points)
    5. stop the sample:
         paradigms   when every point is accepted (``a = tol``: ParaDiGMS's tolerance and rule)
         final       when its final point y_N moved by <= tol / 2 (max-abs, data units) in each of the last two rounds,
                     by no more than in the round before each (a change that grows is not quiet), or every point is
                     accepted (``a = accept_tol``, default :func:`default_accept_tol`: an accepted point is frozen,
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
sample to float rounding within N rounds. Anderson keeps the same safeguard (per sample, on its change over
Picard's).

Constant-D path (``init="x0"``, ``fill="path"``, :func:`_constant_d_path`): the trajectory the solver would take from
a point with D held at one value, which for DDIM / DDPM / Euler-Maruyama steps (linear in D and the noise,
``x_{j+1} - D = a_j (x_j - D) + k_j z_j``) is closed-form and carries the pre-drawn noise; the others take the DDIM
path. A guess only: it changes where the iteration starts, never its fixed point.

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

from paratime.kernels import cumsum0, picard_update

from ..denoiser import append_dims
from ..solvers import history_rows

from .common import Outcome, Problem, RoundInfo

__all__ = ["sample_picard", "STOPS", "UPDATES", "INITS", "FILLS", "DEFAULT_TOL", "default_accept_tol", "path_plan"]

log = logging.getLogger("paratime")

STOPS = ("final", "paradigms")
UPDATES = ("secant", "picard", "anderson")
INITS = ("auto", "noise", "x0")
FILLS = ("path", "copy")
#: past rounds each update keeps per window point: secant its last evaluation, anderson its last m values and
#: residuals (ParaTAA's memory, less the current round)
HISTORY = {"picard": 0, "secant": 1, "anderson": 3}
#: tolerance used when none is given: max |sample - sequential sample| for ``final``; ParaDiGMS's for ``paradigms``
DEFAULT_TOL = {"final": 2e-3, "paradigms": 0.1}
QUIET_ROUNDS, QUIET_SCALE = 2, 0.5
#: ``final`` rule: acceptance relative to the target, and how much stricter it is for a stochastic solver in a window
#: of the whole grid (see :func:`default_accept_tol`)
ACCEPT_SCALE, STOCHASTIC_FULL_SCALE = 1 / 30, 1 / 100
SAFEGUARD = 10.0   # largest accepted ratio of a secant correction to the Picard one
#: Tikhonov weight of the Anderson least squares, relative to the mean diagonal of its normal matrix (scale-free:
#: ParaTAA's absolute 1e-3, sized for 4x32x32 latents, is ~all of the normal matrix on a 2-D model)
ANDERSON_REG = 1e-3


def default_accept_tol(tol: float, stochastic_full: bool = False) -> float:
    """The window-slide tolerance (noise-level units) of the ``final`` rule: ``tol / 30``, or ``tol / 3000`` with
    ``stochastic_full`` (a stochastic solver with a window of the whole grid, ``W >= N``).

    An accepted point is frozen, and its error reaches the final point amplified: up to ~5x on ``gmm`` DDIM-100 for a
    sample near a mode boundary (and the secant iterates' cumulative defect underestimates their error up to ~3x
    more), so acceptance must be stricter than the target. A stochastic solver's trajectory amplifies far more (the
    reverse SDE's drift pulls apart twice as hard as the ODE's): on ``gmm`` DDPM-100, 1 sample in 4,000 moves
    ~650x per unit change of its initial noise and up to ~3e4x per unit change of a mid-trajectory point, and
    ``tol / 30`` left it 49x over tol (issue 17). No cheap per-sample measure of that amplification was found (the
    secant pairs' expansion along the last change underestimated it ~1e3x), so the stricter tolerance applies to
    every sample, where it costs NFE only: in a window of the whole grid the final point decides when a sample stops,
    and acceptance only saves evaluations (+12-17% NFE on ``gmm`` DDPM-100, rounds -1 to +1). A sliding window keeps
    ``tol / 30``: there acceptance drives the slide, so the rounds, and with more, smaller steps the frozen errors
    shrink (``gmm`` DDPM-1000, W 100: max |Δ| <= 0.14 tol on 4,000 samples at tol 1e-2 and 1e-3). Measured on
    ``gmm`` and the 3-D mixture of ``tests/test_accuracy.py``."""
    return tol * ACCEPT_SCALE * (STOCHASTIC_FULL_SCALE if stochastic_full else 1.0)


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
    ss, uu = (s * s).sum(-1), (u * u).sum(-1)                             # (W, B); x * x: pow(2)'s bits, faster
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
    return (d + torch.where(_sane(cumsum0(corr), change), corr, zero)).reshape(dy.shape)


def _sane(extra, change):
    """``(B, 1)`` whether a sample's accelerated change is usable this round: its largest correction ``extra`` (the
    accelerated values less Picard's, ``(W, B, D)``) is finite and <= SAFEGUARD x its largest Picard change
    ``change`` ``(W, B, D)``; where not, the sample takes Picard's values."""
    extra = extra.abs().amax((0, 2))
    return ((extra <= SAFEGUARD * change.abs().amax((0, 2))) & torch.isfinite(extra))[:, None]


def path_plan(init: str, fill: str, window: int, steps: int, max_rounds: int | None) -> tuple[str, bool]:
    """``(init, fill_reads_D)``: the initial guess in force (``auto``: ``x0`` when the window is shorter than the
    grid, else ``noise``) and whether the path fill runs (it reads D at the window end; only a window shorter than
    the grid, or ``max_rounds``' window of 1, slides). Either one makes :func:`_path_tables` (shared with the
    memory bound of :class:`paratime.config.SamplerConfig`)."""
    if init == "auto":
        init = "x0" if window < steps else "noise"
    return init, fill == "path" and (window < steps or max_rounds is not None)


def _path_tables(problem):
    """Tables for :func:`_constant_d_path`, made once per sample call: ``(C, Z)`` with ``C`` ``(N + 1,)`` the
    cumulative log step factors ``C_j = sum_{l<j} log a_l`` and ``Z`` ``(N + 1, B, *shape)`` (or None without step
    noise) the discounted noise ``Z_j = sum_{m<j} exp(-C_{m+1}) k_z,m z_m``. A step with ``D`` held is
    ``x_{j+1} - D = a_j (x_j - D) + k_z,j z_j`` (VE frame): ``a_j = 1 + k_d,j`` for solvers linear in ``D`` and the
    noise (DDIM, DDPM, Euler-Maruyama), the DDIM factor ``sigma_{j+1} / sigma_j`` and no noise for the others."""
    N = problem.steps
    coef = problem.solver.linear_step(torch.arange(N, device=problem.sigmas.device), problem.sigmas)
    a = problem.sigmas[1:] / problem.sigmas[:-1] if coef is None else 1 + coef[0]
    # log 0 (the step to sigma = 0) is clamped: exp(-30) is 0 to the guess, and keeps exp(-C) finite.
    C = torch.cat([a.new_zeros(1), a.log().clamp_min(-30).cumsum(0)])
    if coef is None or not torch.is_tensor(problem.noise):
        return C, None
    view = (N,) + (1,) * (problem.noise.ndim - 1)
    Z = (torch.exp(-C[1:]) * coef[1]).reshape(view) * problem.noise
    return C, torch.cat([torch.zeros_like(Z[:1]), Z.cumsum(0)])


def _constant_d_path(problem, tables, y_e, den_e, e, pts, b):
    """Guesses ``(K, B, *shape)`` (model frame) of points ``pts`` ``(K, B)`` from each sample's point ``e`` ``(B,)``
    (state ``y_e``, model frame) with ``D`` held at ``den_e`` (both ``(B, *shape)``; ``b`` the samples' indices),
    exact for the steps of :func:`_path_tables`, carrying the pre-drawn noise:
    ``x_P = D + exp(C_P - C_e) (x_e - D) + exp(C_P) (Z_P - Z_e)``."""
    C, Z = tables
    x_e = problem.scale(y_e, e, inverse=True)                        # (B, *shape), VE frame
    x = den_e + append_dims(torch.exp(C[pts] - C[e]), y_e.ndim + 1) * (x_e - den_e)
    if Z is not None:
        x = x + append_dims(torch.exp(C[pts]), y_e.ndim + 1) * (Z[pts, b] - Z[e, b])
    return problem.scale(x, pts)


def _anderson_values(new_pic, old, hist_x, hist_r, hist_ok):
    """ParaTAA's triangular Anderson step (Tang et al. 2024) on the window's points ``p+1 .. p+W``.

    The residual of point j is Picard's change ``R_j = new_j - old_j`` (the cumulative one-step defect from the
    window start: ParaTAA's residual of order W). With the point's m previous values and residuals,
    ``dX_j = [x_j - x_j^(1) ..]``, ``dR_j = [R_j - R_j^(1) ..]`` (``D x m``), Anderson (type II) sets
    ``x_j^new = x_j + R_j - (dX_j + dR_j) g_j``; triangular: ``g_j`` fits the residuals of the points up to j only
    (those point j depends on), ``g_j = argmin sum_{l<=j} |R_l - dR_l g|^2 + lam_j |g|^2`` with
    ``lam_j = ANDERSON_REG * mean diag(sum_{l<=j} dR_l^T dR_l)`` (relative, where ParaTAA's is absolute). Columns
    without history are 0; the per-sample fallback to Picard is the secant one.

    Args:
        new_pic, old: ``(W, B, *shape)`` Picard's new values and the old values of points p+1 .. p+W.
        hist_x, hist_r: ``(m, W, B, *shape)`` those points' values and residuals in earlier rounds, newest first.
        hist_ok: ``(m, W, B)`` whether each exists.
    Returns:
        ``(W, B, *shape)`` the accelerated values.
    """
    W, B = old.shape[:2]
    m = hist_ok.shape[0]
    x, R = old.reshape(W, B, -1), (new_pic - old).reshape(W, B, -1)
    ok, zero = hist_ok[..., None], x.new_zeros(())
    dX = torch.where(ok, x - hist_x.reshape(m, W, B, -1), zero)          # (m, W, B, D)
    dR = torch.where(ok, R - hist_r.reshape(m, W, B, -1), zero)
    # Normal equations summed over the points up to j: (W, B, m, m) and (W, B, m, 1).
    G = torch.einsum("iwbd,jwbd->wbij", dR, dR).cumsum(0)
    g = torch.einsum("iwbd,wbd->wbi", dR, R).cumsum(0)[..., None]
    lam = ANDERSON_REG * G.diagonal(dim1=-2, dim2=-1).mean(-1)           # (W, B); 1 where G = 0 (no history)
    G = G + torch.where(lam > 0, lam, 1.0)[..., None, None] * torch.eye(m, dtype=G.dtype, device=G.device)
    gamma = torch.linalg.solve_ex(G, g)[0][..., 0]                        # (W, B, m)
    corr = torch.einsum("wbi,iwbd->wbd", gamma, dX + dR)
    return (new_pic.reshape(W, B, -1) - torch.where(_sane(corr, R), corr, zero)).reshape(old.shape)


def sample_picard(x: torch.Tensor, problem: Problem, window: int, tol: float | None = None,
                  max_rounds: int | None = None, shared_window: bool = False, *, stop: str = "final",
                  update: str = "secant", accept_tol: float | None = None, init: str = "auto",
                  fill: str = "path") -> Outcome:
    """Sample with sliding-window Picard iteration.

    Args:
        x: ``(B, *shape)`` initial state (VE frame).
        problem: the trajectory to compute.
        window: W, time points evaluated per sample per round.
        tol: ``stop="final"``: the bound on the returned sample's distance to the sequential sample (max-abs
            over features, in the units of the returned sample) that the stopping rule aims at: a sample is returned
            once its final point moved by <= tol / 2, and by no more than the round before, in each of two
            successive rounds; ``stop="paradigms"``:
            ParaDiGMS's tolerance in units of the noise level. 0 runs to the exact fixed point (the sequential
            sample). None: ``DEFAULT_TOL[stop]``.
        max_rounds: rounds before the window shrinks to 1 point (the sequential sampler) for what is left;
            None: no limit (at most N rounds are ever needed).
        shared_window: slide one window for the whole batch, by the smallest stride of any sample (diffusers'
            ParaDiGMS pipeline).
        stop: ``final`` (default) or ``paradigms`` (see the module docstring).
        update: ``secant`` (default), ``picard`` or ``anderson`` (see the module docstring).
        accept_tol: ``stop="final"``: the window-slide tolerance in noise-level units; None:
            :func:`default_accept_tol` (stricter for a stochastic solver with a window of the whole grid). Ignored
            by ``paradigms`` (which slides at ``tol``).
        init: the initial guess of every point: ``noise`` (x_T, ParaDiGMS), ``x0`` (one network call at x_T, then
            the constant-D path from there, carrying the pre-drawn noise; the call is a round of its own, counted),
            or ``auto`` (default): ``x0`` when the window is shorter than the grid, else ``noise`` (a full window's
            first round already evaluates every point at x_T, so the extra call buys nothing there).
        fill: the guess of the points that enter a sliding window: ``path`` (default; the constant-D path from the
            old window end) or ``copy`` (the value at the old window end, ParaDiGMS).
    Returns:
        :class:`Outcome`; ``rounds`` counts rounds, ``residuals`` the worst ParaDiGMS residual per round,
        ``sample_rounds`` the round each sample finished (CPU), ``extra["converged"]`` per sample whether it
        finished before ``max_rounds``.
    Raises:
        ValueError: an unknown ``stop``, ``update``, ``init`` or ``fill``, or a negative ``tol`` / ``accept_tol``.
    """
    if stop not in STOPS:
        raise ValueError(f"stop: unknown {stop!r}; allowed: {', '.join(STOPS)}")
    if update not in UPDATES:
        raise ValueError(f"update: unknown {update!r}; allowed: {', '.join(UPDATES)}")
    if init not in INITS:
        raise ValueError(f"init: unknown {init!r}; allowed: {', '.join(INITS)}")
    if fill not in FILLS:
        raise ValueError(f"fill: unknown {fill!r}; allowed: {', '.join(FILLS)}")
    tol = DEFAULT_TOL[stop] if tol is None else float(tol)
    if not tol >= 0 or (accept_tol is not None and not accept_tol >= 0):
        raise ValueError(f"tol, accept_tol: must be >= 0, got {tol!r}, {accept_tol!r}")
    N, B, dev = problem.steps, x.shape[0], x.device
    solver = problem.solver
    if stop == "final":
        accept = (default_accept_tol(tol, solver.stochastic and window >= N) if accept_tol is None else
                  float(accept_tol))
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
    # (m, W, B, ...) stacks, newest first, of each window slot's point's past rounds, shifted with the window:
    # secant (y, dy, ok) of its evaluations, anderson (x, R, ok) of its values and residuals.
    hist = None
    depth = HISTORY[update]
    # Per point (N+1,): the acceptance threshold, the noise level and the level to divide by (1 where it is 0).
    lvl = problem.noise_levels
    levels = torch.stack([accept * lvl, lvl, torch.where(lvl > 0, lvl, torch.ones_like(lvl))])    # (3, N+1)
    begin = torch.zeros(B, dtype=torch.long, device=dev)              # window start: the last accepted point
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    quiet = torch.zeros(B, dtype=torch.long, device=dev)              # successive rounds the final point was quiet
    last_moved = torch.full((B,), float("inf"), dtype=traj.dtype, device=dev)   # its change in the previous round
    inf = torch.tensor(float("inf"), dtype=traj.dtype, device=dev)
    sink = torch.tensor(N + 1, device=dev)                            # row that masked writes go to
    feat = tuple(range(1, x.ndim))                                    # feature dimensions of (B, *shape)
    aranges: dict[int, torch.Tensor] = {}                             # arange(n) per window shape, made once
    # Host copies, refreshed by the one read per round.
    begin_h, done_h, done_round = [0] * B, [False] * B, [0] * B
    residuals: list[float] = []
    rounds = 0
    init, need_den = path_plan(init, fill, window, N, max_rounds)
    tables = _path_tables(problem) if init == "x0" or need_den else None
    if init == "x0":
        # 0. One call at x_T; every point from there with D held at its value (one round, counted).
        zeros = torch.zeros(B, dtype=torch.long, device=dev)
        den_T = problem.evaluate(problem.scale(x, zeros, inverse=True), zeros, ar_b)
        pts = torch.arange(1, N + 1, device=dev)[:, None]               # (N, 1)
        traj[1:N + 1] = _constant_d_path(problem, tables, x, den_T, zeros, pts, ar_b)
        rounds = 1
        residuals.append(float("nan"))
        problem.report(RoundInfo(rounds, torch.tensor(begin_h), B, float("nan")))
    while not all(done_h):
        W = window if max_rounds is None or rounds < max_rounds else 1
        if W not in aranges:
            aranges[W], aranges[W + 1] = torch.arange(W, device=dev), torch.arange(W + 1, device=dev)
        k = aranges[W][:, None]                                       # (W, 1)
        active = ~done                                                # (B,)
        # Rows, sample-major: their steps are known on the host, so no device read is needed to build them (and
        # solvers with a second call on some rows size it from them: Heun, PLMS, Langevin).
        host_steps = [p + j for p, d in zip(begin_h, done_h) if not d for j in range(min(W, N - p))]   # (M,)
        M = len(host_steps)
        counts = (N - begin).clamp_max(W) * active                    # (B,) window points of each sample
        valid = k < counts                                            # (W, B)
        bb = torch.repeat_interleave(ar_b, counts, output_size=M)     # (M,)
        kk = torch.arange(M, device=dev) - (counts.cumsum(0) - counts)[bb]
        jj = begin[bb] + kk
        # The window's points p .. p+W (clamped to N) in one gather: y_win = points p+k, old = the points they update.
        idx = (begin + aranges[W + 1][:, None]).clamp_max(N)          # (W+1, B)
        win = traj[idx, ar_b1]                                        # (W+1, B, *shape)
        start, y_win, old, tgt = win[0], win[:W], win[1:], idx[1:]    # tgt: (W, B) the point each slot updates

        # 1-2. Evaluate the denoiser at every window point of every active sample (one batched call) and take the
        #      step increments, in the model's frame.
        last = (counts.cumsum(0) - 1).clamp_min(0) if need_den else None   # (B,) each sample's last window row
        y_rows = y_win[kk, bb]                                        # (M, *shape), model frame
        x_rows = problem.scale(y_rows, jj, inverse=True)              # VE frame
        if solver.uses_history:
            den_rows = problem.evaluate(x_rows, jj, bb)
            # History at the previous points: this round's neighbouring window slots, or the buffer before the
            # window start (solver.history_value: D itself for dpmpp, the eps prediction for plms).
            den_buf[jj, bb] = solver.history_value(x_rows, den_rows, jj, problem.sigmas)
            dx_rows = problem.increment(x_rows, jj, bb, den_rows, history_rows(den_buf, jj, bb, solver.history_depth),
                                        host_steps=host_steps)
            den_last = den_rows[last] if need_den else None
        else:
            # Linear steps in one pass from the network outputs (Problem.step); D only where the fill needs it.
            den_last, dx_rows = problem.step(x_rows, jj, bb, last, host_steps=host_steps)
        dy = torch.zeros_like(y_win)                                  # (W, B, *shape)
        dy[kk, bb] = problem.scale(x_rows + dx_rows, jj + 1) - y_rows

        # 3. Picard update: new (W, B, *shape) at points begin+1+k, err (W, B) rms change (fused kernel or
        #    reference). err, the Picard change (the cumulative one-step defect from the window start), also
        #    decides acceptance under the accelerated updates: a small accelerated change does not imply a small
        #    defect.
        new, err = picard_update(start, dy, old)
        new_sec = new
        if depth:
            if hist is not None:          # no previous evaluation anywhere in the first round: Picard's values
                h_a, h_b, h_ok = hist[0][:, :W], hist[1][:, :W], hist[2][:, :W] & valid
                if update == "anderson":
                    new_sec = _anderson_values(new, old, h_a, h_b, h_ok)
                else:
                    dy_sec = _secant_increment(dy, new, old, y_win, h_a[0], h_b[0], h_ok[0])
                    new_sec, _ = picard_update(start, dy_sec, old, want_err=False)
            entry = (old, new - old, valid) if update == "anderson" else (y_win, dy, valid)
            hist = (tuple(e[None] for e in entry) if hist is None else
                    tuple(torch.cat([e[None], h[:depth - 1, :W]]) for e, h in zip(entry, hist)))

        # 4. Acceptance. If the old values of the first c points converged, the new values of the first c + 1
        #    points were all computed from accepted states (ParaDiGMS's ``1 + ind``).
        thr, lvl, lvl_div = levels[:, tgt]                            # (W, B) each
        ok = (err <= thr) & valid
        stride = torch.minimum(ok.int().cumprod(0).sum(0) + 1, counts)   # 1 + the leading converged points
        if shared_window:
            smallest = torch.where(active, stride, N + 1).min()
            stride = torch.where(active, smallest, 0)
        if new_sec is not new:
            # Accepted points take Picard's values (exact steps from converged points), the rest the accelerated ones.
            new = torch.where((k < stride).reshape(W, B, *([1] * (new.ndim - 2))), new, new_sec)
        traj[torch.where(valid, tgt, sink), ar_b1] = new
        # Change of the final point (max-abs: exact in any reduction order), inf while it is outside the window.
        to_end = N - 1 - begin                                        # (B,) slot that updates point N, if < W
        k_end = to_end.clamp(0, W - 1)
        moved = (new[k_end, ar_b] - old[k_end, ar_b]).abs().amax(feat)
        moved = torch.where(active & (to_end < W), moved, inf)

        # Slide; points entering the window get their guess (masked writes go to the sink row). A window of N
        # points always ends at N: nothing enters.
        old_end = begin + counts
        begin = begin + stride
        if W < N:
            p = old_end + 1 + k                                       # (W, B)
            entering = (p <= (begin + W).clamp_max(N)) & active
            if fill == "copy":                # the latest value at the old window end
                guess = traj[old_end, ar_b][None].expand_as(new)
            else:                             # the constant-D path from there, D at the last window point
                guess = _constant_d_path(problem, tables, traj[old_end, ar_b], den_last, old_end,
                                         torch.where(entering, p, old_end), ar_b)                 # (W, B, *shape)
            traj[torch.where(entering, p, sink), ar_b1] = guess
        if hist is not None:
            src = k + stride                                          # (W, B) slot the point came from
            keep = src < W
            src = src.clamp_max(W - 1)
            hist = (hist[0][:, src, ar_b1], hist[1][:, src, ar_b1], hist[2][:, src, ar_b1] & keep)

        # 5. Stop.
        done = done | (begin >= N)
        if stop == "final" and tol > 0:
            # Quiet: moved <= tol / 2 and no more than the round before (a growing change is not converging).
            calm = (moved <= tol * QUIET_SCALE) & (moved <= last_moved)
            last_moved = moved
            quiet = torch.where(calm, quiet + 1, 0)
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
    log.debug("picard (%s update, %s rule, %s init, %s fill, tol %g, accept %g): %d rounds", update, stop, init, fill,
              tol, accept, rounds)
    x_final = problem.scale(traj[N], torch.full((B,), N, device=dev), inverse=True)
    return Outcome(x_final, rounds, residuals, torch.tensor(done_round), {"converged": converged})
