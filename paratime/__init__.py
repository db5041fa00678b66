"""paratime: parallel-in-time sampling for diffusion and score-based models.

Public face: :class:`ParallelSampler` (sample any score model sequentially, with Picard iteration or with
Parareal), the model contract :class:`Denoiser` with its schedules, and the named models in :mod:`paratime.zoo`.
"""

from .denoiser import Denoiser
from .methods import RoundInfo
from .sampler import NonFiniteOutputError, ParallelSampler, SampleResult, SampleStats, SamplerConfig
from .schedules import (ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, NoiseSchedule, TimeGrid,
                        VESchedule)
from .solvers import SOLVERS, Solver, make_solver
from .zoo import load_model

__version__ = "0.1.0"

__all__ = [
    "ParallelSampler", "SampleResult", "SampleStats", "SamplerConfig", "RoundInfo", "NonFiniteOutputError",
    "Denoiser", "NoiseSchedule", "DiscreteVPSchedule", "ContinuousVPSchedule", "VESchedule", "EDMSchedule",
    "TimeGrid", "SOLVERS", "Solver", "make_solver", "load_model",
]
