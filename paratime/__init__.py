"""paratime: parallel-in-time sampling for diffusion and score-based models.

Public face: :class:`ParallelSampler` (sample any score model sequentially, with Picard iteration or with
Parareal), the model contract :class:`Denoiser` with its schedules, and the named models in :mod:`paratime.zoo`.
"""

from .denoiser import Denoiser
from .methods import RoundInfo
from .config import SamplerConfig
from .evaluator import NonFiniteOutputError
from .results import SampleResult, SampleStats
from .sampler import ParallelSampler
from .schedules import (ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, NoiseSchedule, TimeGrid,
                        VESchedule)
from .solvers import SOLVERS, Solver, make_solver
from .models import load_model, register_model
from . import zoo  # noqa: F401 - registers the shipped models

__version__ = "0.1.0"

__all__ = [
    "ParallelSampler", "SampleResult", "SampleStats", "SamplerConfig", "RoundInfo", "NonFiniteOutputError",
    "Denoiser", "NoiseSchedule", "DiscreteVPSchedule", "ContinuousVPSchedule", "VESchedule", "EDMSchedule",
    "TimeGrid", "SOLVERS", "Solver", "make_solver", "load_model", "register_model", "parallelize",
]


def __getattr__(name):
    # Lazy: ``paratime.parallelize`` imports diffusers only when first used.
    if name == "parallelize":
        from .integrations.pipelines import parallelize

        return parallelize
    raise AttributeError(f"module 'paratime' has no attribute {name!r}")
