"""``ParallelSampler``: the public face. It owns the model, the backend and the configuration, checks every input
once, and calls the pure sampling methods in :mod:`paratime.methods`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch

from .backends import Backend, make_backend
from .backends.base import map_cond
from .denoiser import Denoiser
from .methods import METHODS, Problem, RoundInfo
from .noise import CORRECTOR, INITIAL, STEP, draw_noise
from .schedules import SPACINGS, NoiseSchedule, TimeGrid
from .solvers import LangevinCorrected, Solver, make_solver

__all__ = ["ParallelSampler", "SamplerConfig", "SampleResult", "SampleStats", "NonFiniteOutputError"]

log = logging.getLogger("paratime")


class NonFiniteOutputError(FloatingPointError):
    """The network returned NaN or inf; the message names the step and its time."""


@dataclass(frozen=True)
class SamplerConfig:
    """Validated sampling options (see :class:`ParallelSampler` for their meaning)."""

    solver: str = "ddim"
    steps: int = 50
    method: str = "picard"
    window: int | None = None
    tol: float = 0.1
    max_rounds: int | None = None
    spacing: str | None = None
    eta: float | None = None
    slices: int | None = None
    coarse_steps: int = 1
    coarse: Any = None
    shared_window: bool = False

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps: must be an integer >= 1, got {self.steps!r}")
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window: must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.tol, (int, float)) or not math.isfinite(self.tol) or self.tol < 0:
            raise ValueError(f"tol: must be a finite number >= 0, got {self.tol!r}")
        if self.max_rounds is not None and (not isinstance(self.max_rounds, int) or self.max_rounds < 1):
            raise ValueError(f"max_rounds: must be an integer >= 1 or None, got {self.max_rounds!r}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"spacing: unknown {self.spacing!r}; allowed: {', '.join(SPACINGS)}")
        if self.slices is not None and (not isinstance(self.slices, int) or not 1 <= self.slices <= self.steps):
            raise ValueError(f"slices: must be an integer in [1, steps={self.steps}], got {self.slices!r}")
        if self.coarse is not None and not callable(self.coarse):
            raise TypeError(f"coarse: expected a callable coarse(x, sigma_from, sigma_to), got {type(self.coarse).__name__}")
        if not isinstance(self.coarse_steps, int) or self.coarse_steps < 1:
            raise ValueError(f"coarse_steps: must be an integer >= 1, got {self.coarse_steps!r}")
        make_solver(self.solver, **self.solver_options)  # raises on a bad name or option

    @property
    def solver_options(self) -> dict:
        return {} if self.eta is None else {"eta": self.eta}

    @property
    def window_size(self) -> int:
        return min(self.window or self.steps, self.steps)


@dataclass
class SampleStats:
    """What a ``sample`` call cost.

    Attributes:
        rounds: sequential depth in network calls (Heun's two calls per step count twice).
        iterations: method iterations (Picard rounds, Parareal iterations, steps for ``sequential``).
        nfe: time-point evaluations per sample, averaged over the batch.
        nfe_total: time-point evaluations over the whole batch.
        wall_s: seconds spent sampling (noise drawing excluded).
        residuals: worst residual per iteration, in units of the noise level (compare with ``tol``).
        sample_rounds: per sample, the iteration at which it finished.
        converged: per sample, whether it finished inside Picard's tolerance test (False: it reached
            ``max_rounds`` and was finished sequentially, which is exact).
    """

    method: str
    solver: str
    steps: int
    backend: str
    workers: int
    window: int | None
    tol: float
    rounds: int = 0
    iterations: int = 0
    nfe: float = 0.0
    nfe_total: int = 0
    wall_s: float = 0.0
    residuals: list[float] = field(default_factory=list)
    sample_rounds: list[int] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    comm_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


@dataclass
class SampleResult:
    """``samples``: ``(B, *shape)`` in the model's frame (decoded if a decoder was given); ``stats``: the cost."""

    samples: torch.Tensor
    stats: SampleStats
    latents: torch.Tensor | None = None


class _Counter:
    def __init__(self, batch: int, device):
        self.calls = 0
        self.rows = torch.zeros(batch, dtype=torch.long, device=device)

    def add(self, b: torch.Tensor):
        self.calls += 1
        self.rows += torch.bincount(b, minlength=self.rows.numel())


class ParallelSampler:
    """Sample a diffusion model sequentially or in parallel in time.

    Args:
        model: a :class:`~paratime.denoiser.Denoiser`, a model name (``"gmm"``, ``"digits"``), or a raw network
            ``net(x_in, t, **cond)`` together with ``schedule=`` and ``prediction=``.
        solver: ``ddim`` (default), ``ddpm``, ``euler``, ``euler_maruyama``, ``heun``, ``dpmpp_2m``.
        steps: N, the number of solver steps.
        method: ``picard`` (default), ``sequential``, ``parareal`` or ``parareal_pipelined`` (SRDS).
        window: Picard window W (points per sample per round); default N.
        tol: tolerance in units of the noise level (ParaDiGMS's); 0 iterates to the exact fixed point.
        max_rounds: Picard rounds before the rest is finished sequentially; default unlimited (<= N anyway).
        shared_window: Picard slides one window for the whole batch (diffusers' ParaDiGMS) instead of one per
            sample: more NFE, closer to the sequential sample at the same ``tol``.
        spacing: time grid spacing (``leading``, ``trailing``, ``linspace``, ``karras``); default the schedule's.
        eta: noise scale of ``ddim``/``ddpm``/``euler_maruyama``.
        slices, coarse_steps, coarse: Parareal options (see :mod:`paratime.methods.parareal`): S slices (default
            round(sqrt(N))), DDIM steps of the coarse propagator per slice, or a ``coarse(x, sigma_from, sigma_to)``
            callable replacing it (VE frame).
        dtype: dtype the network runs in (default: its parameters' dtype).
        state_dtype: dtype of the trajectory; default float64 on CPU, float32 on CUDA.
        device: where the state lives; default the network's device, else CPU.
        backend: ``local`` (default), ``torch``, ``ray``, or a :class:`~paratime.backends.Backend`.
        backend_options: keyword arguments for the backend's constructor.
        decoder: latent diffusion: ``decoder(latents) -> images``, or a VAE with ``.decode`` (diffusers
            ``AutoencoderKL``), applied after sampling to ``samples / latent_scale``.
        latent_scale: the VAE's latent scaling factor (Stable Diffusion: 0.18215); default 1.
        guidance, guidance_rescale: classifier-free guidance scale and rescale (see :class:`Denoiser`).
        classifier, classifier_scale: classifier guidance (labels passed to ``sample`` as ``y=``).
        corrector_snr, corrector_steps: add Langevin corrector steps with this signal-to-noise ratio after every
            solver step (predictor-corrector); works in every method.
        progress: show a tqdm bar over rounds.
        schedule, prediction, clip_x0: adapter options when ``model`` is a raw network.

    Raises:
        ValueError, TypeError: any bad option, naming it.
    """

    def __init__(self, model: Denoiser | str | Callable, solver: str | Solver = "ddim", steps: int = 50,
                 method: str = "picard", window: int | None = None, tol: float = 0.1,
                 max_rounds: int | None = None, spacing: str | None = None, eta: float | None = None,
                 slices: int | None = None, coarse_steps: int = 1, coarse: Any = None, shared_window: bool = False,
                 dtype: torch.dtype | None = None, state_dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, backend: str | Backend = "local",
                 backend_options: dict | None = None, decoder: Callable | None = None, progress: bool = True,
                 schedule: NoiseSchedule | None = None, prediction: str | None = None,
                 clip_x0: float | None = None, guidance: float | None = None, guidance_rescale: float | None = None,
                 classifier: Callable | None = None, classifier_scale: float | None = None,
                 latent_scale: float | None = None, corrector_snr: float | None = None, corrector_steps: int = 1):
        self.denoiser = self._wrap(model, schedule, prediction, clip_x0, dtype)
        extra = {k: v for k, v in (("guidance", guidance), ("guidance_rescale", guidance_rescale),
                                   ("classifier", classifier), ("classifier_scale", classifier_scale))
                 if v is not None}
        if extra:
            self.denoiser = replace(self.denoiser, **extra)
        if latent_scale is not None and not latent_scale > 0:
            raise ValueError(f"latent_scale: must be > 0, got {latent_scale!r}")
        self.latent_scale = latent_scale
        self.solver = make_solver(solver, **({} if eta is None else {"eta": eta}))
        base_name = self.solver.name
        if corrector_snr is not None:
            self.solver = LangevinCorrected(self.solver, corrector_snr, corrector_steps)
        self.config = SamplerConfig(base_name, steps, method, window, tol, max_rounds, spacing, eta, slices,
                                    coarse_steps, coarse, shared_window)
        self.device = self._pick_device(device)
        if state_dtype is None:
            state_dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        if state_dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"state_dtype: expected a floating torch.dtype, got {state_dtype!r}")
        self.state_dtype = state_dtype
        if decoder is not None and not callable(decoder):
            raise TypeError(f"decoder: expected a callable, got {type(decoder).__name__}")
        self.decoder, self.progress = decoder, progress
        self.grid: TimeGrid = self.denoiser.schedule.grid(steps, spacing)
        self.backend = make_backend(backend, **(backend_options or {}))
        self.backend.bind(self.denoiser)

    # -- construction helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _wrap(model, schedule, prediction, clip_x0, dtype) -> Denoiser:
        if isinstance(model, str):
            from .zoo import load_model

            model = load_model(model)
        if isinstance(model, Denoiser):
            if schedule is not None or prediction is not None:
                raise ValueError("schedule, prediction: already set by the Denoiser given as model")
            kw = {k: v for k, v in (("clip_x0", clip_x0), ("dtype", dtype)) if v is not None}
            return replace(model, **kw) if kw else model
        if not callable(model):
            raise TypeError(f"model: expected a Denoiser, a model name or a callable network, got {type(model).__name__}")
        if schedule is None or prediction is None:
            raise ValueError("schedule, prediction: required when model is a raw network")
        return Denoiser(model, schedule, prediction, dtype=dtype, clip_x0=clip_x0)

    def _pick_device(self, device) -> torch.device:
        net = self.denoiser.network
        p = next(net.parameters(), None) if isinstance(net, torch.nn.Module) else None
        if p is None and isinstance(net, torch.nn.Module):
            p = next(net.buffers(), None)
        if device is None:
            return p.device if p is not None else torch.device("cpu")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: not a device: {device!r}") from e
        if p is not None and p.device.type != device.type:
            raise ValueError(f"device: the network is on {p.device} but device={device}; move one of them")
        return device

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
        cfg, N = self.config, self.config.steps
        x_T, z = self._initial_state(shape, noise, seed, generator, first_sample)
        B = x_T.shape[0]
        cond = self._check_cond(cond, B)
        counter = _Counter(B, self.device)
        sig_state = self.grid.sigmas.to(self.device, self.state_dtype)
        sig_model = self.grid.sigmas.to(self.device)
        times = self.grid.model_times.to(self.device)

        def evaluate(x: torch.Tensor, i: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            rows = map_cond(cond, lambda v: v[b])
            den = self.backend.evaluate(x, sig_model[i].to(x.dtype), times[i], rows)
            counter.add(b)
            bad = ~torch.isfinite(den.flatten(1)).all(1)
            if bool(bad.any()):
                r = int(bad.nonzero()[0, 0])
                step = int(i[r])
                raise NonFiniteOutputError(
                    f"network output is not finite at step {step} (sigma={float(self.grid.sigmas[step]):.6g}, "
                    f"model time={float(self.grid.model_times[step]):.6g}), sample {int(b[r]) + first_sample}")
            return den

        levels = self.grid.ancestral_std().to(self.device, self.state_dtype)
        bar, on_round = self._progress(progress, callback, N)
        problem = Problem(sig_state, levels, self.grid.frame_scales.to(self.device, self.state_dtype), self.solver,
                          evaluate, z, on_round)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():   # the network's autograd graph is never needed (classifier guidance re-enables it)
                outcome = METHODS[cfg.method](x_T, problem, cfg)
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t0
        samples = outcome.x * self.grid.frame_scales[-1].to(outcome.x)
        corrected = "+langevin" if isinstance(self.solver, LangevinCorrected) else ""
        stats = SampleStats(
            method=cfg.method, solver=cfg.solver + corrected, steps=N, backend=self.backend.name,
            workers=self.backend.workers, window=cfg.window_size if cfg.method == "picard" else None, tol=cfg.tol,
            rounds=counter.calls + outcome.extra.pop("coarse_calls", 0), iterations=outcome.rounds,
            nfe=float(counter.rows.float().mean()),
            nfe_total=int(counter.rows.sum()), wall_s=wall, residuals=outcome.residuals,
            sample_rounds=[int(r) for r in outcome.sample_rounds], comm_s=self.backend.timings.get("comm_s", 0.0),
            extra=outcome.extra)
        stats.converged = outcome.extra.pop("converged", [True] * B)
        latents = None
        if self.decoder is not None:
            latents, samples = samples, self.decode(samples)
        return SampleResult(samples, stats, latents)

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

    def _initial_state(self, shape, noise, seed, generator, first_sample):
        if noise is None:
            if shape is None:
                raise ValueError("shape: give a shape or noise")
            if isinstance(shape, int):
                if self.denoiser.sample_shape is None:
                    raise ValueError("shape: the model has no known sample shape; give (B, *sample_shape)")
                shape = (shape, *self.denoiser.sample_shape)
            shape = tuple(shape)
            if len(shape) < 2 or not all(isinstance(s, int) and s >= 1 for s in shape):
                raise ValueError(f"shape: expected (B, *sample_shape) of positive integers, got {shape}")
        else:
            if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
                raise TypeError("noise: expected a floating-point tensor")
            if shape is not None and tuple(noise.shape) != (tuple(shape) if not isinstance(shape, int) else noise.shape):
                raise ValueError(f"shape: {shape} differs from noise.shape {tuple(noise.shape)}")
            if noise.ndim < 2:
                raise ValueError(f"noise: expected (B, *sample_shape), got shape {tuple(noise.shape)}")
            if noise.device.type != self.device.type:
                raise ValueError(f"noise: on {noise.device} but the sampler runs on {self.device}")
            if not bool(torch.isfinite(noise).all()):
                raise ValueError("noise: contains NaN or inf")
            shape = tuple(noise.shape)
        if self.denoiser.sample_shape is not None and tuple(shape[1:]) != tuple(self.denoiser.sample_shape):
            raise ValueError(f"shape: the model expects samples of shape {self.denoiser.sample_shape}, got {shape[1:]}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        B, N = shape[0], self.config.steps
        kw = dict(dtype=self.state_dtype, device=self.device)
        if noise is None:
            if generator is not None:
                noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)
            else:
                noise = draw_noise(seed, B, shape[1:], None, INITIAL, first_sample, **kw)
        def step_noise(stream, per_step=()):
            if generator is not None:
                n = torch.randn((N, B, *per_step, *shape[1:]), generator=generator, dtype=torch.float32,
                                device=generator.device)
            else:
                n = draw_noise(seed, B, (*per_step, *shape[1:]), N, stream, first_sample, **kw)
            return n.to(**kw)

        z = None
        if isinstance(self.solver, LangevinCorrected):
            base = step_noise(STEP) if self.solver.base.stochastic else None
            z = (base, step_noise(CORRECTOR, (self.solver.corrector_steps,)))
        elif self.solver.stochastic:
            z = step_noise(STEP)
        prior = self.denoiser.schedule.prior_std(self.grid.sigmas[:1]).to(**kw)
        return noise.to(**kw) * prior, z

    def _check_cond(self, cond: dict, B: int, prefix: str = "") -> dict:
        for k, v in cond.items():
            if isinstance(v, dict):
                self._check_cond(v, B, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                if v.ndim == 0 or v.shape[0] != B:
                    raise ValueError(f"{prefix}{k}: conditioning tensors need a leading batch dimension of {B}, "
                                     f"got shape {tuple(v.shape)}")
                if v.device.type != self.device.type:
                    raise ValueError(f"{prefix}{k}: on {v.device} but the sampler runs on {self.device}")
        return cond

    def _progress(self, progress, callback, N):
        show = self.progress if progress is None else progress
        bar = None
        if show and self.backend.is_primary:
            from tqdm.auto import tqdm

            bar = tqdm(total=N, desc=f"{self.config.method}/{self.solver.name}", unit="pt", leave=False)

        def on_round(info: RoundInfo):
            if bar is not None:
                pos = int(info.begin.min())
                bar.update(pos - bar.n)
                bar.set_postfix(round=info.round, window=pos, residual=f"{info.residual:.3g}")
            if callback is not None:
                callback(info)

        return bar, on_round

    # -- resources ------------------------------------------------------------------------------------------------
    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
