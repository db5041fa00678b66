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
       in the model's frame); accept the converged prefix plus one (its value came from accepted states).

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
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from .common import Outcome, Problem, RoundInfo, rms

__all__ = ["sample_parareal", "sample_parareal_pipelined", "slice_bounds"]

Coarse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def slice_bounds(steps: int, slices: int | None) -> torch.Tensor:
    """``(S + 1,)`` slice boundaries, near-equal slices; default S = round(sqrt(N))."""
    S = slices or max(1, round(math.sqrt(steps)))
    return torch.linspace(0, steps, S + 1, dtype=torch.float64).round().long().unique()


def coarse_subgrids(bounds: torch.Tensor, coarse_steps: int) -> list[torch.Tensor]:
    """Per slice, the coarse propagator's ``coarse_steps + 1`` grid points from ``n_s`` to ``n_{s+1}``."""
    return [torch.linspace(float(bounds[s]), float(bounds[s + 1]), coarse_steps + 1).round().long().unique()
            for s in range(bounds.numel() - 1)]


class _Propagators:
    """Fine and coarse propagators over rows (slice s, sample b)."""

    def __init__(self, problem: Problem, bounds: torch.Tensor, coarse_steps: int, coarse: Coarse | None):
        self.p, self.bounds, self.coarse = problem, bounds, coarse
        self.coarse_calls = 0
        self.sub = coarse_subgrids(bounds, coarse_steps)

    def fine_lockstep(self, U: torch.Tensor, s: torch.Tensor, b: torch.Tensor, hist: torch.Tensor | None):
        """``F_s(U)`` for rows ``(s, b)``, all slices advancing together.

        ``hist`` is D at the point before each slice start (multistep solvers). Returns the slice ends and, with
        ``hist``, each slice's last D (the next slice's history).
        """
        p, lo, hi = self.p, self.bounds[s], self.bounds[s + 1]
        x = U.clone()
        prev = None if hist is None else hist.clone()
        for m in range(int((hi - lo).max())):
            rows = (lo + m < hi).nonzero().squeeze(1)               # slices still running at fine step m
            i = lo[rows] + m
            den = p.evaluate(x[rows], i, b[rows])
            x[rows] = x[rows] + p.increment(x[rows], i, b[rows], den, None if prev is None else prev[rows])
            if prev is not None:
                prev[rows] = den
        return x, prev

    def coarse_step(self, U: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``G_s(U)`` for rows ``(s, b)`` (rows share one slice in a sweep, but need not)."""
        p = self.p
        if self.coarse is not None:
            self.coarse_calls += 1
            return self.coarse(U.clone(), p.sigmas[self.bounds[s]], p.sigmas[self.bounds[s + 1]])
        x = U
        for c in range(max(len(self.sub[int(k)]) for k in s.unique()) - 1):
            pts = torch.stack([self.sub[int(k)][min(c, len(self.sub[int(k)]) - 1)] for k in s])
            nxt = torch.stack([self.sub[int(k)][min(c + 1, len(self.sub[int(k)]) - 1)] for k in s])
            rows = (nxt > pts).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            i, j = pts[rows], nxt[rows]
            den = p.evaluate(x[rows], i, b[rows])
            x = x.clone()
            x[rows] = coarse_jump(p, x[rows], den, i, j, b[rows])
        return x


def coarse_jump(p: Problem, x: torch.Tensor, den: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    """One network call's jump of rows from grid point ``i`` to ``j`` with ``D`` held at its value at ``i``.

    For DDIM / DDPM (ancestral, eta) every step is ``x' - D = r_m (x - D) + up_m z_m`` with
    ``r_m = down_m / sigma_m``; with D constant the whole stretch is exact:

        x_j = D + (prod_m r_m) (x_i - D) + sum_m (prod_{m' > m} r_m') up_m z_m

    so the jump carries the fine solver's own pre-drawn noise (eta 0: the DDIM jump ``D + sigma_j/sigma_i (x - D)``).
    Other solvers take the deterministic DDIM jump.
    """
    from ..solvers import Ancestral

    shape1 = (-1,) + (1,) * (x.ndim - 1)
    sig = p.sigmas
    eta = p.solver.eta if isinstance(p.solver, Ancestral) else 0.0
    if eta == 0 or p.noise is None or isinstance(p.noise, tuple):
        return den + (sig[j] / sig[i]).reshape(shape1) * (x - den)
    acc = x - den
    for m in range(int((j - i).max())):
        k = i + m
        live = (k < j).reshape(shape1)
        kk = k.clamp_max(sig.numel() - 2)
        s, s1 = sig[kk], sig[kk + 1]
        up = eta * s1 * torch.sqrt((s * s - s1 * s1).clamp_min(0)) / s
        r = torch.sqrt((s1 * s1 - up * up).clamp_min(0)) / s
        step = r.reshape(shape1) * acc + up.reshape(shape1) * p.noise[kk.clamp_max(p.noise.shape[0] - 1), b]
        acc = torch.where(live, step, acc)
    return den + acc


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
    N, B, dev = problem.steps, x.shape[0], x.device
    bounds = slice_bounds(N, slices).to(dev)
    S = bounds.numel() - 1
    ar_b = torch.arange(B, device=dev)
    shape1 = (1,) * (x.ndim - 1)
    thresholds = tol * problem.noise_levels[bounds]                     # (S+1,)
    calls = {"fine": 0, "coarse": 0}
    evaluate = problem.evaluate

    def counted(kind):
        def ev(xr, i, b):
            calls[kind] += int(b.numel())
            return evaluate(xr, i, b)
        return ev

    fine = _Propagators(replace(problem, evaluate=counted("fine")), bounds, coarse_steps, coarse)
    coarse_prop = _Propagators(replace(problem, evaluate=counted("coarse")), bounds, coarse_steps, coarse)

    # Initial coarse sweep: U[s+1] = G_s(U[s]).
    U = x.new_zeros((S + 1, *x.shape))                                  # (S+1, B, *shape), VE frame
    U[0] = x
    G_old = torch.zeros_like(U[:S])
    for s in range(S):
        G_old[s] = coarse_prop.coarse_step(U[s], torch.full((B,), s, device=dev), ar_b)
        U[s + 1] = G_old[s]
    hist = torch.zeros_like(U[:S]) if problem.solver.uses_history else None  # D at n_s - 1, per slice
    begin = torch.zeros(B, dtype=torch.long, device=dev)                # first slice whose start is not accepted
    done_round = torch.zeros(B, dtype=torch.long, device=dev)
    residuals: list[float] = []
    # Critical path of the pipelined schedule, in network calls: when each U[s] of the current iteration is known.
    ready = torch.arange(0, S + 1, dtype=torch.float64) * coarse_steps  # after the initial coarse sweep
    lengths = (bounds[1:] - bounds[:-1]).double().cpu() * problem.solver.evals_per_step
    it = 0
    while bool((begin < S).any()):
        it += 1
        active = begin < S
        # 1. Fine solves of every unfinished slice, in lockstep (rows: slice-major, so workers get whole slices).
        sl = torch.arange(S, device=dev)[:, None].expand(S, B)
        run = (sl >= begin[None]) & active[None]                        # (S, B)
        ss, bb = run.nonzero(as_tuple=True)
        h = None
        if hist is not None:
            h = torch.where((bounds[ss] == 0).reshape(-1, *shape1), 0, hist[(ss - 1).clamp_min(0), bb])
        F_end, last_den = fine.fine_lockstep(U[ss, bb], ss, bb, h)   # h at i = 0 is unused (first order)
        F = torch.zeros_like(U[:S])
        F[ss, bb] = F_end
        if hist is not None:
            hist[ss, bb] = last_den
        fine_done = ready[:-1] + lengths                                # pipelined: when F_s(U[s]) is done
        # 2. Sequential correction sweep from each sample's first unaccepted slice.
        U_new = U.clone()
        for s in range(S):
            rows = (run[s]).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            G_new = coarse_prop.coarse_step(U_new[s, rows], torch.full((rows.numel(),), s, device=dev), rows)
            U_new[s + 1, rows] = G_new + F[s, rows] - G_old[s, rows]
            G_old[s, rows] = G_new
        # Pipelined critical path: U_new[s+1] needs G(U_new[s]) and F(U_old[s]).
        new_ready = ready.clone()
        for s in range(S):
            new_ready[s + 1] = max(float(new_ready[s]) + coarse_steps, float(fine_done[s]))
        ready = new_ready
        # 3. Convergence of slice starts (model frame), accept prefix + 1.
        err = rms(problem.scale(U_new[1:] - U[1:], bounds[1:, None].expand(S, B)), 2)   # (S, B)
        tgt = sl + 1
        ok = ((err <= thresholds[tgt]) & run) | (sl < begin[None])      # slices before begin stay accepted
        fail = torch.cat([~ok, torch.ones_like(ok[:1])])
        first = fail.int().argmax(0)                                    # first unconverged slice >= begin
        stride = torch.minimum((first - begin).clamp_min(0) + 1, S - begin)
        stride = torch.where(active, stride, 0)
        U = U_new
        begin = begin + stride
        done_round = torch.where(active & (begin >= S), it, done_round)
        level = problem.noise_levels[bounds[1:]][:, None].expand(S, B)[run]
        e = err[run]
        moved = e[level > 0] / level[level > 0]
        residuals.append(float(moved.max()) if moved.numel() else float("nan"))
        problem.report(RoundInfo(it, (bounds[begin.clamp_max(S)]).clone(), int(ss.numel()), residuals[-1]))
    extra = {"slices": S, "nfe_fine": calls["fine"] / B, "nfe_coarse": calls["coarse"] / B,
             "pipelined_rounds": float(ready[-1]),
             "coarse_calls": coarse_prop.coarse_calls}
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
        raise ValueError("solver: pipelined Parareal needs a one-step solver; dpmpp_2m uses the previous D")
    N, B, dev = problem.steps, x.shape[0], x.device
    bounds = slice_bounds(N, slices).to(dev)
    S = bounds.numel() - 1
    sub = coarse_subgrids(bounds, coarse_steps)
    lengths = [int(bounds[s + 1] - bounds[s]) for s in range(S)]
    b_all = torch.arange(B, device=dev)
    u: dict[tuple[int, int], torch.Tensor] = {}          # (s, k) -> iterate, (B, *shape)
    F: dict[tuple[int, int], torch.Tensor] = {}
    G: dict[tuple[int, int], torch.Tensor] = {}
    final: dict[int, tuple[int, torch.Tensor]] = {}      # accepted starts: s -> (k, value)
    tasks: list[dict] = []                                # running propagations
    residuals: list[float] = []
    count = {"fine": 0, "coarse": 0, "coarse_calls": 0}

    def newest(s):
        return max((k for (ss, k) in u if ss == s), default=-1)

    def produce(s: int, k: int, value: torch.Tensor):
        u[(s, k)] = value
        if s < S and s >= max(final, default=0):
            tasks.append({"kind": "fine", "s": s, "k": k, "x": value.clone(), "m": 0})
            if coarse is None:
                tasks.append({"kind": "coarse", "s": s, "k": k, "x": value.clone(), "m": 0})
            else:
                count["coarse_calls"] += 1
                done("coarse", s, k, coarse(value.clone(), problem.sigmas[bounds[s]].expand(B),
                                            problem.sigmas[bounds[s + 1]].expand(B)))
        if k > 0 and s == max(final) + 1:
            err = rms(problem.scale(value - u[(s, k - 1)], bounds[s].expand(B)), 1)
            level = problem.noise_levels[bounds[s]]
            if float(level) > 0:
                residuals.append(float(err.max() / level))
            if bool((err <= tol * level).all()):
                accept(s, k)

    def accept(s: int, k: int):
        final[s] = (k, u[(s, k)])
        if s < S and (s, k) in F:                          # the exact next start is already known
            take_fine(s, k)

    def take_fine(s: int, k: int):
        if s + 1 not in final:
            kn = newest(s + 1) + 1
            produce(s + 1, kn, F[(s, k)])
            if s + 1 not in final:
                accept(s + 1, kn)

    def done(kind: str, s: int, k: int, value: torch.Tensor):
        (F if kind == "fine" else G)[(s, k)] = value
        if kind == "coarse" and k == 0 and (s + 1, 0) not in u:
            produce(s + 1, 0, value)                        # the initial coarse sweep
        if kind == "fine" and final.get(s, (None,))[0] == k:
            take_fine(s, k)
            return
        for kp in (k, k + 1):                               # corrections this result completes
            parts = ((G, (s, kp)), (F, (s, kp - 1)), (G, (s, kp - 1)))
            if kp >= 1 and (s + 1, kp) not in u and all(key in d for d, key in parts):
                produce(s + 1, kp, G[(s, kp)] + F[(s, kp - 1)] - G[(s, kp - 1)])

    final[0] = (0, x)
    produce(0, 0, x)
    ticks = 0
    while S not in final:
        A = max(final)
        tasks[:] = [t for t in tasks if t["s"] >= A]        # propagations from superseded starts are not needed
        owners = tasks[:]
        # One tick: one step of every running propagation, in one batched call (rows: propagation x sample).
        idx = [int(bounds[t["s"]] + t["m"]) if t["kind"] == "fine" else int(sub[t["s"]][t["m"]]) for t in owners]
        X = torch.cat([t["x"] for t in owners])
        I = torch.tensor(idx, device=dev).repeat_interleave(B)
        Bi = b_all.repeat(len(owners))
        den = problem.evaluate(X, I, Bi)
        is_fine = torch.tensor([t["kind"] == "fine" for t in owners], device=dev).repeat_interleave(B)
        dx = torch.zeros_like(X)
        fr, cr = is_fine.nonzero().squeeze(1), (~is_fine).nonzero().squeeze(1)
        if fr.numel():
            dx[fr] = problem.increment(X[fr], I[fr], Bi[fr], den[fr], None)
        if cr.numel():                                      # coarse jump from sub-grid point i to the next one
            nxt = torch.tensor([int(sub[t["s"]][t["m"] + 1]) for t in owners if t["kind"] != "fine"],
                               device=dev).repeat_interleave(B)
            dx[cr] = coarse_jump(problem, X[cr], den[cr], I[cr], nxt, Bi[cr]) - X[cr]
        count["fine"] += int(fr.numel())
        count["coarse"] += int(cr.numel())
        ticks += 1
        finished = []
        for n, t in enumerate(owners):
            t["x"] = t["x"] + dx[n * B:(n + 1) * B]
            t["m"] += 1
            if t["m"] == (lengths[t["s"]] if t["kind"] == "fine" else len(sub[t["s"]]) - 1):
                finished.append(t)
        tasks[:] = [t for t in tasks if all(t is not f for f in finished)]
        for t in finished:
            done(t["kind"], t["s"], t["k"], t["x"])
        problem.report(RoundInfo(ticks, bounds[max(final)].expand(B).clone(), int(X.shape[0]),
                                 residuals[-1] if residuals else float("nan")))
    extra = {"slices": S, "nfe_fine": count["fine"] / B, "nfe_coarse": count["coarse"] / B,
             "pipelined_rounds": float(ticks * problem.solver.evals_per_step), "coarse_calls": count["coarse_calls"]}
    return Outcome(final[S][1], max(k for (_, k) in u), residuals, torch.full((B,), ticks, device=dev), extra)
