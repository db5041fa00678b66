"""Backends by name: ``local`` (one device), ``torch`` (torch.distributed SPMD), ``ray`` (Ray actors); the memory
bounds every backend honours (:mod:`.memory`)."""

from __future__ import annotations

import inspect

from .base import Backend, cast_network
from .local import LocalBackend
from .memory import DeviceMemoryError, check_memory, guidance_buffers, noise_draws, window_buffers

__all__ = ["Backend", "LocalBackend", "BACKENDS", "make_backend", "cast_network", "check_memory", "noise_draws",
           "DeviceMemoryError", "window_buffers", "guidance_buffers"]


def _torch_backend():
    from .torch_dist import TorchDistributedBackend

    return TorchDistributedBackend


def _ray_backend():
    from .ray_actors import RayBackend

    return RayBackend


#: name -> a zero-argument function returning the backend's class (imported only when used)
BACKENDS = {"local": lambda: LocalBackend, "torch": _torch_backend, "ray": _ray_backend}


def make_backend(backend: str | Backend, **options) -> Backend:
    """A backend instance from a name (``options`` go to its constructor) or an instance as is.

    Raises:
        ValueError: unknown name, or options the backend does not take.
    """
    if isinstance(backend, Backend):
        if options:
            raise ValueError(f"backend_options: given with a Backend instance ({sorted(options)})")
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name or a Backend, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown {backend!r}; allowed: {', '.join(BACKENDS)}")
    cls = BACKENDS[backend]()
    takes = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(takes))
    if unknown:         # named here: a TypeError raised inside a constructor is not an unknown option
        raise ValueError(f"backend_options: {backend!r} does not take {unknown}; it takes {', '.join(takes)}")
    return cls(**options)
