"""What ``ParallelSampler.sample`` returns: the samples and what they cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

__all__ = ["SampleStats", "SampleResult"]


@dataclass
class SampleStats:
    """What a ``sample`` call cost.

    Attributes:
        rounds: sequential depth in network calls (Heun's two calls per step count twice).
        iterations: method iterations (Picard rounds, Parareal iterations, steps for ``sequential``).
        nfe: time-point evaluations per sample, averaged over the batch.
        nfe_total: time-point evaluations over the whole batch.
        wall_s: seconds spent sampling, drawing the noise included (``extra["noise_s"]``: that part alone).
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
