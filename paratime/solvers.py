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
    dpmpp (DPM-Solver++(kM), orders 1-3):     h = ln(s/s'), rho = e^-h = s'/s, r_k = ln(sigma_{i-k}/sigma_{i-k+1})/h,
                                              D1, D2 = divided differences of D_i, D_{i-1}, D_{i-2} (diffusers' form)
                                              ODE: x' = rho x + (1 - rho) D_i + k1 D1 + k2 D2
                                              SDE: x' = rho^2 x + (1 - rho^2) D_i + k1 D1 + k2 D2 + s' sqrt(1-rho^2) z_i
                                              (order min(k, i + 1), lowered on the last steps as diffusers does;
                                              dpmpp_2m: D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, dx = (s'/s - 1)(x - D'))
    plms (PNDM with skip_prk_steps):          e_j = (x_j - D_j) / sigma_j;  x' = x + (s' - s) e',  e' = Adams-Bashforth
                                              of e_i .. e_{i-3} (orders 1 -> 4 as history builds up); step 0 is Heun
                                              in e (a second call at the Euler predictor)

The history ``D_{i-1}, D_{i-2}, ...`` (or the solver's :meth:`Solver.history_value`, e.g. ``e_j`` for ``plms``) comes
from the neighbouring rows of the window (ParaDiGMS's ParaDPMSolver) or from the buffer of the last evaluation at
those points (:func:`history_rows`).

No host syncs: a step map reads nothing back from the device. The solvers whose second call takes some rows only
(``heun``, ``plms``'s step 0, the Langevin corrector) size it from the rows' steps on the host (``host_steps``, which
every method has: it builds its rows from host integers), and the DDPM coarse jump loops over a host bound (``span``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch

from paratime.kernels import fused_step

from .denoiser import append_dims

__all__ = ["Solver", "SOLVERS", "make_solver", "HostSteps", "Ancestral", "EulerMaruyama", "Heun", "DPMSolverPP",
           "DPMPP2M", "PLMS", "history_rows"]

Evaluate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: The rows' step indices on the host, when the caller knows them (every method builds its rows from host integers):
#: one int for rows all at the same step, or one int per row.
HostSteps = int | Sequence[int] | None


@dataclass(frozen=True)
class Solver:
    """A step map. Subclasses set the class attributes and implement :meth:`increment`."""

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False      # uses the pre-drawn per-step noise z_i
    uses_history: ClassVar[bool] = False    # needs D (or history_value) at previous points
    evals_per_step: ClassVar[int] = 1

    @property
    def history_depth(self) -> int:
        """How many previous points the step reads (``prev_denoised`` is a tensor for 1, a tuple for more)."""
        return 1 if self.uses_history else 0

    def history_value(self, x: torch.Tensor, denoised: torch.Tensor, i: torch.Tensor,
                      sigmas: torch.Tensor) -> torch.Tensor:
        """What the history keeps of point ``i``'s evaluation: ``D`` itself unless a solver says otherwise."""
        return denoised

    def increment(self, x: torch.Tensor, i: torch.Tensor, b: torch.Tensor, denoised: torch.Tensor,
                  prev_denoised: torch.Tensor | None, noise: torch.Tensor | None, sigmas: torch.Tensor,
                  evaluate: Evaluate, *, host_steps: HostSteps = None) -> torch.Tensor:
        """One step for every row.

        Args:
            x: ``(M, *shape)`` states at the rows' points. i: ``(M,)`` step indices. b: ``(M,)`` sample indices.
            denoised: ``(M, *shape)`` ``D(x_i)``. prev_denoised: the history value at ``i - 1`` (only if
                ``uses_history``); with ``history_depth > 1`` a tuple, newest first (entries before point 0 are
                placeholders the step does not read).
            noise: ``(M, *shape)`` ``z_i`` (only if ``stochastic``). sigmas: ``(N + 1,)`` the grid's sigmas.
            evaluate: ``evaluate(x, i, b) -> D`` for solvers that need another network call.
            host_steps: ``i`` on the host (:data:`HostSteps`). Solvers that make a second call on some rows only
                (``heun``, ``plms``, the Langevin corrector) then size it on the host, with no device read; without
                it they find the rows with one ``nonzero`` (a device-to-host read on CUDA). Others ignore it.
        Returns:
            ``dx``, ``(M, *shape)``.
        Raises:
            ValueError: ``host_steps`` does not give one step per row.
        """
        raise NotImplementedError

    def linear_step(self, i: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(k_d, k_z)``, ``(M,)`` each, when the step is linear in ``D`` and the noise,
        ``dx = k_d (x - D) + k_z z`` (DDIM, DDPM, Euler, Euler ancestral, Euler-Maruyama); None otherwise. A caller
        holding the raw network outputs then takes guidance, the conversion to ``D`` and the step in one pass
        (:func:`paratime.kernels.fused_step`) instead of materialising ``D`` first."""
        return None

    def jump(self, x: torch.Tensor, denoised: torch.Tensor, i: torch.Tensor, j: torch.Tensor, b: torch.Tensor,
             noise: torch.Tensor | tuple | None, sigmas: torch.Tensor, *, span: int | None = None) -> torch.Tensor:
        """Parareal's coarse propagator: one network call's jump of rows from grid point ``i`` to ``j`` with ``D``
        held at its value at ``i``. The default is the deterministic DDIM jump ``D + sigma_j / sigma_i (x - D)``;
        solvers whose fine steps have a closed form under a constant ``D`` override it.

        Args:
            x: ``(M, *shape)`` states at ``i``. denoised: ``(M, *shape)`` ``D(x_i)``. i, j: ``(M,)`` grid points.
            b: ``(M,)`` sample indices. noise: the problem's pre-drawn noise. sigmas: ``(N + 1,)``.
            span: a host integer ``>= max(j - i)`` (the caller's coarse sub-grid gives it) for jumps that take the
                stretch's steps one by one; None bounds it by the grid's N steps (no device read, more masked steps).
        Returns:
            ``(M, *shape)`` the states at ``j``.
        """
        ratio = append_dims(sigmas[j] / sigmas[i], x.ndim)
        return denoised + ratio * (x - denoised)

    @staticmethod
    def _sig(sigmas, i, ndim):
        return append_dims(sigmas[i], ndim), append_dims(sigmas[i + 1], ndim)

    def _per_step(self, sigmas: torch.Tensor, table: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        """``table(sigmas[:-1], sigmas[1:])``, a ``(K, N)`` table of per-step coefficients, computed once per grid
        (cached on the solver, keyed by the table, the sigmas tensor and its version) instead of once per row per
        call: the same elementwise arithmetic, so the same bits as computing it on the gathered rows."""
        return self._cached(table.__name__, sigmas, lambda: table(sigmas[:-1], sigmas[1:]))

    def _cached(self, key: str, sigmas: torch.Tensor, make: Callable[[], object]):
        """``make()``, once per grid: cached under ``key``, keyed by the sigmas tensor and its version."""
        caches = self.__dict__.get("_caches")
        if caches is None:
            caches = {}
            object.__setattr__(self, "_caches", caches)   # a cache, not state: frozen dataclasses compare fields only
        cached = caches.get(key)
        if cached is None or cached[0] is not sigmas or cached[1] != sigmas._version:
            cached = caches[key] = (sigmas, sigmas._version, make())
        return cached[2]

    def _takes_last_step(self, sigmas: torch.Tensor) -> bool:
        """Whether the step into point N is a step to sigma > 0 (the only step that can reach sigma = 0): one
        device read per grid, cached, made the first time a row at step N - 1 asks (the grid's end is not known to
        the host otherwise)."""
        return self._cached("_takes_last_step", sigmas, lambda: bool(sigmas[-1] > 0))

    def _host_count(self, host_steps: HostSteps, rows: int, sigmas: torch.Tensor, second) -> int | None:
        """How many rows take a second call by their host steps (``second(n, N) -> bool``), or None without them.

        Raises:
            ValueError: ``host_steps`` is a sequence of the wrong length.
        """
        if host_steps is None:
            return None
        N = sigmas.numel() - 1
        if isinstance(host_steps, int):
            return rows if second(host_steps, N) else 0
        if len(host_steps) != rows:
            raise ValueError(f"host_steps: one step per row, got {len(host_steps)} for {rows} rows")
        return sum(1 for n in host_steps if second(n, N))

    def _to_positive(self, host_steps: HostSteps, rows: int, sigmas: torch.Tensor) -> int | None:
        """How many rows step to sigma > 0 by their host steps (every step but the last; the last one by the grid's
        end), or None without host steps."""
        return self._host_count(host_steps, rows, sigmas, lambda n, N: n + 1 < N or self._takes_last_step(sigmas))


def _linear_increment(x, denoised, k_d, k_z, noise):
    """``dx = k_d (x - D) + k_z z`` through the fused kernel's dispatcher (``D`` is already x0: c_x = 0, c_o = 1)."""
    _, dx = fused_step(x, denoised, None, 1.0, torch.zeros_like(k_d), torch.ones_like(k_d), k_d, k_z, noise,
                       want_x0=False)
    return dx


_ALL = slice(None)   # "every row" for :func:`_rows`: a view, no gather and no scatter


def _rows(mask: torch.Tensor, count: int | None) -> torch.Tensor | slice | None:
    """The rows where ``mask`` (``(M,)``) holds: None for none, :data:`_ALL` for all of them, else their indices
    ``(K,)`` in ascending order. ``count`` (K, from the host steps) sizes them with ``nonzero_static``, which reads
    nothing back; None falls back to one ``nonzero``, a device-to-host read on CUDA."""
    if count is None:
        rows = mask.nonzero().squeeze(1)            # fallback for callers without host steps: one device read
        count = rows.numel()
    elif 0 < count < mask.numel():
        rows = torch.nonzero_static(mask, size=count).squeeze(1)    # the same indices, sized on the host
    if count == 0:
        return None
    return _ALL if count == mask.numel() else rows


def _put(dx: torch.Tensor, rows: torch.Tensor | slice, value: torch.Tensor) -> torch.Tensor:
    """``dx`` with ``rows`` (from :func:`_rows`) replaced by ``value``."""
    return value if rows is _ALL else dx.index_copy(0, rows, value)


def _check_eta(eta, hi=1.0):
    if not isinstance(eta, (int, float)) or not 0 <= eta <= hi:
        raise ValueError(f"eta: must lie in [0, {hi}], got {eta!r}")


@dataclass(frozen=True)
class Ancestral(Solver):
    """DDIM with ``eta`` (``ddim``: eta 0, the probability-flow Euler step; ``ddpm``: eta 1, ancestral sampling).

    ``clip``: DDIM's ``clip_sample``: the x0 term uses ``clamp(D, -clip, clip)`` while the direction term keeps the
    unclipped ``d = (x - D) / s`` (diffusers' ``use_clipped_model_output=False``):
    ``x' = clamp(D) + down d + up z``. (DDPM clips x0 before its posterior mean: that is ``Denoiser(clip_x0=...)``.)
    """

    name: ClassVar[str] = "ddim"
    eta: float = 0.0
    clip: float | None = None

    def __post_init__(self):
        _check_eta(self.eta)
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise ValueError(f"clip: must be a number > 0 or None, got {self.clip!r}")

    @property
    def stochastic(self):  # type: ignore[override]
        return self.eta > 0

    def coefficients(self, s: torch.Tensor, s1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` of steps from ``s`` to ``s1``: ``x' = D + down / s (x - D) + up z``."""
        up = self.eta * s1 * torch.sqrt((s * s - s1 * s1).clamp_min(0)) / s
        down = torch.sqrt((s1 * s1 - up * up).clamp_min(0))
        return up, down

    def _step_table(self, s: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        """``(2, N)``: ``k_d = (down - s) / s, k_z = up`` per step."""
        up, down = self.coefficients(s, s1)
        return torch.stack([(down - s) / s, up])

    def linear_step(self, i, sigmas):
        if self.clip is not None:        # the x0 term is clamped: not linear in D
            return None
        k_d, k_z = self._per_step(sigmas, self._step_table)[:, i]
        return k_d, k_z

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        k_d, k_z = self._per_step(sigmas, self._step_table)[:, i]   # (M,) each
        dx = _linear_increment(x, denoised, k_d, k_z, noise if self.eta > 0 else None)
        if self.clip is not None:
            dx = dx + denoised.clamp(-self.clip, self.clip) - denoised
        return dx

    def _jump_table(self, s: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        """``(2, N)``: ``r = down / s, up`` per step (the jump's recurrence ``x' - D = r (x - D) + up z``)."""
        up, down = self.coefficients(s, s1)
        return torch.stack([down / s, up])

    def jump(self, x, denoised, i, j, b, noise, sigmas, *, span=None):
        """Every step is ``x' - D = r_m (x - D) + up_m z_m`` with ``r_m = down_m / sigma_m``; with ``D`` constant the
        whole stretch is exact, carrying the fine solver's own pre-drawn noise:

            x_j = D + (prod_m r_m) (x_i - D) + sum_m (prod_{m' > m} r_m') up_m z_m

        (eta 0: the DDIM jump ``D + sigma_j / sigma_i (x - D)``), taken as the recurrence over ``span`` steps, each
        row frozen once it reaches its ``j``.
        """
        if self.eta == 0 or noise is None or isinstance(noise, tuple):
            return super().jump(x, denoised, i, j, b, noise, sigmas)
        # The recurrence, not a closed form: it is the fine steps' own arithmetic (a ratio of cumulative products
        # would round differently and divide by the zero product of a step to sigma = 0), and its noise sum needs
        # a loop over the stretch anyway; the loop's length is the caller's host bound, never read off j - i.
        r, up = self._per_step(sigmas, self._jump_table)                # (N,) each
        acc = x - denoised
        last = sigmas.numel() - 2
        for m in range(sigmas.numel() - 1 if span is None else span):
            k = i + m
            live = append_dims(k < j, x.ndim)
            kk = k.clamp_max(last)
            z = noise[kk.clamp_max(noise.shape[0] - 1), b]
            step = append_dims(r[kk], x.ndim) * acc + append_dims(up[kk], x.ndim) * z
            acc = torch.where(live, step, acc)
        return denoised + acc


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

    def _step_table(self, s: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        """``(2, N)``: ``k_d = -(1 + eta^2) / 2 (s^2 - s'^2) / s^2, k_z = eta sqrt(s^2 - s'^2)``; on a step to
        sigma = 0, ``k_d = -1, k_z = 0`` (``dx = D - x``)."""
        var = s * s - s1 * s1
        k_d = torch.where(s1 > 0, -(1 + self.eta**2) / 2 * var / (s * s), -torch.ones_like(s))
        k_z = torch.where(s1 > 0, self.eta * torch.sqrt(var.clamp_min(0)), torch.zeros_like(s))
        return torch.stack([k_d, k_z])

    def linear_step(self, i, sigmas):
        k_d, k_z = self._per_step(sigmas, self._step_table)[:, i]
        return k_d, k_z

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        k_d, k_z = self.linear_step(i, sigmas)
        return _linear_increment(x, denoised, k_d, k_z, noise)


@dataclass(frozen=True)
class Heun(Solver):
    """EDM's deterministic 2nd-order Heun step (two network calls per step)."""

    name: ClassVar[str] = "heun"
    evals_per_step: ClassVar[int] = 2

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        s, s1 = self._sig(sigmas, i, x.ndim)
        d = (x - denoised) / s
        dx = (s1 - s) * d
        # The corrector only on rows whose next sigma is > 0, counted from the host steps: a second call on every
        # row (discarding the steps to sigma = 0) would add network rows; finding the rows on the device, a read.
        rows = _rows(sigmas[i + 1] > 0, self._to_positive(host_steps, x.shape[0], sigmas))
        if rows is not None:
            x_pred = x[rows] + dx[rows]
            d2 = (x_pred - evaluate(x_pred, i[rows] + 1, b[rows])) / s1[rows]
            dx = _put(dx, rows, (s1[rows] - s[rows]) * (d[rows] + d2) / 2)
        return dx


def _history(prev_denoised, denoised, depth: int) -> tuple:
    """``prev_denoised`` as a tuple of ``depth`` tensors, newest first (``denoised`` fills what is missing)."""
    if prev_denoised is None:
        prev = ()
    elif isinstance(prev_denoised, torch.Tensor):
        prev = (prev_denoised,)
    else:
        prev = tuple(prev_denoised)
    return (prev + (denoised,) * depth)[:depth]


@dataclass(frozen=True)
class DPMSolverPP(Solver):
    """DPM-Solver++ multistep (Lu et al. 2022), orders 1-3, ODE or SDE, in diffusers' form
    (``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` or ``"sde-dpmsolver++"``).

    Args:
        order: k = 1, 2 or 3 (``solver_order``); step i uses order ``min(k, i + 1)``.
        sde: the SDE variant (stochastic; its first order is the DDPM / Euler ancestral step).
        solver_type: the second-order coefficient, ``midpoint`` or ``heun``.
        lower_order_final: on grids of fewer than 15 steps the last step is first order and the one before it at
            most second order (diffusers' stabilisation); a last step to sigma = 0 is always first order.
        euler_at_final: the last step is first order on any grid.

    Raises:
        ValueError: a bad ``order`` or ``solver_type``.
    """

    name: ClassVar[str] = "dpmpp"
    uses_history: ClassVar[bool] = True
    order: int = 2
    sde: bool = False
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False

    def __post_init__(self):
        if self.order not in (1, 2, 3):
            raise ValueError(f"order: must be 1, 2 or 3, got {self.order!r}")
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type: unknown {self.solver_type!r}; allowed: midpoint, heun")

    @property
    def stochastic(self):  # type: ignore[override]
        return self.sde

    @property
    def history_depth(self):  # type: ignore[override]
        return max(self.order - 1, 1)

    def step_orders(self, i: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """``(M,)`` the order each row's step takes (diffusers' ``lower_order_nums`` / ``lower_order_final``)."""
        N = sigmas.numel() - 1
        o = (i + 1).clamp_max(self.order)
        short = self.lower_order_final and N < 15
        last_first = (sigmas[-1] == 0) | (self.euler_at_final or short)
        o = torch.where((i == N - 1) & last_first, torch.ones_like(o), o)
        return torch.where((i == N - 2) & short, o.clamp_max(2), o)

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        s, s1 = self._sig(sigmas, i, x.ndim)
        o = append_dims(self.step_orders(i, sigmas), x.ndim)
        D0 = denoised
        D_1, D_2 = (_history(prev_denoised, denoised, 2))
        # h = ln(s / s'); higher orders never run on a step to sigma = 0, so h is made safe there.
        rho = s1 / s
        h = torch.where(o > 1, torch.log(s / torch.where(s1 > 0, s1, s)), torch.ones_like(s))
        r0 = torch.log(append_dims(sigmas[(i - 1).clamp_min(0)], x.ndim) / s) / h
        r1 = torch.log(append_dims(sigmas[(i - 2).clamp_min(0)] / sigmas[(i - 1).clamp_min(0)], x.ndim)) / h
        r0 = torch.where(o > 1, r0, torch.ones_like(r0))
        r1 = torch.where(o > 2, r1, torch.ones_like(r1))
        # Divided differences: second order D1 = (D0 - D_1) / r0; third order as diffusers' third_order_update.
        d10 = (D0 - D_1) / r0
        d11 = (D_1 - D_2) / r1
        D1 = torch.where(o > 2, d10 + r0 / (r0 + r1) * (d10 - d11), d10)
        D2 = (d10 - d11) / (r0 + r1)
        if self.sde:
            q = rho * rho                                           # e^{-2h}
            k1_heun = (1 - q) / (-2 * h) + 1
            k1 = (1 - q) / 2 if self.solver_type == "midpoint" else k1_heun
            k2 = (1 - q - 2 * h) / (2 * h) ** 2 - 0.5
        else:
            q = rho
            k1_heun = (rho - 1) / h + 1
            k1 = (1 - rho) / 2 if self.solver_type == "midpoint" else k1_heun
            k2 = -((rho - 1 + h) / h**2 - 0.5)
        k1 = torch.where(o > 2, k1_heun, k1)
        x_new = q * x + (1 - q) * D0
        x_new = x_new + torch.where(o > 1, k1 * D1, torch.zeros_like(D1)) + torch.where(o > 2, k2 * D2,
                                                                                        torch.zeros_like(D2))
        if self.sde:
            x_new = x_new + s1 * torch.sqrt((1 - q).clamp_min(0)) * noise
        return x_new - x

    def jump(self, x, denoised, i, j, b, noise, sigmas, *, span=None):
        """With ``D`` constant the divided differences vanish: the ODE is the DDIM jump, the SDE is DDPM's (its first
        order step), which carries the pre-drawn noise exactly."""
        if self.sde:
            # One DDPM per grid (cached here), so its jump table is made once, not on every coarse jump.
            return self._cached("_ddpm", sigmas, DDPM).jump(x, denoised, i, j, b, noise, sigmas, span=span)
        return super().jump(x, denoised, i, j, b, noise, sigmas)


@dataclass(frozen=True)
class DPMPP2M(DPMSolverPP):
    """DPM-Solver++(2M), k-diffusion's form: second order except on the first step and on a step to sigma = 0."""

    name: ClassVar[str] = "dpmpp_2m"
    order: int = 2
    lower_order_final: bool = False


@dataclass(frozen=True)
class DPMPP3M(DPMSolverPP):
    name: ClassVar[str] = "dpmpp_3m"
    order: int = 3


@dataclass(frozen=True)
class DPMPP2MSDE(DPMSolverPP):
    name: ClassVar[str] = "dpmpp_2m_sde"
    sde: bool = True


@dataclass(frozen=True)
class PLMS(Solver):
    """Pseudo linear multistep (PNDM, Liu et al. 2022) as diffusers runs it with ``skip_prk_steps=True``.

    The history holds ``e_j = (x_j - D_j) / sigma_j`` (the eps prediction); step i combines ``e_i .. e_{i-3}`` with
    the Adams-Bashforth weights of order ``min(i + 1, 4)`` and takes the DDIM step with it (PNDM's transfer function
    is DDIM's); step 0 is Heun's: a second call at the Euler predictor ``x_0 + (s_1 - s_0) e_0``, then the step with
    ``(e_0 + e_pred) / 2`` (skipped when point 1 is the last).
    """

    name: ClassVar[str] = "plms"
    uses_history: ClassVar[bool] = True
    AB: ClassVar[tuple] = ((1.0, 0.0, 0.0, 0.0), (3 / 2, -1 / 2, 0.0, 0.0), (23 / 12, -16 / 12, 5 / 12, 0.0),
                           (55 / 24, -59 / 24, 37 / 24, -9 / 24))

    @property
    def history_depth(self):  # type: ignore[override]
        return 3

    def history_value(self, x, denoised, i, sigmas):
        return (x - denoised) / append_dims(sigmas[i], x.ndim)

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        s, s1 = self._sig(sigmas, i, x.ndim)
        e = (x - denoised) / s
        hist = torch.stack((e,) + _history(prev_denoised, e, 3), 1)           # (M, 4, *shape), newest first
        weights = torch.tensor(self.AB, dtype=x.dtype, device=x.device)[(i.clamp_max(3))]   # (M, 4)
        e_ab = (append_dims(weights, hist.ndim) * hist).sum(1)
        dx = (s1 - s) * e_ab
        # Step 0: Heun in e (PNDM's first two calls); never on a one-step grid. The rows at step 0 are counted on
        # the host (no device read) and only they are evaluated again (no extra network rows).
        first = (i == 0) & (sigmas.numel() > 2)
        rows = _rows(first, self._host_count(host_steps, x.shape[0], sigmas, lambda n, N: n == 0 and N > 1))
        if rows is not None:
            x_pred = x[rows] + dx[rows]
            e_pred = (x_pred - evaluate(x_pred, i[rows] + 1, b[rows])) / s1[rows]
            dx = _put(dx, rows, (s1[rows] - s[rows]) * (e[rows] + e_pred) / 2)
        return dx


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
    def history_depth(self):  # type: ignore[override]
        return self.base.history_depth

    def history_value(self, x, denoised, i, sigmas):
        return self.base.history_value(x, denoised, i, sigmas)

    def _takes_last_step(self, sigmas):
        return self.base._takes_last_step(sigmas)      # one read per grid for the corrector and its base together

    @property
    def evals_per_step(self):  # type: ignore[override]
        return self.base.evals_per_step + self.corrector_steps

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        z_pred, z_corr = noise                                      # z_corr: (M, corrector_steps, *shape)
        x1 = x + self.base.increment(x, i, b, denoised, prev_denoised, z_pred if self.base.stochastic else None,
                                     sigmas, evaluate, host_steps=host_steps)
        # No corrector at sigma = 0; its rows are counted on the host like Heun's (no device read, no extra rows).
        rows = _rows(sigmas[i + 1] > 0, self._to_positive(host_steps, x.shape[0], sigmas))
        if rows is None:
            return x1 - x
        xc, j, bc = x1[rows], i[rows] + 1, b[rows]
        s1 = append_dims(sigmas[j], x.ndim)
        e = 2 * (self.snr * s1) ** 2
        for c in range(self.corrector_steps):
            g = (evaluate(xc, j, bc) - xc) / s1**2
            xc = xc + e * g + torch.sqrt(2 * e) * z_corr[rows, c]
        return _put(x1, rows, xc) - x


SOLVERS: dict[str, type[Solver]] = {c.name: c for c in (Ancestral, DDPM, EulerMaruyama, Heun, DPMSolverPP, DPMPP2M,
                                                         DPMPP3M, DPMPP2MSDE, PLMS)}
SOLVERS["euler"] = Ancestral  # the probability-flow Euler step is DDIM in the VE frame
SOLVERS["euler_ancestral"] = DDPM  # k-diffusion's / diffusers' Euler ancestral step is DDPM's in the VE frame


def history_rows(buffer: torch.Tensor, i: torch.Tensor, b: torch.Tensor, depth: int):
    """The history a multistep solver reads for rows ``(i, b)``: ``buffer[i - 1, b]`` for ``depth`` 1, else the
    tuple ``(buffer[i - 1, b], ..., buffer[i - depth, b])`` (indices below 0 clamp to 0: placeholders).

    ``buffer`` is ``(N, B, *shape)``: each point's latest history value (:meth:`Solver.history_value`).
    """
    prev = tuple(buffer[(i - k).clamp_min(0), b] for k in range(1, depth + 1))
    return prev[0] if depth == 1 else prev


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
