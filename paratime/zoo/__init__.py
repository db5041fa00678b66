"""Named models shipped with paratime: ``gmm`` (analytic 8-Gaussian ring), ``digits`` (a small trained U-Net) and
``policy`` (an untrained policy-sized MLP for latency benchmarks)."""

from __future__ import annotations

from typing import Callable

from ..denoiser import Denoiser
from .gmm import GaussianMixture, ring_gmm

__all__ = ["MODELS", "load_model", "GaussianMixture", "ring_gmm"]


def _digits(**kw) -> Denoiser:
    from .digits import load_digits_model

    return load_digits_model(**kw)


def _policy(**kw) -> Denoiser:
    from .policy import policy_model

    return policy_model(**kw)


MODELS: dict[str, Callable[..., Denoiser]] = {"gmm": ring_gmm, "digits": _digits, "policy": _policy}


def load_model(name: str, **options) -> Denoiser:
    """A named model as a :class:`~paratime.denoiser.Denoiser`.

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in MODELS:
        raise ValueError(f"model: unknown {name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[name](**options)
