"""Step maps: one solver step, written as a map over *rows*, each row one (time point, sample) pair.

Every solver maps ``(x_i, D(x_i), i) -> dx_i`` with ``x_{i+1} = x_i + dx_i``, for a batch of rows that may sit at
different steps ``i``. The same call serves the sequential loop (one row per sample) and a Picard window (many
points per sample). Notation (VE frame, see :mod:`paratime.schedules`):

    s = sigma_i, s' = sigma_{i+1},  d = (x - D) / s  (the ODE's dx/dsigma),  z_i = pre-drawn N(0, I) noise of step i

    ddim / ddpm (ancestral, DDIM with eta):   up = eta s' sqrt(s^2 - s'^2) / s,  down = sqrt(s'^2 - up^2)
                                              dx = (down - s) d + up z_i          (eta 0: DDIM = PF-ODE Euler;
                                                                                   eta 1: DDPM's posterior step)
    euler_maruyama (reverse SDE family):      dx = -(1 + eta^2)/2 (s^2 - s'^2)/s d + eta sqrt(s^2 - s'^2) z_i,
                                              and dx = D - x on the last step to sigma = 0 (Tweedie denoising)
    heun (EDM Alg. 1, 2nd order):             Euler predictor, then the trapezoid with d at (x_pred, s');
                                              the second evaluation is skipped on a step to sigma = 0
    dpmpp_2m (DPM-Solver++(2M)):              h = ln(s/s'), r = ln(sigma_{i-1}/s)/h,
                                              D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  dx = (s'/s - 1)(x - D')
                                              (first order on the first step and on a step to sigma = 0)

``dpmpp_2m``'s history ``D_{i-1}`` comes from the neighbouring row of the window (ParaDiGMS's ParaDPMSolver) or
from the buffer of the last evaluation at point i-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from paratime.kernels import fused_step

from .denoiser import append_dims

__all__ = ["Solver", "SOLVERS", "make_solver", "Ancestral", "EulerMaruyama", "Heun", "DPMPP2M"]

Evaluate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Solver:
    """A step map. Subclasses set the class attributes and implement :meth:`increment`."""

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False      # uses the pre-drawn per-step noise z_i
    uses_history: ClassVar[bool] = False    # needs D at the previous point
    evals_per_step: ClassVar[int] = 1

    def increment(self, x: torch.Tensor, i: torch.Tensor, b: torch.Tensor, denoised: torch.Tensor,
                  prev_denoised: torch.Tensor | None, noise: torch.Tensor | None, sigmas: torch.Tensor,
                  evaluate: Evaluate) -> torch.Tensor:
        """One step for every row.

        Args:
            x: ``(M, *shape)`` states at the rows' points. i: ``(M,)`` step indices. b: ``(M,)`` sample indices.
            denoised: ``(M, *shape)`` ``D(x_i)``. prev_denoised: ``D(x_{i-1})`` (only if ``uses_history``).
            noise: ``(M, *shape)`` ``z_i`` (only if ``stochastic``). sigmas: ``(N + 1,)`` the grid's sigmas.
            evaluate: ``evaluate(x, i, b) -> D`` for solvers that need another network call.
        Returns:
            ``dx``, ``(M, *shape)``.
        """
        raise NotImplementedError

    @staticmethod
    def _sig(sigmas, i, ndim):
        return append_dims(sigmas[i], ndim), append_dims(sigmas[i + 1], ndim)


def _check_eta(eta, hi=1.0):
    if not isinstance(eta, (int, float)) or not 0 <= eta <= hi:
        raise ValueError(f"eta: must lie in [0, {hi}], got {eta!r}")


@dataclass(frozen=True)
class Ancestral(Solver):
    """DDIM with ``eta`` (``ddim``: eta 0, the probability-flow Euler step; ``ddpm``: eta 1, ancestral sampling)."""

    name: ClassVar[str] = "ddim"
    eta: float = 0.0

    def __post_init__(self):
        _check_eta(self.eta)

    @property
    def stochastic(self):  # type: ignore[override]
        return self.eta > 0

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate):
        s, s1 = sigmas[i], sigmas[i + 1]                                   # (M,)
        up = self.eta * s1 * torch.sqrt((s * s - s1 * s1).clamp_min(0)) / s
        down = torch.sqrt((s1 * s1 - up * up).clamp_min(0))
        # dx = k_d (x - D) + k_z z, through the fused kernel's dispatcher (x0 = D already: c_x = 0, c_o = 1).
        one = torch.ones_like(s)
        _, dx = fused_step(x, denoised, None, 1.0, 0 * one, one, (down - s) / s, up,
                           noise if self.eta > 0 else None, want_x0=False)
        return dx


@dataclass(frozen=True)
class DDPM(Ancestral):
    name: ClassVar[str] = "ddpm"
    eta: float = 1.0


@dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler–Maruyama for the reverse SDE family with the same marginals (eta 1: the reverse SDE)."""

    name: ClassVar[str] = "euler_maruyama"
    stochastic: ClassVar[bool] = True
    eta: float = 1.0

    def __post_init__(self):
        _check_eta(self.eta, hi=10.0)

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate):
        s, s1 = self._sig(sigmas, i, x.ndim)
        var = s * s - s1 * s1
        d = (x - denoised) / s
        dx = -(1 + self.eta**2) / 2 * var / s * d + self.eta * torch.sqrt(var) * noise
        return torch.where(s1 == 0, denoised - x, dx)


@dataclass(frozen=True)
class Heun(Solver):
    """EDM's deterministic 2nd-order Heun step (two network calls per step)."""

    name: ClassVar[str] = "heun"
    evals_per_step: ClassVar[int] = 2

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate):
        s, s1 = self._sig(sigmas, i, x.ndim)
        d = (x - denoised) / s
        dx = (s1 - s) * d
        second = sigmas[i + 1] > 0  # (M,) rows that take the corrector
        if bool(second.any()):
            rows = second.nonzero().squeeze(1)
            x_pred = x[rows] + dx[rows]
            d2 = (x_pred - evaluate(x_pred, i[rows] + 1, b[rows])) / s1[rows]
            dx = dx.index_copy(0, rows, (s1[rows] - s[rows]) * (d[rows] + d2) / 2)
        return dx


@dataclass(frozen=True)
class DPMPP2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep in log-sigma; k-diffusion's and diffusers' form."""

    name: ClassVar[str] = "dpmpp_2m"
    uses_history: ClassVar[bool] = True

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate):
        s, s1 = self._sig(sigmas, i, x.ndim)
        s_prev = append_dims(sigmas[(i - 1).clamp_min(0)], x.ndim)
        second = (append_dims(i, x.ndim) > 0) & (s1 > 0)
        h = torch.log(s / torch.where(s1 > 0, s1, s))          # safe where s1 == 0 (first-order rows)
        r = torch.log(s_prev / s) / torch.where(second, h, torch.ones_like(h))
        r = torch.where(second, r, torch.ones_like(r))
        prev = denoised if prev_denoised is None else prev_denoised
        d_eff = torch.where(second, (1 + 1 / (2 * r)) * denoised - prev / (2 * r), denoised)
        return (s1 / s - 1) * (x - d_eff)


@dataclass(frozen=True)
class LangevinCorrected(Solver):
    """Predictor-corrector (Song et al. 2021): after the base step to sigma' > 0, ``corrector_steps`` Langevin
    steps at fixed sigma', ``x <- x + e g + sqrt(2 e) z_c``, ``g = (D(x) - x) / sigma'^2`` the score.

    Step size: score-SDE sets ``e = 2 (snr ||z|| / ||g||)^2`` with norms averaged over the batch, which couples the
    samples of a batch (the result would depend on how it is split) and, per sample in low dimension, diverges.
    Here ``||z|| / ||g|| ~ sqrt(sigma'^2 + sigma_data^2) ~ sigma'`` is replaced by sigma': ``e = 2 (snr sigma')^2``,
    a function of the step alone. Corrector noise ``z_c`` is pre-drawn per (seed, step, sample) like
    the predictor's, so the step map stays a deterministic function of the step index and Picard / Parareal reach
    the same fixed point. One extra network call per corrector step.
    """

    name: ClassVar[str] = "langevin"
    stochastic: ClassVar[bool] = True
    base: Solver = None  # type: ignore[assignment]
    snr: float = 0.16
    corrector_steps: int = 1

    def __post_init__(self):
        if not isinstance(self.base, Solver) or isinstance(self.base, LangevinCorrected):
            raise ValueError("solver: the corrector needs a base solver")
        if not self.snr > 0:
            raise ValueError(f"corrector_snr: must be > 0, got {self.snr!r}")
        if not isinstance(self.corrector_steps, int) or self.corrector_steps < 1:
            raise ValueError(f"corrector_steps: must be an integer >= 1, got {self.corrector_steps!r}")

    @property
    def uses_history(self):  # type: ignore[override]
        return self.base.uses_history

    @property
    def evals_per_step(self):  # type: ignore[override]
        return self.base.evals_per_step + self.corrector_steps

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate):
        z_pred, z_corr = noise                                      # z_corr: (M, corrector_steps, *shape)
        x1 = x + self.base.increment(x, i, b, denoised, prev_denoised, z_pred if self.base.stochastic else None,
                                     sigmas, evaluate)
        rows = (sigmas[i + 1] > 0).nonzero().squeeze(1)             # no corrector at sigma = 0
        if rows.numel() == 0:
            return x1 - x
        xc, j, bc = x1[rows], i[rows] + 1, b[rows]
        s1 = append_dims(sigmas[j], x.ndim)
        e = 2 * (self.snr * s1) ** 2
        for c in range(self.corrector_steps):
            g = (evaluate(xc, j, bc) - xc) / s1**2
            xc = xc + e * g + torch.sqrt(2 * e) * z_corr[rows, c]
        return x1.index_copy(0, rows, xc) - x


SOLVERS: dict[str, type[Solver]] = {c.name: c for c in (Ancestral, DDPM, EulerMaruyama, Heun, DPMPP2M)}
SOLVERS["euler"] = Ancestral  # the probability-flow Euler step is DDIM in the VE frame


def make_solver(name: str | Solver, **options) -> Solver:
    """Look a solver up by name. ``options`` (e.g. ``eta``) go to its constructor.

    Raises:
        ValueError: unknown name, or an option the solver does not take.
    """
    if isinstance(name, Solver):
        if options:
            raise ValueError(f"solver_options: given with a Solver instance ({sorted(options)})")
        return name
    if name not in SOLVERS:
        raise ValueError(f"solver: unknown {name!r}; allowed: {', '.join(sorted(SOLVERS))}")
    try:
        return SOLVERS[name](**options)
    except TypeError as e:
        raise ValueError(f"solver_options: {name!r} does not take {sorted(options)}") from e
