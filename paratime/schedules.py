"""Noise schedules and time grids.

Notation (k-diffusion / EDM): every schedule is expressed in the *variance-exploding frame*

    x = x0 + sigma * eps,          sigma = noise-to-signal ratio,

in which DDIM is exactly the Euler method of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``.
A model's own (native) frame is ``x_native = frame_scale(sigma) * x``:

    VP   (DDPM, alphas_cumprod a_t):  sigma = sqrt((1 - a_t) / a_t),  frame_scale = sqrt(a_t) = 1 / sqrt(1 + sigma^2)
    VE   (NCSN, score-SDE):           frame_scale = 1
    EDM  (Karras et al. 2022):        frame_scale = 1, network input scaled by c_in = 1 / sqrt(sigma^2 + sigma_data^2)
    flow (rectified flow, t in [0,1]): x_native = (1 - t) x0 + t eps:  sigma = t / (1 - t),  frame_scale = 1 - t

The network sees ``input_scale(sigma) * x`` (``= frame_scale`` except for EDM's ``c_in``) and a conditioning value
``model_time`` (the integer DDPM timestep, a continuous t, sigma itself, or EDM's ``ln(sigma) / 4``).

A :class:`TimeGrid` is the N-step discretisation: N + 1 points ``sigmas[0] > ... > sigmas[N]`` (the last is usually
0) and the network conditioning ``model_times`` at each point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import check_int, check_number

__all__ = [
    "TimeGrid",
    "NoiseSchedule",
    "DiscreteVPSchedule",
    "ContinuousVPSchedule",
    "VESchedule",
    "EDMSchedule",
    "FlowSchedule",
    "karras_sigmas",
    "betas_for",
    "SPACINGS",
]

SPACINGS = ("leading", "trailing", "linspace", "karras")


def _check_default_spacing(schedule) -> None:
    """A schedule's ``default_spacing`` is one of :data:`SPACINGS` (named when built, not blamed on ``spacing``
    at the first grid)."""
    if schedule.default_spacing not in SPACINGS:
        raise ValueError(f"default_spacing: unknown {schedule.default_spacing!r}; allowed: {', '.join(SPACINGS)}")


@dataclass(frozen=True)
class TimeGrid:
    """An N-step time grid.

    Attributes:
        sigmas: ``(N + 1,)`` float64, strictly decreasing noise levels; ``sigmas[N]`` may be 0.
        model_times: ``(N + 1,)`` float64, the network's conditioning value at each point.
        frame_scales: ``(N + 1,)`` float64, ``x_native = frame_scale * x`` at each point.
    """

    sigmas: torch.Tensor
    model_times: torch.Tensor
    frame_scales: torch.Tensor

    def __post_init__(self):
        n = self.sigmas.numel()
        if n < 2:
            raise ValueError(f"steps: a time grid needs at least 1 step, got {n - 1}")
        for name in ("model_times", "frame_scales"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name}: expected shape ({n},), got {tuple(getattr(self, name).shape)}")
        if not bool((self.sigmas[:-1] > self.sigmas[1:]).all()):
            raise ValueError("sigmas: a time grid must be strictly decreasing")
        if bool((self.sigmas < 0).any()) or not bool(torch.isfinite(self.sigmas).all()):
            raise ValueError("sigmas: noise levels must be finite and >= 0")

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    def ancestral_std(self) -> torch.Tensor:
        """``(N + 1,)``: standard deviation, in the model's frame, of the noise DDPM adds on the step *leaving* each
        point (``sigma_up`` of the step, times the frame scale of its target); 0 at the last point.

        This is the noise level ParaDiGMS scales its tolerance by (``DDPMScheduler._get_variance`` ** 0.5).
        """
        s, s_next = self.sigmas[:-1], self.sigmas[1:]
        up = s_next * torch.sqrt((s**2 - s_next**2).clamp_min(0)) / s
        return torch.cat([up * self.frame_scales[1:], self.sigmas.new_zeros(1)])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid: ``(sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, then 0."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    check_number("sigma_min", sigma_min, 0, low_open=True)      # 0 ended the grid on two zeros
    check_number("sigma_max", sigma_max, sigma_min, low_open=True)
    check_number("rho", rho, 0, low_open=True)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def betas_for(name: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """DDPM beta schedules as diffusers defines them: ``linear``, ``scaled_linear`` (Stable Diffusion) and
    ``squaredcos_cap_v2`` / ``cosine`` (Nichol & Dhariwal)."""
    check_int("num_train_timesteps", num_train_timesteps, 1)
    for name_, beta in (("beta_start", beta_start), ("beta_end", beta_end)):
        check_number(name_, beta, 0, 1, low_open=True)
        if beta >= 1:
            raise ValueError(f"{name_}: must be below 1 (a beta of 1 leaves no signal), got {beta!r}")
    T = num_train_timesteps
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if name in ("squaredcos_cap_v2", "cosine"):
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"beta_schedule: unknown {name!r}; allowed: linear, scaled_linear, squaredcos_cap_v2, cosine")


class NoiseSchedule:
    """Base class: how a model's noise levels, inputs and conditioning relate to the VE-frame ``sigma``."""

    kind: str = "ve"
    default_spacing: str = "karras"

    def frame_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.frame_scale(sigma)

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def sigma_of_model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`model_time`."""
        return t

    def prior_std(self, sigma: torch.Tensor) -> torch.Tensor:
        """Standard deviation of ``x`` (VE frame) at the start of sampling: VP ``sqrt(1 + sigma^2)``, else sigma."""
        return sigma

    @property
    def sigma_range(self) -> tuple[float, float]:
        raise NotImplementedError

    def sigma_grid(self, steps: int, spacing: str) -> torch.Tensor:
        if spacing != "karras":
            raise ValueError(f"spacing: {type(self).__name__} supports 'karras', got {spacing!r}")
        lo, hi = self.sigma_range
        return karras_sigmas(steps, lo, hi)

    def grid(self, steps: int, spacing: str | None = None) -> TimeGrid:
        """The N-step grid for this schedule.

        Raises:
            ValueError: ``steps < 1`` or a ``spacing`` this schedule does not support.
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps: must be an integer >= 1, got {steps!r}")
        spacing = spacing or self.default_spacing
        if spacing not in SPACINGS:
            raise ValueError(f"spacing: unknown {spacing!r}; allowed: {', '.join(SPACINGS)}")
        sig = self.sigma_grid(steps, spacing)
        return self._grid_from_sigmas(sig)

    def _grid_from_sigmas(self, sig: torch.Tensor) -> TimeGrid:
        times = self.model_time(sig.clamp_min(self._time_floor()))
        return TimeGrid(sig, times.to(torch.float64), self.frame_scale(sig))

    def _time_floor(self) -> float:
        """The smallest sigma a grid point's model time is read at (the final sigma = 0 is never evaluated; a
        schedule whose time map stops at its range clamps to it)."""
        return self.sigma_range[0]


@dataclass(frozen=True)
class DiscreteVPSchedule(NoiseSchedule):
    """DDPM-style discrete VP schedule given by ``alphas_cumprod`` over ``T`` training steps.

    Args:
        alphas_cumprod: ``(T,)`` decreasing values in (0, 1].
        steps_offset: added to every grid timestep (diffusers' ``steps_offset``; Stable Diffusion uses 1).
        final_alpha_cumprod: signal level after the last step; 1.0 (diffusers ``set_alpha_to_one=True``) ends at
            sigma = 0, ``alphas_cumprod[0]`` otherwise.
        default_spacing: the grid spacing when a sampler gives no ``spacing`` (default ``trailing``).
    """

    alphas_cumprod: torch.Tensor
    steps_offset: int = 0
    final_alpha_cumprod: float = 1.0
    default_spacing: str = "trailing"
    kind: str = field(default="vp", init=False)

    def __post_init__(self):
        _check_default_spacing(self)
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not bool(((ac > 0) & (ac <= 1)).all()) or not bool((ac[1:] <= ac[:-1]).all()):
            raise ValueError("alphas_cumprod: must be a decreasing 1-D sequence in (0, 1]")
        check_number("final_alpha_cumprod", self.final_alpha_cumprod, 0, 1, low_open=True)
        check_int("steps_offset", self.steps_offset, 0)
        object.__setattr__(self, "alphas_cumprod", ac)

    @classmethod
    def from_betas(cls, beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02, **kw) -> "DiscreteVPSchedule":
        betas = betas_for(beta_schedule, num_train_timesteps, beta_start, beta_end)
        return cls(torch.cumprod(1 - betas, 0), **kw)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def train_sigmas(self) -> torch.Tensor:
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def sigma_range(self):
        s = self.train_sigmas
        return float(s[0]), float(s[-1])

    def frame_scale(self, sigma):
        return 1 / torch.sqrt(1 + sigma**2)

    def prior_std(self, sigma):
        return torch.sqrt(1 + sigma**2)

    @property
    def _log_train_sigmas(self) -> torch.Tensor:
        # alphas_cumprod[0] = 1 (a first beta of 0) puts sigma 0 at timestep 0: floored, the interpolation below
        # stays finite (log 0 = -inf made every sigma under the second timestep's a NaN model time).
        return self.train_sigmas.clamp_min(torch.finfo(torch.float64).tiny).log()

    def model_time(self, sigma):
        """Fractional timestep whose sigma is ``sigma``: linear interpolation in log sigma (k-diffusion)."""
        log_s = self._log_train_sigmas
        ls = sigma.to(torch.float64).log().clamp(log_s[0], log_s[-1])
        idx = torch.searchsorted(log_s, ls.contiguous()).clamp(1, log_s.numel() - 1)
        lo, hi = log_s[idx - 1], log_s[idx]
        w = (ls - lo) / (hi - lo)
        return (idx - 1).to(torch.float64) + w

    def sigma_of_model_time(self, t):
        log_s = self._log_train_sigmas
        t = t.to(torch.float64).clamp(0, log_s.numel() - 1)
        lo = t.floor().long().clamp_max(log_s.numel() - 2)
        w = t - lo
        return torch.exp(log_s[lo] + w * (log_s[lo + 1] - log_s[lo]))

    def timesteps(self, steps: int, spacing: str) -> np.ndarray:
        """Integer timesteps, as diffusers' ``set_timesteps`` computes them for this spacing."""
        T = self.num_train_timesteps
        if steps > T:
            raise ValueError(f"steps: at most num_train_timesteps={T} for a discrete schedule, got {steps}")
        if spacing == "leading":
            ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + self.steps_offset
            if int(ts[0]) > T - 1:          # clipped below, it would repeat T - 1
                raise ValueError(f"steps, steps_offset: leading spacing with {steps} steps and steps_offset="
                                 f"{self.steps_offset} reaches timestep {int(ts[0])} of {T}; use fewer steps")
        elif spacing == "trailing":
            # diffusers' float arange, whose values round .5 its way (48 steps: 936, where T - k T / N gives 937);
            # it holds steps + 1 values at 61, 103, ... steps: the first steps are diffusers' grid
            ts = np.round(np.arange(T, 0, -T / steps)[:steps]).astype(np.int64) - 1
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
        else:
            raise ValueError(f"spacing: {spacing!r} is not a discrete spacing")
        return np.clip(ts, 0, T - 1)

    def grid(self, steps: int, spacing: str | None = None) -> TimeGrid:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps: must be an integer >= 1, got {steps!r}")
        spacing = spacing or self.default_spacing
        if spacing not in SPACINGS:
            raise ValueError(f"spacing: unknown {spacing!r}; allowed: {', '.join(SPACINGS)}")
        if spacing == "karras":
            lo, hi = self.sigma_range
            return self._grid_from_sigmas(karras_sigmas(steps, lo, hi))
        ts = torch.from_numpy(self.timesteps(steps, spacing).copy())
        ac = self.alphas_cumprod[ts]
        if not self.final_alpha_cumprod > float(ac[-1]):
            # The grid's last step goes to final_alpha_cumprod: it must be less noisy than the last timestep.
            raise ValueError(f"final_alpha_cumprod: must exceed alpha_bar at the grid's last timestep "
                             f"{int(ts[-1])} ({float(ac[-1]):.6g}) for a {steps}-step {spacing} grid, got "
                             f"{self.final_alpha_cumprod!r}")
        a_final = torch.tensor([self.final_alpha_cumprod], dtype=torch.float64)
        ac = torch.cat([ac, a_final])
        sig = ((1 - ac) / ac).sqrt()
        times = torch.cat([ts.to(torch.float64), torch.zeros(1, dtype=torch.float64)])
        return TimeGrid(sig, times, ac.sqrt())


@dataclass(frozen=True)
class ContinuousVPSchedule(NoiseSchedule):
    """Continuous-time VP SDE (score-SDE): ``linear`` betas ``beta(t) = beta_min + t (beta_max - beta_min)`` or the
    ``cosine`` schedule, t in [eps, 1]. The network is conditioned on ``time_scale * t``."""

    schedule: str = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3
    time_scale: float = 1.0
    default_spacing: str = "linspace"
    kind: str = field(default="vp", init=False)

    def __post_init__(self):
        _check_default_spacing(self)
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule: unknown {self.schedule!r}; allowed: linear, cosine")
        check_number("eps", self.eps, 0, 1, low_open=True)
        if not self.eps < 1:
            raise ValueError(f"eps: must lie in (0, 1), got {self.eps}")
        check_number("beta_min", self.beta_min, 0)
        check_number("beta_max", self.beta_max, self.beta_min)
        if self.schedule == "cosine" and (self.beta_min, self.beta_max) != (0.1, 20.0):
            raise ValueError("beta_min, beta_max: apply to the linear schedule; the cosine one has no betas")
        if self.beta_max == 0:
            raise ValueError("beta_max: must be > 0 (beta_min = beta_max = 0 adds no noise)")
        check_number("time_scale", self.time_scale, 0, low_open=True)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return torch.exp(-0.5 * t**2 * (self.beta_max - self.beta_min) - t * self.beta_min)
        f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return (f(t) / f(torch.zeros_like(t))).clamp(1e-8, 1)  # sigma <= 1e4 at t = 1

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        ab = 1 / (1 + sigma.to(torch.float64) ** 2)
        if self.schedule == "linear":
            # Solve 0.5 (bmax - bmin) t^2 + bmin t + log(ab) = 0 for t >= 0; constant beta (a = 0): linear.
            a, b, c = 0.5 * (self.beta_max - self.beta_min), self.beta_min, ab.log()
            if a == 0:
                return -c / b
            return (-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)
        u = torch.acos(torch.sqrt(ab * math.cos(0.008 / 1.008 * math.pi / 2) ** 2)) * 2 / math.pi
        return u * 1.008 - 0.008

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar(t.to(torch.float64))
        return ((1 - ab) / ab).sqrt()

    @property
    def sigma_range(self):
        t = torch.tensor([self.eps, 1.0], dtype=torch.float64)
        s = self.sigma_of_t(t)
        return float(s[0]), float(s[1])

    def frame_scale(self, sigma):
        return 1 / torch.sqrt(1 + sigma**2)

    def prior_std(self, sigma):
        return torch.sqrt(1 + sigma**2)

    def model_time(self, sigma):
        return self.t_of_sigma(sigma) * self.time_scale

    def sigma_of_model_time(self, t):
        return self.sigma_of_t(t.to(torch.float64) / self.time_scale)

    def sigma_grid(self, steps, spacing):
        if spacing == "karras":
            return super().sigma_grid(steps, spacing)
        if spacing != "linspace":
            raise ValueError(f"spacing: continuous VP supports 'linspace' (uniform in t) or 'karras', got {spacing!r}")
        # The cosine alpha_bar is capped at 1e-8 (sigma 1e4) for t above ~0.99994: start there, or a grid of more
        # than ~15,600 steps repeats sigma_max (t = 1 and its neighbours all read 1e4)
        top = 1.0 if self.schedule == "linear" else float(self.t_of_sigma(torch.tensor(self.sigma_range[1])))
        t = torch.linspace(top, self.eps, steps, dtype=torch.float64)
        return torch.cat([self.sigma_of_t(t), torch.zeros(1, dtype=torch.float64)])


@dataclass(frozen=True)
class VESchedule(NoiseSchedule):
    """Variance-exploding SDE (NCSN / score-SDE): ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``; the network is
    conditioned on sigma. ``linspace`` is the geometric grid of score-SDE, ``karras`` EDM's."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    default_spacing: str = "linspace"

    def __post_init__(self):
        _check_default_spacing(self)
        check_number("sigma_min", self.sigma_min, 0, low_open=True)
        check_number("sigma_max", self.sigma_max, 0, low_open=True)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                             f"{self.sigma_max}")

    @property
    def sigma_range(self):
        return self.sigma_min, self.sigma_max

    def sigma_grid(self, steps, spacing):
        if spacing == "karras":
            return super().sigma_grid(steps, spacing)
        if spacing != "linspace":
            raise ValueError(f"spacing: VE supports 'linspace' (geometric) or 'karras', got {spacing!r}")
        t = torch.linspace(1.0, 0.0, steps, dtype=torch.float64)
        sig = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


@dataclass(frozen=True)
class EDMSchedule(NoiseSchedule):
    """EDM (Karras et al. 2022) preconditioning: the network sees ``c_in x`` with ``c_in = 1/sqrt(sigma^2 +
    sigma_data^2)`` and ``c_noise = ln(sigma) / 4``; pair it with ``prediction="edm"`` for the raw ``F_theta``."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0

    def __post_init__(self):
        _check_default_spacing(self)
        check_number("sigma_min", self.sigma_min, 0, low_open=True)
        check_number("sigma_max", self.sigma_max, 0, low_open=True)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                             f"{self.sigma_max}")
        check_number("sigma_data", self.sigma_data, 0, low_open=True)
        check_number("rho", self.rho, 0, low_open=True)

    @property
    def sigma_range(self):
        return self.sigma_min, self.sigma_max

    def input_scale(self, sigma):
        return 1 / torch.sqrt(sigma**2 + self.sigma_data**2)

    def model_time(self, sigma):
        return sigma.log() / 4

    def sigma_of_model_time(self, t):
        return torch.exp(4 * t.to(torch.float64))

    def sigma_grid(self, steps, spacing):
        if spacing != "karras":
            raise ValueError(f"spacing: EDM supports 'karras', got {spacing!r}")
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)


@dataclass(frozen=True)
class FlowSchedule(NoiseSchedule):
    """Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022; SD3, Flux): ``x_t = (1 - t) x0 + t eps``
    for t in [0, 1], the network conditioned on ``time_scale * t``; pair it with ``prediction="flow"`` (the
    velocity ``v = eps - x0``), under which the ``euler`` solver is exactly the flow-matching Euler step
    ``x' = x + (t' - t) v``.

    VE frame: ``sigma = t / (1 - t)``, ``frame_scale = input_scale = 1 - t = 1 / (1 + sigma)``, prior std
    ``1 + sigma`` (``x_native = eps`` at the start). Pure noise, t = 1, is sigma = inf there, so grids start at
    ``t_max`` (default 1 - 1e-7, which moves the sample by about 1e-7 of its scale). The first step cancels a state
    of size 1 / (1 - t_max): taken as ``x + dx`` it needs a float64 state; taken in the solvers' next-state form
    (:meth:`paratime.solvers.Solver.next_state`, ``D + a (x - D) + k_z z``) float32 is enough (within 1e-5 of
    float64, ``tests/test_precision.py``). Exponential-in-sigma steps (``euler``, ``ddim``, ``dpmpp``) handle that
    first step exactly; ``heun``'s trapezoid in sigma over [sigma_1, 1e7] does not (use ``flow_heun``, Heun in t).

    Args:
        shift: SD3's timestep shift ``t -> shift t / (1 + (shift - 1) t)`` (1: none), applied to the grid.
        time_scale: the network's time conditioning is ``time_scale * t`` (SD3: 1000; Flux: 1).
        t_min, t_max: the range of t a Karras grid spans, and the first point of any grid (t_max).

    Raises:
        ValueError: ``shift <= 0`` or not ``0 < t_min < t_max < 1``.
    """

    shift: float = 1.0
    time_scale: float = 1.0
    t_min: float = 1e-3
    t_max: float = 1 - 1e-7
    default_spacing: str = "linspace"
    kind: str = field(default="flow", init=False)

    def __post_init__(self):
        _check_default_spacing(self)
        check_number("shift", self.shift, 0, low_open=True)
        check_number("time_scale", self.time_scale, 0, low_open=True)
        if not 0 < self.t_min < self.t_max < 1:
            raise ValueError(f"t_min, t_max: need 0 < t_min < t_max < 1, got {self.t_min}, {self.t_max}")

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """VE sigma of flow times t (t clamped to ``t_max``: the grid's stand-in for pure noise)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.t_max)
        return t / (1 - t)

    @property
    def sigma_range(self):
        s = self.sigma_of_t(torch.tensor([self.t_min, self.t_max], dtype=torch.float64))   # float32 read 1-1e-7 short
        return float(s[0]), float(s[1])

    def _time_floor(self) -> float:
        # t = sigma / (1 + sigma) holds down to 0: a grid of more than 1 / t_min steps has points below t_min,
        # whose times a clamp to t_min misreported (t = 5e-4 read 1e-3 at 2,000 steps)
        return 0.0

    def frame_scale(self, sigma):
        return 1 / (1 + sigma)

    def prior_std(self, sigma):
        return 1 + sigma

    def model_time(self, sigma):
        t = sigma / (1 + sigma)
        return self.time_scale * torch.where(sigma >= self.sigma_range[1], torch.ones_like(t), t)  # t_max: pure noise

    def sigma_of_model_time(self, t):
        u = t.to(torch.float64) / self.time_scale
        return self.sigma_of_t(u)

    def sigma_grid(self, steps, spacing):
        if spacing == "karras":
            if self.shift != 1:
                raise ValueError("shift: applies to the 'linspace' spacing (uniform in t, then shifted); 'karras' "
                                 "spaces the sigmas itself")
            return super().sigma_grid(steps, spacing)
        if spacing != "linspace":
            raise ValueError(f"spacing: flow supports 'linspace' (uniform in t, then shifted) or 'karras', "
                             f"got {spacing!r}")
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        t = self.shift * t / (1 + (self.shift - 1) * t)
        return self.sigma_of_t(t)
