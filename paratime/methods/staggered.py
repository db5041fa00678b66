"""Staggered cores (CHORDS, Han et al. ICCV 2025): K sequential solvers started at staggered grid points, each
evaluating one point per tick, the K points of a tick in one batched network call; a core is corrected Parareal-wise
whenever the core before it reaches the point it stands on, and each core that reaches the end gives a sample.
paratime's error control replaces CHORDS's fixed core index: a sample is returned when its successive samples agree
to ``tol``.

Notation (VE frame; grid points ``0 .. N``; ``F`` the solver's fine step, ``G(x, D, t -> s)`` the one-call coarse
jump with ``D`` held: the constant-D path :meth:`paratime.solvers.Solver.jump`, carrying the pre-drawn noise).
Core c stands at point ``t_c`` with state ``x_c``; it remembers its *begin* ``(b_c, x_c^b, D_c^b)`` (where it
started, or was last corrected) and its *finish* ``(t_c, x_c, D_c)`` (its last evaluated point). One tick, every
active sample:

    1. evaluate D at every live core's point x_c (one batched call, rows core-major) and take the fine steps
       F(x_c) = x_c + dx_c (the solver's step map, history per core for multistep solvers)
    2. spawn: when the newest core c has just evaluated its first point, core c+1 starts at ``starts[c+1]`` from
       ``G(x_c, D_c, t_c -> starts[c+1])``; after the last start, the coarse shoot ``G(... -> N)`` is sample 0
    3. correct: when core c-1 has just evaluated the point ``b_c`` where core c began,
           x_c(t_c + 1) = F(x_c) - G(x_c^b, D_c^b, b_c -> t_c + 1) + G(x_{c-1}, D_{c-1}, b_c -> t_c + 1)
       (Parareal: the fine step plus the change of the coarse prediction), and core c begins again at t_c + 1
    4. advance every core by one point; a core that reaches N gives the next sample (core 0 is the sequential
       solver: its sample is exact and comes last, at tick N)
    5. stop: a sample is returned when each of its last QUIET_HITS = 2 samples moved by <= tol / 4 (max-abs, the
       returned sample's units) from the one before (CHORDS's residual rule takes one; two, because successive
       samples can share an uncorrected error); ``tol = 0``: only core 0's, the sequential sample. Its rows leave
       later ticks

The schedule (which core stands where at which tick) is data-independent and known on the host; the only device
read is a per-sample done flag after a tick that produced a sample (at most one small read per tick), computed from
max-abs reductions (exact in any order), so every rank of an SPMD backend decides the same.

Shapes: ``x`` ``(B, *shape)`` per core; a tick's rows are ``(C * A, *shape)`` for C live cores and A active samples,
core-major.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..solvers import true_indices
from .common import Outcome, Problem, RoundInfo
from .stops import DEFAULT_TOL

__all__ = ["sample_staggered", "default_starts"]

log = logging.getLogger("paratime")

#: CHORDS's published 8-core schedule on a 50-step grid (0-2-4-8-16-24-32-40), in units: doubling, then steps of 4
_PATTERN = (0, 1, 2, 4, 8, 12, 16, 20)
#: the last core starts at this fraction of the grid (CHORDS: 40 of 50)
LAST_START = 0.8
#: QUIET_HITS successive samples must each move by <= QUIET_SCALE x tol before one is returned: two samples can share
#: an error (the coarse shoot and the last core's sample both carry the last core's start, uncorrected when it starts
#: at N - 1), so one small change is not evidence (measured: starts 0-7-..-49 on digits DDIM-50 stopped at max |Δ|
#: 0.49 with 1); and two cores started close together (many cores on few steps) can agree within tol while both are
#: off by more (guided ring, PLMS-97, 69 cores: 2.7x tol with a scale of 1, 0.30x with 0.25; tests/test_equivalence.py)
QUIET_HITS, QUIET_SCALE = 2, 0.25


def default_starts(cores: int, steps: int) -> tuple[int, ...]:
    """CHORDS's staggered start points scaled to ``cores`` and ``steps``: units doubling (0, 1, 2, 4, 8) then
    growing by 4, scaled so that the last core starts at ``LAST_START * steps`` (8 cores on 50 steps:
    0-2-4-8-16-24-32-40), made strictly increasing where rounding collides.

    Args:
        cores: K >= 1. steps: N >= K.
    Returns:
        ``K`` strictly increasing grid points, the first 0, all < N.
    Raises:
        ValueError: ``cores`` not in ``[1, steps]``.
    """
    if not isinstance(cores, int) or isinstance(cores, bool) or not 1 <= cores <= steps:
        raise ValueError(f"cores: must be an integer in [1, steps={steps}], got {cores!r}")
    units = list(_PATTERN[:cores]) + [_PATTERN[-1] + 4 * m for m in range(1, cores - len(_PATTERN) + 1)]
    scale = LAST_START * steps / max(units[-1], 1)
    starts = [0]
    for u in units[1:]:
        starts.append(max(round(u * scale), starts[-1] + 1))
    over = starts[-1] - (steps - 1)             # pull the tail back inside the grid, keeping it increasing
    for c in range(cores - 1, 0, -1):
        if over <= 0:
            break
        starts[c] = min(starts[c], steps - cores + c)
    return tuple(starts)


def _check_starts(starts, cores: int, steps: int) -> tuple[int, ...]:
    ok = (isinstance(starts, (list, tuple)) and len(starts) == cores and
          all(isinstance(t, int) and not isinstance(t, bool) for t in starts))
    if ok:
        ok = starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < steps
    if not ok:
        raise ValueError(f"starts: must be {cores} strictly increasing integer grid points from 0, below "
                         f"steps={steps} (one per core), got {starts!r}")
    return tuple(starts)


@dataclass
class _Core:
    """One staggered solver: where it stands, its begin and finish (see the module docstring), its history."""

    t: int
    x: torch.Tensor                       # (B, *shape) state at t
    begin_t: int
    begin_x: torch.Tensor
    begin_d: torch.Tensor | None = None   # D at the begin point, once evaluated
    fin_x: torch.Tensor | None = None     # last evaluated point (at t - 1 after the advance) and its D
    fin_d: torch.Tensor | None = None
    hist: list[torch.Tensor] = field(default_factory=list)   # history values at its previous points, newest first
    evaluated: int = 0                    # points evaluated
    new_x: torch.Tensor | None = None     # this tick's F(x), then corrected


def sample_staggered(x: torch.Tensor, problem: Problem, cores: int, tol: float | None = None,
                     starts: Sequence[int] | None = None, tol_scale: float | None = 1.0) -> Outcome:
    """Sample with K staggered cores (CHORDS) and a tolerance on the returned sample.

    Args:
        x: ``(B, *shape)`` initial state (VE frame).
        problem: the trajectory to compute.
        cores: K, the cores (points evaluated per sample per tick; size it to the devices).
        tol: a sample is returned when its last :data:`QUIET_HITS` samples each moved by <= tol / 4 from the one
            before (max-abs, the returned sample's units); 0: core 0's sample, the sequential one. None:
            ``DEFAULT_TOL["final"]``.
        starts: the K start points (strictly increasing from 0, below N); None: :func:`default_starts`.
        tol_scale: the data scale ``tol`` is relative to (1: absolute units; a model's declared scale), or None for
            each sample's own, the max-abs of its newest sample (as :class:`~paratime.methods.stops.FinalPointStop`).
    Returns:
        :class:`Outcome`: ``rounds`` counts ticks; ``sample_rounds`` the tick each sample was returned (CPU);
        ``extra``: ``cores``, ``starts``, ``sample_core`` (per sample, the core whose sample was returned; -1 the
        coarse shoot), ``tick_rows`` (rows evaluated per tick, second calls of a solver excluded), ``hit_ticks``
        (``(core, tick)`` of every sample produced, in order; core -1: the coarse shoot), ``tol_abs`` and
        ``data_scale`` (per sample, the tolerance in force in the returned sample's units and its scale).
    Raises:
        ValueError: ``cores`` not an integer in ``[1, N]``, bad ``starts``, a negative ``tol``, a ``tol_scale``
            <= 0.
    """
    N, B = problem.steps, x.shape[0]
    starts = default_starts(cores, N) if starts is None else _check_starts(starts, cores, N)
    tol = DEFAULT_TOL["final"] if tol is None else tol
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol: must be a number >= 0, got {tol!r}")
    if tol_scale is not None and not (isinstance(tol_scale, (int, float)) and tol_scale > 0):
        raise ValueError(f"tol_scale: must be a number > 0 or None (each sample's own), got {tol_scale!r}")
    hierarchy, stop = _Hierarchy(problem, x, starts), _SampleStop(x, tol, tol_scale)
    done_h, done_tick, sample_core = [False] * B, [0] * B, [0] * B
    tick_rows: list[int] = []
    hit_ticks: list[tuple[int, int]] = []             # (core, tick) of every sample produced (-1: the shoot)
    tick = 0
    while not all(done_h):
        tick += 1
        A = B - sum(done_h)                           # open samples; their indices from the device flags, no read
        b_act = true_indices(~stop.done, A).squeeze(1) if A < B else hierarchy.ar_b
        # 1-4. One batched call at every live core's point; fine steps, spawn, Parareal corrections, advance.
        hits = hierarchy.tick(b_act, A)
        tick_rows.append(hierarchy.last_rows)
        hit_ticks += [(idx, tick) for idx, _ in hits]
        # 5. Stop: the open samples take each new sample; done when it moved by <= tol from the previous one.
        final_change = float("nan")
        if hits:
            stop.take(hits)
            done_now, cores_now, final_change = stop.read()    # the tick's one device read
            for b in range(B):
                if done_now[b] and not done_h[b]:
                    done_h[b], done_tick[b], sample_core[b] = True, tick, cores_now[b]
        begin = torch.tensor([N if d else hierarchy.front for d in done_h])
        problem.report(RoundInfo(tick, begin, tick_rows[-1], float("nan"), final_change))
    log.debug("staggered (%d cores, starts %s, tol %g): %d ticks", cores, "-".join(map(str, starts)), tol, tick)
    tol_abs = stop.tol_b.tolist()
    own = stop.out.abs().flatten(1).amax(1).tolist() if tol == 0 and tol_scale is None else None   # one read
    return Outcome(stop.out, tick, [float("nan")] * tick, torch.tensor(done_tick),
                   {"cores": cores, "starts": starts, "sample_core": sample_core, "tick_rows": tick_rows,
                    "hit_ticks": hit_ticks, "tol_abs": tol_abs,
                    "data_scale": [t / tol for t in tol_abs] if tol > 0 else own or [tol_scale] * B})


class _Hierarchy:
    """The cores (steps 1-4 of the module docstring). ``live`` holds the running cores in core order: later cores
    retire first and none is spawned after one retired, so live core ``c`` is core number ``c``."""

    def __init__(self, problem: Problem, x: torch.Tensor, starts: tuple[int, ...]):
        self.problem, self.starts, self.N = problem, starts, problem.steps
        self.ar_b = torch.arange(x.shape[0], device=x.device)
        self.live = [_Core(0, x, 0, x)]
        self.last_rows = 0

    @property
    def front(self) -> int:
        """Core 0's point: the trajectory is exact up to there (N once it finished)."""
        return self.live[0].t if self.live and self.live[0].begin_t == 0 else self.N

    def tick(self, b_act: torch.Tensor, A: int) -> list[tuple[int, torch.Tensor]]:
        """One tick for the open samples ``b_act`` (``A`` of them). Returns the samples produced, in order:
        ``(core, (B, *shape))``, core -1 the coarse shoot."""
        problem, live, N, B = self.problem, self.live, self.N, self.ar_b.shape[0]
        solver = problem.solver
        # 1. One batched call at every live core's point, rows core-major (C * A, *shape); fine steps F(x_c).
        den, x_next = _evaluate_and_step(problem, live, b_act, A)
        self.last_rows = len(live) * A
        hits: list[tuple[int, torch.Tensor]] = []
        for c, core in enumerate(live):
            d_c, x1_c = _scatter(den[c], core.x, b_act, A), _scatter(x_next[c], core.x, b_act, A)
            core.fin_x, core.fin_d = core.x, d_c
            if core.begin_t == core.t:
                core.begin_d = d_c.clone()            # kept until the core's next correction: not a view that would
                #                                       hold this tick's whole (C * A) output alive that long
            if solver.uses_history:
                core.hist = [solver.history_value(core.x, d_c, _full(B, core.t, core.x.device), problem.sigmas)] \
                    + core.hist[:solver.history_depth - 1]
            core.evaluated += 1
            core.new_x = x1_c                         # F(x_c), in the next-state form (Problem.advance)
        # 2. Spawn the next core from the newest one's first point, or, after the last start, shoot to N.
        newest, spawn = live[-1], None
        if newest.evaluated == 1:
            nxt = self.starts.index(newest.t) + 1
            if nxt < len(self.starts):
                y = _jump(problem, newest.fin_x, newest.fin_d, newest.t, self.starts[nxt])
                spawn = _Core(self.starts[nxt], y, self.starts[nxt], y)
            else:
                hits.append((-1, _jump(problem, newest.fin_x, newest.fin_d, newest.t, N)))
        # 3. Correct core c when core c-1 has just evaluated the point where c began (Parareal's update).
        for core, prev in zip(live[1:], live[:-1]):
            if core.begin_t == prev.t and core.begin_d is not None:
                s = core.t + 1
                core.new_x = (core.new_x - _jump(problem, core.begin_x, core.begin_d, core.begin_t, s)
                              + _jump(problem, prev.fin_x, prev.fin_d, prev.t, s))
                core.begin_t, core.begin_x, core.begin_d = s, core.new_x, None
        # 4. Advance; a core at N gives a sample, later (less exact) cores first so that the most exact one of a
        #    tick comes last (CHORDS lists them in core order).
        for core in live:
            core.t, core.x = core.t + 1, core.new_x
        hits += [(c, live[c].x) for c in range(len(live) - 1, -1, -1) if live[c].t == N]
        self.live = [core for core in live if core.t < N] + ([spawn] if spawn is not None else [])
        return hits


class _SampleStop:
    """Step 5 per sample: the open samples take each new sample as their candidate; one is done when its last
    :data:`QUIET_HITS` samples each moved by <= ``QUIET_SCALE * tol_b`` (``tol_b``: ``tol`` times the data scale,
    ``tol_scale`` or the candidate's own max-abs) from the one before, or when core 0's (exact) sample arrives;
    ``tol = 0`` waits for core 0. Device state only."""

    def __init__(self, x: torch.Tensor, tol: float, tol_scale: float | None):
        B, dev = x.shape[0], x.device
        self.tol, self.tol_scale = tol, tol_scale
        self.out = x.clone()                                          # (B, *shape) each sample's candidate
        self.last: torch.Tensor | None = None                         # the previous sample produced
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.core = torch.zeros(B, dtype=torch.long, device=dev)      # the core each candidate is from
        self.tol_b = torch.full((B,), tol * (tol_scale or 1.0), dtype=x.dtype, device=dev)
        self.moved_max = torch.full((), float("nan"), dtype=x.dtype, device=dev)
        self.quiet = torch.zeros(B, dtype=torch.long, device=dev)     # successive quiet samples

    def take(self, hits: list[tuple[int, torch.Tensor]]) -> None:
        """Take this tick's samples ``(core, (B, *shape))`` in order."""
        self.moved_max = torch.full_like(self.moved_max, float("nan"))
        for idx, h in hits:
            take = ~self.done                                         # (B,)
            self.out = torch.where(take.reshape(-1, *([1] * (h.ndim - 1))), h, self.out)
            self.core = torch.where(take, idx, self.core)
            if idx == 0:
                # core 0's exact sample: the tolerance at its own scale (tol x 1 before, for one never compared)
                if self.tol > 0 and self.tol_scale is None:
                    self.tol_b = torch.where(take, self.tol * h.abs().flatten(1).amax(1), self.tol_b)
                self.done = torch.ones_like(self.done)
            elif self.tol > 0 and self.last is not None:
                moved = (h - self.last).abs().flatten(1).amax(1)      # (B,) max-abs: exact in any order
                scale = h.abs().flatten(1).amax(1) if self.tol_scale is None else self.tol_scale
                self.tol_b = torch.where(take, self.tol * scale, self.tol_b)   # kept once a sample is done
                self.quiet = torch.where(moved <= QUIET_SCALE * self.tol_b, self.quiet + 1, 0)
                self.done = self.done | (take & (self.quiet >= QUIET_HITS))
                # the tick's largest change of a sample open when it came (a later hit may find none open)
                self.moved_max = torch.fmax(self.moved_max, torch.where(take, moved, -torch.inf).amax())
            self.last = h

    def read(self) -> tuple[list[bool], list[int], float]:
        """One small device read: ``(done, core per sample, the largest change of an open sample or nan)``."""
        B = self.done.shape[0]
        flags = torch.cat([self.done.to(self.tol_b.dtype), self.core.to(self.tol_b.dtype),
                           self.moved_max.view(1)]).tolist()
        change = flags[2 * B] if flags[2 * B] > float("-inf") else float("nan")
        return [bool(v) for v in flags[:B]], [int(v) for v in flags[B:2 * B]], change


def _full(n: int, value: int, dev) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long, device=dev)


def _jump(problem: Problem, x: torch.Tensor, den: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """``G(x, D, t -> s)`` for every sample: the solver's coarse jump (constant-D path, pre-drawn noise)."""
    B = x.shape[0]
    b = torch.arange(B, device=x.device)
    return problem.solver.jump(x, den, _full(B, t, x.device), _full(B, s, x.device), b, problem.noise,
                               problem.sigmas, span=max(s - t, 1))


def _scatter(rows: torch.Tensor, base: torch.Tensor, b_act: torch.Tensor, A: int) -> torch.Tensor:
    """``(B, *shape)`` from the ``(A, *shape)`` rows of the open samples ``b_act``; the others keep ``base``'s
    values."""
    if A == base.shape[0]:
        return rows
    full = base.clone()
    full[b_act] = rows
    return full


def _evaluate_and_step(problem: Problem, live: list[_Core], b_act: torch.Tensor,
                       A: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched call at every live core's point for the active samples: ``(D, x_next)``, each
    ``(C, A, *shape)`` (the next states in the next-state form, :meth:`Problem.advance`).

    The rows' steps are host integers (each core stands at one point), passed as ``host_steps`` so that solvers
    with a second call on some rows (Heun, PLMS, Langevin) read nothing back. Multistep solvers read each core's
    own history (missing entries: the row's own value, as the sequential sampler's first steps)."""
    solver, dev = problem.solver, b_act.device
    C = len(live)
    x_rows = torch.cat([core.x[b_act] for core in live])             # (C * A, *shape)
    i_rows = torch.cat([_full(A, core.t, dev) for core in live])
    b_rows = b_act.repeat(C)
    host_steps = [core.t for core in live for _ in range(A)]
    if not solver.uses_history:
        den, x1 = problem.step_to(x_rows, i_rows, b_rows, torch.arange(C * A, device=dev), host_steps=host_steps)
    else:
        den = problem.evaluate(x_rows, i_rows, b_rows)
        own = solver.history_value(x_rows, den, i_rows, problem.sigmas)              # (C * A, *shape)
        depth = solver.history_depth
        prev = []
        for k in range(depth):   # k-th previous point: each core's entry, or the row's own value
            prev.append(torch.cat([core.hist[k][b_act] if k < len(core.hist) else own[c * A:(c + 1) * A]
                                   for c, core in enumerate(live)]))
        has_any = any(core.hist for core in live)
        hist = (prev[0] if depth == 1 else tuple(prev)) if has_any else None
        x1 = problem.advance(x_rows, i_rows, b_rows, den, hist, host_steps=host_steps)
    shape = x_rows.shape[1:]
    return den.reshape(C, A, *shape), x1.reshape(C, A, *shape)
