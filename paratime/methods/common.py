"""What every sampling method shares: the problem it solves and the record it returns.

A :class:`Problem` is an N-step discretised trajectory: the grid, a step map, its step noise (fixed per (seed, step,
sample) before sampling starts, drawn row by row where it is used, or a caller's generator's table), and
``evaluate(x, i, b) -> D(x)`` for rows at steps ``i`` of samples ``b`` (routed through the backend). Methods are
pure functions ``method(x_T, problem, **options) -> Outcome``; the sampler owns models, backends and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..denoiser import NetworkOutputs
from ..noise import LazyNoise
from ..solvers import Evaluate, Solver, linear_next_state

__all__ = ["Problem", "Outcome", "RoundInfo", "rms", "max_abs"]


@dataclass(frozen=True)
class RoundInfo:
    """What one round (one sequential depth of batched network calls, or one Parareal iteration) did.

    Attributes:
        round: 1-based round number.
        begin: ``(B,)`` each sample's first unconverged point after the round (N once a sample is done).
        rows: time-point evaluations made this round (all samples).
        residual: worst change this round in units of the noise level (ParaDiGMS's residual); ``nan`` when no
            point with a noise level > 0 moved.
        final_change: Picard: the largest change of a final point this round (max-abs, the returned sample's
            units; compare with ``tol`` of ``stop="final"``); ``nan`` while no window reaches the end. Staggered:
            the tick's largest change of a sample from the one before it, over the samples still open when each
            came; ``nan`` when no sample compared.
    """

    round: int
    begin: torch.Tensor
    rows: int
    residual: float
    final_change: float = float("nan")


@dataclass(frozen=True)
class Problem:
    """An N-step trajectory to compute.

    Attributes:
        sigmas: ``(N + 1,)`` grid sigmas in the state dtype, on the state device.
        noise_levels: ``(N + 1,)`` tolerance scale per point in the model's frame (DDPM's ancestral std of the
            step leaving the point; 0 at the end).
        frame_scales: ``(N + 1,)`` ``x_native = frame_scale * x``: parallel methods iterate in the model's frame.
        solver: the step map.
        evaluate: ``evaluate(x, i, b) -> D``; rows at steps ``i`` of samples ``b``.
        noise: the ``(N, B, *shape)`` step noise, read as ``noise[i, b]``: a :class:`~paratime.noise.LazyNoise`
            (a seeded run: the rows are drawn when read, nothing is stored) or a tensor (a caller's generator, or
            a test's table); None for deterministic solvers; with a Langevin corrector, a tuple (predictor noise or
            None, ``(N, B, corrector_steps, *shape)`` corrector noise).
        on_round: called with a :class:`RoundInfo` after every round.
        outputs: ``outputs(x, i, b) -> NetworkOutputs``, the raw network outputs of rows (through the backend), or
            None; with it, :meth:`step_to` takes linear steps in one fused pass from the outputs.
    """

    sigmas: torch.Tensor
    noise_levels: torch.Tensor
    frame_scales: torch.Tensor
    solver: Solver
    evaluate: Evaluate
    noise: torch.Tensor | LazyNoise | tuple | None = None
    on_round: Callable[[RoundInfo], None] | None = None
    outputs: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], NetworkOutputs] | None = None

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    def _noise(self, i, b):
        """The step noise of rows ``(i, b)``: ``(M, *shape)`` (drawn now for a :class:`LazyNoise`), a tuple for a
        corrector, or None."""
        if not self.solver.stochastic:
            return None
        if isinstance(self.noise, tuple):           # (predictor noise or None, corrector noise)
            return tuple(None if n is None else n[i, b] for n in self.noise)
        return self.noise[i, b]

    def advance(self, x, i, b, denoised, prev_denoised=None, host_steps=None) -> torch.Tensor:
        """``x_{i+1}`` of rows ``(i, b)`` with their pre-drawn noise, in the solver's next-state form
        (:meth:`~paratime.solvers.Solver.next_state`): every operand at the scale of the result, so a float32 state
        stays within ~1e-6 of float64 on flow-matching and zero-SNR grids, where ``x + increment`` cancels a state of
        size ~1e7 (``tests/test_precision.py``). ``host_steps``: ``i`` on the host (:data:`paratime.solvers.HostSteps`),
        so that a solver's second call on some rows reads nothing back."""
        return self.solver.next_state(x, i, b, denoised, prev_denoised, self._noise(i, b), self.sigmas,
                                      self.evaluate, host_steps=host_steps)

    def step_to(self, x: torch.Tensor, i: torch.Tensor, b: torch.Tensor, denoised_rows: torch.Tensor | None = None,
                host_steps=None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Evaluate and step rows ``(i, b)`` of a solver without history: ``(D at denoised_rows, or None;
        x_{i+1})``, the next state in the next-state form (:meth:`advance`). A linear step with
        raw outputs takes guidance, the conversion to ``D`` and ``x' = D + a (x - D) + k_z z`` in one pass
        (:func:`~paratime.solvers.linear_next_state`)."""
        lin = None if self.outputs is None else self.solver.linear_next(i, self.sigmas)
        if lin is None:
            den = self.evaluate(x, i, b)
            x1 = self.advance(x, i, b, den, host_steps=host_steps)
            return (None if denoised_rows is None else den[denoised_rows]), x1
        o = self.outputs(x, i, b)
        x1, den = linear_next_state(x, o.out, o.uncond, o.guidance, o.c_x, o.c_o, *lin, self._noise(i, b))
        return (None if denoised_rows is None else den[denoised_rows]), x1

    def scale(self, x: torch.Tensor, i: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rows ``x`` at points ``i`` to the model's frame (``inverse``: back to the VE frame)."""
        f = self.frame_scales[i]
        f = f.reshape(f.shape + (1,) * (x.ndim - f.ndim))
        return x / f if inverse else x * f

    def report(self, info: RoundInfo):
        if self.on_round is not None:
            self.on_round(info)


@dataclass
class Outcome:
    """A method's result: the final states ``(B, *shape)`` (VE frame) and its per-round record."""

    x: torch.Tensor
    rounds: int
    residuals: list[float] = field(default_factory=list)
    sample_rounds: torch.Tensor | None = None   # (B,) round at which each sample finished
    extra: dict = field(default_factory=dict)


def rms(delta: torch.Tensor, start_dim: int) -> torch.Tensor:
    """Root mean square over the feature dimensions from ``start_dim`` on."""
    return delta.flatten(start_dim).pow(2).mean(-1).sqrt()


def max_abs(x: torch.Tensor, start_dim: int = 1) -> torch.Tensor:
    """The max-abs over the feature dimensions from ``start_dim`` on, in one op (``abs().amax`` takes two: a dispatch
    each round on the Picard loop's path; exact in any reduction order, NaN and inf as there)."""
    return torch.linalg.vector_norm(x, float("inf"), tuple(range(start_dim, x.ndim)))
