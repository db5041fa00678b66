"""The model registry (names -> factories returning a :class:`~paratime.denoiser.Denoiser`) and the one place
where whatever a user hands the sampler (a name, a Denoiser, a raw network) becomes a Denoiser.

It sits just above the model contract so that every layer (backends building replicas, the sampler accepting a
name) can turn a name into a model without importing the zoo, which registers its shipped models here when
``paratime`` is imported. A name travels to other processes as ``functools.partial(load_model, name)``.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Callable

import torch

from .denoiser import Denoiser
from .schedules import NoiseSchedule

__all__ = ["MODELS", "register_model", "load_model", "model_factory", "as_denoiser", "state_device"]

MODELS: dict[str, Callable[..., Denoiser]] = {}


def register_model(name: str, factory: Callable[..., Denoiser]) -> None:
    """Make ``load_model(name, **options)`` call ``factory(**options)``.

    Raises:
        ValueError: ``name`` is not a non-empty string or is already taken by another factory.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable, got {type(factory).__name__}")
    if MODELS.get(name, factory) is not factory:
        raise ValueError(f"name: {name!r} is already registered")
    MODELS[name] = factory


def load_model(name: str, **options) -> Denoiser:
    """A named model as a :class:`~paratime.denoiser.Denoiser`.

    Raises:
        ValueError: unknown ``name``.
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model: unknown {name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[name](**options)


def model_factory(name: str, **options) -> Callable[[], Denoiser]:
    """A picklable zero-argument factory for a named model (what backends ship to their workers)."""
    if name not in MODELS:
        raise ValueError(f"model: unknown {name!r}; allowed: {', '.join(sorted(MODELS))}")
    return functools.partial(load_model, name, **options)


def as_denoiser(model, schedule: NoiseSchedule | None = None, prediction: str | None = None,
                clip_x0: float | None = None, dtype: torch.dtype | None = None, **options) -> Denoiser:
    """A registered name, a :class:`Denoiser` or a raw network ``net(x_in, t, **cond)`` as a Denoiser.

    Args:
        schedule, prediction: required for a raw network, refused for the other two.
        clip_x0, dtype, **options: :class:`Denoiser` fields to set (guidance, classifier, ...).
    Raises:
        ValueError, TypeError: naming the argument.
    """
    if isinstance(model, str):
        model = load_model(model)
    if isinstance(model, Denoiser):
        if schedule is not None or prediction is not None:
            raise ValueError("schedule, prediction: already set by the Denoiser given as model")
        kw = {k: v for k, v in (("clip_x0", clip_x0), ("dtype", dtype)) if v is not None}
        return replace(model, **kw, **options) if kw or options else model
    if not callable(model):
        raise TypeError(f"model: expected a Denoiser, a model name or a callable network, got {type(model).__name__}")
    if schedule is None or prediction is None:
        raise ValueError("schedule, prediction: required when model is a raw network")
    return Denoiser(model, schedule, prediction, dtype=dtype, clip_x0=clip_x0, **options)


def state_device(denoiser: Denoiser, device=None) -> torch.device:
    """Where the state lives: ``device`` if given (it must agree with the network's), else the network's device
    (from its parameters or buffers), else the CPU.

    Raises:
        ValueError: ``device`` is not a device, or the network is elsewhere.
    """
    net = denoiser.network
    p = None
    if isinstance(net, torch.nn.Module):
        p = next(net.parameters(), None)
        p = next(net.buffers(), None) if p is None else p
    if device is None:
        return p.device if p is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: not a device: {device!r}") from e
    if p is not None and p.device.type != device.type:
        raise ValueError(f"device: the network is on {p.device} but device={device}; move one of them")
    return device
