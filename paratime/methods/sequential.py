"""The sequential sampler: the reference every parallel method must reproduce."""

from __future__ import annotations

import torch

from .common import Outcome, Problem, RoundInfo

__all__ = ["sample_sequential"]


def sample_sequential(x: torch.Tensor, problem: Problem) -> Outcome:
    """Run the N steps one after the other.

    Args:
        x: ``(B, *shape)`` initial state ``x_T`` (VE frame, state dtype).
        problem: the trajectory to compute.
    Returns:
        :class:`Outcome` with ``x_N``; ``rounds`` counts steps.
    """
    B, N = x.shape[0], problem.steps
    b = torch.arange(B, device=x.device)
    solver = problem.solver
    hist: list[torch.Tensor] = []        # multistep solvers: history values at the previous points, newest first
    for n in range(N):
        i = torch.full((B,), n, dtype=torch.long, device=x.device)
        # Denoise, then step to x_{n+1} in the solver's next-state form (Problem.advance: float32 is enough on every
        # grid; one fused pass from the network outputs for linear steps).
        if solver.uses_history:
            denoised = problem.evaluate(x, i, b)
            prev = (hist[0] if solver.history_depth == 1 else tuple(hist)) if hist else None
            x_next = problem.advance(x, i, b, denoised, prev, host_steps=n)
            hist = [solver.history_value(x, denoised, i, problem.sigmas)] + hist[:solver.history_depth - 1]
        else:
            x_next = problem.step_to(x, i, b, host_steps=n)[1]
        x = x_next
        problem.report(RoundInfo(n + 1, torch.full((B,), n + 1), B, float("nan")))
    return Outcome(x, N, sample_rounds=torch.full((B,), N))
