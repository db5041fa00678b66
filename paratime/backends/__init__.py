"""Backends by name: ``local`` (one device), ``torch`` (torch.distributed SPMD), ``ray`` (Ray actors); the memory
bounds every backend honours (:mod:`.memory`)."""

from __future__ import annotations

from .base import Backend, cast_network
from .local import LocalBackend
from .memory import DeviceMemoryError, check_memory, noise_draws, window_buffers

__all__ = ["Backend", "LocalBackend", "BACKENDS", "make_backend", "cast_network", "check_memory", "noise_draws",
           "DeviceMemoryError", "window_buffers"]


def _torch_backend(**kw):
    from .torch_dist import TorchDistributedBackend

    return TorchDistributedBackend(**kw)


def _ray_backend(**kw):
    from .ray_actors import RayBackend

    return RayBackend(**kw)


BACKENDS = {"local": LocalBackend, "torch": _torch_backend, "ray": _ray_backend}


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
    try:
        return BACKENDS[backend](**options)
    except TypeError as e:
        raise ValueError(f"backend_options: {backend!r} does not take {sorted(options)}: {e}") from e
