"""``SamplerConfig``: every sampling option, validated once (the one entry check; the CLI and the API share it),
and the sample-time conditioning check (:func:`check_cond`; the memory bound is
:func:`paratime.backends.check_memory`).

Rules applied to every option: an integer option refuses ``bool`` and floats (``window=True`` is an error, not 1);
a number option refuses ``bool``, NaN and inf; a name option lists the allowed names. Every message starts with the
option's name.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

import torch

from .backends import check_memory, guidance_buffers, noise_draws, window_buffers
from .backends.memory import jump_bytes, method_footprint, table_draw_bytes
from .checks import check_int, check_number
from .denoiser import PREDICTIONS, Denoiser, cfg_active
from .methods import METHODS
from .methods import PARAREAL_TOL
from .cost import check_cost
from .methods.parareal import check_coarse_steps, check_solver, slice_bounds
from .methods.picard import DEFAULT_TOL, FILLS, INITS, STOPS, UPDATES, check_init, path_plan
from .methods.window import reads_entries
from .noise import tabulates
from .planner import rounds_cap
from .schedules import SPACINGS, NoiseSchedule
from .solvers import SOLVERS, LangevinCorrected, Solver, make_solver

__all__ = ["SamplerConfig", "check_int", "check_number", "check_device", "check_cond", "declared_scale"]

log = logging.getLogger("paratime")

#: units of the final-point rule's ``tol``: ``data`` (relative to the data's scale, :func:`declared_scale`, or the
#: sample's own) or ``absolute`` (the returned sample's units)
TOL_UNITS = ("data", "absolute")

STATE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_device(device: Any) -> torch.device | None:
    """Parse ``device`` and check that it exists on this machine (None passes through).

    Raises:
        ValueError: not a device string, or a CUDA/MPS device this machine does not have.
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a str or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: not a device: {device!r}; allowed: cpu, cuda, cuda:N") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device: {device!r} requested but no CUDA device is available; allowed: cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device: {device!r} requested but only cuda:0..cuda:{n - 1} exist")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device: {device!r} requested but MPS is not available; allowed: cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):         # meta holds no data: nothing to sample on
        raise ValueError(f"device: unsupported device type {dev.type!r}; allowed: cpu, cuda, cuda:N")
    return dev


_PICARD = ("picard", "auto")               # auto: the options are given for the planner's Picard candidate
#                                            (not its window: the planner sizes it, so method="auto" takes
#                                            window="auto")
_PARAREAL = ("parareal", "parareal_pipelined")
#: the options read by some methods only (``window``: Picard's window, staggered's cores); any other method
#: refuses them away from their defaults
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "window": ("picard", "staggered"), "max_rounds": ("picard",), "tol": (*_PICARD, "staggered", *_PARAREAL),
    **{name: _PICARD for name in ("shared_window", "stop", "update", "accept_tol", "init", "fill")},
    **{name: _PARAREAL for name in ("slices", "coarse_steps", "coarse")},
}


def _not_read(name: str, method: str, why: str = "") -> ValueError:
    """The error for :data:`METHOD_OPTIONS` option ``name`` given to ``method``, which does not read it."""
    names = [repr(m) for m in METHOD_OPTIONS[name]]
    allowed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return ValueError(f"{name}: applies only to method={allowed}, not {method!r}{why}")


def _default(name: str) -> Any:
    """A :class:`SamplerConfig` field's default."""
    return SamplerConfig.__dataclass_fields__[name].default


@dataclass(frozen=True)
class SamplerConfig:
    """Validated sampling options (see :class:`~paratime.sampler.ParallelSampler` for their meaning).

    Build it with :meth:`from_options` to get a clear error for an unknown option name.

    Raises:
        TypeError: an option of the wrong type (``window=True``, ``tol="0.1"``, ``dtype=torch.int32``).
        ValueError: an option out of range or unknown name (``method="magic"``, ``guidance=nan``), naming it.
    """

    solver: str | Solver = "ddim"
    steps: int = 50
    method: str = "picard"
    window: int | str | None = "auto"
    cost: Any = "auto"
    tol: float | None = None
    tol_units: str | None = None
    data_scale: float | None = None
    max_rounds: int | None = None
    spacing: str | None = None
    eta: float | None = None
    slices: int | None = None
    coarse_steps: int = 1
    coarse: Any = None
    shared_window: bool = False
    stop: str = "final"
    update: str = "secant"
    accept_tol: float | None = None
    init: str = "auto"
    fill: str = "path"
    dtype: torch.dtype | None = None
    state_dtype: torch.dtype | None = None
    device: str | torch.device | None = None
    schedule: NoiseSchedule | None = None
    prediction: str | None = None
    clip_x0: float | None = None
    guidance: float | None = None
    guidance_rescale: float | None = None
    classifier: Any = None
    classifier_scale: float | None = None
    latent_scale: float | None = None
    corrector_snr: float | None = None
    corrector_steps: int = 1

    def __post_init__(self):
        # A numpy scalar passes the checks below (numbers.Integral, numbers.Real) but not the isinstance(int) and
        # (int, float) tests of the methods, solvers and schedules, nor json: kept as the Python number it equals.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, numbers.Integral) and not isinstance(value, int):
                object.__setattr__(self, f.name, int(value))
            elif isinstance(value, numbers.Real) and not isinstance(value, int) and type(value) is not float:
                object.__setattr__(self, f.name, float(value))      # numpy's float64 is a float subclass too
        # Method and its options.
        check_int("steps", self.steps, 1)
        if not isinstance(self.method, str) or self.method not in (*METHODS, "auto"):
            raise ValueError(f"method: unknown {self.method!r}; allowed: auto, {', '.join(METHODS)}")
        if self.window is None or self.window == "auto":       # None: the planner's choice, as "auto"
            object.__setattr__(self, "window", "auto")
        elif isinstance(self.window, str):
            raise ValueError(f"window: unknown {self.window!r}; allowed: 'auto' or an integer >= 1")
        else:
            check_int("window", self.window, 2 if self.method == "staggered" else 1)   # staggered: K >= 2 cores
        check_cost(self.cost)
        check_number("tol", self.tol, 0, none=True)
        check_int("max_rounds", self.max_rounds, 1, none=True)
        if self.spacing is not None and (not isinstance(self.spacing, str) or self.spacing not in SPACINGS):
            raise ValueError(f"spacing: unknown {self.spacing!r}; allowed: {', '.join(SPACINGS)}")
        check_int("slices", self.slices, 1, self.steps, none=True)
        check_int("coarse_steps", self.coarse_steps, 1)
        if self.method.startswith("parareal") and self.coarse is None:
            check_coarse_steps(slice_bounds(self.steps, self.slices), self.coarse_steps)
        if self.coarse is not None and not callable(self.coarse):
            raise TypeError(f"coarse: expected a callable coarse(x, sigma_from, sigma_to), "
                            f"got {type(self.coarse).__name__}")
        if not isinstance(self.shared_window, bool):
            raise TypeError(f"shared_window: expected True or False, got {self.shared_window!r}")
        if not isinstance(self.stop, str) or self.stop not in STOPS:
            raise ValueError(f"stop: unknown {self.stop!r}; allowed: {', '.join(STOPS)}")
        if not isinstance(self.update, str) or self.update not in UPDATES:
            raise ValueError(f"update: unknown {self.update!r}; allowed: {', '.join(UPDATES)}")
        check_number("accept_tol", self.accept_tol, 0, none=True)
        self._check_tol_units()
        for name, allowed in (("init", INITS), ("fill", FILLS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name}: unknown {value!r}; allowed: {', '.join(allowed)}")
        # Solver (the solver's own constructor checks eta's range).
        check_number("eta", self.eta, none=True)
        try:
            make_solver(self.solver, **self.solver_options)  # raises on a bad name or option
        except ValueError as e:
            if self.eta is None or not str(e).startswith("solver_options:"):
                raise
            what = "a Solver instance carries its own" if isinstance(self.solver, Solver) else \
                f"the {self.solver!r} solver takes none"
            with_eta = [n for n, c in SOLVERS.items() if "eta" in {f.name for f in fields(c)}]
            raise ValueError(f"eta: applies only to solvers with an eta ({', '.join(with_eta)}); {what}") from e
        check_number("corrector_snr", self.corrector_snr, 0, low_open=True, none=True)
        check_int("corrector_steps", self.corrector_steps, 1)
        if self.method == "parareal":
            check_solver(self.build_solver())
        if self.method == "parareal_pipelined" and self.build_solver().uses_history:
            raise ValueError(f"solver: method='parareal_pipelined' needs a one-step solver; {self.solver!r} reads the "
                             f"previous points' D (use method='parareal' or 'picard')")
        # Precision and placement.
        if self.dtype is not None and (not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {self.dtype!r}")
        if self.state_dtype is not None and self.state_dtype not in STATE_DTYPES:
            raise TypeError(f"state_dtype: expected one of {', '.join(map(str, STATE_DTYPES))} or None, "
                            f"got {self.state_dtype!r}")
        object.__setattr__(self, "device", check_device(self.device))
        # Model adapter and guidance.
        if self.schedule is not None and not isinstance(self.schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule or None, got {type(self.schedule).__name__}")
        if self.prediction is not None and self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction: unknown {self.prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        check_number("clip_x0", self.clip_x0, 0, low_open=True, none=True)
        check_number("guidance", self.guidance, 0, none=True)
        check_number("guidance_rescale", self.guidance_rescale, 0, 1, none=True)
        if self.classifier is not None and not callable(self.classifier):
            raise TypeError(f"classifier: expected a callable, got {type(self.classifier).__name__}")
        check_number("classifier_scale", self.classifier_scale, 0, none=True)
        # Which guidance options apply (a classifier without a scale, guidance_rescale without guidance) is the
        # Denoiser's to say: a Denoiser given as the model may carry the other half (its classifier, its guidance).
        # A scale of 0 with no classifier here is nothing on any model (0 is the Denoiser's "off").
        if self.classifier_scale == 0 and self.classifier is None:
            raise ValueError("classifier_scale: given without classifier=")
        check_number("latent_scale", self.latent_scale, 0, low_open=True, none=True)
        self._refuse_options_that_do_not_apply()

    def _refuse_options_that_do_not_apply(self) -> None:
        """An option the chosen method or model part never reads is an error, not silently ignored."""
        if self.corrector_steps != 1 and self.corrector_snr is None:
            raise ValueError("corrector_steps: applies only with the Langevin corrector; give corrector_snr= too")
        # Each method's own options, at their defaults unless the method reads them (METHOD_OPTIONS).
        for name, readers in METHOD_OPTIONS.items():
            if self.method not in readers and getattr(self, name) != _default(name):
                raise _not_read(name, self.method)
        if self.fill != _default("fill") and self._fill_unread():
            raise self._fill_error("(nor does the window of 1 that max_rounds= leaves)")
        if self.method == "picard":
            check_init(self.init, self.window, self.max_rounds)
        if self.coarse is not None and self.coarse_steps != _default("coarse_steps"):
            raise self._coarse_steps_error()

    def _fill_unread(self) -> bool:
        """Whether Picard's window on this grid reads no point that enters it (the whole grid, or one point), so
        ``fill`` does not apply."""
        return self.method == "picard" and isinstance(self.window, int) and not reads_entries(self.window, self.steps)

    def _fill_error(self, why: str) -> ValueError:
        return ValueError(f"fill: applies only to a sliding window wider than one point (1 < window < steps); "
                          f"window={self.window} on the {self.steps}-step grid never reads a point that enters it "
                          f"{why}")

    @staticmethod
    def _coarse_steps_error(why: str = "") -> ValueError:
        return ValueError(f"coarse_steps: applies only to the built-in coarse propagator; coarse= replaces it{why}")

    def _check_tol_units(self) -> None:
        """``tol_units`` names a unit; it and ``data_scale`` apply only where ``tol`` is in the sample's units (the
        ``final`` rule), not to ParaDiGMS's rule or Parareal (noise-level units)."""
        if self.tol_units is not None and (not isinstance(self.tol_units, str) or self.tol_units not in TOL_UNITS):
            raise ValueError(f"tol_units: unknown {self.tol_units!r}; allowed: {', '.join(TOL_UNITS)}")
        check_number("data_scale", self.data_scale, 0, low_open=True, none=True)
        if self.data_scale is not None and self.tol_units == "absolute":
            raise ValueError("data_scale: applies only with tol_units='data' (absolute tolerances are not scaled)")
        noise_units = self.stop == "paradigms" or self.method.startswith("parareal") or self.method == "sequential"
        for name in ("tol_units", "data_scale"):
            if getattr(self, name) is not None and noise_units:
                why = ("method='sequential' takes no tol" if self.method == "sequential" else
                       f"method={self.method!r}, stop={self.stop!r} take tol in noise-level units")
                raise ValueError(f"{name}: applies only to the final-point rule (stop='final'); {why}")
        if self.accept_tol is not None and self.stop == "paradigms":
            raise ValueError("accept_tol: applies only to the final-point rule (stop='final'); stop='paradigms' "
                             "accepts a point at tol (ParaDiGMS's rule)")

    def with_method(self, method: str, **changes: Any) -> "SamplerConfig":
        """This config with ``method`` (and ``changes``), the options of the old method that the new one does not
        read reset to their defaults (a planned or derived run, not the user's choice: nothing to refuse)."""
        fixed = dict(changes)
        for name, readers in METHOD_OPTIONS.items():
            if method not in readers:
                fixed.setdefault(name, _default(name))
        if method.startswith("parareal") or method == "sequential":
            fixed.setdefault("tol_units", None)
            fixed.setdefault("data_scale", None)
        window = fixed.get("window", self.window)
        if isinstance(window, int) and not reads_entries(window, self.steps):
            fixed.setdefault("fill", _default("fill"))    # given for the sliding candidates: this one reads no entry
        if window == 1:
            fixed.setdefault("init", _default("init"))    # given for the wider candidates: a window of 1 reads no guess
        return dataclasses.replace(self, method=method, **fixed)

    def for_devices(self, workers: int) -> "SamplerConfig":
        """This config on ``workers`` devices: ``method="staggered"`` with ``window="auto"`` gets one core per device,
        at least 2 (one core is the sequential solver) and at most ``steps`` (CHORDS' rule); others as they are (the
        planner sizes Picard's ``auto`` window)."""
        if self.method != "staggered" or self.window != "auto":
            return self
        return dataclasses.replace(self, window=max(2, min(self.steps, workers)))

    def for_model(self, declared_scale: float | None) -> "SamplerConfig":
        """The config a ``sample`` call runs with: ``tol_units`` resolved (None: ``data``) and ``data_scale`` filled
        with the model's declared scale (:func:`declared_scale`) when not given. A config that was never resolved
        (``tol_units`` None, e.g. the likelihood's flow) keeps ``tol`` absolute."""
        if self.stop != "final" or self.method.startswith("parareal") or self.method == "sequential":
            return self                   # tol in noise-level units, or none used: nothing to resolve
        units = self.tol_units or "data"
        scale = self.data_scale if self.data_scale is not None or units == "absolute" else declared_scale
        return dataclasses.replace(self, tol_units=units, data_scale=scale)

    @property
    def tol_scale(self) -> float | None:
        """What ``tol`` (``final`` rule) is multiplied by to give max-abs data units: 1 for absolute (or unresolved)
        units, ``data_scale`` for ``data`` units, None for ``data`` units with no scale (the sample's own:
        the max-abs of its final point, per sample, see :mod:`paratime.methods.picard`)."""
        return self.data_scale if self.tol_units == "data" else 1.0

    @classmethod
    def from_options(cls, **options: Any) -> "SamplerConfig":
        """The config from keyword options, refusing unknown names with the list of known ones.

        Raises:
            TypeError: an unknown option name (or any error of the constructor).
            ValueError: see the class.
        """
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            solver = options.get("solver", cls.solver)          # the hint for a solver given by name
            own = isinstance(solver, str) and solver in SOLVERS and unknown[0] in {f.name for f in
                                                                                   fields(SOLVERS[solver])}
            hint = f" ({unknown[0]} is the solver's own option: solver=make_solver({solver!r}, {unknown[0]}=...))" \
                if own else ""
            raise TypeError(f"{unknown[0]}: unknown sampling option{hint}; allowed: {', '.join(known)}")
        # A method's own option given as None is "not given" (the CLI and parallelize pass None for an option left
        # out): it takes its default (update=None: "secant") and is not refused where the method does not read it
        defaults = {f.name: f.default for f in fields(cls)}
        options = {k: v for k, v in options.items()
                   if not (v is None and k in METHOD_OPTIONS and defaults[k] is not None)}
        config = cls(**options)
        config._refuse_given_options_that_do_not_apply(options)
        return config

    def _refuse_given_options_that_do_not_apply(self, options: dict[str, Any]) -> None:
        """A method's own option given by name to a method that does not read it is an error at its default value
        too (``method="sequential", update="secant"``): the constructor sees values only, and refuses them away
        from their defaults. None is "not given" (the CLI and ``parallelize`` pass it for an option left out), and
        ``window="auto"`` is the planner's under ``method="auto"``."""
        for name, readers in METHOD_OPTIONS.items():
            value = options.get(name)
            if value is None or self.method in readers or (name == "window" and value == "auto"
                                                           and self.method == "auto"):
                continue
            raise _not_read(name, self.method, f" (given as {value!r}, the default: an option the method never reads "
                                               f"is refused at any value)")
        if options.get("coarse_steps") is not None and self.coarse is not None:
            raise self._coarse_steps_error(f" (given as {options['coarse_steps']!r}: refused at any value)")
        if options.get("fill") is not None and self._fill_unread():
            raise self._fill_error(f"(given as {options['fill']!r}: refused at any value)")

    @property
    def solver_options(self) -> dict:
        return {} if self.eta is None else {"eta": self.eta}

    @property
    def window_size(self) -> int:
        """Picard's window W: ``window``; for ``"auto"`` (before the sampler's planner chose) the widest window the
        planner considers, ``min(N, max(100, N // 2))`` (:func:`paratime.planner.rounds_cap`). Chosen from measurement
        (``benchmarks/window_sweep.py``, digits and the ``mlp`` fixture, secant update and final-point rule): up to
        100 steps the full window is needed (a window of 64 on DDIM-100 / DDPM-100 costs 1.3-1.5x the rounds);
        on DDPM-1000 a window of 500 keeps the rounds within 9% of the full window (25 against 23) for 0.66x the
        evaluations, while 250 costs 1.35x the rounds."""
        return min(rounds_cap(self.steps) if self.window == "auto" else self.window, self.steps)

    def build_solver(self) -> Solver:
        """The step map these options describe: ``solver`` with its ``eta``, wrapped in the Langevin corrector when
        ``corrector_snr`` is set."""
        solver = make_solver(self.solver, **self.solver_options)
        if self.corrector_snr is not None:
            solver = LangevinCorrected(solver, self.corrector_snr, self.corrector_steps)
        return solver

    def state_dtype_on(self, device: torch.device) -> torch.dtype:
        """The trajectory's dtype on ``device``: ``state_dtype``, by default float32 on CUDA and float64 elsewhere;
        never below float32 (a float16 / bfloat16 request is raised to float32 with a warning: a half-precision grid
        of 1000 steps has hundreds of zero-length steps; the network still runs in its own ``dtype``)."""
        state = self.state_dtype or (torch.float32 if torch.device(device).type == "cuda" else torch.float64)
        if state in (torch.float16, torch.bfloat16):
            log.warning("state_dtype: %s would collapse steps of the time grid; the state runs in float32 (the "
                        "network still runs in its own dtype, dtype=)", state)
            state = torch.float32
        return state

    def check_memory(self, shape: tuple[int, ...], device: torch.device, state_dtype: torch.dtype,
                     solver: Solver | None = None, generator=None, guided: bool | None = None) -> int:
        """The memory bound of sampling ``shape`` with these options (:func:`paratime.backends.check_memory`), before
        anything is allocated; ``solver`` defaults to :meth:`build_solver`; ``guided``: classifier-free guidance
        (each call's rows doubled, :func:`~paratime.backends.guidance_buffers`; None: this config's ``guidance``).

        Step noise: a round draws the rows it uses (a :class:`~paratime.noise.LazyNoise`) or gathers them from a
        table, one window-sized buffer per noise stream (``noise_draws``); the ``(N, B, *shape)`` tables of a
        caller's ``generator``, or of a small seeded run, count besides (:func:`paratime.noise.tabulates`, the
        rule :func:`~paratime.noise.step_noise` follows). Picard's constant-D path (``init="x0"``,
        ``fill="path"``) draws at most W rows per sample at once: one more window buffer.

        Raises:
            DeviceMemoryError: the trajectory, noise and window buffers cannot fit ``device``.
        """
        solver = self.build_solver() if solver is None else solver
        if guided is None:
            guided = cfg_active(self.guidance)
        doubled = guidance_buffers(solver) if guided else 0     # the doubled calls of classifier-free guidance
        draws = noise_draws(solver)                             # noise streams: rows drawn per round
        tables = draws if tabulates(self.steps, tuple(shape), generator) else 0   # (N, B, *shape), whole run
        # A seeded table is drawn whole, its largest stream at once (the corrector's has corrector_steps per step).
        drawing = (table_draw_bytes(self.steps * math.prod(shape) * max(1, getattr(solver, "corrector_steps", 1)))
                   if tables and generator is None else 0)
        if self.method not in _PICARD:
            # No trajectory: the states the method keeps, and its largest call's rows with a Picard point's working
            # buffers each (and its noise rows); a stochastic coarse jump's noise chunk besides.
            foot = method_footprint(self.method, self.steps, solver, self.window_size, self.slices)
            extra = drawing
            if foot.jump_rows and _noisy_jump(solver):
                extra += jump_bytes(foot.jump_rows * math.prod(shape), foot.jump_span)
            return check_memory(tuple(shape), self.steps, state_dtype, device, tables, foot.rows,
                                buffers=window_buffers("picard", solver) + draws + doubled, held=foot.held,
                                extra_bytes=extra)
        # Picard (and "auto" before the planner chose: its widest Picard window): the window buffers a round holds
        # at its peak depend on the update and the solver's kind; a history solver's D buffer is one more
        # (N + 1, B, ...) tensor.
        buffers = window_buffers(self.update, solver) + draws + int(self.uses_noise_path(solver)) + doubled
        return check_memory(tuple(shape), self.steps, state_dtype, device, tables, self.window_size,
                            buffers=buffers, point_buffers=int(solver.uses_history), extra_bytes=drawing)

    def uses_noise_path(self, solver: Solver) -> bool:
        """Whether Picard draws the constant-D path's noise (``init="x0"``, or ``fill="path"`` on a sliding window,
        for a stochastic solver that is linear in ``D``): see :mod:`paratime.methods.picard`."""
        if not _noisy_jump(solver):
            return False
        init, fill_reads_d = path_plan(self.init, self.fill, self.window_size, self.steps, self.max_rounds)
        return init == "x0" or fill_reads_d

    @property
    def tol_in_force(self) -> float:
        """``tol``, or the method's default when it is None: Picard ``DEFAULT_TOL[stop]`` (2e-3 for ``final``,
        0.1 for ``paradigms``), Parareal 0.1; 0 for ``sequential`` (exact by construction)."""
        if self.tol is not None:
            return float(self.tol)
        if self.method in ("picard", "auto"):      # auto: the tolerance the planner plans Picard for
            return DEFAULT_TOL[self.stop]
        if self.method == "staggered":
            return DEFAULT_TOL["final"]
        return PARAREAL_TOL if self.method.startswith("parareal") else 0.0


def _noisy_jump(solver: Solver) -> bool:
    """Whether the solver's constant-D path (Picard's path, the coarse jumps) carries its step noise: a stochastic
    solver linear in ``D`` and the noise (:func:`paratime.solvers.constant_d_factors`)."""
    return bool(solver.stochastic) and solver.linear_step(torch.zeros(1, dtype=torch.long),
                                                          torch.ones(2, dtype=torch.float64)) is not None


# -- the data's scale ----------------------------------------------------------------------------------------------
def declared_scale(denoiser: Denoiser) -> float | None:
    """The data scale a model declares, what ``tol_units="data"`` multiplies ``tol`` by: ``max(|lo|, |hi|)`` of the
    network's ``data_range`` attribute ``(lo, hi)`` (the zoo's digits: ``(-1, 1)``), else ``clip_x0`` (the range the
    x0 prediction is clamped to: the policy's 1, a scheduler's ``clip_sample_range``), else None (latents: the
    sampler then takes each sample's own max-abs).

    Raises:
        ValueError: a ``data_range`` that is not two finite numbers ``lo < hi``.
    """
    rng = getattr(denoiser.network, "data_range", None)
    if rng is not None:
        if (not isinstance(rng, (tuple, list)) or len(rng) != 2
                or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in rng) or not rng[0] < rng[1]):
            raise ValueError(f"data_range: the network's must be (lo, hi) with finite lo < hi, got {rng!r}")
        return float(max(abs(rng[0]), abs(rng[1])))
    return None if denoiser.clip_x0 is None else float(denoiser.clip_x0)


# -- sample-time checks -------------------------------------------------------------------------------------------
_OPTIONS = frozenset(f.name for f in fields(SamplerConfig))     # the sampler's options, for hints


def check_cond(denoiser: Denoiser, cond: dict, batch: int, device: torch.device | None = None) -> None:
    """The conditioning of a ``sample`` call, checked once before any work so the hot loop never validates: first
    the model's own rules (a network may define ``check_cond(cond, batch)`` that raises naming the bad key; the
    digits model checks its labels there), then the general ones: every tensor has the leading batch dimension
    ``batch`` and, when ``device`` is given, lives on that device type.

    Raises:
        ValueError, TypeError: from the network's hook, or naming the offending key (``uncond.encoder_hidden_states``
            for nested ones).
    """
    hook = getattr(denoiser.network, "check_cond", None)
    if callable(hook):          # a classifier's labels y= are not the network's conditioning
        try:
            hook({k: v for k, v in cond.items() if not (denoiser.classified and k == "y")}, batch)
        except ValueError as e:     # the hook names the key first: "tol: the digits model takes only labels= ..."
            key = next((k for k in cond if str(e).startswith(f"{k}:")), None)
            hint = "" if key is None else _option_hint(key)
            if not hint:
                raise
            raise ValueError(f"{e}{hint}") from e
    if "uncond" in cond:
        if not denoiser.guided:
            raise ValueError("uncond: applies only with classifier-free guidance; give guidance= too (other than 1)")
        if not isinstance(cond["uncond"], dict):
            raise TypeError(f"uncond: expected a dict of the network's keyword arguments, "
                            f"got {type(cond['uncond']).__name__}")
    if "y" in cond and not denoiser.classified:
        raise ValueError("y: applies only with classifier guidance (the classifier's labels); give classifier= and "
                         "classifier_scale= too")
    if denoiser.classified and cond.get("y") is None:
        raise ValueError("y: classifier guidance needs the class labels as y=")
    if denoiser.guided and denoiser.uncond_fn is None and "uncond" not in cond:
        raise ValueError(f"guidance: classifier-free guidance (guidance={denoiser.guidance:g}) needs unconditional "
                         f"inputs, and this model has no uncond_fn: pass uncond={{...}} or leave guidance unset")
    if not callable(hook):      # the classifier's y= again left out
        _check_network_keys(denoiser.network, {k: v for k, v in cond.items()
                                               if not (denoiser.classified and k == "y")})
    _check_tensors(cond, batch, device)


def _check_network_keys(network: Any, cond: dict) -> None:
    """A network without a ``check_cond`` hook takes as conditioning the keyword arguments its ``forward`` (or, for a
    plain callable, its signature) names: any other key (a typo, a sampler option such as ``tol=`` given to
    ``sample()``) is refused here, before any work, instead of by the network's first call after the plan and the
    noise. A signature with ``**kwargs``, or one that cannot be read, takes anything.

    Raises:
        ValueError: naming the key (``uncond.KEY`` for the unconditional inputs) and the arguments the network takes.
    """
    fn = network.forward if isinstance(network, torch.nn.Module) else network
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = [p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]   # after (x, t)
    uncond = cond.get("uncond") if isinstance(cond.get("uncond"), dict) else {}
    keys = [k for k in cond if k != "uncond"] + [f"uncond.{k}" for k in uncond]
    for key in keys:
        if key.split(".")[-1] not in named:
            raise ValueError(f"{key}: not an argument of the network, which takes "
                             f"{', '.join(n + '=' for n in named) or 'no conditioning'}{_option_hint(key)}")


def _option_hint(key: str) -> str:
    """For a conditioning key that is a sampler option (``tol=`` given to ``sample()``): where it goes; else ''."""
    name = key.split(".")[-1]
    return f"; {name} is a sampler option: ParallelSampler(..., {name}=...)" if name in _OPTIONS else ""


def _check_tensors(cond: dict, batch: int, device: torch.device | None, prefix: str = "") -> None:
    for k, v in cond.items():
        if isinstance(v, dict):
            _check_tensors(v, batch, device, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            if v.ndim == 0 or v.shape[0] != batch:
                raise ValueError(f"{prefix}{k}: conditioning tensors need a leading batch dimension of {batch}, "
                                 f"got shape {tuple(v.shape)}")
            if device is not None and v.device.type != device.type:
                raise ValueError(f"{prefix}{k}: on {v.device} but the sampler runs on {device}")
