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


class _Propagators:
    """Fine and coarse propagators over rows (slice s, sample b)."""

    def __init__(self, problem: Problem, bounds: torch.Tensor, coarse_steps: int, coarse: Coarse | None):
        self.p, self.coarse = problem, coarse
        self.bounds_h = bounds.tolist()                          # host integers
        self.bounds = bounds.to(problem.sigmas.device)
        self.coarse_calls = 0
        self.sub = coarse_subgrids(bounds, coarse_steps)

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
            s_from, s_to = p.sigmas[self.bounds_h[s]].repeat(R), p.sigmas[self.bounds_h[s + 1]].repeat(R)
            return self.coarse(U.clone(), s_from, s_to)
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
    N, B, dev = problem.steps, x.shape[0], x.device
    bounds_h = slice_bounds(N, slices)                                  # (S+1,) host
    if coarse is None:
        check_coarse_steps(bounds_h, coarse_steps)
    bounds = bounds_h.to(dev)
    S = bounds.numel() - 1
    lengths = (bounds_h[1:] - bounds_h[:-1]).tolist()                   # fine steps per slice (host)
    order = sorted(range(S), key=lambda s: -lengths[s])                 # fine rows: longest slices first
    order_dev = _to_device(order, dev)
    ar_b = torch.arange(B, device=dev)
    shape1 = (1,) * (x.ndim - 1)
    thresholds = tol * problem.noise_levels[bounds]                     # (S+1,)
    calls = {"fine": 0, "coarse": 0}

    def counted(kind, fn):
        def ev(xr, i, b):
            calls[kind] += b.numel()
            return fn(xr, i, b)
        return None if fn is None else ev

    def propagators(kind):
        return _Propagators(replace(problem, evaluate=counted(kind, problem.evaluate),
                                    outputs=counted(kind, problem.outputs)), bounds_h, coarse_steps, coarse)

    fine, coarse_prop = propagators("fine"), propagators("coarse")

    # Initial coarse sweep: U[s+1] = G_s(U[s]).
    U = x.new_zeros((S + 1, *x.shape))                                  # (S+1, B, *shape), VE frame
    U[0] = x
    G_old = torch.zeros_like(U[:S])
    for s in range(S):
        G_old[s] = coarse_prop.coarse_step(U[s], s, ar_b)
        U[s + 1] = G_old[s]
    hist = torch.zeros_like(U[:S]) if problem.solver.uses_history else None  # history value at n_s - 1, per slice
    begin = torch.zeros(B, dtype=torch.long, device=dev)                # first slice whose start is not accepted
    done_round = torch.zeros(B, dtype=torch.long, device=dev)
    sl = torch.arange(S, device=dev)[:, None].expand(S, B)
    level = problem.noise_levels[bounds[1:]][:, None].expand(S, B)     # (S, B)
    residuals: list[float] = []
    # Critical path of the pipelined schedule, in network calls: when each U[s] of the current iteration is known.
    ready = [float(s * coarse_steps) for s in range(S + 1)]             # after the initial coarse sweep
    e = problem.solver.evals_per_step
    fine_calls = [n * e for n in lengths]
    fine_calls[-1] += problem.solver.last_step_evals(problem.sigmas) - e   # the step into N, as the solves make it
    counts = [B] * S                                                    # rows per slice this iteration (host)
    it = 0
    below_prev = torch.zeros((S, B), dtype=torch.bool, device=dev)   # a stochastic solver's last test
    while sum(counts):
        it += 1
        M = sum(counts)
        active = begin < S
        run = (sl >= begin[None]) & active[None]                        # (S, B)
        # 1. Fine solves of every unfinished slice, in lockstep. Rows: slice by slice in `order`, so the rows still
        #    running at fine step m are a prefix, and each slice's rows a contiguous block.
        ro, bb = true_indices(run[order_dev], M).unbind(1)               # (M,) each, no host sync
        ss = order_dev[ro]
        # Rows still running at fine step m, up to the longest slice that still has rows: an accepted longer
        # slice must not leave a zero-row step (its rows are gone, the shorter slices' solves are done).
        horizon = max(lengths[s] for s in range(S) if counts[s])
        running = [sum(counts[s] for s in range(S) if lengths[s] > m) for m in range(horizon)]
        h = None
        if hist is not None:
            h = torch.where((bounds[ss] == 0).reshape(-1, *shape1), 0, hist[(ss - 1).clamp_min(0), bb])
        starts = [fine.bounds_h[s] for s in order for _ in range(counts[s])]   # (M,) host ints: the rows' slice starts
        # h at i = 0 is unused (first order)
        F_end, last_den = fine.fine_lockstep(U[ss, bb], ss, bb, h, running, starts)
        F = torch.zeros_like(U[:S])
        F[ss, bb] = F_end
        if hist is not None:
            hist_used = hist.clone()                                    # the histories this iteration's solves read
            hist[ss, bb] = last_den
        fine_done = [ready[s] + fine_calls[s] for s in range(S)]       # pipelined: when F_s(U[s]) is done
        # 2. Sequential correction sweep from each sample's first unaccepted slice.
        offset, o = {}, 0
        for s in order:
            offset[s], o = o, o + counts[s]
        U_new = U.clone()
        for s in range(S):
            if not counts[s]:
                continue
            rows = bb[offset[s]:offset[s] + counts[s]]
            G_new = coarse_prop.coarse_step(U_new[s, rows], s, rows)
            U_new[s + 1, rows] = G_new + F[s, rows] - G_old[s, rows]
            G_old[s, rows] = G_new
        # Pipelined critical path: U_new[s+1] needs G(U_new[s]) and F(U_old[s]).
        for s in range(S):
            ready[s + 1] = max(ready[s] + coarse_steps, fine_done[s])
        # 3. Convergence of slice starts (model frame), accept prefix + 1.
        err = rms(problem.scale(U_new[1:] - U[1:], bounds[1:, None].expand(S, B)), 2)   # (S, B)
        if hist is not None:
            # A multistep solver's slice start s + 1 is the pair (U[s+1], D at n_{s+1} - 1 = hist[s]): the fine
            # solve from it is exact only when the history it read has settled too (else a start that did not move
            # is accepted with a stale history; at tol 0 Parareal then ends off the sequential sample).
            err = torch.maximum(err, rms(hist - hist_used, 2))          # (S, B); D (data units) or eps
        # Iteration 1 read no history (zeros: none computed yet), so its change is not a settling: a small history
        # (DEIS's eps, ~0.1 on the ring at high noise) passed the test from zero and left the start it made 5-10x
        # tol off (5 steps in 5 slices). There iteration 1 accepts by exactness only; err, its residual, is real.
        settled = err if hist is None or it > 1 else torch.full_like(err, math.inf)
        below = settled <= thresholds[sl + 1]
        if problem.solver.stochastic:
            # A stochastic solver's fine steps stretch an accepted start's remaining error far beyond its last move
            # (a sample crossing between modes: gmm DDPM-100 in 10 slices, coarse_steps 2, starts that moved 0.57x
            # and 0.67x their thresholds left the sample 1.66x its tolerance): a start counts as converged only after
            # two iterations in a row within its threshold.
            below, below_prev = below & below_prev, below
        ok = (below & run) | (sl < begin[None])                         # slices before begin stay accepted
        fail = torch.cat([~ok, torch.ones_like(ok[:1])])
        first = fail.int().argmax(0)                                    # first unconverged slice >= begin
        # Accept the converged prefix plus one: slice `first`'s end came from its accepted start. Exact when that
        # start did not change this iteration (first == begin); after a start that converged (moved <= its
        # threshold) the end is off by that change times how much F - G moves with it, which can exceed the change
        # where fine and coarse differ most (a 3-step Heun grid: the worst of 256 samples 1.1x the relative tolerance).
        # A stochastic solver's fine steps stretch that change far more (a sample crossing between modes: gmm DDPM-20
        # in 4 slices, coarse_steps 2, the worst of 256 samples 3.6x; DDPM-50 in 7 slices 4.2x), so there the plus
        # one is taken only when exact (with the two-in-a-row test above: 0.005x at most over 64 cases of DDPM and
        # Euler ancestral, for one or two more iterations).
        plus_one = (first < S) & ((first == begin) | (not problem.solver.stochastic))
        stride = (first - begin).clamp_min(0) + plus_one.long()
        stride = torch.where(active, stride, 0)
        U = U_new
        begin = begin + stride
        done_round = torch.where(active & (begin >= S), it, done_round)
        moved = torch.where(run & (level > 0), err / level, -math.inf).max()
        # The iteration's one host read: the next iteration's rows per slice, and this one's residual.
        nxt = ((sl >= begin[None]) & (begin < S)[None]).sum(1)
        host = torch.cat([nxt.double(), moved.double().reshape(1), begin.clamp_max(S).double()]).tolist()
        counts = [int(c) for c in host[:S]]
        residuals.append(host[S] if host[S] > -math.inf else float("nan"))
        # The samples' window starts on the host, from the same read (a device tensor made the progress bar read
        # again each iteration).
        problem.report(RoundInfo(it, torch.tensor([fine.bounds_h[int(b)] for b in host[S + 1:]]), M, residuals[-1]))
    extra = {"slices": S, "nfe_fine": calls["fine"] / B, "nfe_coarse": calls["coarse"] / B,
             "pipelined_rounds": ready[-1], "coarse_calls": coarse_prop.coarse_calls}
    return Outcome(U[S], it, residuals, done_round, extra)


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
    N, B, dev = problem.steps, x.shape[0], x.device
    bounds_h = slice_bounds(N, slices)                                  # host
    if coarse is None:
        check_coarse_steps(bounds_h, coarse_steps)
    S = bounds_h.numel() - 1
    sub = coarse_subgrids(bounds_h, coarse_steps)
    lengths = (bounds_h[1:] - bounds_h[:-1]).tolist()
    start = bounds_h.tolist()
    bounds = bounds_h.to(dev)
    levels = problem.noise_levels[bounds].tolist()                      # (S+1,) host, read once
    b_all = torch.arange(B, device=dev)
    u: dict[tuple[int, int], torch.Tensor] = {}          # (s, k) -> iterate, (B, *shape): the newest two per s
    F: dict[tuple[int, int], torch.Tensor] = {}          # results still to be read (see _prune)
    G: dict[tuple[int, int], torch.Tensor] = {}
    made: set[tuple[int, int]] = set()                    # every (s, k) ever produced (host integers)
    newest_k: dict[int, int] = {}                         # s -> its newest iteration
    final: dict[int, tuple[int, torch.Tensor]] = {}      # accepted starts: s -> (k, value)
    tasks: list[dict] = []                                # running propagations
    residuals: list[float] = []
    count = {"fine": 0, "coarse": 0, "coarse_calls": 0, "second_calls": 0}

    def fine_second_call(xr, i, b):     # a two-call solver's second call on the fine rows (Heun's), counted
        count["fine"] += b.numel()
        count["second_calls"] += 1
        return problem.evaluate(xr, i, b)

    fine_problem = replace(problem, evaluate=fine_second_call)

    def newest(s):
        return newest_k.get(s, -1)

    def produce(s: int, k: int, value: torch.Tensor, exact: bool = False):
        u[(s, k)] = value
        made.add((s, k))
        newest_k[s] = max(k, newest(s))
        if s < S and s >= max(final, default=0):
            tasks.append({"kind": "fine", "s": s, "k": k, "x": value.clone(), "m": 0})
            if coarse is None:
                tasks.append({"kind": "coarse", "s": s, "k": k, "x": value.clone(), "m": 0})
            else:
                count["coarse_calls"] += 1
                done("coarse", s, k, coarse(value.clone(), problem.sigmas[start[s]].repeat(B),
                                            problem.sigmas[start[s + 1]].repeat(B)))
        if k > 0 and s == max(final) + 1 and not exact:     # an exact value is accepted without a test
            # The acceptance test at the frontier: one host read (residual and decision together).
            err = rms(problem.scale(value - u[(s, k - 1)], bounds[s].expand(B)), 1)
            worst, converged = torch.stack([err.max(), (err <= tol * levels[s]).all().to(err.dtype)]).tolist()
            if levels[s] > 0:
                residuals.append(worst / levels[s])
            if converged:
                accept(s, k)
        u.pop((s, k - 1), None)                             # read only by the test above

    def accept(s: int, k: int):
        final[s] = (k, u[(s, k)])
        if s < S and (s, k) in F:                          # the exact next start is already known
            take_fine(s, k)

    def take_fine(s: int, k: int):
        if s + 1 not in final:
            kn = newest(s + 1) + 1
            produce(s + 1, kn, F[(s, k)], exact=True)
            if s + 1 not in final:
                accept(s + 1, kn)

    def done(kind: str, s: int, k: int, value: torch.Tensor):
        (F if kind == "fine" else G)[(s, k)] = value
        if kind == "coarse" and k == 0 and (s + 1, 0) not in made:
            produce(s + 1, 0, value)                        # the initial coarse sweep
        if kind == "fine" and final.get(s, (None,))[0] == k:
            take_fine(s, k)
            return
        for kp in (k, k + 1):                               # corrections this result completes
            parts = ((G, (s, kp)), (F, (s, kp - 1)), (G, (s, kp - 1)))
            if kp >= 1 and (s + 1, kp) not in made and all(key in d for d, key in parts):
                produce(s + 1, kp, G[(s, kp)] + F[(s, kp - 1)] - G[(s, kp - 1)])

    final[0] = (0, x)
    produce(0, 0, x)
    ticks = 0
    while S not in final:
        A = max(final)
        tasks[:] = [t for t in tasks if t["s"] >= A]        # propagations from superseded starts are not needed
        _prune(u, F, G, made, final, A)
        # One tick: one step of every running propagation, in one batched call (rows: propagation x sample), fine
        # propagations first, so fine and coarse rows are two contiguous blocks.
        owners = [t for t in tasks if t["kind"] == "fine"] + [t for t in tasks if t["kind"] != "fine"]
        nf = B * sum(t["kind"] == "fine" for t in owners)
        coarse_owners = owners[nf // B:]
        # Step indices of every propagation and the coarse jumps' targets: one host-to-device copy per tick.
        steps_h = [start[t["s"]] + t["m"] if t["kind"] == "fine" else sub[t["s"]][t["m"]] for t in owners]
        steps_h += [sub[t["s"]][t["m"] + 1] for t in coarse_owners]
        steps = _to_device(steps_h, dev)
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
        x_next = torch.cat(parts) if len(parts) > 1 else parts[0]      # next states (next-state form)
        count["fine"] += nf
        count["coarse"] += X.shape[0] - nf
        ticks += 1
        finished = []
        for n, t in enumerate(owners):
            t["x"] = x_next[n * B:(n + 1) * B]
            t["m"] += 1
            if t["m"] == (lengths[t["s"]] if t["kind"] == "fine" else len(sub[t["s"]]) - 1):
                finished.append(t)
        finished = [t for t in tasks if any(t is f for f in finished)]   # in the order the tasks were started
        tasks[:] = [t for t in tasks if all(t is not f for f in finished)]
        for t in finished:     # a copy: a view would keep this tick's whole x_next alive while the result is kept
            done(t["kind"], t["s"], t["k"], t["x"].clone())
        problem.report(RoundInfo(ticks, torch.tensor([start[max(final)]] * B), int(X.shape[0]),
                                 residuals[-1] if residuals else float("nan")))
    extra = {"slices": S, "nfe_fine": count["fine"] / B, "nfe_coarse": count["coarse"] / B,
             "pipelined_rounds": float(ticks + count["second_calls"]), "coarse_calls": count["coarse_calls"]}
    return Outcome(final[S][1], max(newest_k.values()), residuals, torch.full((B,), ticks, device=dev), extra)


def _prune(u: dict, F: dict, G: dict, made: set, final: dict, A: int) -> None:
    """Drop the pipelined schedule's values no later step reads, so that memory is what the running propagations
    hold (not every iterate of the run). Called before a tick, when every running propagation starts at or after
    the accepted frontier ``A``:

    - every ``u``, ``F``, ``G`` of a start before ``A`` (no propagation or correction reads them again), and the
      accepted values before ``A`` (only ``final[S]`` is returned);
    - ``F(s, k)``: read only by the correction that makes ``u(s+1, k+1)`` (or, once ``s`` is accepted at ``k``, to
      give ``s+1`` its exact value): dead once ``u(s+1, k+1)`` was made or ``s+1`` is accepted;
    - ``G(s, k)``: read by the corrections making ``u(s+1, k)`` and ``u(s+1, k+1)``: dead once both were made or
      ``s+1`` is accepted.
    """
    for s in [s for s in final if s < A and final[s][1] is not None]:
        final[s] = (final[s][0], None)
    for d in (u, F, G):
        for key in [key for key in d if key[0] < A]:
            del d[key]
    for s, k in list(F):
        if s + 1 in final or (s + 1, k + 1) in made:
            del F[(s, k)]
    for s, k in list(G):
        if s + 1 in final or ((s + 1, k) in made and (s + 1, k + 1) in made):
            del G[(s, k)]
