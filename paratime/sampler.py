"""``ParallelSampler``: the public face. It owns the model, the backend and the configuration, and calls the pure
sampling methods in :mod:`paratime.methods`. Each other concern lives in one place: option checking in
:class:`~paratime.config.SamplerConfig`, per-sample noise in :mod:`paratime.noise`, counting and the NaN check in
:class:`~paratime.evaluator.Evaluator`, the progress bar in :mod:`paratime.progress`, the records in
:mod:`paratime.results`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable

import torch

from .backends import Backend, cast_network, make_backend
from .config import SamplerConfig, check_cond
from .denoiser import Denoiser
from .kernels import kernels as kernel_context
from .evaluator import Evaluator, NonFiniteOutputError
from .methods import METHODS, Problem, RoundInfo
from .models import as_denoiser, model_factory, state_device
from .noise import initial_noise, step_noise
from .progress import RoundProgress
from .results import SampleResult, SampleStats
from .schedules import TimeGrid
from .solvers import LangevinCorrected, Solver

__all__ = ["ParallelSampler", "SamplerConfig", "SampleResult", "SampleStats", "NonFiniteOutputError"]

_DENOISER_OPTIONS = ("guidance", "guidance_rescale", "classifier", "classifier_scale")


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
        progress: show a tqdm bar over rounds.
        kernels: run this sampler's calls in kernel mode ``auto``, ``torch`` or ``triton`` (see
            :func:`paratime.kernels.kernels`); default: the mode in force where ``sample`` is called.
        **options: every other option is a field of :class:`~paratime.config.SamplerConfig`, checked there once:
            the method (``steps``, ``method``, ``window``, ``tol``, ``stop``, ``update``, ``max_rounds``,
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
        if decoder is not None and not callable(decoder):
            raise TypeError(f"decoder: expected a callable, got {type(decoder).__name__}")
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
        self.grid: TimeGrid = self.denoiser.schedule.grid(cfg.steps, cfg.spacing)
        if isinstance(backend, str) and backend == "ray" and isinstance(model, str):
            # Actors build a named model themselves instead of receiving the weights through the object store.
            backend_options = {"model": model_factory(model), **(backend_options or {})}
        self.backend = make_backend(backend, **(backend_options or {}))
        self.backend.bind(self.denoiser)

    # -- sampling -------------------------------------------------------------------------------------------------
    def sample(self, shape: tuple[int, ...] | int | None = None, *, noise: torch.Tensor | None = None,
               seed: int = 0, generator: torch.Generator | None = None, first_sample: int = 0,
               callback: Callable[[RoundInfo], None] | None = None, progress: bool | None = None,
               **cond: Any) -> SampleResult:
        """Draw samples.

        Args:
            shape: ``(B, *sample_shape)``, or ``B`` when the model knows its sample shape; or give ``noise``.
            noise: ``(B, *sample_shape)`` standard-normal initial noise (scaled here by the schedule's prior std).
            seed: noise seed; sample ``i`` (global index ``first_sample + i``) gets noise from ``(seed, i)`` only.
            generator: draw all noise from this generator instead (layout-dependent: no longer per sample).
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
        cfg = self.config
        kw = dict(dtype=self.state_dtype, device=self.device)
        t_noise = time.perf_counter()           # drawing the noise is part of the wall time
        fits = functools.partial(cfg.check_memory, device=self.device, state_dtype=self.state_dtype,
                                 solver=self.solver)
        x_T = initial_noise(shape, noise, seed, generator, first_sample, self.denoiser.sample_shape, **kw,
                            check=fits)          # the memory bound, before the noise and trajectory exist
        B = x_T.shape[0]
        check_cond(self.denoiser, cond, B, self.device)   # the model's rules (digits: labels 0..9), shapes
        z = step_noise(self.solver, cfg.steps, x_T.shape, seed, generator, first_sample, **kw)
        x_T = x_T * self.denoiser.schedule.prior_std(self.grid.sigmas[:1]).to(**kw)
        t_noise = time.perf_counter() - t_noise
        grid = self.grid

        def solve(evaluate, on_round):
            problem = Problem(grid.sigmas.to(**kw), grid.ancestral_std().to(**kw), grid.frame_scales.to(**kw),
                              self.solver, evaluate, z, on_round, evaluate.outputs if evaluate.fusable else None)
            return METHODS[cfg.method](x_T, problem, cfg)

        outcome, evaluator, wall = self._run(solve, grid, cond, B, first_sample,
                                             f"{cfg.method}/{self.solver.name}", callback, progress)
        samples = outcome.x * grid.frame_scales[-1].to(outcome.x)
        stats = self._stats(outcome, evaluator, wall + t_noise, B)
        stats.extra["noise_s"] = t_noise
        latents = None
        if self.decoder is not None:
            latents, samples = samples, self.decode(samples)
        return SampleResult(samples, stats, latents)

    def _run(self, solve: Callable, grid: TimeGrid, cond: dict, B: int, first_sample: int, desc: str,
             callback: Callable[[RoundInfo], None] | None, progress: bool | None):
        """What every solve shares: ``solve(evaluate, on_round)`` runs with the conditioning placed on the backend,
        the evaluator's counting and NaN check (read once per round), the progress bar, the kernel mode and the wall
        clock. Returns ``(solve's result, evaluator, wall seconds)``."""
        evaluator = Evaluator(self.backend, grid, B, self.device, first_sample)
        show = (self.progress if progress is None else progress) and self.backend.is_primary
        modes = contextlib.nullcontext() if self.kernels is None else kernel_context(self.kernels)

        def on_round(info: RoundInfo):
            evaluator.check()
            bar(info)

        self.backend.prepare(cond)
        t0 = time.perf_counter()
        try:
            with RoundProgress(grid.steps, desc, show, callback) as bar, modes, \
                    torch.no_grad():   # the network's autograd graph is never needed (classifier guidance re-enables it)
                result = solve(evaluator, on_round)
            evaluator.check()
        finally:
            self.backend.release()
        return result, evaluator, time.perf_counter() - t0

    def _stats(self, outcome, evaluator: Evaluator, wall: float, B: int) -> SampleStats:
        cfg = self.config
        corrected = "+langevin" if isinstance(self.solver, LangevinCorrected) else ""
        rows = evaluator.rows.float()
        timings = self.backend.timings
        extra = dict(outcome.extra)
        stats = SampleStats(
            method=cfg.method, solver=self.solver.name + corrected, steps=cfg.steps, backend=self.backend.name,
            workers=self.backend.workers, window=cfg.window_size if cfg.method == "picard" else None,
            tol=cfg.tol_in_force,
            rounds=evaluator.calls + extra.pop("coarse_calls", 0), iterations=outcome.rounds,
            nfe=float(rows.mean()), nfe_total=int(rows.sum()), wall_s=wall, residuals=outcome.residuals,
            sample_rounds=[int(r) for r in outcome.sample_rounds], comm_s=timings.get("comm_s", 0.0), extra=extra)
        stats.converged = extra.pop("converged", [True] * B)
        if "comm_bytes" in timings:
            stats.extra["comm_bytes"] = timings["comm_bytes"]
        return stats

    def decode(self, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Decode latents with the sampler's decoder, ``batch`` at a time, after dividing by ``latent_scale``."""
        z = latents / (self.latent_scale or 1.0)
        dec = self.decoder.decode if hasattr(self.decoder, "decode") else self.decoder
        dtype = next(self.decoder.parameters()).dtype if isinstance(self.decoder, torch.nn.Module) else z.dtype
        outs = []
        with torch.inference_mode():
            for s in range(0, z.shape[0], batch):
                out = dec(z[s:s + batch].to(dtype))
                outs.append(out.sample if hasattr(out, "sample") else out)
        return torch.cat(outs)

    # -- likelihood -----------------------------------------------------------------------------------------------
    def log_likelihood(self, x: torch.Tensor, *, solver: str = "euler", steps: int | None = None,
                       method: str | None = None, divergence: str = "exact", probes: int = 1,
                       probe: str = "rademacher", seed: int = 0, first_sample: int = 0,
                       data_range: tuple[float, float] | None = None, levels: int = 256, dequantize: bool = False,
                       callback: Callable[[RoundInfo], None] | None = None, progress: bool | None = None,
                       **cond: Any):
        """Exact log-likelihood of data through the probability-flow ODE, solved with this sampler's method (the
        maths, the augmented state and the bits/dim convention: :mod:`paratime.methods.likelihood`).

        Args:
            x: ``(B, *sample_shape)`` clean data in the model's data space.
            solver: ``euler`` or ``heun``.
            steps: ODE steps (default the sampler's); the grid is the positive part of the ``(steps + 1)``-step
                sampling grid with the sampler's ``spacing``, traversed from ``sigma_min`` to ``sigma_max``.
            method: ``sequential``, ``picard``, ``parareal`` or ``parareal_pipelined`` (default the sampler's), with
                the sampler's ``window``, ``tol``, ``max_rounds``, ``slices`` and ``coarse_steps``.
            divergence: ``exact`` (n vector-Jacobian products per evaluation) or ``hutchinson``.
            probes, probe: Hutchinson's probes per sample and their kind (``rademacher`` or ``gaussian``); they
                depend on ``(seed, first_sample + i)`` only and are shared by every time point.
            seed, first_sample: as for :meth:`sample`.
            data_range: ``(lo, hi)`` the data lie in (values outside raise); with ``levels`` it sets the
                quantisation bin of bits/dim. Default ``(-clip_x0, clip_x0)`` when the model clips, else none.
            levels: quantisation levels spanning ``data_range`` (256 for 8-bit images).
            dequantize: add uniform noise of one bin to ``x`` (per sample and seed) before the solve.
            callback, progress: as for :meth:`sample`.
            **cond: conditioning for the network, as for :meth:`sample`.
        Returns:
            :class:`~paratime.methods.likelihood.LikelihoodResult` (``nats``, ``bits_per_dim``, ``stats``, ...).
        Raises:
            ValueError, TypeError: bad data or option, naming it. NonFiniteOutputError: the network produced NaN.
        """
        from .methods import likelihood as lk
        from .noise import draw_noise

        if data_range is None and self.denoiser.clip_x0 is not None:
            data_range = (-self.denoiser.clip_x0, self.denoiser.clip_x0)
        cfg = dataclasses.replace(self.config, solver=solver, eta=None,
                                  steps=self.config.steps if steps is None else steps,
                                  method=self.config.method if method is None else method)
        lk.check_request(x, self.denoiser.sample_shape, self.device, data_range, levels, solver, divergence, probe,
                         probes, cond, cfg)
        kw = dict(dtype=self.state_dtype, device=self.device)
        B, n, N = x.shape[0], x[0].numel(), cfg.steps
        x = x.to(**kw)
        bin = lk.bin_width(data_range, levels)
        if dequantize:
            if data_range is None:
                raise ValueError("dequantize: needs data_range (the bin is (hi - lo) / (levels - 1))")
            x = lk.dequantise(x, draw_noise(seed, B, x.shape[1:], None, lk.DEQUANT_STREAM, first_sample, **kw), bin)
        check_cond(self.denoiser, cond, B, self.device)   # before the probes join the conditioning
        if divergence == "hutchinson":
            z = draw_noise(seed, B, (probes, n), None, lk.PROBE_STREAM, first_sample, **kw)   # (B, K, n)
            cond = {**cond, lk.PROBE_KEY: lk.make_probes(z, probe)}
        bound = self.backend.denoiser
        grid = lk.likelihood_grid(self.denoiser.schedule, N, cfg.spacing)

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
        stats = dataclasses.replace(self._stats(outcome, evaluator, wall, B), method=cfg.method, solver=solver,
                                    steps=N, window=cfg.window_size if cfg.method == "picard" else None)
        return lk.LikelihoodResult(nats, lk.bits_per_dim(nats, n, bin), prior, delta, x_T,
                                   float(grid.sigmas[-1]), float(grid.sigmas[0]), stats)

    # -- resources ------------------------------------------------------------------------------------------------
    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

