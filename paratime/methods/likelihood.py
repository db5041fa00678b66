"""Exact log-likelihood through the probability-flow ODE (a continuous normalising flow), by any sampling method.

Notation (VE frame, see :mod:`paratime.schedules`): ``n`` is the dimension of one sample, ``s`` the noise level,
``v(x, s) = (x - D(x, s)) / s`` the probability-flow drift ``dx/ds``, ``J = dD/dx`` the denoiser's Jacobian, ``f(s)``
the frame scale (``x_native = f x``). Along a solution ``x(s)`` of the ODE the instantaneous change of variables
(Chen et al. 2018; Song et al. 2021, App. D) gives

    d log p_s(x(s)) / ds = -div v = -(n - tr J) / s,

so the data ``x`` at the grid's smallest noise level ``s_min``, carried to ``x_T`` at ``s_max``, has

    log p_{s_min}(x) = log p_{s_max}(x_T) + l_T,    l_T = int_{s_min}^{s_max} (n - tr J) / s ds,

and ``log p_{s_max}`` is replaced by the sampler's prior ``N(0, prior_std^2 I)``. ``p_s`` is the VE-frame marginal
``p_data * N(0, s^2 I)``: the result is the density of the data smoothed by noise of std ``s_min``, evaluated at ``x``.

The divergence is integrated in the model's own frame: with ``x_native = f x`` the two frames' log-densities differ
by ``n log f``, so ``l^f(s) = l(s) + n log(f(s) / f(s_min))`` obeys

    dl^f/ds = (n - tr J) / s + n d(log f)/ds,    and at the end    l_T = l^f_T - n log(f(s_max) / f(s_min)).

The two are equal in the continuum; discretised they are not. In the model's own time (``t`` for rectified flow,
``sigma = t / (1 - t)``) ``l``'s rate grows without bound towards the prior (like ``n sigma``) while ``l^f``'s stays
bounded, and for rectified flow the Euler step on ``w`` below is exactly Euler in ``t`` on ``l^f``. Its grid's last
interval reaches ``sigma ~1e7`` (``t_max``): a step on ``l`` left the log-density 12-16 bits/dim off at any step
count, on ``l^f`` Euler and Heun converge at their order. On the ring mixture under its DDPM schedule (25 steps,
trailing grid, mean over 64 points) Euler is 0.25 nats off instead of 1.10, Heun 0.024 instead of 0.195
(``benchmarks/likelihood.py --convergence``).

Augmented state: one ``(n + 1,)`` row per sample, ``x~ = (x, w)`` with ``w = l^f / (sqrt(n) f(s))``. With the
augmented denoiser

    D~(x~, s) = (D(x, s), w - s dw/ds),    dw/ds = ((n - tr J) / s + n d(log f)/ds) / (sqrt(n) f) - w d(log f)/ds,

the augmented drift ``(x~ - D~) / s`` is exactly ``(dx/ds, dw/ds)``. So every step map (``euler`` = DDIM with eta 0,
``heun``), Picard's window and Parareal's DDIM coarse jump (Euler for ``w``) apply unchanged, on the grid traversed
from ``s_min`` up to ``s_max``. The methods measure convergence in the model's frame, where the last coordinate is
``f w = l^f / sqrt(n)`` at every noise level: their rms over the ``n + 1`` coordinates weighs a change of ``e`` nats per
dimension like an rms change ``e`` of the (native) state, near the data and near the prior alike. (Carrying ``l``
itself, VP's ``f ~ 1/sigma_max`` would hide the log-density's changes near the prior from the tolerance test.)

Divergence: ``tr J ~ sum_k c_k z_k^T J z_k`` over probes ``z_k`` (one forward pass, one vector-Jacobian product per
probe): the ``n`` basis vectors with ``c = 1`` give the exact trace; Hutchinson's estimator (Rademacher or Gaussian
``z``, ``c = 1/K``) is unbiased. Probes belong to the sample and are the same at every time point, so the augmented ODE
is one deterministic ODE per sample and Picard / Parareal converge to the sequential solution of it.

Tolerance: the reversed grid's noise levels are the sampling grid's (DDPM's noise std of the step between two grid
points, model frame), so ``tol`` means what it means for sampling.

Bits per dimension: ``bpd = (-log p(x) / n + log(1 / bin)) / log 2`` with ``bin = (hi - lo) / (levels - 1)`` for data
quantised to ``levels`` values spanning ``[lo, hi]`` (8-bit images in [-1, 1]: ``+ log 127.5`` nats per dimension):
the continuous density times the volume of the data's quantisation bin. With uniform dequantisation (the data plus
``U(-bin/2, bin/2)`` noise, :func:`dequantise`) it is an upper bound on the discrete model's negative log-likelihood.
Without a declared data range the offset is 0 (bits/dim of the density itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from ..denoiser import Denoiser
from ..noise import DEQUANT, PROBE
from ..schedules import NoiseSchedule, TimeGrid
from ..solvers import Evaluate, Solver, make_solver
from .common import Outcome, Problem, RoundInfo

__all__ = ["FlowDenoiser", "flow_denoiser", "LikelihoodResult", "DIVERGENCES", "PROBES", "FLOW_SOLVERS", "FLOW_METHODS",
           "PROBE_KEY", "PROBE_STREAM", "DEQUANT_STREAM", "likelihood_grid", "flow_problem", "solve_flow",
           "gaussian_log_density", "bits_per_dim", "bin_width", "make_probes", "dequantise", "check_data",
           "check_request", "flow_solver_for"]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
FLOW_SOLVERS = ("euler", "heun")
#: the methods that solve the flow (``auto``: Picard with its widest window); staggered cores are for sampling only
FLOW_METHODS = ("sequential", "picard", "parareal", "parareal_pipelined")
#: streams of :func:`paratime.noise.draw_noise`, listed there with the others
PROBE_STREAM, DEQUANT_STREAM = PROBE, DEQUANT
PROBE_KEY = "divergence_probes"     # the per-row conditioning entry that carries Hutchinson's probes


@dataclass(frozen=True, eq=False)
class FlowDenoiser(Denoiser):
    """The augmented denoiser ``D~(x~, s) = (D(x, s), w - s dw/ds)`` over ``(M, n + 1)`` rows (module notes).

    It keeps the model contract (``D~(x~, sigma, model_time, **cond)``, a :class:`Denoiser`), so every backend
    evaluates it like the model itself, and the divergence is computed with autograd where the rows are evaluated.
    Build it with :func:`flow_denoiser`. Hutchinson's probes arrive as per-sample conditioning ``divergence_probes``
    ``(M, K, n)``; the rest of the conditioning goes to the model.

    Its :class:`Denoiser` fields are the model's own (:attr:`model` is the model again), so backends that ship or
    rebuild the network (Ray actors) treat it like the model. For backends that gather raw network outputs and
    convert them after (torch.distributed), ``D~`` is its raw output: :meth:`run_network` computes it in the state
    dtype and :meth:`to_x0` is the identity.

    Attributes:
        data_shape: the shape of one data sample. exact: exact trace, else Hutchinson's estimate.
    """

    data_shape: tuple[int, ...] = ()
    exact: bool = True

    @property
    def dim(self) -> int:
        return math.prod(self.data_shape)

    @property
    def model(self) -> Denoiser:
        """The model's own denoiser ``D`` (the same fields, the plain class)."""
        return Denoiser(**{f.name: getattr(self, f.name) for f in fields(Denoiser)})

    @property
    def network_dtype(self) -> torch.dtype | None:
        return None                 # D~ stays in the state dtype (the model's network still runs in its own)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_time: torch.Tensor, **cond: Any) -> torch.Tensor:
        """Args: ``x`` ``(M, n + 1)`` augmented rows; ``sigma``, ``model_time`` ``(M,)``; ``divergence_probes``
        ``(M, K, n)`` (Hutchinson) among ``cond``. Returns ``D~``, ``(M, n + 1)``."""
        return self.run_network(x, sigma, model_time, **cond)

    def to_x0(self, x, sigma, out, out_uncond=None, guidance=1.0):
        return out

    @property
    def fusable(self) -> bool:
        return False                # D~ is no linear map of a network output

    def run_network(self, x: torch.Tensor, sigma: torch.Tensor, model_time: torch.Tensor,
                    divergence_probes: torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        """``D~`` for augmented rows ``(M, n + 1)`` (see :meth:`__call__`)."""
        M, n = x.shape[0], self.dim
        if divergence_probes is None and not self.exact:
            raise ValueError(f"{PROBE_KEY}: Hutchinson's estimator needs the probes")
        s = sigma.to(x.dtype)
        with torch.enable_grad(), torch.inference_mode(False):
            xs = x[:, :n].detach().clone().reshape(M, *self.data_shape).requires_grad_(True)
            den = self.model(xs, s, model_time, **cond)                         # (M, *data_shape)
            trace = self._trace(den, xs, divergence_probes)                     # (M,)
            f, dlogf = self._frame(s)                                           # (M,) each
        # w = l^f / (sqrt(n) f), l^f the divergence integrated in the model's frame (module notes):
        # dw/ds = ((n - tr J) / s + n dlogf/ds) / (sqrt(n) f) - w dlogf/ds, and D~_w = w - s dw/ds.
        w = x[:, n]
        dw = ((n - trace) / s + n * dlogf) / (math.sqrt(n) * f) - w * dlogf
        return torch.cat([den.detach().reshape(M, n).to(x.dtype), (w - s * dw)[:, None]], 1)

    def _frame(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame scale ``f(s)`` and ``d log f / ds`` (autograd through the schedule's ``frame_scale``)."""
        s = sigma.detach().clone().requires_grad_(True)
        log_f = torch.log(self.schedule.frame_scale(s))
        if not log_f.requires_grad:                                 # a constant frame (VE, EDM)
            return log_f.detach().exp(), torch.zeros_like(sigma)
        (dlogf,) = torch.autograd.grad(log_f.sum(), s)
        return log_f.detach().exp(), dlogf

    def _trace(self, den: torch.Tensor, xs: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor:
        """``sum_k c_k z_k^T J z_k``, one vector-Jacobian product per probe (rows are independent samples)."""
        M, n = xs.shape[0], self.dim
        K = n if self.exact else probes.shape[1]
        trace = xs.new_zeros(M)
        for k in range(K):
            if self.exact:                                          # z = e_k picks the k-th diagonal entry
                z = xs.new_zeros(M, n)
                z[:, k] = 1
            else:
                z = probes[:, k].to(xs.dtype)                       # (M, n)
            (zJ,) = torch.autograd.grad(den, xs, z.reshape(xs.shape).to(den.dtype), retain_graph=k < K - 1)
            trace = trace + (zJ.reshape(M, n).to(xs.dtype) * z).sum(1)
        return trace.detach() if self.exact else trace.detach() / K


def flow_denoiser(denoiser: Denoiser, data_shape: tuple[int, ...], divergence: str) -> FlowDenoiser:
    """The augmented model for ``divergence`` ``exact`` or ``hutchinson``.

    Raises:
        ValueError: unknown ``divergence``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: unknown {divergence!r}; allowed: {', '.join(DIVERGENCES)}")
    model = {f.name: getattr(denoiser, f.name) for f in fields(Denoiser)}
    return FlowDenoiser(**model, data_shape=tuple(data_shape), exact=divergence == "exact")


@dataclass
class LikelihoodResult:
    """Log-likelihoods of a batch.

    Attributes:
        nats: ``(B,)`` ``log p(x)`` (the data smoothed by noise of std ``sigma_min``, see the module notes).
        bits_per_dim: ``(B,)`` ``(-nats / n + log(1 / bin)) / log 2`` (``bin``: the quantisation bin, or 1).
        prior: ``(B,)`` ``log N(x_T; 0, prior_std^2 I)``.
        delta: ``(B,)`` ``l_T``, the integrated divergence (``nats = prior + delta``).
        latents: ``(B, *shape)`` ``x_T`` (VE frame).
        sigma_min, sigma_max: the noise levels at which the data and the prior sit.
        stats: what the solve cost (:class:`~paratime.sampler.SampleStats` from ``ParallelSampler.log_likelihood``).
    """

    nats: torch.Tensor
    bits_per_dim: torch.Tensor
    prior: torch.Tensor
    delta: torch.Tensor
    latents: torch.Tensor
    sigma_min: float
    sigma_max: float
    stats: Any = None


def likelihood_grid(schedule: NoiseSchedule, steps: int, spacing: str | None = None) -> TimeGrid:
    """The ``steps``-step grid of positive noise levels, ``sigma_max`` first as for sampling: the
    ``(steps + 1)``-step sampling grid less its final ``sigma = 0`` (where the drift is singular), or the
    ``steps``-step grid when the schedule's grids end above 0.

    ``steps`` intervals need ``steps + 1`` positive levels: on a discrete schedule of ``T`` trained timesteps whose
    grids end at 0, at most ``T - 1`` steps (the ``T`` trained levels; the sampler's ``T``-th step is the one to 0).

    Raises:
        ValueError: bad ``steps`` (naming the most this schedule takes) or ``spacing``.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: must be an integer >= 1, got {steps!r}")
    if float(schedule.grid(1, spacing).sigmas[-1]) > 0:        # the grids end above 0: their own points
        return schedule.grid(steps, spacing)
    T = getattr(schedule, "num_train_timesteps", None)
    if T is not None and steps + 1 > T:
        raise ValueError(f"steps: the likelihood ODE takes steps intervals between steps + 1 positive noise levels; "
                         f"this discrete schedule has {T}, so at most {T - 1} steps, got {steps}")
    grid = schedule.grid(steps + 1, spacing)
    return TimeGrid(grid.sigmas[:-1], grid.model_times[:-1], grid.frame_scales[:-1])


def flow_solver_for(solver: Solver) -> str:
    """The likelihood ODE's solver for a sampler's ``solver``: ``euler`` for deterministic DDIM (the same step in the
    VE frame), ``heun`` for Heun.

    Raises:
        ValueError: any other solver (stochastic, multistep, corrected), naming it and the choices.
    """
    if solver.name == "heun":
        return "heun"
    if solver.name == "ddim" and not solver.stochastic:
        return "euler"
    raise ValueError(f"solver: the sampler's solver {solver.label!r} is not one the likelihood ODE takes; pass "
                     f"solver= one of {', '.join(FLOW_SOLVERS)}")


def flow_problem(grid: TimeGrid, solver: str | Solver, evaluate: Evaluate, dtype: torch.dtype,
                 device: torch.device | str, on_round: Callable[[RoundInfo], None] | None = None) -> Problem:
    """The augmented ODE as a :class:`Problem`: ``grid`` (from :func:`likelihood_grid`) traversed from ``sigma_min``
    to ``sigma_max``; point ``j`` of the problem is point ``N - j`` of ``grid``.

    Args:
        grid: the positive grid. solver: ``euler`` or ``heun`` (or such a :class:`Solver`).
        evaluate: ``evaluate(x~, j, b) -> D~`` over augmented rows at problem points ``j`` of samples ``b``.
        dtype, device: of the state. on_round: called after every round.
    Raises:
        ValueError: a solver other than the deterministic one-step ``euler`` / ``heun``.
    """
    solver = make_solver(solver)
    if solver.name not in ("ddim", "heun") or solver.stochastic:
        raise ValueError(f"solver: the likelihood ODE takes {', '.join(FLOW_SOLVERS)}, got {solver.name!r}")
    flip = lambda t: t.flip(0).to(device=device, dtype=dtype)       # noqa: E731
    # Tolerance scale at problem point j: the noise std of the DDPM step between grid points N - j and N - j + 1.
    return Problem(flip(grid.sigmas), flip(grid.ancestral_std()), flip(grid.frame_scales), solver, evaluate, None,
                   on_round)


def solve_flow(x: torch.Tensor, problem: Problem, method: Callable[[torch.Tensor, Problem], Outcome]
               ) -> tuple[torch.Tensor, torch.Tensor, Outcome]:
    """Carry the data to the prior along the augmented ODE.

    Args:
        x: ``(B, *shape)`` data (VE frame at ``sigma_min``; state dtype and device).
        problem: from :func:`flow_problem`. method: ``method(x~, problem) -> Outcome`` (sequential, Picard, ...).
    Returns:
        ``x_T`` ``(B, *shape)``, ``l_T`` ``(B,)`` and the method's :class:`Outcome`.
    """
    B, n = x.shape[0], x[0].numel()
    x_aug = torch.cat([x.reshape(B, n), x.new_zeros(B, 1)], 1)        # (B, n + 1), w = 0 at the data
    out = method(x_aug, problem)
    f_min, f_max = problem.frame_scales[0], problem.frame_scales[-1]
    l_frame = out.x[:, n] * f_max * math.sqrt(n)                      # l^f_T: w = l^f / (sqrt(n) f)
    return out.x[:, :n].reshape(x.shape), l_frame - n * torch.log(f_max / f_min), out


def gaussian_log_density(x: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``log N(x; 0, std^2 I)`` per sample, ``(B, *shape) -> (B,)``."""
    n = x[0].numel()
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    sq = x.reshape(x.shape[0], -1).pow(2).sum(1)
    return -0.5 * sq / std**2 - n * torch.log(std) - 0.5 * n * math.log(2 * math.pi)


def bin_width(data_range: tuple[float, float] | None, levels: int) -> float:
    """The quantisation bin ``(hi - lo) / (levels - 1)``, or 1 (no offset) without a data range."""
    if data_range is None:
        return 1.0
    lo, hi = data_range
    return (hi - lo) / (levels - 1)


def bits_per_dim(nats: torch.Tensor, dim: int, bin: float = 1.0) -> torch.Tensor:
    """``(-nats / dim + log(1 / bin)) / log 2``: the density times the bin volume, in bits per dimension."""
    return (-nats / dim - math.log(bin)) / math.log(2)


def make_probes(gaussian: torch.Tensor, kind: str) -> torch.Tensor:
    """Hutchinson probes from standard-normal draws: ``gaussian`` as is, or their signs (``rademacher``)."""
    if kind not in PROBES:
        raise ValueError(f"probe: unknown {kind!r}; allowed: {', '.join(PROBES)}")
    return gaussian if kind == "gaussian" else torch.where(gaussian >= 0, 1.0, -1.0).to(gaussian)


def dequantise(x: torch.Tensor, gaussian: torch.Tensor, bin: float) -> torch.Tensor:
    """Uniform dequantisation ``x + U(-bin/2, bin/2)``, the uniform noise made from standard-normal draws through
    the normal CDF (so it depends on the seed and sample only, like all of paratime's noise)."""
    return x + bin * (torch.special.ndtr(gaussian) - 0.5)


def check_data(x: Any, sample_shape: tuple[int, ...] | None, data_range: tuple[float, float] | None,
               levels: int) -> None:
    """The entry check for :func:`ParallelSampler.log_likelihood`'s data.

    Raises:
        TypeError: ``x`` is not a floating tensor. ValueError: wrong shape, NaN or inf, values outside
            ``data_range``, a bad ``data_range`` or ``levels``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor (B, *sample_shape), got {type(x).__name__}"
                        + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"x: expected (B, *sample_shape), got shape {tuple(x.shape)}")
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise ValueError(f"x: the model expects samples of shape {tuple(sample_shape)}, got {tuple(x.shape[1:])}")
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if bool(bad.any()):
        raise ValueError(f"x: contains NaN or inf (sample {int(bad.nonzero()[0, 0])})")
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
        raise ValueError(f"levels: must be an integer >= 2, got {levels!r}")
    if data_range is not None:
        if (not isinstance(data_range, (tuple, list)) or len(data_range) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data_range)
                or not all(math.isfinite(v) for v in data_range) or not data_range[0] < data_range[1]):
            raise ValueError(f"data_range: expected finite (lo, hi) with lo < hi (the quantisation bin is "
                             f"(hi - lo) / (levels - 1)), got {data_range!r}")
        lo, hi = data_range
        out = ((x < lo) | (x > hi)).reshape(x.shape[0], -1).any(1)
        if bool(out.any()):
            b = int(out.nonzero()[0, 0])
            raise ValueError(f"x: sample {b} has values in [{float(x[b].min()):.4g}, {float(x[b].max()):.4g}], "
                             f"outside the data range [{lo}, {hi}]")

def check_request(x: Any, sample_shape: tuple[int, ...] | None, device: torch.device,
                  data_range: tuple[float, float] | None, levels: int | None, solver: str, divergence: str,
                  probe: str | None, probes: int, dequantize: bool, cond: dict, cfg: Any,
                  seed: int | None = None, first_sample: int = 0) -> None:
    """Every check of a ``log_likelihood`` request, before anything is computed. ``levels``, ``probe``, ``seed`` and
    ``first_sample`` are as the caller gave them (None, 0: not given), so an option that does not apply is refused
    rather than ignored.

    Raises:
        ValueError, TypeError: naming the offending argument.
    """
    if levels is not None and data_range is None:
        raise ValueError("levels: applies only with data_range= (the bin is (hi - lo) / (levels - 1))")
    check_data(x, sample_shape, data_range, 256 if levels is None else levels)
    if x.device.type != torch.device(device).type:
        raise ValueError(f"x: on {x.device} but the sampler runs on {device}")
    if solver not in FLOW_SOLVERS:
        raise ValueError(f"solver: the likelihood ODE takes {', '.join(FLOW_SOLVERS)}, got {solver!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: unknown {divergence!r}; allowed: {', '.join(DIVERGENCES)}")
    if probe is not None and probe not in PROBES:
        raise ValueError(f"probe: unknown {probe!r}; allowed: {', '.join(PROBES)}")
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"probes: must be an integer >= 1, got {probes!r}")
    if divergence != "hutchinson":
        for name, value, unset in (("probes", probes, 1), ("probe", probe, None)):
            if value != unset:
                raise ValueError(f"{name}: applies only to divergence='hutchinson', not {divergence!r}")
    if not isinstance(dequantize, bool):
        raise TypeError(f"dequantize: expected True or False, got {dequantize!r}")
    if dequantize and data_range is None:
        raise ValueError("dequantize: needs data_range (the bin is (hi - lo) / (levels - 1))")
    for name, given in (("seed", seed is not None), ("first_sample", first_sample != 0)):
        if given and divergence != "hutchinson" and not dequantize:
            raise ValueError(f"{name}: draws Hutchinson's probes and the dequantisation noise only; it applies with "
                             f"divergence='hutchinson' or dequantize=True, not divergence={divergence!r} without "
                             f"dequantize")
    if PROBE_KEY in cond:
        raise ValueError(f"{PROBE_KEY}: reserved for Hutchinson's probes")
    if cfg.coarse is not None and cfg.method.startswith("parareal"):
        raise ValueError("coarse: a coarse callable maps samples, not the likelihood's augmented state")
