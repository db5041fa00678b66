"""``ParallelSampler``: the public face. It owns the model, the backend and the configuration, and calls the pure
sampling methods in :mod:`paratime.methods`. Each other concern lives in one place: option checking in
:class:`~paratime.config.SamplerConfig`, per-sample noise in :mod:`paratime.noise`, counting and the NaN check in
:class:`~paratime.evaluator.Evaluator`, the progress bar in :mod:`paratime.progress`, the records in
:mod:`paratime.results`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import statistics
import time
from typing import Any, Callable

import torch

from .backends import Backend, cast_network, make_backend
from .backends.base import map_cond
from .backends.memory import PROBE_ROWS, DeviceMemoryError
from .checks import check_int
from .config import SamplerConfig, check_cond, declared_scale
from .cost import MEASURE_ROWS, CostCurve, call_gaps, make_cost, measure_cost, round_cost
from .denoiser import Denoiser
from .kernels import kernels as kernel_context, triton_missing, triton_usable
from .evaluator import Evaluator, NonFiniteOutputError
from .methods import METHODS, Problem, RoundInfo
from .methods.parareal import takes_solver
from .models import as_denoiser, model_factory, state_device
from .noise import check_seed, draws_step_noise, initial_noise, step_noise
from .planner import ALONE, TIMED_SPAN, Plan, candidates, plan_sampling
from .progress import RoundProgress, check_callback
from .results import SampleResult, SampleStats, record_rounds
from .schedules import TimeGrid
from .solvers import Solver

__all__ = ["ParallelSampler", "SamplerConfig", "SampleResult", "SampleStats", "NonFiniteOutputError"]

log = logging.getLogger("paratime")

_DENOISER_OPTIONS = ("guidance", "guidance_rescale", "classifier", "classifier_scale")


def check_kernels(kernels: str | None, state_dtype: torch.dtype, device: torch.device) -> None:
    """``kernels="triton"`` needs a state the Triton kernels run on: CUDA (or ``TRITON_INTERPRET=1`` on CPU) and
    float32, float16 or bfloat16; checked where the state's device and dtype are known, before any work.

    Raises:
        ValueError: naming ``kernels``.
    """
    if kernels != "triton" or triton_usable(torch.empty(0, dtype=state_dtype, device=device)):
        return
    # What is missing, and only that: the device, the dtype, or both (the dtype's advice was given for a float32 state)
    kind = torch.device(device).type
    on_device = kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    wants = [] if on_device else ["CUDA, or TRITON_INTERPRET=1 on CPU"]
    if state_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        wants.append("a float32, float16 or bfloat16 state (e.g. state_dtype=torch.float32)")
    raise ValueError("kernels: 'triton' " + (triton_missing() or f"cannot run on this sampler's {state_dtype} state "
                     f"on {device}: it needs {' and '.join(wants) or 'a device Triton supports'}; kernels='auto' "
                     f"falls back to torch"))


def _check_call(progress: Any, seed: Any, first_sample: Any, callback: Any) -> None:
    """A call's own arguments, before any work (the plan, a measured cost curve, the noise): ``progress`` True,
    False, or None for the sampler's own; ``seed`` and ``first_sample`` (:func:`~paratime.noise.check_seed`);
    ``callback`` a callable or None."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress: expected True, False or None (the sampler's), got {progress!r}")
    check_seed(seed, first_sample)
    check_callback(callback)


def _new_shapes(gaps: list[tuple[float, int]]) -> bool:
    """Whether a timing run's timed calls (all but the first of :func:`~paratime.cost.call_gaps`' ``(seconds,
    rows)``) bring a row count the run had not made before."""
    seen = {rows for _, rows in gaps[:1]}
    for _, rows in gaps[1:]:
        if rows not in seen:
            return True
        seen.add(rows)
    return False


def _read_together(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each tensor as ``tolist()`` gives it (exactly, in its own dtype and shape), read in one
    device-to-host copy per device (their bytes side by side); anything else as it is."""
    out = dict(values)
    groups: dict[torch.device, list[str]] = {}
    for k, v in values.items():
        if isinstance(v, torch.Tensor):
            groups.setdefault(v.device, []).append(k)
    for keys in groups.values():
        parts = [values[k].detach().contiguous().reshape(-1) for k in keys]
        parts = [p.to(torch.uint8) if p.dtype == torch.bool else p for p in parts]
        host = torch.cat([p.view(torch.uint8) for p in parts]).cpu()            # the one read
        at = 0
        for k, p in zip(keys, parts):
            n = p.numel() * p.element_size()
            v = host[at:at + n].clone().view(p.dtype).reshape(values[k].shape)   # clone: aligned for the view
            out[k] = (v.bool() if values[k].dtype == torch.bool else v).tolist()
            at += n
    return out


class ParallelSampler:
    """Sample a diffusion model sequentially or in parallel in time.

    Args:
        model: a :class:`~paratime.denoiser.Denoiser`, a registered model name (``"gmm"``, ``"digits"``,
            ``"policy"``), or a raw network ``net(x_in, t, **cond)`` together with ``schedule=`` and ``prediction=``.
        solver: ``ddim`` (default), ``ddpm``, ``euler``, ``euler_ancestral``, ``euler_maruyama``, ``heun``,
            ``dpmpp_2m``, ``dpmpp_3m``, ``dpmpp_2m_sde``, ``plms``, ... or a :class:`~paratime.solvers.Solver`.
        backend: ``local`` (default), ``torch``, ``ray``, or a :class:`~paratime.backends.Backend`.
        backend_options: keyword arguments for the backend's constructor (``workers``, ``max_batch``, ...).
        decoder: latent diffusion: ``decoder(latents) -> images``, or a VAE with ``.decode`` (diffusers
            ``AutoencoderKL``), applied after sampling to ``samples / latent_scale``.
        progress: show progress over the time points (a tqdm bar on a terminal, a line every 5 s otherwise).
        kernels: run this sampler's calls in kernel mode ``auto``, ``torch`` or ``triton`` (see
            :func:`paratime.kernels.kernels`); default: the mode in force where ``sample`` is called.
        **options: every other option is a field of :class:`~paratime.config.SamplerConfig`, checked there once:
            the method (``steps``, ``method``: a name or ``auto``, ``window``: an integer or ``auto``, the
            default, ``cost``: the cost curve the planner and the SCE figures use, see :mod:`paratime.planner`
            and :mod:`paratime.cost`; ``tol``, ``stop``, ``update``, ``max_rounds``,
            ``shared_window``, ``spacing``, ``eta``; Parareal's ``slices``, ``coarse_steps``, ``coarse``),
            precision and placement (``dtype``: the network's dtype, default its parameters'; ``state_dtype``:
            the trajectory's, default float64 on CPU and float32 on CUDA, never below float32; ``device``), the
            model adapter for a raw network (``schedule``, ``prediction``, ``clip_x0``), guidance (``guidance``,
            ``guidance_rescale``, ``classifier``, ``classifier_scale``), ``latent_scale`` (Stable Diffusion:
            0.18215) and the Langevin corrector (``corrector_snr``, ``corrector_steps``).

    Raises:
        ValueError, TypeError: any bad option, naming it.
    """

    def __init__(self, model: Denoiser | str | Callable, solver: str | Solver = "ddim", *,
                 backend: str | Backend = "local", backend_options: dict | None = None,
                 decoder: Callable | None = None, progress: bool = True, kernels: str | None = None,
                 **options: Any):
        self.config = cfg = SamplerConfig.from_options(solver=solver, **options)   # the one entry check
        if decoder is not None and not (callable(decoder) or callable(getattr(decoder, "decode", None))):
            raise TypeError(f"decoder: expected a callable or an object with a callable .decode, "
                            f"got {type(decoder).__name__}")
        if cfg.latent_scale is not None and decoder is None:
            raise ValueError("latent_scale: applies only with a decoder (latents are divided by it before decoding)")
        if not isinstance(progress, bool):
            raise TypeError(f"progress: expected True or False, got {progress!r}")
        if kernels not in (None, "auto", "torch", "triton"):
            raise ValueError(f"kernels: unknown {kernels!r}; allowed: auto, torch, triton (or None)")
        self.decoder, self.progress, self.kernels, self.latent_scale = decoder, progress, kernels, cfg.latent_scale
        denoiser_options = {k: getattr(cfg, k) for k in _DENOISER_OPTIONS if getattr(cfg, k) is not None}
        # The network runs in its own dtype: weights cast to `dtype` (in place for a model loaded by name).
        self.denoiser = cast_network(as_denoiser(model, cfg.schedule, cfg.prediction, cfg.clip_x0, cfg.dtype,
                                                 **denoiser_options), inplace=isinstance(model, str))
        self.solver = cfg.build_solver()
        self.device = state_device(self.denoiser, cfg.device)
        self.state_dtype = cfg.state_dtype_on(self.device)
        check_kernels(kernels, self.state_dtype, self.device)
        # The kernels' module (and Triton) load on first use: here, so no sample() call's wall time carries it (the
        # first call's noise draw took 0.14 s of a 0.15 s gmm run before, and a --compare speed-up read 0.015).
        triton_usable(torch.empty(0, device=self.device))
        self.grid: TimeGrid = self.denoiser.schedule.grid(cfg.steps, cfg.spacing)
        self.solver.check_grid(self.grid.sigmas)
        if backend_options is not None and not isinstance(backend_options, dict):
            raise TypeError(f"backend_options: expected a dict of the backend's options, "
                            f"got {type(backend_options).__name__}")
        if isinstance(backend, str) and backend == "ray" and isinstance(model, str):
            # Actors build a named model themselves instead of receiving the weights through the object store.
            backend_options = {"model": model_factory(model), **(backend_options or {})}
        self.backend = make_backend(backend, **(backend_options or {}))
        try:
            self.backend.bind(self.denoiser)
        except BaseException:
            if not isinstance(backend, Backend):    # made here: nobody else holds it to close (workers, Ray)
                self.backend.close()
            raise

    # -- sampling -------------------------------------------------------------------------------------------------
    def sample(self, shape: tuple[int, ...] | int | None = None, *, noise: torch.Tensor | None = None,
               seed: int | None = None, generator: torch.Generator | None = None, first_sample: int = 0,
               callback: Callable[[RoundInfo], None] | None = None, progress: bool | None = None,
               **cond: Any) -> SampleResult:
        """Draw samples.

        Args:
            shape: ``(B, *sample_shape)``, or ``B`` when the model knows its sample shape; or give ``noise``.
            noise: ``(B, *sample_shape)`` standard-normal initial noise (scaled here by the schedule's prior std).
                With a deterministic solver nothing else is drawn: ``seed``, ``first_sample`` and ``generator``
                are then errors (they would be unused); with a stochastic one they draw the step noise.
            seed: noise seed (None: 0); sample ``i`` (global index ``first_sample + i``) gets noise from
                ``(seed, i)`` only.
            generator: draw all noise from this generator instead (layout-dependent: no longer per sample); an
                error together with ``seed`` or ``first_sample``, which it would leave unused.
            first_sample: global index of the first sample, to split one seed's batch across calls.
            callback: called with a :class:`~paratime.methods.RoundInfo` after every round.
            progress: override the sampler's ``progress`` for this call.
            **cond: conditioning for the network; tensors with a leading batch dimension ``B`` follow their sample.
        Returns:
            :class:`SampleResult`.
        Raises:
            ValueError, TypeError: bad ``shape``, ``noise``, ``seed`` or conditioning, naming the argument.
            NonFiniteOutputError: the network produced NaN or inf.
        """
        _check_call(progress, seed, first_sample, callback)
        if generator is not None and seed is not None:
            raise ValueError("seed: applies only without generator= (the generator draws all the noise)")
        if generator is not None and first_sample != 0:
            raise ValueError("first_sample: applies only without generator= (a generator's noise is not indexed "
                             "per sample)")
        if noise is not None and not self.draws_step_noise:
            for name, unused in (("seed", seed is not None), ("first_sample", first_sample != 0),
                                 ("generator", generator is not None)):
                if unused:
                    raise ValueError(f"{name}: applies only when noise is drawn here; with noise= and the "
                                     f"deterministic solver {self.solver.name or type(self.solver).__name__} "
                                     f"nothing is")
        seed, first_sample = 0 if seed is None else int(seed), int(first_sample)   # a numpy integer as a Python one
        kw = dict(dtype=self.state_dtype, device=self.device)
        t_noise = time.perf_counter()           # drawing the noise is part of the wall time
        planned = {}

        def fits(full_shape):
            # Before the noise and trajectory exist: the conditioning, the plan (method and window from the cost
            # model), and the memory bound of the planned method.
            check_cond(self.denoiser, cond, full_shape[0], self.device)   # the model's rules, shapes
            t_plan = time.perf_counter()
            (planned["cfg"], planned["plan"], planned["curve"], planned["overhead"],
             planned["limit"]) = self._plan(full_shape, cond)
            planned["plan_s"] = time.perf_counter() - t_plan
            self._check_memory_agreed(planned["cfg"], full_shape, generator)

        x_T = initial_noise(shape, noise, seed, generator, first_sample, self.denoiser.sample_shape, **kw,
                            check=fits)
        cfg, plan, curve, overhead = planned["cfg"], planned["plan"], planned["curve"], planned["overhead"]
        cfg = cfg.for_model(declared_scale(self.denoiser))   # tol_units resolved, the model's data scale
        B = x_T.shape[0]
        # The step noise: drawn row by row where the method uses it (seeded), or whole tables (a generator's, or
        # small ones: noise.tabulates).
        z = step_noise(self.solver, cfg.steps, x_T.shape, seed, generator, first_sample, **kw)
        x_T = x_T * self.denoiser.schedule.prior_std(self.grid.sigmas[:1]).to(**kw)
        # The plan's measurements (a cost curve, candidates' timing runs: once per shape, then cached) are not the
        # sample's time: stats.extra["plan_s"] reports them.
        t_noise = time.perf_counter() - t_noise - planned["plan_s"]
        grid = self.grid

        def solve(evaluate, on_round):
            outputs = evaluate.outputs if evaluate.fusable else None
            return METHODS[cfg.method](x_T, self._problem(evaluate, z, on_round, outputs, kw), cfg)

        desc = f"{cfg.method}/{self.solver_label}"
        if plan is not None:
            # cost="auto" off CUDA plans on the latency curve without timing anything: the bar says it is assumed.
            assumed = " assumed, cost='measure' times it" if cfg.cost == "auto" and curve.name != "measured" \
                else ""
            desc = f"{plan.method}{'' if plan.window is None else f' W={plan.window}'}/{self.solver_label} " \
                   f"(plan: {plan.speedup:.2f}x predicted on {plan.devices} device(s), {curve.name} cost{assumed})"
        marks: list[tuple[int, float]] = []
        alone = plan is not None and plan.alone           # every rank samples the whole batch by itself
        backend = self._backend_for(alone)
        outcome, evaluator, wall = self._run(solve, grid, cond, B, first_sample, desc, callback, progress, marks,
                                             backend)
        samples = outcome.x * grid.frame_scales[-1].to(outcome.x)
        stats = self._stats(outcome, evaluator, wall + t_noise, B, cfg)
        stats.extra["noise_s"], stats.extra["plan_s"] = t_noise, planned["plan_s"]
        # Rounds priced as the plan priced them: with the ranks' agreed rows per call (the rank with the smallest
        # waits longest; the plan's, else agreed now, once the run's first call derived it); a rank sampling alone
        # with its own.
        limit = backend.batch_limit() if alone else planned["limit"] or self._chunking()["limit"]
        record_rounds(stats, evaluator.call_rows, marks, wall, curve, 1 if alone else self.backend.workers, plan,
                      overhead, limit, backend.buckets)
        latents = None
        if self.decoder is not None:
            latents, samples = samples, self.decode(samples)
        return SampleResult(samples, stats, latents)

    @property
    def solver_label(self) -> str:
        """The solver's name as the stats and the progress bar give it (:attr:`Solver.label`): ``ddim+langevin``
        for a base solver with the Langevin corrector (``corrector_snr=``)."""
        return self.solver.label

    @property
    def draws_step_noise(self) -> bool:
        """Whether the solver consumes per-step noise (drawn from ``seed`` / ``first_sample`` or a generator; with
        ``noise=`` given and no step noise, those are errors)."""
        return draws_step_noise(self.solver)

    def _plan(self, shape: tuple[int, ...], cond: dict) -> tuple[SamplerConfig, Plan | None, CostCurve, float,
                                                                 int | None]:
        """The config this call runs: for ``method="auto"`` or Picard with ``window="auto"``, the planner's method
        and window (:mod:`paratime.planner`) for ``K = backend.workers`` devices and the batch of ``shape``; else
        the sampler's config as is. With a measured cost curve the planner also prices each candidate's work per
        call outside the network (:meth:`overheads`). Returns ``(config, plan or None, cost curve, the run's
        overhead per call in seconds or 0, the ranks' agreed rows per call where planning or measuring read it,
        else None)``."""
        cfg = self.config.for_devices(self.backend.workers)        # staggered's cores
        planning = cfg.method in ("auto", "picard") and cfg.window == "auto"
        if planning or self._measures():
            self._derive_limit(shape, cond)
        curve = self._cost_curve(shape, cond)
        measured = curve.name == "measured"
        # The ranks' agreed rows per call, read once: the plan, its timed runs and their pricing all use it.
        chunking = self._chunking() if planning or measured else None
        if not planning:
            own = [("run", cfg.method, cfg.window_size if cfg.method == "picard" else None)]
            if not measured:
                return cfg, None, curve, 0.0, None
            return cfg, None, curve, self.overheads(shape, cond, curve, own, chunking["limit"])["run"], \
                chunking["limit"]
        # Parareal takes tol in noise-level units: not a candidate when the tolerance was given in data units, nor
        # for a solver reading more than one previous D (Parareal carries one across a slice boundary).
        methods = tuple(m for m in METHODS if not (m.startswith("parareal") and (
            cfg.tol_units is not None or cfg.data_scale is not None or not takes_solver(self.solver))))
        # Each rank sampling by itself needs the model on every rank: an SPMD backend's.
        alone = self.backend.name == "torch" and self.backend.workers > 1
        # Candidates that cannot fit the device are neither timed nor planned (a narrower window may fit); when none
        # fits, all are planned and the chosen one's memory check names what does not fit.
        every = candidates(cfg.steps, self.backend.workers, cfg.method, methods, alone)
        # A candidate fits when it fits every rank's device (free memory can differ: the ranks must plan alike).
        unfit = self._agree([0.0 if self._fits(shape, *p[1:]) else 1.0 for p in every])
        plans = [p for p, u in zip(every, unfit) if not u] or every
        args = (curve, cfg.steps, shape[0], self.backend.workers, cfg.tol_in_force)
        # The step to sigma = 0 makes one call (Heun's second and a corrector's skip it); the grid is on the host.
        evals = self.solver.evals_per_step
        kw = dict(method=cfg.method, evals=evals, last_evals=1 if float(self.grid.sigmas[-1]) == 0 else evals,
                  methods=methods, alone=alone, stochastic=bool(self.solver.stochastic),
                  skip=[p[0] for p in every if p not in plans], **chunking)
        overhead = None
        if measured:
            overhead = self._priced(shape, cond, curve, plans, plan_sampling(*args, **kw), kw["limit"])
        plan = plan_sampling(*args, overhead=overhead, **kw)
        log.info("plan: %s", plan.reason)
        # Another method planned: Picard's own options (given for the Picard candidate) do not carry over.
        return cfg.with_method(plan.method, window=plan.window or "auto"), plan, curve, plan.overhead_s, \
            chunking["limit"]

    def _priced(self, shape: tuple[int, ...], cond: dict, curve: CostCurve, plans: list[tuple[str, str, int | None]],
                bare: Plan, limit: int | None) -> dict[str, float]:
        """Each candidate's work per call outside the network (:meth:`overheads`): timed for sequential sampling
        (the baseline) and the candidates whose network time alone (``bare``, the plan without it) is within
        :data:`~paratime.planner.TIMED_SPAN` of the best; the others, already far behind, get the largest value
        timed."""
        best = min(bare.candidates.values())
        near = [p for p in plans if p[1] == "sequential" or bare.candidates[p[0]] <= TIMED_SPAN * best]
        overhead = self.overheads(shape, cond, curve, near, limit=limit)
        rest = max(0.0, *overhead.values())
        return {**{p[0]: rest for p in plans}, **overhead}

    def overheads(self, shape: tuple[int, ...], cond: dict, curve: CostCurve,
                  plans: list[tuple[str, str, int | None]], limit: int | None = None) -> dict[str, float]:
        """Per plan ``(label, method, window)``, the seconds of each network call's work outside the network, which
        a cost curve does not hold: the method's own work between two calls, the backend's dispatch, transfers and
        gather, and the wait for the slowest worker. Measured by running the plan for a few calls on the real
        network and backend, with this sampler's options, batch and shape (:meth:`_outside_seconds`; each call's
        network time priced at ``limit`` rows a call, the ranks' agreed one, or None: this backend's); once per
        plan, shape and options (cached on the sampler); under torch.distributed the ranks agree on the slowest
        rank's. On a GPU with a large model these are small beside ``c(1)``; on a CPU, or with a small model (a
        policy), they decide between a window and sequential sampling."""
        cache = self.__dict__.setdefault("_overhead_cache", {})
        keys = [(label, method, window, tuple(shape), repr(self.config)) for label, method, window in plans]
        todo = [k for k in keys if k not in cache]
        if todo:
            values = [self._outside_seconds(shape, cond, curve, method, window, label == ALONE, limit)
                      for label, method, window, *_ in todo]
            cache.update(zip(todo, self._agree(values)))
        return {k[0]: cache[k] for k in keys}

    def _outside_seconds(self, shape: tuple[int, ...], cond: dict, curve: CostCurve, method: str,
                         window: int | None, alone: bool, limit: int | None = None) -> float:
        """One plan's work per call outside the network: the plan run from seeded noise on the real network through
        its backend for :data:`~paratime.cost.OVERHEAD_CALLS` calls (:func:`~paratime.cost.call_gaps`; again where
        those calls brought new shapes), each call's time to the next less the curve's time for
        its rows on one device's share; the median over the calls after the first. Negative where the curve, timed call
        by call on its own, ran slower than the plan's calls do (on a busy CPU, 2 gloo ranks measured c(1) at 2 ms
        where their steps took 1.2 ms): the prediction then follows the plan's own calls."""
        kw = dict(dtype=self.state_dtype, device=self.device)
        cfg = self._candidate(method, window)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(**kw)
        z = step_noise(self.solver, cfg.steps, shape, 0, None, 0, **kw)
        g, backend = self.grid, self._backend_for(alone)

        def run(stamp):
            evaluator = Evaluator(backend, g, shape[0], self.device)       # a fresh one a run: nothing carried over

            def evaluate(x, i, b):
                stamp(x.shape[0])
                return evaluator(x, i, b)

            def outputs(x, i, b):
                stamp(x.shape[0])
                return evaluator.outputs(x, i, b)

            # As sample() runs it: the fused path where the denoiser allows, in the sampler's kernel mode.
            problem = self._problem(evaluate, z, None, outputs if evaluator.fusable else None, kw)
            METHODS[cfg.method](x * self.denoiser.schedule.prior_std(g.sigmas[:1]).to(**kw), problem, cfg)

        # A new call shape's first call pays once for what a sampler's run of such calls does not (memory the
        # allocator grows, kernels picked for the shape): timed cold, an SD-1.5 UNet's Picard W=50 on an H100 (7
        # rounds of shrinking windows, each round a new shape) was predicted at 3.6 s where it ran in 1.0 s. So a run
        # whose timed calls (all but the first) bring a shape it had not made before runs again, and the second run,
        # whose every shape the first made, is timed. The rows a call holds follow the method's decisions, the same on
        # every rank, so every rank runs again or none.
        backend.prepare(cond)
        try:
            with self._kernel_mode(), torch.no_grad():
                gaps = call_gaps(run, self.device)
                if _new_shapes(gaps):
                    gaps = call_gaps(run, self.device)
        finally:
            backend.release()
        # The ranks' agreed limit (given): a rank with a larger one waits for the chunks of the rank with the
        # smallest, which is network time, not this rank's work outside it. Without one (a direct call), this
        # backend's own.
        limit = limit or backend.batch_limit()
        outside = [t - round_cost(curve, rows, backend.workers, limit, backend.buckets)
                   for t, rows in gaps[1:]] or [0.0]
        return statistics.median(outside)

    def _problem(self, evaluate: Callable, z, on_round: Callable | None, outputs: Callable | None,
                 kw: dict) -> Problem:
        """The trajectory a method computes on this sampler's grid (``kw``: the state's dtype and device)."""
        g = self.grid
        return Problem(g.sigmas.to(**kw), g.ancestral_std().to(**kw), g.frame_scales.to(**kw), self.solver,
                       evaluate, z, on_round, outputs)

    def _candidate(self, method: str, window: int | None) -> SamplerConfig:
        """The config a planned candidate runs: this sampler's on K devices with ``method`` and ``window`` (the
        options the method does not read reset), the model's data scale resolved."""
        cfg = self.config.for_devices(self.backend.workers)
        if method != cfg.method or window not in (None, cfg.window_size):
            cfg = cfg.with_method(method, **({"window": window} if window is not None else {}))
        return cfg.for_model(declared_scale(self.denoiser))

    def _fits(self, shape: tuple[int, ...], method: str, window: int | None) -> bool:
        """Whether a candidate's memory bound fits the device (:meth:`SamplerConfig.check_memory`, seeded noise)."""
        try:
            self._candidate(method, window).check_memory(shape, self.device, self.state_dtype, self.solver,
                                                         guided=self.denoiser.guided)
        except DeviceMemoryError:
            return False
        return True

    def _backend_for(self, alone: bool) -> Backend:
        """The backend a run evaluates through: the sampler's, or for a plan that samples on each rank by itself
        (:data:`~paratime.planner.ALONE`), a local backend bound to this rank's copy of the model (made once)."""
        if not alone:
            return self.backend
        local = self.__dict__.get("_alone")
        if local is None or local.denoiser is not self.backend.denoiser:
            local = self.__dict__["_alone"] = make_backend("local", max_batch=self.backend.max_batch,
                                                           buckets=self.backend.buckets)
            local.bind(self.backend.denoiser)
        return local

    def _kernel_mode(self):
        """The context the sampler's network calls and steps run in: its kernel mode (``kernels=``), if any."""
        return contextlib.nullcontext() if self.kernels is None else kernel_context(self.kernels)

    def _derive_limit(self, shape: tuple[int, ...], cond: dict) -> None:
        """Where this process's backend derives its rows per call at its first call (CUDA, no ``max_batch``) and has
        not yet: derive them now, with one call of :data:`~paratime.backends.memory.PROBE_ROWS` rows of sample 0's
        conditioning through :meth:`Backend.run_chunked`. The first ``sample()`` then plans and prices with the
        limit its calls will use, as later ones do (it planned without one: on a cost table, a window of 20 was
        predicted at 9 s and priced at 147 s by its own stats, and the next call of the same sampler planned
        sequential sampling, another sample)."""
        if self.backend.name not in ("local", "torch") or self.backend.batch_limit(self.device) is not None:
            return
        with self._kernel_mode(), torch.no_grad():
            self.backend.run_chunked(*self._probe_rows(shape, cond, PROBE_ROWS))

    def _probe_rows(self, shape: tuple[int, ...], cond: dict, r: int) -> tuple:
        """``(x, sigma, model_time, cond)`` of ``r`` rows for a call that measures (the cost curve's timed calls,
        the backend's memory probe): seeded noise of ``shape``'s sample shape on the state device, at the grid's
        middle step, with sample 0's conditioning."""
        mid, first = self.grid.steps // 2, torch.zeros(1, dtype=torch.long)
        x = torch.randn((r, *shape[1:]), generator=torch.Generator().manual_seed(0)).to(self.device, self.state_dtype)
        rows = map_cond(cond, lambda v: v[first.to(v.device)].expand(r, *v.shape[1:]))
        return x, self.grid.sigmas[mid].to(x).expand(r), self.grid.model_times[mid].to(x).expand(r), rows

    def _chunking(self) -> dict:
        """How the backend splits a call, for the planner: ``limit``, its rows per network call in force (known
        ahead off CUDA; on CUDA derived at the first call when no ``max_batch`` was given, None before), the
        smallest over the ranks under torch.distributed (a limit derived from each device's free memory can differ,
        and the ranks must plan alike); ``buckets``, its fixed shapes or None."""
        limit = self.backend.batch_limit(self.device)
        least = -self._agree([-float(limit or math.inf)])[0]
        return {"limit": None if math.isinf(least) else int(least), "buckets": self.backend.buckets}

    def _check_memory_agreed(self, cfg: SamplerConfig, shape: tuple[int, ...], generator) -> None:
        """``cfg``'s memory bound on this rank's device (:meth:`SamplerConfig.check_memory`), and under
        torch.distributed on every rank's: a rank whose device cannot fit raises its own error, and the others
        raise too (alone, the others would start the first round and wait in its collective until ``timeout_s``).

        Raises:
            DeviceMemoryError: this rank's device, or another rank's, cannot fit the call."""
        try:
            cfg.check_memory(shape, self.device, self.state_dtype, self.solver, generator=generator,
                             guided=self.denoiser.guided)
            mine = None
        except DeviceMemoryError as e:
            mine = e
        if self._agree([0.0 if mine is None else 1.0])[0] and mine is None:
            raise DeviceMemoryError(f"another rank's device cannot fit this call of {tuple(shape)} with method "
                                    f"{cfg.method} (that rank's error names what to reduce); this rank's "
                                    f"{self.device} can")
        if mine is not None:
            raise mine

    def _agree(self, values: list[float]) -> list[float]:
        """Under torch.distributed, every rank's maximum of each value (so that every rank plans alike); else the
        values as they are."""
        if self.backend.workers <= 1 or self.backend.name != "torch":
            return values
        return self.backend.agree_max(values)

    def _measures(self) -> bool:
        """Whether ``cost=`` times the network here: ``measure``, or ``auto`` on CUDA."""
        return self.config.cost == "measure" or (self.config.cost == "auto" and self.device.type == "cuda")

    def _cost_curve(self, shape: tuple[int, ...], cond: dict) -> CostCurve:
        """The cost curve of ``cost=``: ``auto`` measures on CUDA and takes the ``latency`` curve elsewhere (the
        assumption today's wide default window was sized for; deterministic, so tests and ranks plan alike);
        ``measure`` times calls of 1, 2, 4, ... rows of sample 0's conditioning on the state device, up to 64 and the
        backend's rows per call in force (cached per model, device, dtype and shape; under torch.distributed the
        ranks agree on the slowest rank's curve)."""
        if not self._measures():
            return make_cost("latency" if self.config.cost == "auto" else self.config.cost)
        den = self.denoiser

        def call(r: int):
            x, sigma, t, rows = self._probe_rows(shape, cond, r)
            with torch.no_grad():
                den(x, sigma, t, **rows)

        # Never a call wider than the backend's limit in force (a call here is not chunked).
        limit = self.backend.batch_limit()
        rows = tuple(r for r in MEASURE_ROWS if limit is None or r <= limit)
        # A call's cost on the same network also depends on the guidance (twice the rows), a classifier's gradient
        # and the conditioning's shapes: each its own curve.
        variant = (den.guided, den.classified,
                   tuple(sorted((k, tuple(v.shape[1:])) for k, v in cond.items() if torch.is_tensor(v))))
        curve = measure_cost(den.network, call, self.device, den.network_dtype, tuple(shape[1:]), rows,
                             variant=variant)
        # Every rank plans from the same curve: the row counts every rank could time (one stopped short of memory,
        # measure_rows), the slowest rank's time at each.
        n = int(-self._agree([-float(len(curve.rows))])[0])
        return CostCurve(curve.rows[:n], tuple(self._agree(list(curve.seconds[:n]))), curve.name)

    def _run(self, solve: Callable, grid: TimeGrid, cond: dict, B: int, first_sample: int, desc: str,
             callback: Callable[[RoundInfo], None] | None, progress: bool | None,
             marks: list[tuple[int, float]] | None = None, backend: Backend | None = None):
        """What every solve shares: ``solve(evaluate, on_round)`` runs with the conditioning placed on ``backend``
        (default the sampler's), the evaluator's counting and NaN check (read once per round), the progress bar, the
        kernel mode and the wall clock; ``marks`` (when given) gets ``(network calls so far, seconds since the
        start)`` at every round.
        Returns ``(solve's result, evaluator, wall seconds)``."""
        backend = self.backend if backend is None else backend
        evaluator = Evaluator(backend, grid, B, self.device, first_sample)
        show = (self.progress if progress is None else progress) and self.backend.is_primary
        modes = self._kernel_mode()

        def on_round(info: RoundInfo):
            evaluator.check()
            if marks is not None:
                marks.append((evaluator.calls, time.perf_counter() - t0))
            bar(info)

        backend.prepare(cond)
        t0 = time.perf_counter()
        try:
            # the network's autograd graph is never needed (classifier guidance re-enables it)
            with RoundProgress(grid.steps, desc, show, callback) as bar, modes, \
                    torch.no_grad():
                result = solve(evaluator, on_round)
            evaluator.check(wait=True)       # the run's one waiting NaN check
        finally:
            backend.release()
        return result, evaluator, time.perf_counter() - t0

    def _stats(self, outcome, evaluator: Evaluator, wall: float, B: int,
                cfg: SamplerConfig | None = None) -> SampleStats:
        cfg = self.config if cfg is None else cfg
        timings = self.backend.timings
        extra = dict(outcome.extra)
        # The per-sample records in one device read per device (on CUDA a read is a host sync: read sample by
        # sample, a batch of 8 made 8).
        host = _read_together({"rows": evaluator.rows, "sample_rounds": outcome.sample_rounds,
                              "data_scale": extra.pop("data_scale", None), "tol_abs": extra.pop("tol_abs", None),
                              "rolled_back": extra.get("rolled_back")})
        rows = host["rows"]
        stats = SampleStats(
            method=cfg.method, solver=self.solver_label, steps=cfg.steps, backend=self.backend.name,
            workers=self.backend.workers, window=cfg.window_size if cfg.method in ("picard", "staggered") else None,
            tol=cfg.tol_in_force,
            rounds=evaluator.calls + extra.pop("coarse_calls", 0), iterations=outcome.rounds,
            nfe=sum(rows) / len(rows), nfe_total=int(sum(rows)), wall_s=wall, residuals=outcome.residuals,
            sample_rounds=[int(r) for r in host["sample_rounds"]], comm_s=timings.get("comm_s", 0.0), extra=extra)
        stats.converged = extra.pop("converged", [True] * B)
        # The final-point rule's tolerance: its units, and per sample the scale and the tolerance in data units.
        stats.tol_units = cfg.tol_units if cfg.method in ("picard", "staggered") and cfg.stop == "final" else None
        stats.data_scale, stats.tol_abs = host["data_scale"], host["tol_abs"]
        # Picard's final rule: per sample, whether rolled back
        if isinstance(extra.get("rolled_back"), torch.Tensor):
            stats.extra["rolled_back"] = host["rolled_back"]
        if "comm_bytes" in timings:
            stats.extra["comm_bytes"] = timings["comm_bytes"]
        return stats

    def decode(self, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Decode latents with the sampler's decoder, ``batch`` at a time, after dividing by ``latent_scale``.

        Raises:
            ValueError: the sampler has no decoder.
        """
        if self.decoder is None:
            raise ValueError("decoder: this sampler has none; pass decoder= to ParallelSampler")
        check_int("batch", batch, 1)
        z = latents / (self.latent_scale or 1.0)
        dec = self.decoder.decode if callable(getattr(self.decoder, "decode", None)) else self.decoder
        weights = next(self.decoder.parameters(), None) if isinstance(self.decoder, torch.nn.Module) else None
        dtype = z.dtype if weights is None else weights.dtype
        outs = []
        with torch.inference_mode():
            for s in range(0, z.shape[0], batch):
                out = dec(z[s:s + batch].to(dtype))
                outs.append(out.sample if hasattr(out, "sample") else out)
        return torch.cat(outs)

    # -- likelihood -----------------------------------------------------------------------------------------------
    def log_likelihood(self, x: torch.Tensor, *, solver: str | None = None, steps: int | None = None,
                       method: str | None = None, divergence: str = "exact", probes: int = 1,
                       probe: str | None = None, seed: int | None = None, first_sample: int = 0,
                       data_range: tuple[float, float] | None = None, levels: int | None = None,
                       dequantize: bool = False, callback: Callable[[RoundInfo], None] | None = None,
                       progress: bool | None = None, **cond: Any):
        """Exact log-likelihood of data through the probability-flow ODE, solved with this sampler's method (the
        maths, the augmented state and the bits/dim convention: :mod:`paratime.methods.likelihood`).

        Args:
            x: ``(B, *sample_shape)`` clean data in the model's data space.
            solver: ``euler`` or ``heun``; default the sampler's own solver (deterministic ``ddim`` is ``euler``).
            steps: ODE steps (default the sampler's); the grid is the positive part of the ``(steps + 1)``-step
                sampling grid with the sampler's ``spacing``, traversed from ``sigma_min`` to ``sigma_max`` (on a
                discrete schedule of T timesteps, at most T - 1).
            method: ``sequential``, ``picard``, ``parareal`` or ``parareal_pipelined`` (default the sampler's), with
                the sampler's ``window``, ``tol``, ``max_rounds``, ``slices`` and ``coarse_steps``. Picard's final
                rule reads ``tol`` as an absolute bound on the max |change| of the flow's end state in the model frame
                (``stats.tol_units`` is ``absolute``), not relative to a data scale: x_T's coordinates and the
                log-density change over ``sqrt(n)`` (the augmented coordinate, module notes of
                :mod:`paratime.methods.likelihood`), so the log-density's own change up to ``tol * sqrt(n)`` nats,
                ``tol / (sqrt(n) log 2)`` bits/dim.
            divergence: ``exact`` (n vector-Jacobian products per evaluation) or ``hutchinson``.
            probes, probe: Hutchinson's probes per sample and their kind (``rademacher``, the default, or
                ``gaussian``); they depend on ``(seed, first_sample + i)`` only and are shared by every time point.
                Refused with ``divergence="exact"``.
            seed, first_sample: as for :meth:`sample` (seed None: 0); the draws are Hutchinson's probes and the
                dequantisation noise, so ``seed`` is refused with neither ``divergence="hutchinson"`` nor
                ``dequantize``.
            data_range: finite ``(lo, hi)`` the data lie in (values outside raise); with ``levels`` it sets the
                quantisation bin of bits/dim. Default ``(-clip_x0, clip_x0)`` when the model clips, else none.
            levels: quantisation levels spanning ``data_range`` (default 256, 8-bit images); needs a data range.
            dequantize: add uniform noise of one bin to ``x`` (per sample and seed) before the solve.
            callback, progress: as for :meth:`sample`.
            **cond: conditioning for the network, as for :meth:`sample`.
        Returns:
            :class:`~paratime.methods.likelihood.LikelihoodResult` (``nats``, ``bits_per_dim``, ``stats``, ...).
        Raises:
            ValueError, TypeError: bad data or option, naming it (the sampler's solver when it is no ODE solver and
                ``solver`` is not given). DeviceMemoryError: the batch of ``x`` cannot fit the device (checked
                before anything is allocated). NonFiniteOutputError: the network produced NaN.
        """
        from .methods import likelihood as lk
        from .noise import draw_noise

        _check_call(progress, seed, first_sample, callback)
        if data_range is None and self.denoiser.clip_x0 is not None:
            data_range = (-self.denoiser.clip_x0, self.denoiser.clip_x0)
        solver = lk.flow_solver_for(self.solver) if solver is None else solver
        flow_method = self.config.method if method is None else method
        if flow_method in METHODS and flow_method not in lk.FLOW_METHODS:     # (an unknown name: the config's error)
            given = "" if method is not None else " (this sampler's; give method=)"
            raise ValueError(f"method: the likelihood ODE takes {', '.join(lk.FLOW_METHODS)} or auto, not "
                             f"{flow_method!r}{given}")
        # The flow's config: the sampler's method options with the ODE solver (an unknown `solver` is named by
        # check_request with the flow's choices, so the config holds a placeholder until then).
        cfg = self.config.with_method(flow_method,
                                      solver=solver if solver in lk.FLOW_SOLVERS else "ddim", eta=None,
                                      corrector_snr=None, corrector_steps=1,
                                      steps=self.config.steps if steps is None else steps)
        if cfg.method == "auto":           # the flow has no planner: "auto" runs Picard with its widest window
            cfg = dataclasses.replace(cfg, method="picard")
        # The final rule's tol is absolute here: a max |change| of the flow's end state (x_T, and the log-density
        # change over sqrt(n)), not relative to a data scale (the sampler's tol_units / data_scale are sample()'s).
        final = cfg.method == "picard" and cfg.stop == "final"
        cfg = dataclasses.replace(cfg, tol_units="absolute" if final else None, data_scale=None)
        lk.check_request(x, self.denoiser.sample_shape, self.device, data_range, levels, solver, divergence, probe,
                         probes, dequantize, cond, cfg, seed, first_sample)
        seed, first_sample = 0 if seed is None else int(seed), int(first_sample)   # a numpy integer as a Python one
        kw = dict(dtype=self.state_dtype, device=self.device)
        B, n = x.shape[0], x[0].numel()
        grid = lk.likelihood_grid(self.denoiser.schedule, cfg.steps, cfg.spacing)
        N = grid.steps                                   # ODE steps: the problem's points are the grid's
        self._check_likelihood_memory(cfg, B, n)         # before the data, probes and trajectory are allocated
        x = x.to(**kw)
        bin = lk.bin_width(data_range, 256 if levels is None else levels)
        if dequantize:
            x = lk.dequantise(x, draw_noise(seed, B, x.shape[1:], None, lk.DEQUANT_STREAM, first_sample, **kw), bin)
        check_cond(self.denoiser, cond, B, self.device)   # before the probes join the conditioning
        if divergence == "hutchinson":
            z = draw_noise(seed, B, (probes, n), None, lk.PROBE_STREAM, first_sample, **kw)   # (B, K, n)
            cond = {**cond, lk.PROBE_KEY: lk.make_probes(z, probe or lk.PROBES[0])}
        bound = self.backend.denoiser

        def solve(evaluate, on_round):
            # Problem point j is grid point N - j: the grid is traversed from sigma_min up to sigma_max.
            problem = lk.flow_problem(grid, solver, lambda xa, j, b: evaluate(xa, N - j, b), self.state_dtype,
                                      self.device, on_round)
            return lk.solve_flow(x, problem, lambda xa, p: METHODS[cfg.method](xa, p, cfg))

        self.backend.bind(lk.flow_denoiser(bound, x.shape[1:], divergence))
        try:
            (x_T, delta, outcome), evaluator, wall = self._run(solve, grid, cond, B, first_sample,
                                                               f"likelihood {cfg.method}/{solver}", callback, progress)
        finally:
            self.backend.bind(bound)
        prior = lk.gaussian_log_density(x_T, self.denoiser.schedule.prior_std(grid.sigmas[:1]).to(**kw))
        nats = prior + delta
        stats = dataclasses.replace(self._stats(outcome, evaluator, wall, B, cfg), solver=solver, steps=N)
        return lk.LikelihoodResult(nats, lk.bits_per_dim(nats, n, bin), prior, delta, x_T,
                                   float(grid.sigmas[-1]), float(grid.sigmas[0]), stats)

    def _check_likelihood_memory(self, cfg: SamplerConfig, B: int, n: int) -> None:
        """The memory bound of :meth:`sample` for the likelihood's ``(B, n + 1)`` augmented rows (no pre-drawn noise:
        the ODE is deterministic), raised naming the batch of ``x``.

        Raises:
            DeviceMemoryError: it cannot fit the device.
        """
        from .backends.memory import DeviceMemoryError

        try:
            cfg.check_memory((B, n + 1), self.device, self.state_dtype)
        except DeviceMemoryError as e:
            raise DeviceMemoryError(f"x: a batch of {B} samples does not fit for the likelihood ({e}); split x "
                                    f"across log_likelihood() calls with first_sample=") from e

    # -- resources ------------------------------------------------------------------------------------------------
    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

