"""diffusers models: a UNet / transformer with its scheduler becomes a :class:`~paratime.Denoiser` whose time grid and
step map reproduce the scheduler's own ``set_timesteps`` / ``step`` loop.

What maps to what (``solver_for``; every other scheduler or option raises ``ValueError`` naming it):

    scheduler                                  paratime solver                    grid
    DDIMScheduler, DDIMParallelScheduler       ddim (eta; clip_sample: clip)      timesteps, then final_alpha_cumprod
    DDPMScheduler, DDPMParallelScheduler       ddpm (fixed_small; clip_x0;        timesteps, then sigma 0
                                               fixed_large: DDPMFixedLarge)
    PNDMScheduler (skip_prk_steps=True)        plms                               timesteps, then final_alpha_cumprod
    EulerDiscreteScheduler                     euler                              scheduler.sigmas / timesteps
    EulerAncestralDiscreteScheduler            euler_ancestral                    scheduler.sigmas / timesteps
    HeunDiscreteScheduler                      heun                               every other sigma (Heun doubles them)
    LMSDiscreteScheduler                       lms (order 4, Lagrange weights)    scheduler.sigmas / timesteps
    DPMSolverMultistepScheduler                dpmpp (order 1-3, sde, solver_type, lower_order_final, euler_at_final)
                                                                                  scheduler.sigmas (Karras, exponential,
                                                                                  beta, lu; final sigma zero or min)
    FlowMatchEulerDiscreteScheduler            euler on FlowSchedule, "flow"      scheduler.sigmas (shift, mu)
    FlowMatchHeunDiscreteScheduler             flow_heun (Heun in flow time t)    every other sigma (shift)
    UniPCMultistepScheduler                    unipc (bh2, order 1-3, UniC)       scheduler.sigmas (also flow sigmas)
    EDMEulerScheduler                          euler, EDM preconditioning "edm"   scheduler.sigmas (karras, exponential)
    EDMDPMSolverMultistepScheduler             dpmpp, EDM preconditioning "edm"   scheduler.sigmas
    DEISMultistepScheduler                     deis (log-rho, order 1-3)          scheduler.sigmas
    DPMSolverSinglestepScheduler               dpmpp_singlestep (ODE, order list) scheduler.sigmas
    TCDScheduler                               tcd (gamma = the call's eta)       timesteps, then training step 0
    LCMScheduler                               consistency (x' = D + sigma' z;    timesteps, then x0
                                               boundary condition: LCMBoundary)
    (refused, with the reason and the nearest supported scheduler: :data:`REFUSED`)

    prediction_type epsilon | v_prediction | sample | flow_prediction  ->  prediction eps | v | x0 | flow

Sigma-based schedulers are reproduced by reading the grid off the scheduler after ``set_timesteps``, so every sigma
option (Karras, exponential, beta, lu lambdas, final sigma type, timestep spacing, shift) carries over as is. DDIM and
PNDM step from t to ``t - T // N`` whatever the spacing; where that is not the next timestep (``linspace``, or
``trailing`` when N does not divide T) the grid raises. A zero terminal SNR (``rescale_betas_zero_snr``) and flow
matching's t = 1 are pure noise, sigma = inf in paratime's VE frame: the grid starts at ``alpha_bar = ZERO_SNR``
(sigma 1e8) and ``t = 1 - 1e-7``, moving the sample by about 1e-8 and 1e-7 of its scale; keep the state in float64.

The scheduler's *sample* lives in the VE frame for Euler, Euler ancestral, Heun and LMS (``init_noise_sigma`` ~
sigma_max) and in the model's frame for the others: :func:`initial_noise` / :func:`to_latents` convert a pipeline's
latents.
diffusers stays an optional extra (``pip install paratime[diffusers]``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..checks import check_int
from ..denoiser import Denoiser
from ..sampler import ParallelSampler, SampleResult
from ..schedules import DiscreteVPSchedule, EDMSchedule, FlowSchedule, NoiseSchedule, TimeGrid
from ..solvers import (DDPM, DEIS, LMS, PLMS, TCD, Ancestral, Consistency, DPMSolverPP, DPMSolverSinglestep, FlowHeun,
                       Heun, Solver, UniPC)

__all__ = ["from_diffusers", "DiffusersSchedule", "solver_for", "initial_noise", "to_latents", "sample_latents",
           "with_timestep_kwargs", "Keyword", "LCMBoundary", "DiffusersEDMSchedule", "SCHEDULERS", "REFUSED",
           "ZERO_SNR"]

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
ZERO_SNR = 1e-16   # alpha_bar standing in for 0 (a zero terminal SNR): sigma = 1e8

# Scheduler families: how the grid is read and in which frame the scheduler's sample lives.
_TIMESTEP = ("DDIMScheduler", "DDIMParallelScheduler", "DDPMScheduler", "DDPMParallelScheduler", "PNDMScheduler",
             "LCMScheduler", "TCDScheduler")
_SIGMA_VE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
             "LMSDiscreteScheduler")
_SIGMA_VP = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
             "DPMSolverSinglestepScheduler")
_FLOW = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
_HEUN = ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")   # two calls per step: doubled timesteps
_EDM = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")      # EDM preconditioning, VE-frame sample
SCHEDULERS = _TIMESTEP + _SIGMA_VE + _SIGMA_VP + _FLOW + _EDM


def _is_flow(scheduler) -> bool:
    """Flow matching: the flow-matching schedulers, and UniPC on flow sigmas (Wan's default scheduler)."""
    name = type(scheduler).__name__
    return name in _FLOW or (name == "UniPCMultistepScheduler" and scheduler.config.get("use_flow_sigmas", False))

# Unsupported schedulers: (nearest supported scheduler, why paratime does not reproduce it), named in the error.
REFUSED = {
    "KDPM2DiscreteScheduler": ("HeunDiscreteScheduler", "its second call sits at a log-midpoint sigma off the grid"),
    "KDPM2AncestralDiscreteScheduler": ("EulerAncestralDiscreteScheduler", "its second call sits at a log-midpoint "
                                        "sigma off the grid, and its noise is drawn between the two calls"),
    "DPMSolverSDEScheduler": ("DPMSolverMultistepScheduler (algorithm_type='sde-dpmsolver++')",
                              "its Brownian-tree noise depends on the whole interval, not on (seed, step, sample)"),
    "SASolverScheduler": ("DPMSolverMultistepScheduler", "its stochastic Adams predictor-corrector is not ported"),
    "IPNDMScheduler": ("PNDMScheduler (skip_prk_steps=True)", "its improved PNDM weights are not ported"),
    "CMStochasticIterativeScheduler": ("DDPMScheduler", "consistency-model sampling is not ported"),
}


# Multistep schedulers whose restart part-way (img2img's set_begin_index) paratime's grid does not reproduce.
_NO_RESTART = {"PNDMScheduler": "repeats a timestep paratime's grid cannot hold",
               "DPMSolverSinglestepScheduler": "keeps the whole grid's order groups but starts with no outputs",
               "LMSDiscreteScheduler": "takes its order from the full grid's step index, weighting its first "
                                       "derivative with a 4-point Lagrange coefficient whose other points it lacks"}


def _refuse(scheduler, option: str, value, nearest: str) -> ValueError:
    return ValueError(f"scheduler: {type(scheduler).__name__} with {option}={value!r} is not supported; "
                      f"use {nearest}")


def _check_options(scheduler) -> None:
    """Raise for an unsupported scheduler, or an option whose effect paratime does not reproduce."""
    name = type(scheduler).__name__
    if name not in SCHEDULERS:          # before reading .config: None or a class is named here too
        near, why = REFUSED.get(name, ("DDIMScheduler or DPMSolverMultistepScheduler", "not ported"))
        raise ValueError(f"scheduler: {name} is not supported ({why}; nearest: {near}); supported: "
                         f"{', '.join(SCHEDULERS)}")
    cfg = scheduler.config
    if cfg.get("prediction_type", "epsilon") not in _PREDICTIONS and not _is_flow(scheduler):
        raise ValueError(f"prediction_type: {cfg.prediction_type!r} is not supported; allowed: "
                         f"{', '.join(_PREDICTIONS)}")
    ac = getattr(scheduler, "alphas_cumprod", None)
    if cfg.get("rescale_betas_zero_snr", False) and ac is not None and not bool((ac[1:] < ac[:-1]).all()):
        # Euler-type schedulers replace the zero terminal alpha_bar by 2**-24 (a finite first sigma), above the
        # value before it: no decreasing noise level to step along
        raise _refuse(scheduler, "rescale_betas_zero_snr", True, "DDIMScheduler or DDPMScheduler with "
                      "rescale_betas_zero_snr=True (its alphas_cumprod here is not decreasing)")
    if cfg.get("prediction_type") == "flow_prediction" and not _is_flow(scheduler) and \
            not cfg.get("use_flow_sigmas", False):          # with flow sigmas, the scheduler's own refusal names them
        # diffusers' own step refuses it on the VP schedulers: paratime would run what the scheduler never does
        raise ValueError(f"prediction_type: 'flow_prediction' on {name} (a VP scheduler); flow matching takes "
                         f"FlowMatchEulerDiscreteScheduler or use_flow_sigmas=True where a scheduler has it")
    if cfg.get("thresholding", False):
        raise _refuse(scheduler, "thresholding", True, "thresholding=False (clip_sample for a fixed range)")
    if name.startswith("DDPM") and cfg.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise _refuse(scheduler, "variance_type", cfg.variance_type, "variance_type='fixed_small'")
    if name == "PNDMScheduler":
        if not cfg.skip_prk_steps:
            raise _refuse(scheduler, "skip_prk_steps", False, "skip_prk_steps=True (Stable Diffusion's setting)")
        if cfg.prediction_type != "epsilon":   # PNDM combines raw v outputs before converting them
            raise _refuse(scheduler, "prediction_type", cfg.prediction_type,
                          "prediction_type='epsilon', or DDIMScheduler for v_prediction")
    if name == "EulerAncestralDiscreteScheduler" and cfg.prediction_type == "sample":
        # diffusers' step raises NotImplementedError for it: paratime would run what the scheduler never does
        raise _refuse(scheduler, "prediction_type", "sample", "prediction_type='epsilon' or 'v_prediction' (for an "
                      "x0 model, EulerDiscreteScheduler)")
    if name == "HeunDiscreteScheduler" and cfg.get("clip_sample", False):
        raise _refuse(scheduler, "clip_sample", True, "clip_sample=False")
    if name in ("LCMScheduler", "TCDScheduler") and (cfg.prediction_type != "epsilon" or cfg.clip_sample):
        raise _refuse(scheduler, "prediction_type, clip_sample", (cfg.prediction_type, cfg.clip_sample),
                      "prediction_type='epsilon', clip_sample=False (LCM's boundary condition on eps)")
    if name == "DPMSolverSinglestepScheduler":
        for option, ok in (("algorithm_type", "dpmsolver++"), ("use_flow_sigmas", False), ("variance_type", None),
                           ("use_dynamic_shifting", False)):
            if cfg.get(option, ok) != ok:
                raise _refuse(scheduler, option, cfg.get(option), f"{option}={ok!r} (the ODE DPM-Solver++; for "
                              f"the SDE variants, DPMSolverMultistepScheduler)")
        if cfg.solver_order not in (1, 2, 3):
            raise _refuse(scheduler, "solver_order", cfg.solver_order, "solver_order 1, 2 or 3")
    if name == "DEISMultistepScheduler":
        for option, ok in (("algorithm_type", "deis"), ("solver_type", "logrho"), ("use_flow_sigmas", False),
                           ("use_dynamic_shifting", False)):
            if cfg.get(option, ok) != ok:
                raise _refuse(scheduler, option, cfg.get(option), f"{option}={ok!r}")
        if cfg.solver_order not in (1, 2, 3):
            raise _refuse(scheduler, "solver_order", cfg.solver_order, "solver_order 1, 2 or 3")
    if name in _EDM and cfg.prediction_type != "epsilon":
        raise _refuse(scheduler, "prediction_type", cfg.prediction_type, "prediction_type='epsilon' (EDM's F_theta)")
    if name in ("DPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler"):
        if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise _refuse(scheduler, "algorithm_type", cfg.algorithm_type, "'dpmsolver++' or 'sde-dpmsolver++'")
        if cfg.get("variance_type") is not None:
            raise _refuse(scheduler, "variance_type", cfg.variance_type, "variance_type=None")
        if cfg.get("use_flow_sigmas", False):
            raise _refuse(scheduler, "use_flow_sigmas", True, "FlowMatchEulerDiscreteScheduler")
        if cfg.solver_order not in (1, 2, 3):
            raise _refuse(scheduler, "solver_order", cfg.solver_order, "solver_order 1, 2 or 3")
    if name == "UniPCMultistepScheduler":
        if not cfg.predict_x0:
            raise _refuse(scheduler, "predict_x0", False, "predict_x0=True (the data-prediction UniPC)")
        if cfg.solver_type != "bh2":
            raise _refuse(scheduler, "solver_type", cfg.solver_type, "solver_type='bh2'")
        if cfg.solver_order not in (1, 2, 3):
            raise _refuse(scheduler, "solver_order", cfg.solver_order, "solver_order 1, 2 or 3")
        if scheduler.solver_p is not None:
            raise _refuse(scheduler, "solver_p", type(scheduler.solver_p).__name__, "solver_p=None")
        if cfg.get("use_flow_sigmas", False) != (cfg.prediction_type == "flow_prediction"):
            raise _refuse(scheduler, "use_flow_sigmas, prediction_type",
                          (cfg.get("use_flow_sigmas", False), cfg.prediction_type),
                          "use_flow_sigmas=True with prediction_type='flow_prediction' (or neither)")
    if name in _FLOW:
        for option in ("stochastic_sampling", "invert_sigmas"):
            if cfg.get(option, False):
                raise _refuse(scheduler, option, True, f"{option}=False")


def solver_for(scheduler, eta: float = 0.0, total_steps: int | None = None) -> Solver:
    """The paratime step map that reproduces this scheduler's ``step``.

    Args:
        scheduler: a diffusers scheduler (see the module table).
        eta: DDIM's ``eta`` and TCD's gamma (a ``step`` argument in diffusers, passed by pipelines as ``eta=``, 0 by
            default; ``TCDScheduler.step`` called without it defaults to 0.3); 0 elsewhere.
        total_steps: the scheduler's ``num_inference_steps`` when the loop runs only its last part (img2img's
            ``strength``): DPM-Solver++ and DEIS take their "fewer than 15 steps" ``lower_order_final`` rule from
            the whole grid, not from the steps run. None: the grid run is the whole grid.
    Returns:
        a :class:`~paratime.solvers.Solver` instance.
    Raises:
        ValueError: an unsupported scheduler or option, naming it and the nearest supported choice; ``total_steps``
            below 1. TypeError: ``total_steps`` not an integer or None.
    """
    _check_options(scheduler)
    check_int("total_steps", total_steps, 1, none=True)
    name, cfg = type(scheduler).__name__, scheduler.config
    # diffusers' lower_order_final fires on grids of fewer than 15 steps, counted over the scheduler's whole grid.
    lower_order_final = cfg.get("lower_order_final", True) and (total_steps is None or total_steps < 15)
    if eta and not name.startswith("DDIM") and name != "TCDScheduler":
        raise ValueError(f"eta: only DDIM and TCD schedulers take eta, got eta={eta!r} with {name}")
    if name == "TCDScheduler":              # the call's eta is TCD's gamma
        ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        return TCD(eta=eta, train_sigmas=tuple(((1 - ac) / ac).sqrt().tolist()))
    if name.startswith("DDIM"):
        return Ancestral(eta=eta, clip=float(cfg.clip_sample_range) if cfg.clip_sample else None)
    if name.startswith("DDPM") and cfg.variance_type == "fixed_large":
        ac0 = float(scheduler.alphas_cumprod[0])
        return DDPMFixedLarge(sigma_t0=((1 - ac0) / ac0) ** 0.5)
    if name.startswith("DDPM") or name == "EulerAncestralDiscreteScheduler":
        return DDPM()
    if name == "PNDMScheduler":
        return PLMS()
    if name == "HeunDiscreteScheduler":
        return Heun()
    if name == "FlowMatchHeunDiscreteScheduler":
        return FlowHeun()
    if name == "LMSDiscreteScheduler":
        return LMS()            # the pipelines' step(order=4) default
    if name == "LCMScheduler":
        return Consistency()
    if name == "DPMSolverSinglestepScheduler":
        # set_timesteps turns lower_order_final on for a zero final sigma, and for a step count the order does not
        # divide (known here from total_steps; else the solver refuses such a count, naming lower_order_final)
        uneven = total_steps is not None and total_steps % cfg.solver_order != 0
        return DPMSolverSinglestep(order=cfg.solver_order, solver_type=cfg.solver_type,
                                   lower_order_final=cfg.lower_order_final or cfg.final_sigmas_type == "zero" or uneven,
                                   final_first_order=cfg.final_sigmas_type == "zero")
    if name == "DEISMultistepScheduler":
        return DEIS(order=cfg.solver_order, lower_order_final=lower_order_final)
    if name == "UniPCMultistepScheduler":
        return UniPC(order=cfg.solver_order, disable_corrector=tuple(cfg.disable_corrector),
                     lower_order_final=cfg.lower_order_final)
    if name in ("DPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler"):
        return DPMSolverPP(order=cfg.solver_order, sde=cfg.algorithm_type == "sde-dpmsolver++",
                           solver_type=cfg.solver_type, lower_order_final=lower_order_final,
                           euler_at_final=cfg.euler_at_final)
    return Ancestral()    # Euler, flow-matching Euler: the probability-flow Euler step in the VE frame


@dataclass(frozen=True)
class DDPMFixedLarge(DDPM):
    """DDPM with ``variance_type="fixed_large"`` (VP schedules): ``ddpm``'s posterior mean with noise of std
    ``sqrt(beta_t)``, ``beta_t = 1 - alpha_bar_t / alpha_bar_prev``, which in the VE frame is

        up = sqrt((s^2 - s'^2) (1 + s'^2) / (1 + s^2)),

    also on the last step (diffusers adds it for every t > 0), but none on a step from training timestep 0
    (``sigma_t0``, its VE sigma).
    """

    sigma_t0: float = 0.0

    def coefficients(self, s, s1):
        _, down = super().coefficients(s, s1)          # the posterior mean's
        up = torch.sqrt(((s * s - s1 * s1) * (1 + s1 * s1) / (1 + s * s)).clamp_min(0))
        at_t0 = torch.isclose(s, torch.full_like(s, self.sigma_t0), rtol=1e-9, atol=0)
        return torch.where(at_t0, torch.zeros_like(up), up), down


@dataclass(frozen=True)
class DiffusersSchedule(NoiseSchedule):
    """The grid of a diffusers scheduler, read off a copy of it after ``set_timesteps``.

    Args:
        base: the continuous-in-sigma schedule it discretises (:class:`DiscreteVPSchedule` from
            ``alphas_cumprod``, or :class:`FlowSchedule`): input scaling, prior and frames come from it.
        scheduler: the diffusers scheduler (never stepped: the grid uses a deep copy).
        timestep_kwargs: extra ``set_timesteps`` arguments (flow matching's ``mu``, custom ``sigmas``).
        begin: the grid point the loop starts at (img2img's ``t_start``: ``strength`` < 1 skips the first ``begin``
            of ``steps + begin`` scheduler steps, as the pipeline's ``get_timesteps`` / ``set_begin_index`` do).
    """

    base: NoiseSchedule = None  # type: ignore[assignment]
    scheduler: Any = field(default=None, compare=False)
    timestep_kwargs: dict = field(default_factory=dict, compare=False)
    begin: int = 0

    def __post_init__(self):
        if not isinstance(self.base, NoiseSchedule):
            raise TypeError(f"base: expected a NoiseSchedule, got {type(self.base).__name__}")
        if not isinstance(self.begin, int) or isinstance(self.begin, bool) or self.begin < 0:
            raise ValueError(f"begin: must be an integer >= 0, got {self.begin!r}")
        if self.begin and type(self.scheduler).__name__ in _NO_RESTART:
            raise ValueError(f"strength: {type(self.scheduler).__name__} restarted part-way (img2img with strength "
                             f"< 1) {_NO_RESTART[type(self.scheduler).__name__]}; use DDIMScheduler or "
                             f"EulerDiscreteScheduler")
        object.__setattr__(self, "kind", self.base.kind)

    # The continuous schedule's maps.
    def frame_scale(self, sigma):
        return self.base.frame_scale(sigma)

    def input_scale(self, sigma):
        return self.base.input_scale(sigma)

    def model_time(self, sigma):
        return self.base.model_time(sigma)

    def sigma_of_model_time(self, t):
        return self.base.sigma_of_model_time(t)

    def prior_std(self, sigma):
        return self.base.prior_std(sigma)

    @property
    def sigma_range(self):
        return self.base.sigma_range

    @property
    def sample_in_ve_frame(self) -> bool:
        """Euler-type schedulers step the VE-frame state itself (``init_noise_sigma`` ~ sigma_max)."""
        return type(self.scheduler).__name__ in _SIGMA_VE + _EDM

    def sample_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """``scheduler_sample = sample_scale * x`` (VE-frame ``x``)."""
        return torch.ones_like(sigma) if self.sample_in_ve_frame else self.frame_scale(sigma)

    def grid(self, steps: int, spacing: str | None = None) -> TimeGrid:
        """The scheduler's own N-step grid.

        Raises:
            ValueError: ``spacing`` given (set ``timestep_spacing`` on the scheduler), bad ``steps``, or a DDIM / PNDM
                spacing whose steps land off the next timestep.
        """
        if spacing is not None:
            raise ValueError("spacing: set timestep_spacing on the diffusers scheduler instead")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps: must be an integer >= 1, got {steps!r}")
        if self.begin:                          # the last `steps` of a (steps + begin)-step grid
            full = replace(self, begin=0).grid(steps + self.begin)
            return TimeGrid(*(v[self.begin:] for v in (full.sigmas, full.model_times, full.frame_scales)))
        sch = copy.deepcopy(self.scheduler)
        custom = sorted({"sigmas", "timesteps"} & set(self.timestep_kwargs))
        if custom:                              # they replace N, as the pipelines' retrieve_timesteps passes them
            sch.set_timesteps(device="cpu", **self.timestep_kwargs)
            given = (len(sch.timesteps) + 1) // 2 if type(sch).__name__ in _HEUN else len(sch.timesteps)
            if given != steps:
                raise ValueError(f"steps: {steps}, but the custom {' and '.join(custom)} give {type(sch).__name__} "
                                 f"{given} steps")
        else:
            sch.set_timesteps(steps, device="cpu", **self.timestep_kwargs)
        name = type(sch).__name__
        times = torch.as_tensor(sch.timesteps).detach().cpu().to(torch.float64)
        if name in _TIMESTEP:
            return self._timestep_grid(sch, times.long(), steps)
        sig = torch.as_tensor(sch.sigmas).detach().cpu().to(torch.float64)
        if name in _HEUN:                       # [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0] and [t0, t1, t1, ...]
            sig, times = torch.cat([sig[:1], sig[1::2]]), torch.cat([times[:1], times[1::2]])
        else:
            # The loop steps sigmas[i] -> sigmas[i + 1] for i < len(timesteps): a longer sigma list (Euler's
            # log_linear interpolation appends a zero after sigma_min) ends, as the pipeline does, at sigmas[N].
            sig = sig[:times.numel() + 1]
        if _is_flow(sch):
            sig = self.base.sigma_of_t(sig)     # flow time t -> VE sigma (t = 1 clamped to t_max)
        sig = _open_final_step(sig)
        times = torch.cat([times, times.new_zeros(1)])  # the last point is never evaluated
        return TimeGrid(sig, times, self.frame_scale(sig))

    def _timestep_grid(self, sch, ts: torch.Tensor, steps: int) -> TimeGrid:
        name, T = type(sch).__name__, sch.config.num_train_timesteps
        if int(ts.max()) >= T or int(ts.min()) < 0:
            raise ValueError(f"steps: {name} with {steps} steps reaches timestep {int(ts.max())}, outside its "
                             f"num_train_timesteps={T} (steps_offset={sch.config.get('steps_offset', 0)}); use "
                             f"fewer steps")
        if name == "PNDMScheduler":             # skip_prk_steps: [t0, t1, t1, t2, ...]: one grid point each
            ts = torch.unique_consecutive(ts)
        ac_all = self.base.alphas_cumprod
        if name.startswith("DDPM") or name == "LCMScheduler":   # to the next timestep, the last one to x0
            final = torch.ones(1, dtype=torch.float64)
        elif name == "TCDScheduler":            # the last step lands on training timestep 0
            final = ac_all[:1]
        else:                                   # DDIM / PNDM step from t to t - T // N
            target = ts - T // steps
            off = (target[:-1] != ts[1:]).nonzero()
            if off.numel():
                k = int(off[0, 0])
                raise ValueError(
                    f"timestep_spacing: {name} with {sch.config.timestep_spacing!r} spacing and {steps} steps moves "
                    f"from t={int(ts[k])} to t - T//N = {int(target[k])}, not to the next timestep {int(ts[k + 1])}; "
                    f"paratime steps grid point to grid point: use timestep_spacing='leading', or 'trailing' with "
                    f"N dividing num_train_timesteps={T}")
            last = int(target[-1])
            final = (ac_all[last:last + 1] if last >= 0
                     else torch.tensor([float(sch.final_alpha_cumprod)], dtype=torch.float64))
        if float(final) == float(ac_all[ts[-1]]):
            raise ValueError(f"steps_offset, set_alpha_to_one: {name}'s last step goes from t={int(ts[-1])} to the "
                             f"same alpha_bar (an empty step paratime's grid cannot hold); use steps_offset=1 or "
                             f"set_alpha_to_one=True")
        ac = torch.cat([ac_all[ts], final])
        sig = ((1 - ac) / ac).sqrt()
        times = torch.cat([ts.to(torch.float64), torch.zeros(1, dtype=torch.float64)])
        return TimeGrid(sig, times, ac.sqrt())


FINAL_STEP_NUDGE = 1e-6   # relative: a last step sigma_min -> sigma_min becomes sigma_min -> (1 - 1e-6) sigma_min


def _open_final_step(sig: torch.Tensor) -> torch.Tensor:
    """Karras / exponential / beta sigmas with ``final_sigmas_type="sigma_min"`` end on a zero-length step (the last
    timestep's sigma is sigma_min already). diffusers evaluates the model there and its DPM-Solver++ update is the
    identity (h = 0); paratime's grid must decrease strictly, so that last point moves down by ``FINAL_STEP_NUDGE``
    of sigma_min (still distinct in float32). The step then moves the sample by about 1e-6 of sigma_min times the
    model's error (ODE), or adds noise of std ``sigma_min * sqrt(2e-6)`` (SDE variants): ~1e-5 of a latent's scale."""
    # Equal up to rounding (EDM schedulers compute the two in different dtypes).
    if sig.numel() > 1 and float(sig[-1]) > 0 and float(sig[-1]) >= float(sig[-2]) * (1 - 1e-9):
        sig = torch.cat([sig[:-1], sig[-2:-1] * (1 - FINAL_STEP_NUDGE)])
    return sig


@dataclass(frozen=True)
class DiffusersEDMSchedule(DiffusersSchedule, EDMSchedule):
    """A :class:`DiffusersSchedule` over an :class:`~paratime.schedules.EDMSchedule` (``EDMEulerScheduler``,
    ``EDMDPMSolverMultistepScheduler``): the grid is the scheduler's, and it is an EDM schedule too, so the denoiser
    takes EDM's ``c_skip x + c_out F`` with its ``sigma_data`` (the EDM fields equal ``base``'s)."""


def _base_schedule(scheduler) -> NoiseSchedule:
    if type(scheduler).__name__ in _EDM:
        cfg = scheduler.config
        return EDMSchedule(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data, rho=cfg.rho)
    if _is_flow(scheduler):
        return FlowSchedule(time_scale=float(scheduler.config.num_train_timesteps))
    # A zero terminal SNR (alpha_bar = 0) is sigma = inf in the VE frame: stand in ZERO_SNR for it.
    ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clamp_min(ZERO_SNR)
    return DiscreteVPSchedule(ac, steps_offset=scheduler.config.get("steps_offset", 0))


def from_diffusers(network: torch.nn.Module, scheduler, dtype: torch.dtype | None = None,
                   sample_shape: tuple[int, ...] | str | None = "config", **denoiser_options) -> Denoiser:
    """Wrap a diffusers network and its scheduler.

    Args:
        network: ``UNet2DModel`` / ``UNet2DConditionModel``, or any callable ``network(x_in, t, **cond)`` (a
            transformer under :class:`Keyword`).
        scheduler: one of :data:`SCHEDULERS` (its config: betas, ``prediction_type``, spacing, offsets, clipping,
            sigma options).
        dtype: network dtype.
        sample_shape: ``"config"``: ``(in_channels, sample_size, sample_size)`` from the network's config when it has
            one (so ``sample(B)`` works); None: any size; or a shape.
        denoiser_options: e.g. ``guidance=7.5``.
    Returns:
        a :class:`Denoiser` on a :class:`DiffusersSchedule`; sample it with ``solver_for(scheduler)``.
    Raises:
        ValueError: an unsupported scheduler, prediction type or option.
    """
    _check_options(scheduler)
    name, cfg = type(scheduler).__name__, scheduler.config
    prediction = "flow" if _is_flow(scheduler) else _PREDICTIONS[cfg.prediction_type]
    if name == "LCMScheduler":              # the consistency model's boundary condition is part of the model
        network = LCMBoundary(network, scheduler)
    base = _base_schedule(scheduler)
    if isinstance(base, EDMSchedule):       # EDM's F_theta: the denoiser reads sigma_data off an EDMSchedule
        schedule = DiffusersEDMSchedule(base=base, scheduler=scheduler, sigma_min=base.sigma_min,
                                        sigma_max=base.sigma_max, sigma_data=base.sigma_data, rho=base.rho)
        prediction = "edm"
    else:
        schedule = DiffusersSchedule(base=base, scheduler=scheduler)
    # DDPM clips x0 before its posterior mean (the whole D); DDIM clips only its x0 term (solver_for's clip).
    clip = float(cfg.clip_sample_range) if name.startswith("DDPM") and cfg.clip_sample else None
    if sample_shape == "config":
        sample_shape = None
        ncfg = getattr(network, "config", None)
        size = getattr(ncfg, "sample_size", None) if ncfg is not None else None
        if size is not None and getattr(ncfg, "in_channels", None) is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            sample_shape = (ncfg.in_channels, *size)
    fixed = sorted(set(denoiser_options) & {"network", "schedule", "prediction", "clip_x0"})
    if fixed:           # the scheduler sets them (a TypeError about multiple values before)
        raise ValueError(f"{fixed[0]}: set by the scheduler's config, not an option of from_diffusers")
    return Denoiser(network, schedule, prediction, dtype=dtype, clip_x0=clip, sample_shape=sample_shape,
                    **denoiser_options)


def with_timestep_kwargs(denoiser: Denoiser, *, begin: int = 0, **timestep_kwargs) -> Denoiser:
    """The denoiser with ``set_timesteps`` arguments (flow matching's ``mu``) added to its diffusers schedule, and
    the grid point its loop begins at (:class:`DiffusersSchedule`'s ``begin``: img2img's ``strength``).

    Raises:
        TypeError: a denoiser not built by :func:`from_diffusers`. ValueError: a bad ``begin``.
    """
    if not isinstance(denoiser.schedule, DiffusersSchedule):
        raise TypeError("denoiser: expected one built by from_diffusers")
    return replace(denoiser, schedule=replace(denoiser.schedule, timestep_kwargs=timestep_kwargs, begin=begin))


def initial_noise(schedule: DiffusersSchedule, grid: TimeGrid, latents: torch.Tensor) -> torch.Tensor:
    """The ``noise=`` for :meth:`ParallelSampler.sample` that starts it from a pipeline's prepared ``latents`` (the
    scheduler's sample at the first grid point, ``init_noise_sigma`` already applied)."""
    s0 = grid.sigmas[:1].to(torch.float64)
    factor = (schedule.sample_scale(s0) * schedule.prior_std(s0)).to(latents.device)
    return latents.to(torch.float64) / factor


def to_latents(schedule: DiffusersSchedule, grid: TimeGrid, samples: torch.Tensor) -> torch.Tensor:
    """The scheduler's sample at the last grid point from :meth:`ParallelSampler.sample`'s ``samples`` (which are
    in the model's frame)."""
    sN = grid.sigmas[-1:].to(torch.float64)
    factor = (schedule.sample_scale(sN) / grid.frame_scales[-1:]).to(samples.device)
    return samples * factor.to(samples.dtype)


def sample_latents(sampler: ParallelSampler, latents: torch.Tensor, generator: torch.Generator | None = None,
                   **cond: Any) -> SampleResult:
    """Run the sampler from a pipeline's prepared ``latents`` (the scheduler's initial sample) as the scheduler's loop
    would; ``samples`` of the result are the scheduler's final sample.

    Args:
        sampler: a :class:`ParallelSampler` over a :func:`from_diffusers` denoiser.
        latents: ``(B, *shape)`` initial latents, ``init_noise_sigma`` applied.
        generator: the step noise of stochastic schedulers is drawn from it, in the order diffusers draws it
            (unused by a deterministic one, as in diffusers' loop, where it drew the latents).
        **cond: the network's conditioning (and ``uncond=`` for guidance).
    Returns:
        :class:`SampleResult` with ``samples`` in ``latents``' dtype.
    Raises:
        TypeError: the sampler's model is not a diffusers one.
    """
    schedule = sampler.denoiser.schedule
    if not isinstance(schedule, DiffusersSchedule):
        raise TypeError("sampler: expected a ParallelSampler over a from_diffusers denoiser")
    noise = initial_noise(schedule, sampler.grid, latents).to(sampler.state_dtype)
    res = sampler.sample(noise=noise, generator=generator if sampler.draws_step_noise else None, **cond)
    res.samples = to_latents(schedule, sampler.grid, res.samples).to(latents.dtype)
    return res


class Keyword(torch.nn.Module):
    """``network(x_in, t, **cond)`` for diffusers transformers, whose forward takes ``hidden_states=`` and
    ``timestep=`` by keyword (SD3's second positional argument is the text embedding)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    @property
    def config(self):
        return self.module.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.module(hidden_states=x, timestep=t, return_dict=False, **cond)[0]


class LCMBoundary(torch.nn.Module):
    """A latent consistency model's boundary condition folded into its eps output (``LCMScheduler.step``):

        x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t),   D = c_out(t) x0 + c_skip(t) x,
        c_skip = s_d^2 / ((k t)^2 + s_d^2),  c_out = k t / sqrt((k t)^2 + s_d^2)    (s_d = 0.5, k = timestep_scaling)

    returned as the eps whose x0 is ``D``: ``eps' = (x - sqrt(a_t) D) / sqrt(1 - a_t)``. It is affine in eps with the
    same x, so classifier-free guidance on eps' equals guidance on eps followed by the condition (as the pipeline
    does). ``x`` is the network input (the scheduler's sample: LCM does not scale it), ``t`` the integer timestep.
    """

    def __init__(self, network: torch.nn.Module, scheduler):
        super().__init__()
        self.network, self.scaling = network, float(scheduler.config.timestep_scaling)
        self.register_buffer("alphas_cumprod", torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64),
                             persistent=False)

    @property
    def config(self):
        return self.network.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        eps = self.network(x, t, **cond)
        eps = eps if isinstance(eps, torch.Tensor) else (eps.sample if hasattr(eps, "sample") else eps[0])
        shape = (-1,) + (1,) * (x.ndim - 1)
        tt = t.to(torch.float64).reshape(-1).expand(x.shape[0])
        a = self.alphas_cumprod.to(x.device)[tt.round().long()].reshape(shape)
        kt = (self.scaling * tt).reshape(shape)
        c_skip, c_out = 0.25 / (kt * kt + 0.25), kt / torch.sqrt(kt * kt + 0.25)
        x64, eps64 = x.to(torch.float64), eps.to(torch.float64)
        den = c_out * (x64 - torch.sqrt(1 - a) * eps64) / torch.sqrt(a) + c_skip * x64
        return ((x64 - torch.sqrt(a) * den) / torch.sqrt(1 - a)).to(eps.dtype)
