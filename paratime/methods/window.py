"""Window management of Picard-type methods: the trajectory, each sample's sliding window over it, the rows of one
batched network call, acceptance, the slide and the guesses of the points that enter (notation of
:mod:`paratime.methods.picard`: points ``y_0 .. y_N`` in the model's frame, window start ``p``, slot ``k`` holds point
``p + k`` and produces the new value of point ``p + k + 1``).

:class:`SlidingWindow` owns the state (device tensors and their host copies, refreshed by one small read per round);
:func:`window_increments` is one round's batched call and step map; :func:`model_frame_path` the constant-D guess
(:func:`paratime.solvers.constant_d_path`) in the model's frame.

Shapes: ``traj`` is ``(N + 2, B, *shape)`` (row N + 1 is a sink for masked writes); window tensors ``(W, B, ...)``;
evaluation rows are the valid ``(k, b)`` pairs, flattened, sample-major (``(M, ...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..solvers import constant_d_path, history_rows, step_column

from .common import Problem, max_abs

__all__ = ["Rows", "SlidingWindow", "window_increments", "model_frame_path", "acceptance_levels", "reads_entries"]


@dataclass(frozen=True)
class Rows:
    """One round's window points and evaluation rows.

    Attributes:
        k: ``(W, 1)`` slot index. counts: ``(B,)`` window points per sample (0 once done). valid: ``(W, B)``.
        bb, kk, jj: ``(M,)`` each row's sample, slot and step. host_steps: the rows' steps on the host.
        frames: ``(2, M, 1, ..)`` the frame scales of each row's point and the next (:meth:`Problem.scale`'s
            factors at ``jj`` and ``jj + 1``), shaped to broadcast over a row's features.
        start: ``(B, *shape)`` ``y_p``. y_win: ``(W, B, *shape)`` points ``p .. p+W-1``. old: ``(W, B, *shape)``
            points ``p+1 .. p+W`` (clamped to N). tgt: ``(W, B)`` the point each slot updates. dest: ``(W, B)``
            ``tgt`` at valid slots, the sink row N + 1 elsewhere (where a slot's value is written, and the column of
            the acceptance levels it reads).
        last: ``(B,)`` each sample's last row (for the fill's ``D``; a sample without rows reads another's, -1
            before any: its guess goes to the sink row), or None.
    """

    k: torch.Tensor
    counts: torch.Tensor
    valid: torch.Tensor
    bb: torch.Tensor
    kk: torch.Tensor
    jj: torch.Tensor
    host_steps: list[int]
    frames: torch.Tensor
    start: torch.Tensor
    y_win: torch.Tensor
    old: torch.Tensor
    tgt: torch.Tensor
    dest: torch.Tensor
    last: torch.Tensor | None

    @property
    def W(self) -> int:
        return self.k.shape[0]


def acceptance_levels(noise_levels: torch.Tensor, accept: float, tail: float = 1.0,
                      tail_fraction: float = 0.0, sink: bool = False) -> torch.Tensor:
    """``(3, N + 1)`` per point: the acceptance threshold ``accept * n`` (times ``tail`` on the points ``j >= (1 -
    tail_fraction) N``), the noise level ``n`` and the level to divide the residual by (1 where ``n`` is 0).
    ``sink``: ``(3, N + 2)``, a column for the sink row N + 1 appended that accepts nothing and moves no residual
    (threshold NaN, level 0, divisor 1: what :meth:`SlidingWindow.accept` reads at the slots it does not use)."""
    lvl = noise_levels
    u = torch.arange(lvl.numel(), device=lvl.device, dtype=lvl.dtype) / max(lvl.numel() - 1, 1)     # j / N
    threshold = accept * lvl * torch.where(u >= 1 - tail_fraction, tail, 1.0)     # x 1.0 elsewhere: exact
    levels = torch.stack([threshold, lvl, torch.where(lvl > 0, lvl, torch.ones_like(lvl))])
    if sink:
        column = torch.stack([lvl.new_full((1,), float("nan")), lvl.new_zeros(1), lvl.new_ones(1)])    # (3, 1)
        levels = torch.cat([levels, column], 1)
    return levels


def model_frame_path(problem: Problem, y_e: torch.Tensor, den_e: torch.Tensor, e: torch.Tensor, b: torch.Tensor,
                     span: int, out: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Guesses (model frame) of the points ``e + 1 .. e + span`` after each sample's point ``e`` ``(B,)`` (state
    ``y_e``, model frame) with ``D`` held at ``den_e`` (both ``(B, *shape)``; ``b`` the samples): the constant-D path
    of :func:`paratime.solvers.constant_d_path`, between the frames, drawing only the noise rows of those steps.
    Points past N repeat the state at N.

    Args:
        span: points per sample, a host integer. out: ``(span, B, *shape)`` to write the guesses into (a view of
            the trajectory: then no ``(span, B, *shape)`` temporary), or None for a new tensor. chunk: points per
            chunk (default: bounded elements, :data:`paratime.solvers.PATH_CHUNK_ELEMENTS`).
    Returns:
        ``(span, B, *shape)``: ``out``, or the new tensor.
    """
    x_e = problem.scale(y_e, e, inverse=True)                        # (B, *shape), VE frame
    N = problem.steps
    for k0, x in constant_d_path(problem.solver, problem.sigmas, problem.noise, x_e, den_e, e, b, span, chunk):
        c = x.shape[0]
        pts = (e + step_column(problem.solver, problem.sigmas, k0 + 1, c)).clamp_max(N)   # (c, B)
        if out is None and c == span:
            return problem.scale(x, pts)                              # one chunk: no copy
        if out is None:
            out = torch.empty((span, *y_e.shape), dtype=y_e.dtype, device=y_e.device)
        out[k0:k0 + c] = problem.scale(x, pts)
    return out


def reads_entries(window: int, steps: int) -> bool:
    """Whether points enter the window and its rounds read their guesses (the x0 guess, ``fill``): a window shorter
    than the grid and wider than one point (one of the whole grid holds every point from the start; one of a single
    point computes each point before reading it)."""
    return 1 < window < steps


class SlidingWindow:
    """Each sample's window over the trajectory, for a batch of ``B`` samples.

    Args:
        problem: the trajectory. y: ``(B, *shape)`` the initial state, model frame. measure_window: whether
            :meth:`write` measures the largest change of each window (the final stop rule reads it; the paradigms
            rule does not).
    State: ``traj`` ``(N + 2, B, *shape)``; ``begin`` ``(B,)`` each window start (the last accepted point); ``done``
    ``(B,)``; ``den_buf`` ``(N, B, *shape)`` the history values of a multistep solver (else None); host copies
    ``begin_h``, ``done_h`` and ``done_round`` (the round each sample finished).
    """

    def __init__(self, problem: Problem, y: torch.Tensor, measure_window: bool = True):
        N, B, dev = problem.steps, y.shape[0], y.device
        self.problem, self.N, self.B, self.measure_window = problem, N, B, measure_window
        self.traj = y.unsqueeze(0).repeat(N + 2, *([1] * y.ndim))     # (N+2, B, *shape), initial guess y_T
        self.den_buf = torch.zeros_like(self.traj[:N]) if problem.solver.uses_history else None
        self.begin = torch.zeros(B, dtype=torch.long, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self._active = ~self.done
        self.ar_b = torch.arange(B, device=dev)
        # Filled on the device, not copied from the host (a copy from pageable memory is a host sync on CUDA: two of
        # a Picard call's set-up syncs on an H100).
        self._inf = torch.full((), float("inf"), dtype=y.dtype, device=dev)
        self._neg_inf = -self._inf
        self._sink = torch.full((), N + 1, dtype=torch.long, device=dev)     # row that masked writes go to
        self._b_row = self.ar_b[None]                                 # (1, B)
        self._aranges: dict[int, torch.Tensor] = {}                   # arange(n) per window shape, made once
        self._frame_scales, self._sigmas = problem.frame_scales, problem.sigmas    # (N + 1,): see write()
        self._final, self._frame_N = self.traj[N], problem.frame_scales[N]     # final_estimate's, made once
        # (2, N, 1, ..): the frame scales of each step's point and the next, shaped to broadcast over a row's
        # features (a row's pair in one gather, see pack())
        self._frame_pairs = torch.stack([problem.frame_scales[:-1], problem.frame_scales[1:]]).reshape(
            2, N, *([1] * (y.ndim - 1)))
        self._sigma_finite = self._sigmas.abs() < torch.inf                           # isfinite per point, once
        self._one, self._zero = self._sigmas.new_ones(()), self._inf.new_zeros(())     # 0-d, made once
        self.begin_h, self.done_h, self.done_round = [0] * B, [False] * B, [0] * B

    @property
    def all_done(self) -> bool:
        return all(self.done_h)

    @property
    def active(self) -> torch.Tensor:
        """``(B,)`` the samples this round works on (``~done`` as :meth:`pack` found it)."""
        return self._active

    def _arange(self, n: int) -> torch.Tensor:
        if n not in self._aranges:
            self._aranges[n] = torch.arange(n, device=self.ar_b.device)
        return self._aranges[n]

    def _column(self, n: int, first: int = 0) -> torch.Tensor:
        """``(n, 1)``: ``first .. first + n - 1``, made once per grid and shape (the path fill's
        :func:`~paratime.solvers.step_column`, shared with it)."""
        return step_column(self.problem.solver, self.problem.sigmas, first, n)

    def pack(self, W: int, want_last: bool) -> Rows:
        """The rows of this round's call: points ``p .. p+W-1`` of every active sample (clamped to the grid).

        The rows' steps are known on the host, so no device read builds them (and solvers with a second call on some
        rows size it from them: Heun, PLMS, Langevin). ``want_last``: give each sample's last row (the fill's D).
        """
        N, begin = self.N, self.begin
        k = self._column(W)                                           # (W, 1)
        host_steps = [p + j for p, d in zip(self.begin_h, self.done_h) if not d for j in range(min(W, N - p))]
        M = len(host_steps)
        self._active = ~self.done                                     # (B,) the samples this round works on
        counts = (N - begin).clamp_max(W) * self._active              # (B,) window points of each sample
        valid = k < counts                                            # (W, B)
        ends = counts.cumsum(0)                                       # (B,) each sample's rows end there
        # Row r belongs to the first sample whose rows end after r: repeat_interleave(ar_b, counts) in one call.
        row_ids = self._arange(W * self.B)[:M]                        # (M,) 0 .. M-1: a view of one made per W
        bb = torch.searchsorted(ends, row_ids, right=True)            # (M,)
        kk = row_ids - (ends - counts)[bb]
        # The window's points p .. p+W (clamped to N) in one gather: y_win = points p+k, old = the points they update.
        idx = (begin + self._column(W + 1)).clamp_max(N)              # (W+1, B)
        jj = idx[kk, bb]                                              # (M,) p + k: a row's point is below N, unclamped
        frames = self._frame_pairs[:, jj]                             # (2, M, 1, ..)
        win = self.traj[idx, self._b_row]                             # (W+1, B, *shape)
        last = ends - 1 if want_last else None                        # (B,) each sample's last row
        tgt = idx[1:]
        dest = torch.where(valid, tgt, self._sink)                    # (W, B) the sink row at unused slots
        return Rows(k, counts, valid, bb, kk, jj, host_steps, frames, win[0], win[:W], win[1:], tgt, dest, last)

    def accept(self, rows: Rows, err: torch.Tensor, levels: torch.Tensor, shared: bool,
               scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stride, residual)``: how far each window slides, ``(B,)``, and the round's worst ParaDiGMS residual
        (0-d, ``-inf`` when no point with a noise level > 0 moved).

        If the old values of the first c points converged (``err <= levels[0]``), the new values of the first c + 1
        points were all computed from accepted states (ParaDiGMS's ``1 + ind``). ``shared``: one stride for the whole
        batch, the smallest of any active sample (diffusers' ParaDiGMS pipeline). ``scale``: ``(B,)`` factor on each
        sample's thresholds (the stop rule's :meth:`accept_scale`), or None. ``levels``: ``(3, N + 2)``, with the
        sink column (:func:`acceptance_levels` ``sink``): an unused slot reads it, accepts nothing (its NaN
        threshold) and adds no residual (its level 0).
        """
        thr, lvl, lvl_div = levels[:, rows.dest]                      # (W, B) each
        thr = thr if scale is None else thr * scale
        ok = err <= thr                                               # false at the unused slots (NaN)
        stride = torch.minimum(ok.cumprod(0).sum(0) + 1, rows.counts)   # 1 + the leading converged points
        if shared:
            smallest = torch.where(self._active, stride, self.N + 1).min()
            stride = torch.where(self._active, smallest, 0)
        residual = torch.where(lvl > 0, err / lvl_div, self._neg_inf).amax()     # level 0 at the unused slots
        return stride, residual

    def write(self, rows: Rows, new: torch.Tensor, new_rule: torch.Tensor, stride: torch.Tensor,
              scale: torch.Tensor | None = None, residual: bool = False,
              reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store the round's values; return ``(moved, window_moved)``, each ``(B,)``: the change of each sample's
        final point (inf while the final point is outside the window) and the largest change of any point of its
        window (0 for a sample without one; None unless :attr:`measure_window`), both max-abs over features
        (exact in any reduction order). A window point's change is taken in the VP frame of data with scale
        ``scale`` ``(B,)`` (None: 1), where a point at any noise level has the data's scale: ``x s / sqrt(s^2 +
        sigma^2)`` in the VE frame, so the same problem scaled as a whole (data and sigmas) gives the same change
        per unit scale. Accepted points (slots below ``stride``) take Picard's values ``new`` (exact steps from
        converged points), the rest the rule's. ``residual``: a point's change is the larger of the rule's and
        Picard's (its one-step defect), for a rule whose own change can stall while the defect does not
        (Anderson's). ``reset`` ``(W, B)``: points held at their previous values (past the stop rule's cap,
        :meth:`~paratime.methods.stops.FinalPointStop.bound`), whose change reads as inf; None: none."""
        N, W = self.N, rows.W
        defect = max_abs(new - rows.old, 2) if residual else None             # (W, B), Picard's change
        if new_rule is not new:
            new = torch.where((rows.k < stride).reshape(W, self.B, *([1] * (new.ndim - 2))), new, new_rule)
        self.traj[rows.dest, self._b_row] = new
        change = max_abs(new - rows.old, 2)                                    # (W, B)
        if defect is not None:
            change = torch.maximum(change, defect)
        if reset is not None:         # (an accepted slot stores Picard's value, not the held one: its inf only delays)
            change = change.masked_fill(reset, torch.inf)
        window_moved = None
        if self.measure_window:
            # (W, B) the factor from the model's frame to the VP frame of data at scale s, 1 / (frame_scale sqrt(1 +
            # (sigma / s)^2)): 1 for VP latents at s = 1, s / sqrt(s^2 + sigma^2) in VE; its limit s where sigma is
            # inf
            # (1 / x as reciprocal: 1 / x is reciprocal(x) x 1; hypot's 1 a 0-d one, broadcast: the same bits.
            # Not a per-point table: hypot's vectorized and scalar CPU paths differ in the last bit, so a table would
            # not reproduce the per-round values.)
            tgt = rows.tgt
            sigma, frame, finite = self._sigmas[tgt], self._frame_scales[tgt], self._sigma_finite[tgt]
            s = self._one if scale is None else scale.to(sigma.dtype)
            to_data = torch.where(finite, (frame * torch.hypot(self._one, sigma / s)).reciprocal(), s)
            window_moved = torch.where(rows.valid, change * to_data.to(change.dtype), self._zero).amax(0)   # (B,)
        # The change of the slot that updates point N (at most one valid slot does; none outside the window or for a
        # sample without one: inf), as a min over the slots: min(x, inf, ..) is x, NaN included.
        return torch.where(rows.dest == N, change, self._inf).amin(0), window_moved

    def slide(self, rows: Rows, stride: torch.Tensor, fill: str, den_last: torch.Tensor | None) -> None:
        """Move each window start by ``stride``; the points entering the window get their guess (masked writes go
        to the sink row): ``copy`` the latest value at the old window end (ParaDiGMS), ``path`` the constant-D path
        from there with D at this round's value at the last window point. A window of the whole grid always ends at
        N: nothing enters; a window of one point computes its next point before reading it: nothing to guess."""
        N, W, ar_b = self.N, rows.W, self.ar_b
        old_end = self.begin + rows.counts
        self.begin = self.begin + stride
        if not reads_entries(W, N):
            return
        p = old_end + self._column(W, 1)                              # (W, B) old_end + 1 + k
        entering = (p <= (self.begin + W).clamp_max(N)) & self._active
        if fill == "copy":
            guess = self.traj[old_end, ar_b][None].expand(W, *self.traj.shape[1:])
        else:
            guess = model_frame_path(self.problem, self.traj[old_end, ar_b], den_last, old_end, ar_b, W)  # at p
        self.traj[torch.where(entering, p, self._sink), self._b_row] = guess

    def sync(self, rounds: int, residual: torch.Tensor, moved: torch.Tensor) -> tuple[float, float]:
        """The round's one device read: window starts (N once done), the worst residual and the largest final-point
        change of an active sample; refreshes the host copies. Returns ``(residual, final_change)`` (nan for none).
        Call after :attr:`done` is updated; ``moved`` is this round's (inf where outside the window)."""
        dt, B = self.traj.dtype, self.B
        state = torch.cat([self.begin.masked_fill(self.done, self.N).to(dt),
                           torch.stack([residual.to(dt), torch.where(self._active, moved, self._neg_inf).amax()])])
        state = state.tolist()
        self.begin_h = [int(v) for v in state[:B]]
        for b in range(B):
            if self.begin_h[b] >= self.N and not self.done_h[b]:
                self.done_h[b], self.done_round[b] = True, rounds
        return (state[B] if state[B] > float("-inf") else float("nan"),
                state[B + 1] if state[B + 1] < float("inf") else float("nan"))

    def final_estimate(self, W: int, den_last: torch.Tensor) -> torch.Tensor:
        """``(B, *shape)`` each sample's final point as the data scale reads it (model frame): while its window of
        ``W`` points ends before N the final point still holds its first guess (the x0 path's end, D(x_T): near the
        data's mean, a median 0.015x the sample's max-abs on gmm DDPM-1000), so there ``den_last``, D at the window
        end, in the final point's frame (the constant-D path's end from there, where sigma_N is 0); else the final
        point itself."""
        outside = (self.begin < self.N - W).reshape(self.B, *([1] * (den_last.ndim - 1)))
        return torch.where(outside, den_last * self._frame_N, self._final)

    def final_state(self) -> torch.Tensor:
        """``(B, *shape)`` the final points, VE frame."""
        return self.problem.scale(self.traj[self.N], torch.full((self.B,), self.N, device=self.ar_b.device),
                                  inverse=True)


def window_increments(problem: Problem, rows: Rows, den_buf: torch.Tensor | None,
                      want_den: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Evaluate the denoiser at every row (one batched call) and take the step increments in the model's frame.

    Args:
        problem: the trajectory. rows: :meth:`SlidingWindow.pack`. den_buf: a multistep solver's history buffer
            ``(N, B, *shape)`` (updated in place), else None. want_den: return ``D`` at each sample's last row.
    Returns:
        ``(dy, den_last)``: ``(W, B, *shape)`` increments (0 at invalid slots) and ``(B, *shape)`` or None.
    """
    kk, bb, jj = rows.kk, rows.bb, rows.jj
    f_j, f_next = rows.frames                                         # (M, 1, ..) each: Problem.scale's factors
    y_rows = rows.y_win[kk, bb]                                       # (M, *shape), model frame
    x_rows = y_rows / f_j                                             # VE frame: problem.scale(y_rows, jj, inverse)
    if den_buf is not None:
        solver = problem.solver
        den_rows = problem.evaluate(x_rows, jj, bb)
        # History at the previous points: this round's neighbouring window slots, or the buffer before the window
        # start (solver.history_value: D itself for dpmpp, the eps prediction for plms).
        den_buf[jj, bb] = solver.history_value(x_rows, den_rows, jj, problem.sigmas)
        x_next = problem.advance(x_rows, jj, bb, den_rows, history_rows(den_buf, jj, bb, solver.history_depth),
                                 host_steps=rows.host_steps)
        den_last = den_rows[rows.last] if want_den else None
    else:
        # Linear steps in one pass from the network outputs (Problem.step_to); D only where the fill needs it.
        den_last, x_next = problem.step_to(x_rows, jj, bb, rows.last, host_steps=rows.host_steps)
    dy = torch.zeros_like(rows.y_win)                                 # (W, B, *shape)
    # The next states in the next-state form (Problem.advance), differenced in the model's frame (O(1) operands).
    dy[kk, bb] = x_next * f_next - y_rows                             # problem.scale(x_next, jj + 1) - y_rows
    return dy, den_last
