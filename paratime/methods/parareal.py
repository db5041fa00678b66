"""Parareal over time slices (coarse/fine, as in SRDS, Selvam et al. 2024), with per-sample convergence.

Notation: the N-step grid is cut into S slices at points ``n_0 = 0 < n_1 < ... < n_S = N``. ``U[s]`` is the state at
``n_s``. The fine propagator ``F_s`` runs the chosen solver's steps from ``n_s`` to ``n_{s+1}`` (with the pre-drawn
noise of those steps, so the fixed point is the sequential sample); the coarse propagator ``G_s`` jumps the slice with
a few jumps of the same network (:func:`coarse_jump`: DDIM, carrying the fine solver's own pre-drawn noise for
DDPM-type solvers), or a user callable. One iteration k is:

    1. F_s(U^k[s]) for every unfinished slice, all slices at once: the slices advance in lockstep, one batched
       network call per fine step (rows = slices x samples, spread over the backend's workers)
    2. sweep: U^{k+1}[s+1] = G_s(U^{k+1}[s]) + F_s(U^k[s]) - G_s(U^k[s])         (sequential in s)
    3. slice start s is converged when rms(U^{k+1}[s] - U^k[s]) <= tol * n_{n_s} (Picard's noise-scaled test,
       in the model's frame) and, for a multistep solver, the history it carries (H[s], the solver's history value
       at n_s - 1: D, or eps for DEIS, from the fine solve of slice s - 1) moved no more than that between the solve
       that read it and the one that made it (not in iteration 1, which read no history: there a start is
       accepted only as exact); accept the converged prefix plus one (its value came from accepted states: exact
       when the last accepted start did not move, else off by that move times the sensitivity of F - G to it; for a
       stochastic solver, whose fine steps stretch that move far more, only when exact, and its starts converge only
       after two iterations in a row within their threshold).

After k iterations the first k slice starts are exact, so at most S iterations are ever needed and the result is then
the fine sequential one to float rounding. The coarse jump is only a predictor, whose errors the correction removes;
for ancestral SDE solvers (``ddpm``, ``ddim`` with eta > 0) it adds the slice's pre-drawn noise exactly as the fine
steps would if D stayed constant over the slice; for ``euler_maruyama`` and a Langevin corrector it is the
deterministic DDIM jump.

Pipelined (SRDS, ``method="parareal_pipelined"``, :func:`sample_parareal_pipelined`): the fine solve of slice s for
iteration k+1 starts as soon as U^{k+1}[s] is known, while the sweep goes on with later slices; each tick is one
batched call holding one step of every running propagation. The sweep-by-sweep :func:`sample_parareal` also reports
``pipelined_rounds``, the critical path its own iterates would have under that schedule (``U^{k+1}[s+1]`` is ready
at ``max(ready^{k+1}[s] + coarse_steps, ready^k[s] + fine steps of slice s)``).

Device: everything per tick stays on the state's device. Slice boundaries and coarse sub-grids are host integers
decided once per call; per iteration one host read (the rows per slice of the next iteration and the residual) fixes
the layout, so a fine tick slices a prefix of the rows (rows are ordered longest slice first) and a sweep step a
contiguous block, with no ``nonzero``, boolean masks or host-built index tensors. The pipelined variant reads the
acceptance test when a new iterate reaches the frontier and moves its per-tick step indices with one asynchronous
copy.

Pieces: :class:`_SliceLayout` (the slices on the host: bounds, lengths, the fine rows' order and blocks),
:class:`_Propagators` (F and G over rows), :class:`_Iterates` (the sweep-by-sweep state and its steps 1-3, the
acceptance tests and the iteration's one host read), :class:`_CriticalPath` (``pipelined_rounds``); for the pipelined
variant, :class:`_Schedule` (iterates, results, accepted starts and running propagations) and :func:`_tick` (one
batched call).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from ..solvers import true_indices
from .common import Outcome, Problem, RoundInfo, rms

__all__ = ["sample_parareal", "sample_parareal_pipelined", "slice_bounds", "coarse_subgrids", "takes_solver"]

Coarse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def slice_bounds(steps: int, slices: int | None) -> torch.Tensor:
    """``(S + 1,)`` slice boundaries on the CPU (host integers), near-equal slices; default S = round(sqrt(N))."""
    S = slices or max(1, round(math.sqrt(steps)))
    return torch.linspace(0, steps, S + 1, dtype=torch.float64).round().long().unique()


def check_coarse_steps(bounds: torch.Tensor, coarse_steps: int) -> None:
    """``coarse_steps`` is at most the fine steps of the shortest slice of ``bounds`` (host): more would be capped
    there (:func:`coarse_subgrids` keeps distinct grid points), so the option would not do what it says.

    Raises:
        ValueError: naming ``coarse_steps``.
    """
    shortest = int((bounds[1:] - bounds[:-1]).min())
    if coarse_steps > shortest:
        raise ValueError(f"coarse_steps: at most the fine steps of the shortest slice ({shortest} of "
                         f"{int(bounds[-1])} steps in {bounds.numel() - 1} slices), got {coarse_steps}")


def takes_solver(solver) -> bool:
    """Whether Parareal can run ``solver``: it carries at most one previous D across a slice boundary."""
    return solver.history_depth <= 1


def check_solver(solver) -> None:
    """Refuse a solver Parareal cannot run (:func:`takes_solver`).

    Raises:
        ValueError: naming ``solver``.
    """
    if not takes_solver(solver):
        raise ValueError(f"solver: Parareal carries one previous D across slices; {solver.name!r} reads "
                         f"{solver.history_depth}: use method='picard' or 'sequential', or solver='dpmpp_2m'")


def coarse_subgrids(bounds: torch.Tensor, coarse_steps: int) -> list[list[int]]:
    """Per slice, the coarse propagator's distinct grid points from ``n_s`` to ``n_{s+1}`` (host integers)."""
    b = bounds.tolist()
    return [torch.linspace(float(b[s]), float(b[s + 1]), coarse_steps + 1).round().long().unique().tolist()
            for s in range(len(b) - 1)]


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as a long tensor on ``device``, copied asynchronously (pinned memory) on CUDA."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _checked_coarse(out, x: torch.Tensor) -> torch.Tensor:
    """The user's ``coarse(x, sigma_from, sigma_to)`` output ``out``, checked to be a tensor of ``x``'s shape
    (metadata only: no host read). A ``(B, 1)`` output for ``(B, 2)`` states broadcast silently in Parareal's
    correction (a wrong sample) and failed deep inside the pipelined one with torch's own size error.

    Raises:
        ValueError: naming ``coarse``, where it is not.
    """
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"coarse: must return a tensor of the state's shape {tuple(x.shape)}; got {got}")
    return out


class _SliceLayout:
    """The slices of the N-step grid, host integers decided once per call: ``bounds_h`` ``(S + 1,)`` (CPU tensor),
    ``start`` (the same as a list: slice s runs from ``start[s]`` to ``start[s + 1]``), ``bounds`` on the state's
    device, ``lengths`` (fine steps per slice), ``sub`` (the coarse sub-grids, :func:`coarse_subgrids`) and
    ``order``, the slices longest first (the order of the fine rows: the rows still running at fine step m are a
    prefix, and each slice's rows a contiguous block).

    Raises:
        ValueError: ``coarse_steps`` above the shortest slice's fine steps (without a ``coarse`` callable).
    """

    def __init__(self, steps: int, slices: int | None, coarse_steps: int, coarse: Coarse | None,
                 device: torch.device):
        self.bounds_h = slice_bounds(steps, slices)                        # (S+1,) host
        if coarse is None:
            check_coarse_steps(self.bounds_h, coarse_steps)
        self.S = self.bounds_h.numel() - 1
        self.start = self.bounds_h.tolist()
        self.bounds = self.bounds_h.to(device)
        self.lengths = (self.bounds_h[1:] - self.bounds_h[:-1]).tolist()   # fine steps per slice (host)
        self.sub = coarse_subgrids(self.bounds_h, coarse_steps)
        self.order = sorted(range(self.S), key=lambda s: -self.lengths[s])  # fine rows: longest slices first

    def running(self, counts: list[int]) -> list[int]:
        """The fine rows still running at each fine step, for ``counts`` rows per slice (in :attr:`order`)."""
        # Up to the longest slice that still has rows: an accepted longer slice must not leave a zero-row step (its
        # rows are gone, the shorter slices' solves are done).
        horizon = max(n for n, c in zip(self.lengths, counts) if c)
        return [sum(c for n, c in zip(self.lengths, counts) if n > m) for m in range(horizon)]

    def row_starts(self, counts: list[int]) -> list[int]:
        """``(M,)`` host integers: each fine row's slice start (its first step index)."""
        return [self.start[s] for s in self.order for _ in range(counts[s])]

    def blocks(self, counts: list[int]) -> list[slice]:
        """Per slice, its block of the fine rows (slices in :attr:`order`, ``counts`` rows each)."""
        out, o = [slice(0)] * self.S, 0
        for s in self.order:
            out[s], o = slice(o, o + counts[s]), o + counts[s]
        return out


class _Propagators:
    """Fine and coarse propagators over rows (slice s, sample b)."""

    def __init__(self, problem: Problem, layout: _SliceLayout, coarse: Coarse | None):
        self.p, self.coarse = problem, coarse
        self.start = layout.start                                # host integers: slice s from start[s]
        self.bounds = layout.bounds_h.to(problem.sigmas.device)
        self.coarse_calls = 0
        self.sub = layout.sub

    def fine_lockstep(self, U: torch.Tensor, s: torch.Tensor, b: torch.Tensor, hist: torch.Tensor | None,
                      running: list[int], starts: list[int]):
        """``F_s(U)`` for rows ``(s, b)``, all slices advancing together.

        ``running[m]`` is the number of rows still running at fine step m: rows come longest slice first, so they
        are a prefix; ``starts`` are the rows' slice starts on the host (their step indices, for the step maps).
        ``hist`` is the solver's history value (:meth:`~paratime.solvers.Solver.history_value`: D, or eps for
        DEIS) at the point before each slice start (multistep solvers). Returns the slice ends and, with ``hist``,
        each slice's last history value (the next slice's history).
        """
        p, lo = self.p, self.bounds[s]
        x = U.clone()
        prev = None if hist is None else hist.clone()
        for m, r in enumerate(running):
            i, steps_h = lo[:r] + m, [n + m for n in starts[:r]]
            if prev is None:       # one fused pass from the network outputs for linear steps (Problem.step_to)
                x[:r] = p.step_to(x[:r], i, b[:r], host_steps=steps_h)[1]
                continue
            xr = x[:r]
            den = p.evaluate(xr, i, b[:r])
            x1 = p.advance(xr, i, b[:r], den, prev[:r], host_steps=steps_h)
            prev[:r] = p.solver.history_value(xr, den, i, p.sigmas)   # what the sequential loop keeps
            x[:r] = x1
        return x, prev

    def coarse_step(self, U: torch.Tensor, s: int, b: torch.Tensor) -> torch.Tensor:
        """``G_s(U)`` for rows of samples ``b``, all in slice ``s``."""
        p, R = self.p, U.shape[0]
        if self.coarse is not None:
            self.coarse_calls += 1
            s_from, s_to = p.sigmas[self.start[s]].repeat(R), p.sigmas[self.start[s + 1]].repeat(R)
            return _checked_coarse(self.coarse(U.clone(), s_from, s_to), U)
        x, pts = U, self.sub[s]
        for c in range(len(pts) - 1):
            i = torch.full((R,), pts[c], dtype=torch.long, device=U.device)
            j = torch.full((R,), pts[c + 1], dtype=torch.long, device=U.device)
            x = coarse_jump(p, x, p.evaluate(x, i, b), i, j, b, span=pts[c + 1] - pts[c])
        return x


def coarse_jump(p: Problem, x: torch.Tensor, den: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                b: torch.Tensor, span: int | None = None) -> torch.Tensor:
    """One network call's jump of rows from grid point ``i`` to ``j`` with ``D`` held at its value at ``i``: the
    solver's own :meth:`~paratime.solvers.Solver.jump` (exact for DDIM / DDPM under a constant ``D``, carrying the
    fine solver's pre-drawn noise; the deterministic DDIM jump for the others). ``span``: the longest ``j - i``, a
    host integer (the coarse sub-grids are host lists), so the jump never reads it off the device."""
    return p.solver.jump(x, den, i, j, b, p.noise, p.sigmas, span=span)


class _Tally:
    """Rows evaluated (``rows``) and network calls made (``calls``) per kind (``fine``, ``coarse``)."""

    def __init__(self):
        self.rows, self.calls = {"fine": 0, "coarse": 0}, {"fine": 0, "coarse": 0}

    def counting(self, problem: Problem, kind: str) -> Problem:
        """``problem`` whose ``evaluate`` and ``outputs`` count their rows and calls under ``kind``."""
        def counted(fn):
            def ev(xr, i, b):
                self.rows[kind] += b.numel()
                self.calls[kind] += 1
                return fn(xr, i, b)
            return None if fn is None else ev
        return replace(problem, evaluate=counted(problem.evaluate), outputs=counted(problem.outputs))


class _Iterates:
    """Parareal's iterate state: the slice starts ``U`` ``(S+1, B, *shape)`` (VE frame), the last coarse values
    ``G_old`` ``(S, B, *shape)``, a multistep solver's histories ``hist`` (the solver's history value at n_s - 1, per
    slice), each sample's first slice whose start is not accepted (``begin``, ``(B,)``), the iteration it finished
    (``done_round``) and, on the host, the rows per slice of the next iteration (``counts``). Built by the initial
    coarse sweep ``U[s+1] = G_s(U[s])``."""

    def __init__(self, x: torch.Tensor, problem: Problem, layout: _SliceLayout, tol: float, coarse: _Propagators):
        S, B, dev = layout.S, x.shape[0], x.device
        self.p, self.layout = problem, layout
        self.order_dev = _to_device(layout.order, dev)                     # one copy, before any network call
        # Initial coarse sweep: U[s+1] = G_s(U[s]).
        self.U = x.new_zeros((S + 1, *x.shape))                             # (S+1, B, *shape), VE frame
        self.U[0] = x
        self.G_old = torch.zeros_like(self.U[:S])
        ar_b = torch.arange(B, device=dev)
        for s in range(S):
            self.G_old[s] = coarse.coarse_step(self.U[s], s, ar_b)
            self.U[s + 1] = self.G_old[s]
        self.hist = torch.zeros_like(self.U[:S]) if problem.solver.uses_history else None
        self.begin = torch.zeros(B, dtype=torch.long, device=dev)           # first slice whose start is not accepted
        self.done_round = torch.zeros(B, dtype=torch.long, device=dev)
        self.sl = torch.arange(S, device=dev)[:, None].expand(S, B)
        self.level = problem.noise_levels[layout.bounds[1:]][:, None].expand(S, B)     # (S, B)
        self.thresholds = tol * problem.noise_levels[layout.bounds]         # (S+1,)
        self.below_prev = torch.zeros((S, B), dtype=torch.bool, device=dev)     # a stochastic solver's last test
        self.counts = [B] * S                                               # rows per slice this iteration (host)

    def unfinished(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(run, active)``: ``(S, B)`` the slices this iteration solves (from each sample's ``begin``), ``(B,)``
        the samples not done."""
        active = self.begin < self.layout.S
        return (self.sl >= self.begin[None]) & active[None], active

    def fine_solves(self, fine: _Propagators, run: torch.Tensor):
        """Step 1: ``F_s(U[s])`` of every unfinished slice, in lockstep. Returns ``F`` ``(S, B, *shape)`` (zero
        where not run), the rows' samples ``(M,)`` (slice by slice in the layout's order) and, for a multistep
        solver, the histories the solves read (else None); ``hist`` then holds the histories they made."""
        L, U, hist = self.layout, self.U, self.hist
        ro, bb = true_indices(run[self.order_dev], sum(self.counts)).unbind(1)     # (M,) each, no host sync
        ss = self.order_dev[ro]
        h = None
        if hist is not None:       # h at i = 0 is unused (first order)
            h = torch.where((L.bounds[ss] == 0).reshape(-1, *(1,) * (U.ndim - 2)), 0, hist[(ss - 1).clamp_min(0), bb])
        F_end, last_den = fine.fine_lockstep(U[ss, bb], ss, bb, h, L.running(self.counts), L.row_starts(self.counts))
        F = torch.zeros_like(U[:L.S])
        F[ss, bb] = F_end
        hist_used = None
        if hist is not None:
            hist_used = hist.clone()                                        # the histories this iteration's solves read
            hist[ss, bb] = last_den
        return F, bb, hist_used

    def sweep(self, F: torch.Tensor, bb: torch.Tensor, coarse: _Propagators) -> torch.Tensor:
        """Step 2: ``U_new[s+1] = G_s(U_new[s]) + F_s(U[s]) - G_s(U[s])``, sequential in s, on each slice's block of
        the fine rows ``bb``; ``G_old`` takes the new coarse values. Returns ``U_new``."""
        U_new = self.U.clone()
        for s, block in enumerate(self.layout.blocks(self.counts)):
            if not self.counts[s]:
                continue
            rows = bb[block]
            G_new = coarse.coarse_step(U_new[s, rows], s, rows)
            U_new[s + 1, rows] = G_new + F[s, rows] - self.G_old[s, rows]
            self.G_old[s, rows] = G_new
        return U_new

    def start_changes(self, U_new: torch.Tensor, hist_used: torch.Tensor | None) -> torch.Tensor:
        """``(S, B)`` how far each slice start s + 1 moved this iteration (rms, model frame)."""
        bounds, S = self.layout.bounds, self.layout.S
        err = rms(self.p.scale(U_new[1:] - self.U[1:], bounds[1:, None].expand(S, U_new.shape[1])), 2)   # (S, B)
        if hist_used is not None:
            # A multistep solver's slice start s + 1 is the pair (U[s+1], D at n_{s+1} - 1 = hist[s]): the fine
            # solve from it is exact only when the history it read has settled too (else a start that did not move
            # is accepted with a stale history; at tol 0 Parareal then ends off the sequential sample).
            err = torch.maximum(err, rms(self.hist - hist_used, 2))         # (S, B); D (data units) or eps
        return err

    def converged(self, err: torch.Tensor, it: int) -> torch.Tensor:
        """``(S, B)`` whether each slice start counts as converged after iteration ``it``."""
        # Iteration 1 read no history (zeros: none computed yet), so its change is not a settling: a small history
        # (DEIS's eps, ~0.1 on the ring at high noise) passed the test from zero and left the start it made 5-10x
        # tol off (5 steps in 5 slices). There iteration 1 accepts by exactness only; err, its residual, is real.
        settled = err if self.hist is None or it > 1 else torch.full_like(err, math.inf)
        below = settled <= self.thresholds[self.sl + 1]
        if self.p.solver.stochastic:
            # A stochastic solver's fine steps stretch an accepted start's remaining error far beyond its last move
            # (a sample crossing between modes: gmm DDPM-100 in 10 slices, coarse_steps 2, starts that moved 0.57x
            # and 0.67x their thresholds left the sample 1.66x its tolerance): a start counts as converged only after
            # two iterations in a row within its threshold.
            below, self.below_prev = below & self.below_prev, below
        return below

    def accept(self, U_new: torch.Tensor, ok: torch.Tensor, active: torch.Tensor, it: int) -> None:
        """Step 3: take ``U_new`` and move each active sample's ``begin`` past its converged prefix (``ok``,
        ``(S, B)``, from ``begin`` on) plus one."""
        S = self.layout.S
        ok = ok | (self.sl < self.begin[None])                              # slices before begin stay accepted
        fail = torch.cat([~ok, torch.ones_like(ok[:1])])
        first = fail.int().argmax(0)                                        # first unconverged slice >= begin
        # Accept the converged prefix plus one: slice `first`'s end came from its accepted start. Exact when that
        # start did not change this iteration (first == begin); after a start that converged (moved <= its
        # threshold) the end is off by that change times how much F - G moves with it, which can exceed the change
        # where fine and coarse differ most (a 3-step Heun grid: the worst of 256 samples 1.1x the relative tolerance).
        # A stochastic solver's fine steps stretch that change far more (a sample crossing between modes: gmm DDPM-20
        # in 4 slices, coarse_steps 2, the worst of 256 samples 3.6x; DDPM-50 in 7 slices 4.2x), so there the plus
        # one is taken only when exact (with the two-in-a-row test above: 0.005x at most over 64 cases of DDPM and
        # Euler ancestral, for one or two more iterations).
        plus_one = (first < S) & ((first == self.begin) | (not self.p.solver.stochastic))
        stride = (first - self.begin).clamp_min(0) + plus_one.long()
        self.U = U_new
        self.begin = self.begin + torch.where(active, stride, 0)
        self.done_round = torch.where(active & (self.begin >= S), it, self.done_round)

    def sync(self, err: torch.Tensor, run: torch.Tensor) -> tuple[float, list[int]]:
        """The iteration's one host read: the next iteration's rows per slice (into ``counts``), this one's residual
        (the largest change of a start it solved over its noise level; nan when none has a level) and each sample's
        ``begin`` (S once done)."""
        S = self.layout.S
        moved = torch.where(run & (self.level > 0), err / self.level, -math.inf).max()
        nxt = ((self.sl >= self.begin[None]) & (self.begin < S)[None]).sum(1)
        host = torch.cat([nxt.double(), moved.double().reshape(1), self.begin.clamp_max(S).double()]).tolist()
        self.counts = [int(c) for c in host[:S]]
        return (host[S] if host[S] > -math.inf else float("nan")), [int(b) for b in host[S + 1:]]


class _CriticalPath:
    """The depth the sweep-by-sweep iterates would have under the pipelined schedule, in network calls:
    ``ready[s]``, when U[s] of the current iteration is known (``U^{k+1}[s+1]`` needs ``G(U^{k+1}[s])`` and
    ``F(U^k[s])``)."""

    def __init__(self, problem: Problem, layout: _SliceLayout, coarse_steps: int):
        self.coarse_steps = coarse_steps
        self.ready = [float(s * coarse_steps) for s in range(layout.S + 1)]     # after the initial coarse sweep
        e = problem.solver.evals_per_step
        self.fine_calls = [n * e for n in layout.lengths]
        # The step into N, as the solves make it.
        self.fine_calls[-1] += problem.solver.last_step_evals(problem.sigmas) - e

    def iteration(self) -> None:
        """One iteration's fine solves and sweep."""
        fine_done = [r + c for r, c in zip(self.ready, self.fine_calls)]   # when F_s(U[s]) is done
        for s, done in enumerate(fine_done):
            self.ready[s + 1] = max(self.ready[s] + self.coarse_steps, done)


def sample_parareal(x: torch.Tensor, problem: Problem, slices: int | None = None, coarse_steps: int = 1,
                    tol: float = 0.1, coarse: Coarse | None = None) -> Outcome:
    """Sample with Parareal.

    Args:
        x: ``(B, *shape)`` initial state (VE frame).
        problem: the trajectory to compute.
        slices: S (default round(sqrt(N))). coarse_steps: DDIM steps of the coarse propagator per slice.
        tol: tolerance in units of the noise level. coarse: optional ``coarse(x, sigma_from, sigma_to) -> x``
            (VE frame, per-row sigmas) replacing the DDIM coarse propagator, e.g. a consistency model.
    Returns:
        :class:`Outcome`; ``extra`` holds ``slices``, ``nfe_fine``, ``nfe_coarse`` (per sample) and
        ``pipelined_rounds`` (the depth of the pipelined schedule).
    """
    check_solver(problem.solver)
    B, layout, tally = x.shape[0], _SliceLayout(problem.steps, slices, coarse_steps, coarse, x.device), _Tally()
    fine, coarse_prop = (_Propagators(tally.counting(problem, kind), layout, coarse) for kind in ("fine", "coarse"))
    state = _Iterates(x, problem, layout, tol, coarse_prop)                # after the initial coarse sweep
    clock = _CriticalPath(problem, layout, coarse_steps)
    residuals: list[float] = []
    it = 0
    while sum(state.counts):
        it += 1
        run, active = state.unfinished()                                    # (S, B), (B,)
        # 1. Fine solves of every unfinished slice, in lockstep (rows: slice by slice, longest first).
        F, rows, hist_used = state.fine_solves(fine, run)
        # 2. Sequential correction sweep from each sample's first unaccepted slice.
        U_new = state.sweep(F, rows, coarse_prop)
        clock.iteration()                 # pipelined: U_new[s+1] needs G(U_new[s]) and F(U[s])
        # 3. Convergence of slice starts (model frame), accept prefix + 1.
        err = state.start_changes(U_new, hist_used)                         # (S, B)
        state.accept(U_new, state.converged(err, it) & run, active, it)
        residual, begin = state.sync(err, run)                              # the iteration's one host read
        residuals.append(residual)
        # The samples' window starts on the host, from the same read (a device tensor made the progress bar read
        # again each iteration).
        problem.report(RoundInfo(it, torch.tensor([layout.start[b] for b in begin]), rows.numel(), residual))
    extra = {"slices": layout.S, "nfe_fine": tally.rows["fine"] / B, "nfe_coarse": tally.rows["coarse"] / B,
             "pipelined_rounds": clock.ready[-1], "coarse_calls": coarse_prop.coarse_calls}
    return Outcome(state.U[layout.S], it, residuals, state.done_round, extra)


class _Schedule:
    """Pipelined Parareal's bookkeeping (host): the iterates and results later steps still read, the accepted
    starts and the running propagations.

    Attributes:
        u: ``(s, k) -> iterate`` ``(B, *shape)``: the newest two per s. F, G: results still to be read (see
            :meth:`prune`). made: every ``(s, k)`` ever produced (host integers). newest_k: s -> its newest
            iteration. final: accepted starts, s -> (k, value). tasks: running propagations. residuals: the
            frontier tests' worst changes over their noise levels. coarse_calls: calls of a ``coarse`` callable.
    """

    def __init__(self, problem: Problem, layout: _SliceLayout, tol: float, coarse: Coarse | None, B: int):
        self.p, self.L, self.tol, self.coarse, self.B = problem, layout, tol, coarse, B
        self.levels = problem.noise_levels[layout.bounds].tolist()          # (S+1,) host, read once
        self.u: dict[tuple[int, int], torch.Tensor] = {}
        self.F: dict[tuple[int, int], torch.Tensor] = {}
        self.G: dict[tuple[int, int], torch.Tensor] = {}
        self.made: set[tuple[int, int]] = set()
        self.newest_k: dict[int, int] = {}
        self.final: dict[int, tuple[int, torch.Tensor]] = {}
        self.tasks: list[dict] = []
        self.residuals: list[float] = []
        self.coarse_calls = 0

    def newest(self, s: int) -> int:
        return self.newest_k.get(s, -1)

    def produce(self, s: int, k: int, value: torch.Tensor, exact: bool = False):
        """``u[s][k]`` appears: start its fine solve and coarse jump, and test it if it is at the frontier."""
        p, S, start, u = self.p, self.L.S, self.L.start, self.u
        u[(s, k)] = value
        self.made.add((s, k))
        self.newest_k[s] = max(k, self.newest(s))
        if s < S and s >= max(self.final, default=0):
            self.tasks.append({"kind": "fine", "s": s, "k": k, "x": value.clone(), "m": 0})
            if self.coarse is None:
                self.tasks.append({"kind": "coarse", "s": s, "k": k, "x": value.clone(), "m": 0})
            else:
                self.coarse_calls += 1
                self.done("coarse", s, k, _checked_coarse(self.coarse(value.clone(), p.sigmas[start[s]].repeat(self.B),
                                                                      p.sigmas[start[s + 1]].repeat(self.B)), value))
        if k > 0 and s == max(self.final) + 1 and not exact:     # an exact value is accepted without a test
            # The acceptance test at the frontier: one host read (residual and decision together).
            err = rms(p.scale(value - u[(s, k - 1)], self.L.bounds[s].expand(self.B)), 1)
            worst, converged = torch.stack([err.max(), (err <= self.tol * self.levels[s]).all().to(err.dtype)]).tolist()
            if self.levels[s] > 0:
                self.residuals.append(worst / self.levels[s])
            if converged:
                self.accept(s, k)
        u.pop((s, k - 1), None)                             # read only by the test above

    def accept(self, s: int, k: int):
        self.final[s] = (k, self.u[(s, k)])
        if s < self.L.S and (s, k) in self.F:               # the exact next start is already known
            self.take_fine(s, k)

    def take_fine(self, s: int, k: int):
        if s + 1 not in self.final:
            kn = self.newest(s + 1) + 1
            self.produce(s + 1, kn, self.F[(s, k)], exact=True)
            if s + 1 not in self.final:
                self.accept(s + 1, kn)

    def done(self, kind: str, s: int, k: int, value: torch.Tensor):
        """A propagation's result: the initial sweep's next start, an accepted start's exact successor, or the
        corrections it completes."""
        F, G = self.F, self.G
        (F if kind == "fine" else G)[(s, k)] = value
        if kind == "coarse" and k == 0 and (s + 1, 0) not in self.made:
            self.produce(s + 1, 0, value)                   # the initial coarse sweep
        if kind == "fine" and self.final.get(s, (None,))[0] == k:
            self.take_fine(s, k)
            return
        for kp in (k, k + 1):                               # corrections this result completes
            parts = ((G, (s, kp)), (F, (s, kp - 1)), (G, (s, kp - 1)))
            if kp >= 1 and (s + 1, kp) not in self.made and all(key in d for d, key in parts):
                self.produce(s + 1, kp, G[(s, kp)] + F[(s, kp - 1)] - G[(s, kp - 1)])

    def owners(self) -> list[dict]:
        """The running propagations, fine first (fine and coarse rows are two contiguous blocks)."""
        return [t for t in self.tasks if t["kind"] == "fine"] + [t for t in self.tasks if t["kind"] != "fine"]

    def advance(self, owners: list[dict], x_next: torch.Tensor) -> None:
        """Take each owner's step from the tick's ``x_next`` (rows: owner x sample) and hand the propagations that
        finished to :meth:`done`, in the order they were started."""
        B, finished = self.B, []
        for n, t in enumerate(owners):
            t["x"] = x_next[n * B:(n + 1) * B]
            t["m"] += 1
            if t["m"] == (self.L.lengths[t["s"]] if t["kind"] == "fine" else len(self.L.sub[t["s"]]) - 1):
                finished.append(t)
        finished = [t for t in self.tasks if any(t is f for f in finished)]   # in the order the tasks were started
        self.tasks[:] = [t for t in self.tasks if all(t is not f for f in finished)]
        for t in finished:     # a copy: a view would keep this tick's whole x_next alive while the result is kept
            self.done(t["kind"], t["s"], t["k"], t["x"].clone())

    def prune(self) -> None:
        """Drop the propagations from superseded starts and the values no later step reads, so that memory is what
        the running propagations hold (not every iterate of the run). Called before a tick; then every running
        propagation starts at or after the accepted frontier ``A``:

        - every ``u``, ``F``, ``G`` of a start before ``A`` (no propagation or correction reads them again), and the
          accepted values before ``A`` (only ``final[S]`` is returned);
        - ``F(s, k)``: read only by the correction that makes ``u(s+1, k+1)`` (or, once ``s`` is accepted at ``k``,
          to give ``s+1`` its exact value): dead once ``u(s+1, k+1)`` was made or ``s+1`` is accepted;
        - ``G(s, k)``: read by the corrections making ``u(s+1, k)`` and ``u(s+1, k+1)``: dead once both were made or
          ``s+1`` is accepted.
        """
        final, made, F, G, A = self.final, self.made, self.F, self.G, max(self.final)
        self.tasks[:] = [t for t in self.tasks if t["s"] >= A]      # propagations from superseded starts: not needed
        for s in [s for s in final if s < A and final[s][1] is not None]:
            final[s] = (final[s][0], None)
        for d in (self.u, F, G):
            for key in [key for key in d if key[0] < A]:
                del d[key]
        for s, k in list(F):
            if s + 1 in final or (s + 1, k + 1) in made:
                del F[(s, k)]
        for s, k in list(G):
            if s + 1 in final or ((s + 1, k) in made and (s + 1, k + 1) in made):
                del G[(s, k)]


def _tick(problem: Problem, fine_problem: Problem, layout: _SliceLayout, owners: list[dict], b_all: torch.Tensor,
          tally: _Tally) -> torch.Tensor:
    """One tick: one step of every running propagation (``owners``, fine first), in one batched call (rows:
    propagation x sample). Returns the next states, ``(len(owners) * B, *shape)`` (next-state form)."""
    B, sub, start = b_all.numel(), layout.sub, layout.start
    nf = B * sum(t["kind"] == "fine" for t in owners)
    coarse_owners = owners[nf // B:]
    # Step indices of every propagation and the coarse jumps' targets: one host-to-device copy per tick.
    steps_h = [start[t["s"]] + t["m"] if t["kind"] == "fine" else sub[t["s"]][t["m"]] for t in owners]
    steps_h += [sub[t["s"]][t["m"] + 1] for t in coarse_owners]
    steps = _to_device(steps_h, b_all.device)
    X = torch.cat([t["x"] for t in owners])
    I = steps[:len(owners)].repeat_interleave(B)
    Bi = b_all.repeat(len(owners))
    den = problem.evaluate(X, I, Bi)
    parts = []
    if nf:
        parts.append(fine_problem.advance(X[:nf], I[:nf], Bi[:nf], den[:nf], None,
                                          host_steps=[n for n in steps_h[:nf // B] for _ in range(B)]))
    if coarse_owners:                                   # coarse jump from sub-grid point i to the next one
        nxt = steps[len(owners):].repeat_interleave(B)
        span = max(sub[t["s"]][t["m"] + 1] - sub[t["s"]][t["m"]] for t in coarse_owners)   # host integers
        parts.append(coarse_jump(problem, X[nf:], den[nf:], I[nf:], nxt, Bi[nf:], span=span))
    tally.rows["fine"] += nf
    tally.rows["coarse"] += X.shape[0] - nf
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def sample_parareal_pipelined(x: torch.Tensor, problem: Problem, slices: int | None = None, coarse_steps: int = 1,
                              tol: float = 0.1, coarse: Coarse | None = None) -> Outcome:
    """Pipelined Parareal (SRDS): every propagation starts as soon as its input is known.

    Iterates ``u[s][k]`` (slice start s, iteration k). When ``u[s][k]`` appears, the fine solve ``F(s, k)`` and the
    coarse jump ``G(s, k)`` start at once; ``u[s+1][k+1] = G(s, k+1) + F(s, k) - G(s, k)`` appears when its three
    parts are done (``u[s+1][0] = G(s, 0)``: the initial sweep). Each tick is one batched network call holding one
    step of every running propagation (fine steps of many slices and iterations, coarse steps), so the sweep of
    iteration k+1 overlaps the fine solves of iteration k. Acceptance is for the batch as a whole: start A+1 is final
    when the fine solve from the final start A is done (exact), or when its newest iterate moved less than ``tol``
    times its noise level. ``rounds`` counts ticks (x the solver's calls per step). Needs a one-step solver.
    """
    if problem.solver.uses_history:
        raise ValueError(f"solver: pipelined Parareal needs a one-step solver; {problem.solver.name or 'this solver'} "
                         f"reads the previous points' D")
    B, layout, tally = x.shape[0], _SliceLayout(problem.steps, slices, coarse_steps, coarse, x.device), _Tally()
    b_all = torch.arange(B, device=x.device)
    # A two-call solver's second call on the fine rows (Heun's), counted: tally.calls["fine"] counts these alone.
    fine_problem = tally.counting(problem, "fine")
    sched = _Schedule(problem, layout, tol, coarse, B)
    sched.final[0] = (0, x)
    sched.produce(0, 0, x)
    ticks = 0
    while layout.S not in sched.final:
        sched.prune()
        # One tick: one step of every running propagation, in one batched call.
        owners = sched.owners()
        x_next = _tick(problem, fine_problem, layout, owners, b_all, tally)
        ticks += 1
        sched.advance(owners, x_next)
        problem.report(RoundInfo(ticks, torch.tensor([layout.start[max(sched.final)]] * B), int(x_next.shape[0]),
                                 sched.residuals[-1] if sched.residuals else float("nan")))
    extra = {"slices": layout.S, "nfe_fine": tally.rows["fine"] / B, "nfe_coarse": tally.rows["coarse"] / B,
             "pipelined_rounds": float(ticks + tally.calls["fine"]), "coarse_calls": sched.coarse_calls}
    return Outcome(sched.final[layout.S][1], max(sched.newest_k.values()), residuals=sched.residuals,
                   sample_rounds=torch.full((B,), ticks, device=x.device), extra=extra)
