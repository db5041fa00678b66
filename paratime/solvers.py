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
every method has: it builds its rows from host integers); the DDPM coarse jump is the closed-form constant-D path
(:func:`constant_d_jump`; :func:`constant_d_path` gives Picard's guesses), which draws the noise rows it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Sequence

import torch

from paratime.kernels import fused_step

from .checks import check_int, check_number
from .denoiser import append_dims

__all__ = ["Solver", "SOLVERS", "make_solver", "HostSteps", "Ancestral", "EulerMaruyama", "Heun", "DPMSolverPP",
           "DPMPP2M", "PLMS", "history_rows", "linear_next_state", "constant_d_factors", "constant_d_jump",
           "constant_d_path", "PATH_CHUNK_ELEMENTS"]

Evaluate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: The rows' step indices on the host, when the caller knows them (every method builds its rows from host integers):
#: one int for rows all at the same step, or one int per row.
HostSteps = int | Sequence[int] | None


#: the largest noise-level ratio sigma_i / sigma_{i+1} (sigma_{i+1} > 0) of one step a step linear in sigma may take
#: (:attr:`Solver.sigma_linear`). On N(1.5, 0.5^2) data with the exact flow velocity, heun / plms / euler_maruyama at
#: a first-step ratio of 50 ended at std 0.51 / 0.51 / 0.89, at 110: 0.59 / 0.55 / 3.1, at 500: 0.60 / 0.56 / 6.9, at
#: 4e5 (the default flow grid, 20 steps): 92 / 54 / 6,900; the ring mixture's coarsest grid (2 steps) takes 46.
SIGMA_LINEAR_RATIO = 100.0


@dataclass(frozen=True)
class Solver:
    """A step map. Subclasses set the class attributes and implement :meth:`increment`."""

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False      # uses the pre-drawn per-step noise z_i
    uses_history: ClassVar[bool] = False    # needs D (or history_value) at previous points
    evals_per_step: ClassVar[int] = 1

    #: the step is linear in the VE sigma (Heun's trapezoid, PLMS's eps multistep, Euler–Maruyama), so it cannot take
    #: a step that shrinks the noise level more than :data:`SIGMA_LINEAR_RATIO` times (a rectified-flow grid's first,
    #: from sigma ~1e7 at ``FlowSchedule.t_max``): refused there (:meth:`check_grid`)
    sigma_linear: ClassVar[bool] = False

    @property
    def history_depth(self) -> int:
        """How many previous points the step reads (``prev_denoised`` is a tensor for 1, a tuple for more)."""
        return 1 if self.uses_history else 0

    @property
    def label(self) -> str:
        """The name stats, progress bars and errors give: :attr:`name` (``ddim+langevin`` with the corrector)."""
        return self.name

    def check_grid(self, sigmas: torch.Tensor) -> None:
        """Raise unless this solver can run the grid of noise levels ``sigmas`` (host, ``(N + 1,)``; checked when a
        sampler is built, before any work).

        Raises:
            ValueError: naming ``solver`` (a step linear in sigma across a step that shrinks the noise level more
                than :data:`SIGMA_LINEAR_RATIO` times) or ``steps``.
        """
        if not self.sigma_linear:
            return
        s = sigmas.detach().to("cpu", torch.float64)
        ratio = s[:-1] / s[1:]
        ratio = ratio[s[1:] > 0]                    # a step to sigma = 0 is exact for these steps too
        if ratio.numel() and float(ratio.max()) > SIGMA_LINEAR_RATIO:
            i = int(ratio.argmax())
            raise ValueError(f"solver: {self.name!r} steps linearly in the VE sigma, and step {i} of this grid "
                             f"shrinks the noise level {float(ratio[i]):.3g}x (sigma {float(s[i]):.3g} -> "
                             f"{float(s[i + 1]):.3g}; a rectified-flow grid starts at sigma ~1e7), more than the "
                             f"{SIGMA_LINEAR_RATIO:g}x such a step takes (its samples blow up: std 90 for 0.5 on "
                             f"a flow grid); use 'euler', 'flow_heun', 'dpmpp_2m', 'ddpm' or another "
                             f"exponential-in-sigma solver, or more steps")

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
            ``dx``, ``(M, *shape)``: by default (a solver that defines only :meth:`next_state`) ``next_state - x``.
        Raises:
            ValueError: ``host_steps`` does not give one step per row.
        """
        if type(self).next_state is Solver.next_state:          # the default next_state is x + increment
            raise NotImplementedError(f"{type(self).__name__}: define increment or next_state")
        return self.next_state(x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, host_steps=host_steps) - x

    def next_state(self, x: torch.Tensor, i: torch.Tensor, b: torch.Tensor, denoised: torch.Tensor,
                   prev_denoised: torch.Tensor | None, noise: torch.Tensor | None, sigmas: torch.Tensor,
                   evaluate: Evaluate, *, host_steps: HostSteps = None) -> torch.Tensor:
        """``x_{i+1}`` for every row (arguments as :meth:`increment`), in a form whose operands stay at the scale of
        the result: the state frame in which float32 is enough on every grid.

        ``x + dx`` is not such a form. On flow-matching and zero-SNR grids the first point sits at sigma ~1e4-1e7
        and its step lands at sigma ~10-100, so ``dx ~ -x``: in float32 the increment carries an absolute error of
        ``ulp(x)`` ~ 1 into a state of size ~100 (2e-2 in the model's frame after Euler-28 on FlowSchedule(shift=3)).
        Written as ``D + a (x - D) + k_z z`` (``a = 1 + k_d`` from float64 tables) the big ``x`` only enters scaled
        down by ``a``, so every operand is O(result) and the float32 result is within a few ulps of float64's.
        Callers convert the result to the model's frame (``frame_scale * x_{i+1}``, O(1)) before differencing.
        The default (solvers without a cancellation-free form) is ``x + increment``.
        """
        return x + self.increment(x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, host_steps=host_steps)

    def linear_next(self, i: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(a, k_z)``, ``(M,)`` each, of a linear step in its next-state form ``x' = D + a (x - D) + k_z z``
        (``a = 1 + k_d`` of :meth:`linear_step`, computed without the cancellation), or None for other steps.
        :func:`linear_next_state` takes it from the raw network outputs in one fused pass."""
        return None

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

    def last_step_evals(self, sigmas: torch.Tensor) -> int:
        """Network calls the step into point N makes: :attr:`evals_per_step`, or 1 where it reaches sigma = 0
        (Heun's second call and a Langevin corrector's skip it); the grid's one read (:meth:`_takes_last_step`),
        none for a one-call solver."""
        e = self.evals_per_step
        return e if e == 1 or self._takes_last_step(sigmas) else 1

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


def linear_next_state(x, out, out_uncond, guidance, c_x, c_o, a, k_z, noise):
    """``x' = D + a (x - D) + k_z z`` of a linear step (:meth:`Solver.linear_next`) from the network outputs, in one
    pass of the fused kernel (guidance and the conversion ``D = c_x x + c_o o`` inside it): the kernel's ``x0`` is
    ``D`` and its ``dx`` with ``k_d = a`` is ``a (x - D) + k_z z``, so ``x' = x0 + dx`` adds two terms of the result's
    scale (the cancellation-free form of :meth:`Solver.next_state`). With ``out`` already ``D`` pass ``c_x = 0``,
    ``c_o = 1``.

    Returns:
        ``(x', D)``, shaped like ``x``.
    """
    den, r = fused_step(x, out, out_uncond, guidance, c_x, c_o, a, k_z, noise)
    return den + r, den


_ALL = slice(None)   # "every row" for :func:`_rows`: a view, no gather and no scatter


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``(count, mask.ndim)`` the indices of the ``count`` True entries of ``mask`` in row-major order, as
    ``torch.nonzero`` gives them, sized on the host so nothing is read back: a stable sort puts the True entries
    first, in order. (``torch.nonzero_static`` does the same but has no CUDA kernel before torch 2.6, and the
    package takes torch >= 2.4.) ``count`` must be the number of True entries."""
    flat = mask.reshape(-1)
    idx = torch.argsort((~flat).to(torch.uint8), stable=True)[:count]          # (count,) flat indices, ascending
    out = []
    for size in reversed(mask.shape):
        out.append(idx % size)
        idx = idx // size
    return torch.stack(out[::-1], 1)


def _rows(mask: torch.Tensor, count: int | None) -> torch.Tensor | slice | None:
    """The rows where ``mask`` (``(M,)``) holds: None for none, :data:`_ALL` for all of them, else their indices
    ``(K,)`` in ascending order. ``count`` (K, from the host steps) sizes them (:func:`true_indices`), which reads
    nothing back; None falls back to one ``nonzero``, a device-to-host read on CUDA."""
    if count is None:
        rows = mask.nonzero().squeeze(1)            # fallback for callers without host steps: one device read
        count = rows.numel()
    elif 0 < count < mask.numel():
        rows = true_indices(mask, count).squeeze(1)                 # the same indices, sized on the host
    if count == 0:
        return None
    return _ALL if count == mask.numel() else rows


def _put(dx: torch.Tensor, rows: torch.Tensor | slice, value: torch.Tensor) -> torch.Tensor:
    """``dx`` with ``rows`` (from :func:`_rows`) replaced by ``value``."""
    return value if rows is _ALL else dx.index_copy(0, rows, value)


def _check_eta(eta, hi=1.0):
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= hi:
        raise ValueError(f"eta: must lie in [0, {hi}], got {eta!r}")


def _check_flags(solver, *names: str) -> None:
    """Each named field is True or False (a truthy ``'False'`` or ``1`` is not taken as True).

    Raises:
        TypeError: naming the field.
    """
    for name in names:
        if not isinstance(getattr(solver, name), bool):
            raise TypeError(f"{name}: expected True or False, got {getattr(solver, name)!r}")


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

    def _next_table(self, s: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        """``(2, N)``: ``a = down / s, k_z = up`` per step (``x' = D + a (x - D) + up z``)."""
        up, down = self.coefficients(s, s1)
        return torch.stack([down / s, up])

    def linear_next(self, i, sigmas):
        if self.clip is not None:
            return None
        a, k_z = self._per_step(sigmas, self._next_table)[:, i]
        return a, k_z

    def _next_rows(self, s: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        """``(4, N)``: :meth:`_next_table`'s ``a, k_z`` and the rows of 0 and 1 (``D`` is already x0: ``c_x = 0``,
        ``c_o = 1``), gathered with them."""
        table = self._next_table(s, s1)
        return torch.cat([table, torch.zeros_like(table[:1]), torch.ones_like(table[:1])])

    def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        a, k_z, c_x, c_o = self._per_step(sigmas, self._next_rows)[:, i]    # (M,) each
        x1, _ = linear_next_state(x, denoised, None, 1.0, c_x, c_o, a, k_z, noise if self.eta > 0 else None)
        if self.clip is not None:       # x' = clamp(D) + a (x - D) + up z
            x1 = x1 + (denoised.clamp(-self.clip, self.clip) - denoised)
        return x1

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        k_d, k_z = self._per_step(sigmas, self._step_table)[:, i]   # (M,) each
        dx = _linear_increment(x, denoised, k_d, k_z, noise if self.eta > 0 else None)
        if self.clip is not None:
            dx = dx + denoised.clamp(-self.clip, self.clip) - denoised
        return dx

    def jump(self, x, denoised, i, j, b, noise, sigmas, *, span=None):
        """Every step is ``x' - D = a_m (x - D) + up_m z_m``; with ``D`` constant the whole stretch is exact, carrying
        the fine solver's own pre-drawn noise: :func:`constant_d_jump` (the trajectory Picard's guesses follow too),
        which draws the ``span`` (default N) steps' rows it needs. eta 0 (or no step noise): the DDIM jump
        ``D + sigma_j / sigma_i (x - D)``."""
        if self.eta == 0 or noise is None or isinstance(noise, tuple):
            return super().jump(x, denoised, i, j, b, noise, sigmas)
        return constant_d_jump(self, sigmas, noise, x, denoised, i, j, b, sigmas.numel() - 1 if span is None else span)


@dataclass(frozen=True)
class DDPM(Ancestral):
    name: ClassVar[str] = "ddpm"
    eta: float = 1.0


@dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler–Maruyama for the reverse SDE family with the same marginals (eta 1: the reverse SDE)."""

    name: ClassVar[str] = "euler_maruyama"
    sigma_linear: ClassVar[bool] = True
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

    def _next_table(self, s: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        """``(2, N)``: ``a = 1 + k_d = (1 - c) + c s'^2 / s^2`` with ``c = (1 + eta^2) / 2`` (no ``1 - (1 - r^2)``
        cancellation for s' << s), 0 on a step to sigma = 0; ``k_z`` as :meth:`_step_table`."""
        c = (1 + self.eta**2) / 2
        a = torch.where(s1 > 0, (1 - c) + c * (s1 / s) ** 2, torch.zeros_like(s))
        return torch.stack([a, self._step_table(s, s1)[1]])

    def linear_next(self, i, sigmas):
        a, k_z = self._per_step(sigmas, self._next_table)[:, i]
        return a, k_z

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        k_d, k_z = self.linear_step(i, sigmas)
        return _linear_increment(x, denoised, k_d, k_z, noise)

    def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        a, k_z = self.linear_next(i, sigmas)
        ones = torch.ones_like(a)
        return linear_next_state(x, denoised, None, 1.0, 0 * ones, ones, a, k_z, noise)[0]


@dataclass(frozen=True)
class Heun(Solver):
    """EDM's deterministic 2nd-order Heun step (two network calls per step)."""

    name: ClassVar[str] = "heun"
    sigma_linear: ClassVar[bool] = True
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

    def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        """Heun in the cancellation-free form: the Euler predictor ``x_p = D + (s'/s) (x - D)``, then
        ``x' = x_p + (s' - s) / (2 s') (D - D(x_p))`` (the trapezoid: ``(s' - s) (d_p - d) / 2`` with
        ``d_p - d = (D - D(x_p)) / s'``); a step to sigma = 0 is the predictor alone (``x' = D``)."""
        s, s1 = self._sig(sigmas, i, x.ndim)
        x1 = denoised + (s1 / s) * (x - denoised)
        rows = _rows(sigmas[i + 1] > 0, self._to_positive(host_steps, x.shape[0], sigmas))
        if rows is not None:
            x_pred, den = x1[rows], denoised[rows]
            corr = (s1[rows] - s[rows]) / (2 * s1[rows]) * (den - evaluate(x_pred, i[rows] + 1, b[rows]))
            x1 = _put(x1, rows, x_pred + corr)
        return x1


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

    #: the fields a named variant fixes (its name says them): ``dpmpp_2m`` with ``order=3`` would not be DPM++(2M)
    FIXED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if not isinstance(self.order, int) or isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"order: must be 1, 2 or 3, got {self.order!r}")
        _check_flags(self, "sde", "lower_order_final", "euler_at_final")
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type: unknown {self.solver_type!r}; allowed: midpoint, heun")
        for name in self.FIXED:
            default = type(self).__dataclass_fields__[name].default
            if getattr(self, name) != default:
                raise ValueError(f"{name}: fixed at {default!r} by the {self.name!r} solver; use solver='dpmpp' "
                                 f"to choose it")

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

    def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
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
        return x_new

    def jump(self, x, denoised, i, j, b, noise, sigmas, *, span=None):
        """With ``D`` constant the divided differences vanish: the ODE is the DDIM jump, the SDE is DDPM's (its first
        order step), which carries the pre-drawn noise exactly."""
        if self.sde:
            # One DDPM per grid (cached here), so its per-step coefficients are made once, not on every coarse jump.
            return self._cached("_ddpm", sigmas, DDPM).jump(x, denoised, i, j, b, noise, sigmas, span=span)
        return super().jump(x, denoised, i, j, b, noise, sigmas)


@dataclass(frozen=True)
class DPMPP2M(DPMSolverPP):
    """DPM-Solver++(2M), k-diffusion's form: second order except on the first step and on a step to sigma = 0."""

    name: ClassVar[str] = "dpmpp_2m"
    FIXED: ClassVar[tuple[str, ...]] = ("order", "sde")
    order: int = 2
    lower_order_final: bool = False


@dataclass(frozen=True)
class DPMPP3M(DPMSolverPP):
    name: ClassVar[str] = "dpmpp_3m"
    FIXED: ClassVar[tuple[str, ...]] = ("order", "sde")
    order: int = 3


@dataclass(frozen=True)
class DPMPP2MSDE(DPMSolverPP):
    name: ClassVar[str] = "dpmpp_2m_sde"
    FIXED: ClassVar[tuple[str, ...]] = ("order", "sde")
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
    sigma_linear: ClassVar[bool] = True
    uses_history: ClassVar[bool] = True
    AB: ClassVar[tuple] = ((1.0, 0.0, 0.0, 0.0), (3 / 2, -1 / 2, 0.0, 0.0), (23 / 12, -16 / 12, 5 / 12, 0.0),
                           (55 / 24, -59 / 24, 37 / 24, -9 / 24))

    @property
    def history_depth(self):  # type: ignore[override]
        return 3

    def _weights(self, sigmas, x):
        """``AB`` as a ``(4, 4)`` tensor in ``x``'s dtype on its device, made once per grid from device fills (a
        ``torch.tensor(AB, device=...)`` per call would be a blocking host-to-device copy on CUDA)."""
        def make():
            return torch.stack([torch.full((), v, dtype=x.dtype, device=x.device) for row in self.AB
                                for v in row]).view(4, 4)
        return self._cached(f"_plms_weights_{x.dtype}_{x.device}", sigmas, make)

    def history_value(self, x, denoised, i, sigmas):
        return (x - denoised) / append_dims(sigmas[i], x.ndim)

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        s, s1 = self._sig(sigmas, i, x.ndim)
        e = (x - denoised) / s
        hist = torch.stack((e,) + _history(prev_denoised, e, 3), 1)           # (M, 4, *shape), newest first
        weights = self._weights(sigmas, x)[i.clamp_max(3)]                      # (M, 4)
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

    def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        """:meth:`increment` without ``x + dx``: the DDIM step ``D + (s'/s) (x - D)`` plus ``(s' - s) (e_AB - e_i)``
        (the weights sum to 1), and step 0's Heun correction as :class:`Heun`'s, ``(s' - s) / (2 s') (D - D(x_p))``
        at the predictor ``x_p`` (``e_p - e_0 = (D - D(x_p)) / s'``)."""
        s, s1 = self._sig(sigmas, i, x.ndim)
        e = (x - denoised) / s
        hist = torch.stack((e,) + _history(prev_denoised, e, 3), 1)           # (M, 4, *shape), newest first
        weights = self._weights(sigmas, x)[i.clamp_max(3)]                      # (M, 4)
        e_ab = (append_dims(weights, hist.ndim) * hist).sum(1)
        x1 = denoised + (s1 / s) * (x - denoised) + (s1 - s) * (e_ab - e)
        first = (i == 0) & (sigmas.numel() > 2)
        rows = _rows(first, self._host_count(host_steps, x.shape[0], sigmas, lambda n, N: n == 0 and N > 1))
        if rows is not None:
            x_pred, den = x1[rows], denoised[rows]
            corr = (s1[rows] - s[rows]) / (2 * s1[rows]) * (den - evaluate(x_pred, i[rows] + 1, b[rows]))
            x1 = _put(x1, rows, x_pred + corr)
        return x1


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
        check_number("corrector_snr", self.snr, 0, low_open=True)
        check_int("corrector_steps", self.corrector_steps, 1)

    @property
    def uses_history(self):  # type: ignore[override]
        return self.base.uses_history

    @property
    def history_depth(self):  # type: ignore[override]
        return self.base.history_depth

    @property
    def label(self) -> str:
        return f"{self.base.name}+langevin"

    def history_value(self, x, denoised, i, sigmas):
        return self.base.history_value(x, denoised, i, sigmas)

    def check_grid(self, sigmas):
        self.base.check_grid(sigmas)

    def _takes_last_step(self, sigmas):
        return self.base._takes_last_step(sigmas)      # one read per grid for the corrector and its base together

    @property
    def evals_per_step(self):  # type: ignore[override]
        return self.base.evals_per_step + self.corrector_steps

    def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        z_pred, z_corr = noise                                      # z_corr: (M, corrector_steps, *shape)
        x1 = self.base.next_state(x, i, b, denoised, prev_denoised, z_pred if self.base.stochastic else None,
                                  sigmas, evaluate, host_steps=host_steps)
        # No corrector at sigma = 0; its rows are counted on the host like Heun's (no device read, no extra rows).
        rows = _rows(sigmas[i + 1] > 0, self._to_positive(host_steps, x.shape[0], sigmas))
        if rows is None:
            return x1
        xc, j, bc = x1[rows], i[rows] + 1, b[rows]
        s1 = append_dims(sigmas[j], x.ndim)
        e = 2 * (self.snr * s1) ** 2
        for c in range(self.corrector_steps):
            g = (evaluate(xc, j, bc) - xc) / s1**2
            xc = xc + e * g + torch.sqrt(2 * e) * z_corr[rows, c]
        return _put(x1, rows, xc)


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


#: steps x rows x elements per chunk of the constant-D path's noise when the caller gives no chunk: bounds what the
#: path holds (the drawn rows and their sums) whatever its span
PATH_CHUNK_ELEMENTS = 1 << 18


def constant_d_factors(solver: Solver, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The steps of the constant-D path: ``(a, k_z)``, ``(N,)`` each (``k_z`` None: no noise term).

    A step with ``D`` held is ``x_{m+1} - D = a_m (x_m - D) + k_z,m z_m`` (VE frame): ``a_m = 1 + k_d,m`` for solvers
    linear in ``D`` and the noise (:meth:`Solver.linear_step`: DDIM, DDPM, Euler-Maruyama, consistency), the DDIM
    factor ``sigma_{m+1} / sigma_m`` and no noise for the others.
    """
    def make():
        coef = solver.linear_step(torch.arange(sigmas.numel() - 1, device=sigmas.device), sigmas)
        return (sigmas[1:] / sigmas[:-1], None) if coef is None else (1 + coef[0], coef[1])
    return solver._cached("constant_d_factors", sigmas, make)      # once per grid, not once per round


def _path_table(solver: Solver, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(a, k_z)`` of :func:`constant_d_factors` with a step past N appended, ``(N + 1,)`` each: ``a = 1``,
    ``k_z = 0`` (the state stays), so the steps clamped to N read them in one gather each (once per grid)."""
    def make():
        a, k_z = constant_d_factors(solver, sigmas)
        return torch.cat([a, a.new_ones(1)]), None if k_z is None else torch.cat([k_z, k_z.new_zeros(1)])
    return solver._cached("_path_table", sigmas, make)


def step_column(solver: Solver, sigmas: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """``(n, 1)`` the integers ``first .. first + n - 1`` on the grid's device, made once per grid and range (a
    path's steps and points: its rounds reuse them)."""
    return solver._cached(f"_column_{first}_{n}", sigmas,
                          lambda: torch.arange(first, first + n, device=sigmas.device)[:, None])


def _has_noise_term(k_z: torch.Tensor | None, noise) -> bool:
    """Whether the path carries step noise: a linear solver's, and a table or lazy rows (a corrector's tuple: no)."""
    return k_z is not None and noise is not None and not isinstance(noise, tuple)


def _chunk(chunk: int | None, like: torch.Tensor) -> int:
    """Steps per chunk: ``chunk``, or :data:`PATH_CHUNK_ELEMENTS` elements of rows like ``like`` ``(M, *shape)``."""
    return chunk or max(1, PATH_CHUNK_ELEMENTS // max(like.numel(), 1))


def _affine_scan_(A: torch.Tensor, Y: torch.Tensor, ones_to_c: torch.Tensor | None = None) -> torch.Tensor:
    """In place in ``Y``, all prefixes of the recurrence ``y_k = A_k y_{k-1} + Y_k`` (``y_{-1} = 0``) along dim 0,
    in closed form: with ``P_k = prod_{l <= k} A'_l`` (``A'``: ``A`` with its zeros set to 1) and ``S = cumsum(Y /
    P)``, ``y_k = P_k (S_k - S_{r - 1})``, ``r`` the last step ``<= k`` with ``A_r = 0`` (a step that forgets its
    input, as the step to sigma = 0 or a consistency step: the path restarts at ``Y_r`` there; ``S_{-1} = 0``).
    Every weight ``P_k / P_i`` is a product of the ``A`` between, so ``|A| <= 1`` keeps them bounded; about ten
    tensor calls whatever ``c`` (Hillis-Steele's scan took ~11 a pass, ``ceil(log2 c)`` passes: 55 for the 32 points
    of a policy window). ``A``: ``(c, B)`` (its products taken in its own dtype, float64 from the grid's tables),
    ``Y``: ``(c, B, *shape)``; the weights in ``Y``'s dtype, finite while the products between restarts stay above
    its smallest normal (float32: 1e-38; a constant-D path's product is at most ``(sigma_j / sigma_i)^2`` between
    finite sigmas, and an infinite sigma, a zero-SNR or flow grid's first, makes its step a restart).
    ``ones_to_c``: ``(c, 1)`` the integers ``1 .. c`` on ``A``'s device where the caller keeps them (else made here)."""
    c = A.shape[0]
    zero = A == 0
    P = A.masked_fill(zero, 1).cumprod(0)                                    # (c, B)
    P_y = append_dims(P.to(Y.dtype), Y.ndim)
    S = Y.div_(P_y).cumsum_(0)                                               # (c, B, *shape)
    # (c, B) r + 1 at the last restart (0: none): k + 1 where A_k = 0, its running max
    ones_to_c = torch.arange(1, c + 1, device=A.device)[:, None] if ones_to_c is None else ones_to_c
    r1 = (zero * ones_to_c).cummax(0).values
    before = S.gather(0, append_dims((r1 - 2).clamp_min(0), Y.ndim).expand(S.shape))   # (c, B, *shape) S_{r - 1}
    return S.sub_(before.mul_(append_dims(r1 > 1, Y.ndim))).mul_(P_y)


def constant_d_path(solver: Solver, sigmas: torch.Tensor, noise, x_e: torch.Tensor, den_e: torch.Tensor,
                    e: torch.Tensor, b: torch.Tensor, span: int, chunk: int | None = None):
    """The constant-D trajectory from each row's point ``e`` with ``D`` held (VE frame), a chunk of points at a time:
    ``y_{m+1} = a_m y_m + k_z,m z_m`` with ``y = x - D`` (:func:`constant_d_factors`), for ``m = e .. e + span - 1``,
    every prefix at once (:func:`_affine_scan_`); the chunk's last state starts the next chunk. Exact for the steps
    of :func:`constant_d_factors`, carrying the step noise: only the rows ``z[e .. e + span - 1, b]`` are read (a
    :class:`~paratime.noise.LazyNoise` draws just those), never a table. Points past N repeat the state at N.

    Args:
        solver: the step map. sigmas: ``(N + 1,)``. noise: the problem's step noise (table or lazy), or None / a
            corrector's tuple (no noise term). x_e, den_e: ``(B, *shape)`` the states at ``e`` and their held ``D``.
        e, b: ``(B,)`` start points and samples. span: points per row, a host integer. chunk: points per chunk
            (default: :data:`PATH_CHUNK_ELEMENTS` elements).
    Yields:
        ``(k0, x)``: ``x`` ``(c, B, *shape)`` the states at points ``e + k0 + 1 .. e + k0 + c`` (a fresh tensor).
    """
    a, k_z = _path_table(solver, sigmas)                                    # (N + 1,) each: a step past N appended
    N, noisy, chunk = a.numel() - 1, _has_noise_term(k_z, noise), _chunk(chunk, x_e)
    y = x_e - den_e                                                         # (B, *shape) y at the chunk's start
    for k0 in range(0, span, chunk):
        c = min(chunk, span - k0)
        m = e + step_column(solver, sigmas, k0, c)                           # (c, B) the steps taken
        past = m.clamp_max(N)                                                # step N: past the grid, the state stays
        A = a[past]                                                          # (c, B)
        if noisy:
            Y = noise[m.clamp_max(N - 1), b].to(x_e.dtype).mul_(append_dims(k_z[past], x_e.ndim + 1))
        else:
            Y = torch.zeros((c, *x_e.shape), dtype=x_e.dtype, device=x_e.device)
        Y[0].add_(append_dims(A[0], x_e.ndim) * y)                           # the carry: a_m y_m of the first step
        S = _affine_scan_(A, Y, step_column(solver, sigmas, 1, c))
        if k0 + c < span:                                                    # another chunk follows
            y = S[-1].clone()
        yield k0, Y.add_(den_e)


def constant_d_jump(solver: Solver, sigmas: torch.Tensor, noise, x_e: torch.Tensor, den_e: torch.Tensor,
                    e: torch.Tensor, j: torch.Tensor, b: torch.Tensor, span: int) -> torch.Tensor:
    """The constant-D path's state at one point ``j`` per row (the coarse jump), VE frame, in closed form:

        x_j = D + exp(C_j - C_e) (x_e - D) + sum_{m=e}^{j-1} exp(C_j - C_{m+1}) k_z,m z_m,   C_j = sum_{l<j} log a_l

    (:func:`constant_d_factors`; every weight <= 1). The sum draws the noise rows of steps ``e .. e + span - 1`` a
    bounded chunk at a time and runs sequentially in ``m`` (a ``cumsum`` whose carry joins the chunk's first row;
    steps from ``j`` on add exact zeros), so a row's jump depends on its own steps only: not on ``span``, the chunks
    or the other rows (Parareal's correction ``G(new) - G(old)`` cancels exactly at its fixed point). Not
    :func:`constant_d_path`'s scan: its rounding depends on where the chunks fall, which depends on the batch.

    Args:
        solver, sigmas, noise: as :func:`constant_d_path`. x_e, den_e: ``(M, *shape)`` the rows' states at ``e`` and
            their held ``D``. e, j: ``(M,)`` start and target points. b: ``(M,)`` samples.
        span: a host integer ``>= max(j - e)`` (steps past it are left out).
    Returns:
        ``(M, *shape)`` the states at ``j``.
    """
    a, k_z = constant_d_factors(solver, sigmas)
    N = a.numel()
    # log 0 (a step to sigma = 0, or a consistency step) is clamped: exp(-30) is 0 to the path.
    C = torch.cat([a.new_zeros(1), a.log().clamp_min(-30).cumsum(0)])      # (N + 1,)
    x = den_e + append_dims(torch.exp(C[j] - C[e]), x_e.ndim) * (x_e - den_e)
    if not _has_noise_term(k_z, noise):
        return x
    chunk, total = _chunk(None, x_e), None
    for k0 in range(0, span, chunk):
        m = e + k0 + torch.arange(min(chunk, span - k0), device=e.device)[:, None]   # (c, M) the steps
        mc = m.clamp_max(N - 1)
        w = torch.where(m < j, torch.exp(C[j] - C[mc + 1]) * k_z[mc], 0)              # (c, M); 0 from j on
        terms = noise[mc, b].to(x_e.dtype).mul_(append_dims(w, x_e.ndim + 1))         # (c, M, *shape)
        if total is not None:
            terms[0] += total
        total = terms.cumsum_(0)[-1].clone()                                       # S at the chunk's end
    return x if total is None else x + total


def make_solver(name: str | Solver, **options) -> Solver:
    """Look a solver up by name. ``options`` (e.g. ``eta``) go to its constructor.

    Raises:
        ValueError: unknown name, or an option the solver does not take.
    """
    if isinstance(name, Solver):
        if options:
            raise ValueError(f"solver_options: given with a Solver instance ({sorted(options)})")
        return name
    if not isinstance(name, str):
        raise TypeError(f"solver: expected a solver name or a Solver, got {type(name).__name__}")
    if name not in SOLVERS:
        raise ValueError(f"solver: unknown {name!r}; allowed: {', '.join(sorted(SOLVERS))}")
    cls = SOLVERS[name]
    unknown = sorted(set(options) - {f.name for f in fields(cls)})
    if unknown:         # named here: a TypeError raised inside the constructor is not an unknown option
        raise ValueError(f"solver_options: {name!r} does not take {unknown}")
    return cls(**options)


@dataclass(frozen=True)
class FlowHeun(Heun):
    """Heun's 2nd-order step taken in flow-matching time (diffusers' ``FlowMatchHeunDiscreteScheduler``), not in
    the VE sigma: Heun is not invariant to the change of variables, so it differs from :class:`Heun` at O(h^3).

    Notation: VE state ``x`` at ``sigma = s``; flow time ``t = s / (1 + s)`` and flow state ``x_f = x / (1 + s)``
    (``x_f = (1 - t) x0 + t eps``). In flow variables, with ``d = (x_f - D) / t``:

        x_f' = x_f + (t1 - t) d                           (Euler predictor, one call at the next point: D')
        x_f1 = x_f + (t1 - t) (d + (x_f' - D') / t1) / 2  (trapezoid; only where t1 > 0, as for Heun)
    """

    name: ClassVar[str] = "flow_heun"
    sigma_linear: ClassVar[bool] = False     # Heun in flow time t

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        return self.next_state(x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, host_steps=host_steps) - x

    def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        s, s1 = self._sig(sigmas, i, x.ndim)
        t, t1 = s / (1 + s), s1 / (1 + s1)
        x_f = x / (1 + s)
        d = (x_f - denoised) / t
        x_f1 = x_f + (t1 - t) * d
        rows = _rows(sigmas[i + 1] > 0, self._to_positive(host_steps, x.shape[0], sigmas))
        if rows is not None:
            x_pred = x_f1[rows]
            d2 = (x_pred - evaluate(x_pred * (1 + s1[rows]), i[rows] + 1, b[rows])) / t1[rows]
            x_f1 = _put(x_f1, rows, x_f[rows] + (t1[rows] - t[rows]) * (d[rows] + d2) / 2)
        return x_f1 * (1 + s1)


SOLVERS[FlowHeun.name] = FlowHeun


@dataclass(frozen=True)
class LMS(Solver):
    """Linear multistep in sigma (k-diffusion's ``sample_lms``, diffusers' ``LMSDiscreteScheduler``), VE frame.

    The history holds ``d_j = (x_j - D_j) / sigma_j``; step i of order ``k = min(i + 1, order)`` is

        x_{i+1} = x_i + sum_{j<k} c_{i,j} d_{i-j},   c_{i,j} = int_{s_i}^{s_{i+1}} prod_{m<k, m!=j}
                                                                  (tau - s_{i-m}) / (s_{i-j} - s_{i-m}) dtau,

    the Lagrange basis through the last k sigmas integrated over the step (exactly, by 4-point Gauss-Legendre: the
    integrand has degree <= 3; diffusers integrates it with ``scipy.integrate.quad``).

    Args:
        order: 1-4 (diffusers' ``step(order=4)`` default).
    Raises:
        ValueError: a bad ``order``.
    """

    name: ClassVar[str] = "lms"
    uses_history: ClassVar[bool] = True
    order: int = 4

    def __post_init__(self):
        if not isinstance(self.order, int) or isinstance(self.order, bool) or self.order not in (1, 2, 3, 4):
            raise ValueError(f"order: must be 1, 2, 3 or 4, got {self.order!r}")

    @property
    def history_depth(self):  # type: ignore[override]
        return max(1, self.order - 1)

    def history_value(self, x, denoised, i, sigmas):
        return (x - denoised) / append_dims(sigmas[i], x.ndim)

    def _coefficients(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``(N, order)`` ``c_{i,j}``, made once per grid on the sigmas' device (no host read)."""
        return self._cached(f"_lms_{self.order}", sigmas, lambda: self._coefficient_table(sigmas))

    def _next_tables(self, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, c)`` of the step in its next-state form ``x' = D_i + a_i (x_i - D_i) + sum_{j>=1} c_{i,j} d_{i-j}``:
        ``(N,)`` ``a_i = 1 + c_{i,0} / sigma_i`` and ``(N, order)`` ``c`` with ``c_{i,0} = 0``, both from the float64
        coefficients (a float32 ``c_{i,0} ~ -sigma_i`` would leave nothing of ``a_i`` on a flow grid's first step)."""
        def make():
            sig = sigmas.detach().to(torch.float64)
            coef = self._coefficient_table(sig)
            return 1 + coef[:, 0] / sig[:-1], torch.cat([torch.zeros_like(coef[:, :1]), coef[:, 1:]], 1)
        return self._cached(f"_next_{self.name}_{self.order}_{getattr(self, 'lower_order_final', None)}", sigmas,
                            make)

    def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        """The step with ``d_i`` folded into ``D_i + a_i (x_i - D_i)``: ``x + dx`` cancels a state of ~1e7 on a flow
        grid's first step (float32: 1e-2 off float64 after 28 steps), this form does not."""
        a, coef = self._next_tables(sigmas)
        x1 = denoised + append_dims(a[i].to(x.dtype), x.ndim) * (x - denoised)
        if self.order > 1:
            hist = torch.stack(_history(prev_denoised, x1, self.order - 1), 1)      # (M, order - 1, *shape)
            x1 = x1 + (append_dims(coef[i, 1:].to(x.dtype), hist.ndim) * hist).sum(1)
        return x1

    def _coefficient_table(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``(N, order)`` ``c_{i,j}`` in the sigmas' dtype, on their device."""
        N, K = sigmas.numel() - 1, self.order
        steps, lags = torch.arange(N, device=sigmas.device), torch.arange(K, device=sigmas.device)
        pts = sigmas[(steps[:, None] - lags).clamp_min(0)]                        # (N, K): s_{i-m}
        used = lags[None, :] < (steps[:, None] + 1).clamp_max(K)                  # (N, K): m < k_i
        # 4-point Gauss-Legendre on [s_i, s_{i+1}]: nodes (N, 4), weights (4,) times half the step.
        u = torch.tensor([-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526],
                         dtype=sigmas.dtype).to(sigmas.device)
        w = torch.tensor([0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538],
                         dtype=sigmas.dtype).to(sigmas.device)
        half = (sigmas[1:] - sigmas[:-1]) / 2                                     # (N,)
        tau = (sigmas[:-1] + sigmas[1:])[:, None] / 2 + half[:, None] * u         # (N, 4)
        coef = []
        for j in range(K):
            basis = torch.ones_like(tau)
            for m in range(K):
                if m == j:
                    continue
                on = used[:, m:m + 1]                                             # (N, 1)
                den = torch.where(on, pts[:, j:j + 1] - pts[:, m:m + 1], torch.ones_like(half[:, None]))
                basis = basis * torch.where(on, (tau - pts[:, m:m + 1]) / den, torch.ones_like(tau))
            coef.append(torch.where(used[:, j], half * (basis * w).sum(1), torch.zeros_like(half)))
        return torch.stack(coef, 1)                                               # (N, K)

    def increment(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        d = (x - denoised) / append_dims(sigmas[i], x.ndim)
        hist = torch.stack((d,) + _history(prev_denoised, d, self.order - 1), 1)     # (M, order, *shape), newest first
        coef = self._coefficients(sigmas)[i].to(x.dtype)                              # (M, order)
        return (append_dims(coef, hist.ndim) * hist).sum(1)


SOLVERS[LMS.name] = LMS


@dataclass(frozen=True)
class UniPC(Solver):
    """UniPC (Zhao et al. 2023) in diffusers' form (``UniPCMultistepScheduler``: data prediction, ``bh2``,
    ``lower_order_final``), VE frame: a multistep predictor (UniP) and a corrector (UniC) that revises each state
    with the model output *at* that state.

    Notation: lambda = -log sigma; step i goes from point i to i + 1 with ``h_i = lambda_{i+1} - lambda_i``,
    ``r_i = sigma_{i+1} / sigma_i`` and ``B_i = expm1(-h_i) = r_i - 1``; ``p_i = min(order, N - i, i + 1)``.
    The trajectory holds the *predicted* states ``x~_i`` (where the network is evaluated, ``D_i = D(x~_i)``):

        x^c_i     = x~_i + B_{i-1} (P_{i-1} - C_{i-1} - rho_c (D_i - D_{i-1}))   (i >= 1: UniC, order p_{i-1})
        x~_{i+1}  = x^c_i + (r_i - 1) (x^c_i - D_i) - B_i P_i                    (UniP, order p_i)

    with ``P_i = sum_k rho_p,k (D_{i-k} - D_i) / r_{i,k}`` and ``C_{i-1}`` the same sum with the corrector's
    ``rho_c`` (diffusers' ``rhos_p`` / ``rhos_c``, solved from the B(h) conditions) and ``r_{i,k} =
    (lambda_{i-k} - lambda_i) / h_i``. Both revisions are linear in the D history, so each point's step is one
    weight table over ``D_i .. D_{i-order}`` (made once per grid): ``x^c_i = x~_i + sum_j W^c_{i,j} D_{i-j}`` and
    ``P_i = sum_j W^p_{i,j} D_{i-j}``. The last state (no corrector after the last step) is the pipeline's.

    Args:
        order: ``solver_order`` 1-3. disable_corrector: diffusers' option: no UniC at point ``i`` for ``i - 1``
            in it.
        lower_order_final: diffusers' option of that name (the last steps at order ``N - i``).
    Raises:
        ValueError: a bad ``order``.
    """

    name: ClassVar[str] = "unipc"
    uses_history: ClassVar[bool] = True
    order: int = 2
    disable_corrector: tuple = ()
    lower_order_final: bool = True

    def __post_init__(self):
        if not isinstance(self.order, int) or isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"order: must be 1, 2 or 3, got {self.order!r}")
        ks = self.disable_corrector
        if not isinstance(ks, (tuple, list)) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                                       for k in ks):
            raise ValueError(f"disable_corrector: expected step indices (integers >= 0), got {ks!r}")
        object.__setattr__(self, "disable_corrector", tuple(ks))
        _check_flags(self, "lower_order_final")

    @property
    def history_depth(self):  # type: ignore[override]
        return self.order

    def _rhos(self, lam: torch.Tensor, i: int, p: int, corrector: bool) -> torch.Tensor:
        """diffusers' ``rhos_p`` (``p - 1`` of them) or ``rhos_c`` (``p``) for the step from point i (float64)."""
        h = lam[i + 1] - lam[i]
        rks = torch.stack([(lam[i - k] - lam[i]) / h for k in range(1, p)] + [torch.ones_like(h)])
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k, fact, B_h = h_phi_1 / hh - 1, 1, torch.expm1(hh)
        R, b = [], []
        for k in range(1, p + 1):
            R.append(rks ** (k - 1))
            b.append(h_phi_k * fact / B_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R, b = torch.stack(R), torch.stack(b)
        if corrector:
            return torch.full((1,), 0.5, dtype=lam.dtype) if p == 1 else torch.linalg.solve(R, b)
        if p == 1:
            return lam.new_zeros(0)
        return torch.full((1,), 0.5, dtype=lam.dtype) if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])

    def _tables(self, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W^p, W^c)``, ``(N, order + 1)`` each: weights on ``D_i, D_{i-1}, .., D_{i-order}`` (host float64, one
        read of the grid per grid, then on the sigmas' device)."""
        def make():
            sig = sigmas.detach().to("cpu", torch.float64)
            N, K = sig.numel() - 1, self.order
            lam = -torch.log(sig)                                   # lambda_N = -inf at sigma 0: h = inf, B = -1
            orders = [min(K, N - i if self.lower_order_final else K, i + 1) for i in range(N)]
            if float(sig[N]) == 0:      # h = inf: the higher orders have no limit (diffusers: inf, a singular solve)
                orders[N - 1] = 1
            rk = {(i, k): (lam[i - k] - lam[i]) / (lam[i + 1] - lam[i]) for i in range(N) for k in range(1, K)
                  if k < orders[i]}
            Wp, Wc = torch.zeros(N, K + 1, dtype=torch.float64), torch.zeros(N, K + 1, dtype=torch.float64)

            def residual(W, i, shift, rhos, p):     # sum_k rho_k (D_{i-k} - D_i) / r_{i,k}, weights at offset shift
                for k in range(1, p):
                    w = rhos[k - 1] / rk[(i, k)]
                    W[shift + k] += w
                    W[shift] -= w

            for i in range(N):
                residual(Wp[i], i, 0, self._rhos(lam, i, orders[i], False), orders[i])
                if i >= 1 and i - 1 not in self.disable_corrector:   # UniC at point i: step i - 1's order, grid
                    p, B = orders[i - 1], torch.expm1(lam[i - 1] - lam[i])
                    row = torch.zeros(K + 1, dtype=torch.float64)
                    residual(row, i - 1, 1, self._rhos(lam, i - 1, p, False), p)       # + P_{i-1}
                    rc = self._rhos(lam, i - 1, p, True)
                    residual(row, i - 1, 1, -rc[:-1], p)                                # - C_{i-1}
                    row[0] -= rc[-1]
                    row[1] += rc[-1]                                                    # - rho_c (D_i - D_{i-1})
                    Wc[i] = B * row
            return Wp.to(sigmas.device), Wc.to(sigmas.device)
        return self._cached(f"_unipc_{self.order}_{self.disable_corrector}_{self.lower_order_final}", sigmas, make)

    def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        """UniC then UniP as ``D + r (x^c - D) - (r - 1) P`` (``r = sigma' / sigma``), not ``x + dx``: the big state
        of a flow grid's first point only enters scaled down by ``r``."""
        hist = torch.stack((denoised,) + _history(prev_denoised, denoised, self.order), 1)   # (M, order+1, ...)
        Wp, Wc = (append_dims(W[i].to(x.dtype), hist.ndim) for W in self._tables(sigmas))
        s, s1 = self._sig(sigmas, i, x.ndim)
        r = s1 / s
        x_c = x + (Wc * hist).sum(1)                                             # UniC: the revised state
        return denoised + r * (x_c - denoised) - (r - 1) * (Wp * hist).sum(1)   # UniP


SOLVERS[UniPC.name] = UniPC


@dataclass(frozen=True)
class Consistency(DDPM):
    """A consistency model's multistep sampling (LCM, Luo et al. 2023): each step maps to the boundary-conditioned
    ``D`` and re-noises it to the next level with fresh noise, ``x' = D + sigma' z`` (VE frame: ``up = sigma'``,
    ``down = 0``); the last step, to sigma 0, returns ``D``. The boundary condition itself belongs to the model
    (:class:`paratime.integrations.diffusers.LCMBoundary`)."""

    name: ClassVar[str] = "consistency"
    #: not a field: every step re-noises with fresh noise (LCM's rule), so the solver takes no ``eta`` (DDPM's would
    #: be ignored by :meth:`coefficients`, and ``eta=0`` would mark the solver deterministic while it draws noise)
    eta: ClassVar[float] = 1.0

    def coefficients(self, s: torch.Tensor, s1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return s1.expand_as(s).clone(), torch.zeros_like(s)


SOLVERS[Consistency.name] = Consistency


@dataclass(frozen=True)
class DEIS(LMS):
    """DEIS multistep (Zhang & Chen 2023, ``DEISMultistepScheduler``: ``algorithm_type="deis"``, log-rho), VE frame:
    :class:`LMS`'s form ``x_{i+1} = x_i + sum_j c_{i,j} d_{i-j}`` on the eps history ``d_j = (x_j - D_j) / sigma_j``,
    with the Lagrange basis in ``log sigma`` integrated over sigma in closed form (diffusers' ``ind_fn``). Order
    ``min(order, i + 1)``, and on grids of fewer than 15 steps the last step first and the one before at most second
    order (``lower_order_final``).

    The coefficients are float64 (within ~1e-12 of the integrals by quadrature). diffusers computes the same closed
    forms from its float32 ``sigmas`` and ``ind_fn(rho_t) - ind_fn(rho_s0)`` cancels: its third-order coefficients
    are 2e-6 (8 steps) to 5e-4 (50 steps) off, its second-order ones 5e-7 to 2e-5, so a shipped loop differs from
    this one by ~1e-7 to 1e-5 of the sample's scale; with its ``sigmas`` in float64 the two agree to ~1e-14
    (tests/test_deis_float64.py).

    Args:
        order: ``solver_order`` 1-3. lower_order_final: diffusers' option of that name.
    """

    name: ClassVar[str] = "deis"
    order: int = 2
    lower_order_final: bool = True

    def __post_init__(self):
        if not isinstance(self.order, int) or isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"order: must be 1, 2 or 3, got {self.order!r}")
        _check_flags(self, "lower_order_final")

    @staticmethod
    def _integral(t: float, b: float, others: tuple) -> float:
        """``int^t prod_{c in others} (log u - log c) / (log b - log c) du`` at ``t`` (0 at t = 0, the limit)."""
        if t <= 0:
            return 0.0
        lt, lb = math.log(t), math.log(b)
        if not others:
            return t
        if len(others) == 1:
            lc = math.log(others[0])
            return t * (-lc + lt - 1) / (lb - lc)
        lc, ld = (math.log(c) for c in others)
        return t * (lc * (ld - lt + 1) - ld * lt + ld + lt * lt - 2 * lt + 2) / ((lb - lc) * (lb - ld))

    def _coefficients(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``(N, order)`` ``c_{i,j}`` (host float64, one read of the grid per grid)."""
        return self._cached(f"_deis_{self.order}_{self.lower_order_final}", sigmas,
                            lambda: self._coefficient_table(sigmas))

    def _coefficient_table(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``(N, order)`` ``c_{i,j}`` in float64 on the sigmas' device."""
        sig = sigmas.detach().to("cpu", torch.float64).tolist()
        N, K = len(sig) - 1, self.order
        coef = torch.zeros(N, K, dtype=torch.float64)
        for i in range(N):
            p = min(K, i + 1)
            if self.lower_order_final and N < 15:
                p = min(p, N - i)                  # last step first order, the one before at most second
            pts = [sig[i - j] for j in range(p)]   # rho_{i}, rho_{i-1}, ...
            for j in range(p):
                others = tuple(pts[:j] + pts[j + 1:])
                if p == 1:                         # Euler: x' = x + (s1 - s) d
                    coef[i, 0] = sig[i + 1] - sig[i]
                else:
                    coef[i, j] = self._integral(sig[i + 1], pts[j], others) - self._integral(sig[i], pts[j],
                                                                                              others)
        return coef.to(sigmas.device)


SOLVERS[DEIS.name] = DEIS


@dataclass(frozen=True)
class DPMSolverSinglestep(Solver):
    """DPM-Solver++ single-step (``DPMSolverSinglestepScheduler``, ODE), VE frame. The grid is cut into groups by
    diffusers' order list (e.g. ``[1, 2, 1, 2, ...]``); step i of order k starts from its group's first state
    ``x_g`` (g = i - k + 1) and the group's outputs ``D_g .. D_i``:

        x_{i+1} = (sigma_{i+1} / sigma_g) x_g + T_i(D_g .. D_i)        (diffusers' first/second/third-order update)

    The trajectory holds every ``x_i``, and within a group ``x_i = (sigma_i / sigma_g) x_g + T_{i-1}``, so each step is
    a map of ``x_i`` and the D history: ``x_{i+1} = (sigma_{i+1} / sigma_i) (x_i - T_{i-1}) + T_i`` (T_{i-1} = 0 at a
    group's first step). ``T`` is a weight table over ``D_i, D_{i-1}, D_{i-2}`` made once per grid.

    Args:
        order: ``solver_order`` 1-3. solver_type: ``midpoint`` or ``heun``. lower_order_final: diffusers' option
            (its default here is False, as the scheduler's). final_first_order: the last step is first order
            (``final_sigmas_type="zero"``).
    Raises:
        ValueError: a bad ``order`` or ``solver_type``.
    """

    name: ClassVar[str] = "dpmpp_singlestep"
    uses_history: ClassVar[bool] = True
    order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = False
    final_first_order: bool = True

    def __post_init__(self):
        if not isinstance(self.order, int) or isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"order: must be 1, 2 or 3, got {self.order!r}")
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type: must be 'midpoint' or 'heun', got {self.solver_type!r}")
        _check_flags(self, "lower_order_final", "final_first_order")

    @property
    def history_depth(self):  # type: ignore[override]
        return max(1, self.order - 1)

    def check_grid(self, sigmas):
        super().check_grid(sigmas)
        self.orders(sigmas.numel() - 1)

    def orders(self, steps: int) -> list[int]:
        """diffusers' ``get_order_list``: the order of every step."""
        k, n = self.order, steps
        if k == 1:
            out = [1] * n
        elif self.lower_order_final:
            tail = {3: {0: [1, 2, 1], 1: [1], 2: [1, 2]}, 2: {0: [1, 1], 1: [1]}}[k][n % k]
            head = n // k - (1 if n % k == 0 else 0)
            out = [o for _ in range(head) for o in range(1, k + 1)] + tail
        else:
            out = [o for _ in range(n // k) for o in range(1, k + 1)]
        if len(out) != n:
            raise ValueError(f"steps: diffusers' single-step order list for {n} steps has {len(out)} entries "
                             f"(solver_order={k} needs a multiple of it); use lower_order_final=True")
        if self.final_first_order:
            out[-1] = 1
        return out

    def _tables(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``(N, order)``: ``W_i = T_i - (sigma_{i+1} / sigma_i) shift(T_{i-1})`` on ``D_i, D_{i-1}, ...``."""
        def make():
            sig = sigmas.detach().to("cpu", torch.float64)
            N, K = sig.numel() - 1, self.order
            orders = self.orders(N)
            if float(sig[N]) == 0:      # h = inf: the higher orders have no limit (NaN), as in DPMSolverPP
                orders[-1] = 1
            lam = -torch.log(sig)
            T = torch.zeros(N, 3, dtype=torch.float64)
            W = torch.zeros(N, K, dtype=torch.float64)
            for i, k in enumerate(orders):
                g = i - k + 1
                h = lam[i + 1] - lam[g]
                e = torch.exp(-h)
                phi1 = 1 - e                                          # VE weight of D0 = D_g
                phi2 = (e - 1) / h + 1
                if k == 1:
                    T[i, 0] = phi1
                elif k == 2:
                    r0 = (lam[i] - lam[g]) / h
                    c = 0.5 * phi1 if self.solver_type == "midpoint" else phi2        # times D1 = (D_i - D_g) / r0
                    T[i, 1] += phi1 - c / r0
                    T[i, 0] += c / r0
                else:
                    r0, r1 = (lam[i] - lam[g]) / h, (lam[i - 1] - lam[g]) / h
                    # D1_0 = (D_{i-1} - D_g) / r1, D1_1 = (D_i - D_g) / r0 as weights on (D_i, D_{i-1}, D_g)
                    zero = torch.zeros((), dtype=torch.float64)
                    d10, d11 = torch.stack([zero, 1 / r1, -1 / r1]), torch.stack([1 / r0, zero, -1 / r0])
                    w = torch.stack([zero, zero, phi1])
                    if self.solver_type == "midpoint":
                        w = w + phi2 * d11
                    else:
                        d1 = (r0 * d10 - r1 * d11) / (r0 - r1)
                        d2 = 2 * (d11 - d10) / (r0 - r1)
                        w = w + phi2 * d1 - ((e - 1 + h) / (h * h) - 0.5) * d2
                    T[i] = w
                W[i, :min(K, 3)] = T[i, :K]
                if k > 1:                                             # x_g from x_i: subtract A_i T_{i-1}, shifted
                    prev = torch.cat([torch.zeros(1, dtype=torch.float64), T[i - 1, :2]])
                    W[i] -= (sig[i + 1] / sig[i] * prev)[:K]
            return W.to(sigmas.device)
        return self._cached(f"_singlestep_{self.order}_{self.solver_type}_{self.lower_order_final}_"
                            f"{self.final_first_order}", sigmas, make)

    def next_state(self, x, i, b, denoised, prev_denoised, noise, sigmas, evaluate, *, host_steps=None):
        """``(sigma' / sigma) x + sum_j W_{i,j} D_{i-j}``: every operand at the scale of the result (``x + dx``
        cancels a flow grid's first state of ~1e7)."""
        hist = torch.stack((denoised,) + _history(prev_denoised, denoised, self.order - 1), 1)   # (M, order, ...)
        W = append_dims(self._tables(sigmas)[i].to(x.dtype), hist.ndim)
        s, s1 = self._sig(sigmas, i, x.ndim)
        return (s1 / s) * x + (W * hist).sum(1)


SOLVERS[DPMSolverSinglestep.name] = DPMSolverSinglestep


@dataclass(frozen=True)
class TCD(DDPM):
    """Trajectory consistency distillation's sampler (``TCDScheduler``, Zheng et al. 2024), VE frame: each step
    denoises to the intermediate level ``sigma_s`` of training timestep ``s = floor((1 - gamma) t_{i+1})`` along the
    predicted eps, then re-noises to ``sigma_{i+1}`` with fresh noise:

        x' = D + (sigma_s / sigma_i) (x - D) + sqrt(sigma_{i+1}^2 - sigma_s^2) z      (down = sigma_s)

    ``gamma`` 0 is DDIM; the last step (to t = 0, where s = 0) adds no noise, as diffusers'.

    Args:
        eta: gamma, in [0, 1] (the pipelines' ``eta=``).
        train_sigmas: the VE sigma of every training timestep, ``sqrt((1 - alpha_bar_t) / alpha_bar_t)``.
    Raises:
        ValueError: a bad ``eta`` or fewer than 2 ``train_sigmas``.
    """

    name: ClassVar[str] = "tcd"
    eta: float = 0.3
    train_sigmas: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        if len(self.train_sigmas) < 2:
            raise ValueError("train_sigmas: give the VE sigma of every training timestep (at least 2)")

    @property
    def stochastic(self):  # type: ignore[override]
        return self.eta > 0

    def coefficients(self, s: torch.Tensor, s1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.as_tensor(self.train_sigmas, dtype=s1.dtype, device=s1.device)            # (T,)
        t1 = (table[None, :] - s1.reshape(-1, 1)).abs().argmin(1)                               # the grid's t_{i+1}
        s_mid = table[torch.floor((1 - self.eta) * t1.to(torch.float64)).long()].reshape(s1.shape)
        return torch.sqrt((s1 * s1 - s_mid * s_mid).clamp_min(0)), s_mid

# TCD needs the training sigmas: built by paratime.integrations.diffusers.solver_for, not looked up by name.
