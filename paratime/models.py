"""The model registry (names -> factories returning a :class:`~paratime.denoiser.Denoiser`) and the one place
where whatever a user hands the sampler (a name, a Denoiser, a raw network) becomes a Denoiser.

It sits just above the model contract so that every layer (backends building replicas, the sampler accepting a
name) can turn a name into a model without importing the zoo, which registers its shipped models here when
``paratime`` is imported. A name travels to other processes as ``functools.partial(load_model, name)``.
"""

from __future__ import annotations

import functools
from dataclasses import fields, replace
from typing import Callable

import torch

from .denoiser import PREDICTIONS, Denoiser, check_sample_shape
from .schedules import (ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, FlowSchedule, NoiseSchedule,
                        VESchedule)

__all__ = ["MODELS", "register_model", "load_model", "model_factory", "as_denoiser", "state_device", "read_weights",
           "load_weights", "load_factory", "user_model", "SCHEDULES", "make_schedule"]

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
    _check_model_options(name, options)
    return MODELS[name](**options)


def _check_model_options(name, options: dict) -> None:
    """``name`` is registered and its loader takes every key of ``options`` (named here, not a TypeError)."""
    import inspect

    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model: unknown {name!r}; allowed: {', '.join(sorted(MODELS))}")
    params = inspect.signature(MODELS[name]).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise TypeError(f"{unknown[0]}: not an option of the {name!r} model; it takes "
                            f"{', '.join(params) or 'none'}")


def model_factory(name: str, **options) -> Callable[[], Denoiser]:
    """A picklable zero-argument factory for a named model (what backends ship to their workers); the name and
    options are checked here, not where a worker first calls it."""
    _check_model_options(name, options)
    return functools.partial(load_model, name, **options)


#: Schedules a user's raw network can be paired with by name (``paratime sample --schedule``).
SCHEDULES: dict[str, Callable[[], NoiseSchedule]] = {
    "ddpm-linear": lambda: DiscreteVPSchedule.from_betas("linear", 1000),            # DDPM / Stable Diffusion betas
    "ddpm-cosine": lambda: DiscreteVPSchedule.from_betas("squaredcos_cap_v2", 1000),  # improved DDPM's cosine
    "vp": ContinuousVPSchedule,
    "ve": VESchedule,
    "edm": EDMSchedule,
    "flow": FlowSchedule,
}


def make_schedule(name: str) -> NoiseSchedule:
    """The schedule :data:`SCHEDULES` names, with its default parameters.

    Raises:
        ValueError: unknown ``name``.
    """
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"schedule: unknown {name!r}; allowed: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]()


def load_factory(spec: str) -> Callable:
    """The callable ``spec`` = ``"package.module:attribute"`` names (imported now).

    Raises:
        ValueError: ``spec`` is not ``module:attribute``, the module cannot be imported, it has no such attribute,
            or the attribute is not callable; the message names ``model`` and ``spec``.
    """
    import importlib

    module, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module or not attr or not all(p.isidentifier() for p in (*module.split("."), *attr.split("."))):
        raise ValueError(f"model: expected a registered name ({', '.join(sorted(MODELS))}) or package.module:factory, "
                         f"got {spec!r}")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"model: cannot import {module!r} for {spec!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model: {spec!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def user_model(spec: str, prediction: str | None = None, schedule: NoiseSchedule | str | None = None,
               sample_shape: tuple[int, ...] | None = None) -> Denoiser:
    """Call the factory ``spec`` (``package.module:factory``, no arguments) and adapt what it returns: a
    :class:`Denoiser` as it is, or a network ``net(x_in, t, **cond)`` with ``prediction`` and ``schedule``;
    ``sample_shape`` sets the per-sample shape (a Denoiser that declares another is refused).

    Picklable as ``functools.partial(user_model, spec, ...)``, so workers build the model themselves.

    Raises:
        ValueError: see :func:`load_factory`; ``prediction`` / ``schedule`` missing for a network or given for a
            Denoiser; the factory raised. TypeError: the factory returned something that is neither.
    """
    factory = load_factory(spec)
    if isinstance(schedule, str):
        schedule = make_schedule(schedule)
    if prediction is not None and prediction not in PREDICTIONS:       # before the user's factory runs
        raise ValueError(f"prediction: unknown {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
    one_dim = isinstance(sample_shape, int) and not isinstance(sample_shape, bool)      # --sample-shape 2
    sample_shape = check_sample_shape((sample_shape,) if one_dim else sample_shape)
    try:
        made = factory()
    except Exception as e:  # noqa: BLE001 - the user's code: report it as the model's fault, with its message
        raise ValueError(f"model: {spec}() raised {type(e).__name__}: {e}") from e
    if isinstance(made, Denoiser):
        given = [n for n, v in (("prediction", prediction), ("schedule", schedule)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: {spec}() returns a Denoiser, which sets its own; drop the option")
        if sample_shape is not None and made.sample_shape is not None and \
                tuple(made.sample_shape) != tuple(sample_shape):
            raise ValueError(f"sample_shape: {spec}() returns a Denoiser that declares sample_shape="
                             f"{tuple(made.sample_shape)}; drop the option, or build the Denoiser with "
                             f"{tuple(sample_shape)}")
        return made if sample_shape is None else replace(made, sample_shape=sample_shape)
    if not callable(made):
        raise TypeError(f"model: {spec}() returned a {type(made).__name__}; expected a Denoiser or a network "
                        f"net(x_in, t, **cond)")
    missing = [n for n, v in (("prediction", prediction), ("schedule", schedule)) if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)}: required because {spec}() returns a network, not a Denoiser")
    return as_denoiser(made, schedule, prediction, **({} if sample_shape is None else
                                                      {"sample_shape": sample_shape}))


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
        unknown = sorted(set(options) - {f.name for f in fields(Denoiser)})
        if unknown:
            raise TypeError(f"{unknown[0]}: not a Denoiser option")
        return replace(model, **kw, **options) if kw or options else model
    if not callable(model):
        raise TypeError(f"model: expected a Denoiser, a model name or a callable network, got {type(model).__name__}")
    if schedule is None or prediction is None:
        raise ValueError("schedule, prediction: required when model is a raw network")
    return Denoiser(model, schedule, prediction, dtype=dtype, clip_x0=clip_x0, **options)


def read_weights(path, argument: str = "path", prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the ``paratime`` metadata of a ``.safetensors`` weights file, checked.

    Args:
        path: the file. argument: the argument (or flag) that named it, for the messages.
        prefix: keep only the tensors whose names start with it (the prefix removed).
    Returns:
        ``(tensors as float32 on the CPU, metadata dict)``.
    Raises:
        FileNotFoundError: no file at ``path``. ValueError: a directory, an empty, truncated or foreign file (not
            safetensors, or no tensor under ``prefix``), or unreadable metadata; the message names ``argument`` and
            the path.
    """
    import json
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{argument}: no weights file at {p}")
    if not p.is_file():
        raise ValueError(f"{argument}: {p} is not a file; give a .safetensors weights file")
    if p.stat().st_size == 0:
        raise ValueError(f"{argument}: {p} is empty; expected a .safetensors weights file")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            state = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{argument}: {p} is not a readable .safetensors file (truncated or another format?): "
                         f"{e}") from None
    if not state:
        raise ValueError(f"{argument}: {p} holds no tensor named {prefix or ''}*; is it another model's file?")
    try:
        info = json.loads(meta.get("paratime", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{argument}: {p} has unreadable paratime metadata: {e}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{argument}: {p} has unreadable paratime metadata (not a JSON object)")
    return state, info


def load_weights(make: Callable[..., torch.nn.Module], state: dict, config: dict, path, argument: str = "path",
                 what: str = "model") -> torch.nn.Module:
    """``make(**config)`` with ``state`` loaded strictly, a mismatch reported as the file's fault.

    Raises:
        ValueError: the config or the tensors do not fit ``make`` (a foreign file), naming ``argument`` and the path.
    """
    try:
        module = make(**config)
        module.load_state_dict(state)
    except (TypeError, RuntimeError, ValueError) as e:
        first = " ".join(str(e).split())[:300]
        raise ValueError(f"{argument}: {path} does not hold {what} weights ({first})") from None
    return module


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
    if p is None:
        return device
    if p.device.type != device.type or device.index not in (None, p.device.index or 0):   # cuda:1 against cuda:0
        raise ValueError(f"device: the network is on {p.device} but device={device}; move one of them")
    return p.device if device.index is None else device      # device="cuda": the network's own cuda:N
