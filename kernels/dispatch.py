"""Which implementation runs: Triton on CUDA tensors when triton is installed, the Triton interpreter on CPU
tensors when ``TRITON_INTERPRET=1``, the torch reference otherwise (and always for float64 storage).

``set_kernel_mode("torch" | "triton" | "auto")`` overrides the choice ("triton" still never launches where a kernel
cannot run: a CPU tensor without the interpreter raises instead of failing with "0 active drivers").
"""

from __future__ import annotations

import os

import torch

from .reference import fused_step_reference, picard_update_reference

__all__ = ["fused_step", "picard_update", "set_kernel_mode", "kernel_mode", "triton_usable"]

_MODE = "auto"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024


def set_kernel_mode(mode: str) -> None:
    """``auto`` (default), ``torch`` or ``triton``.

    Raises:
        ValueError: another value.
    """
    global _MODE
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"mode: unknown {mode!r}; allowed: auto, torch, triton")
    _MODE = mode


def kernel_mode() -> str:
    return _MODE


def _triton():
    try:
        from . import picard, step  # noqa: F401 - defines the kernels (interpreted if TRITON_INTERPRET=1)
    except ImportError:
        return None
    return step, picard


def triton_usable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``t``: CUDA tensor, or CPU tensor under the interpreter."""
    if t.dtype not in _TRITON_DTYPES or _triton() is None:
        return False
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _use_triton(t: torch.Tensor) -> bool:
    if _MODE == "torch":
        return False
    ok = triton_usable(t)
    if _MODE == "triton" and not ok:
        raise RuntimeError(f"kernel mode 'triton': cannot run on a {t.dtype} tensor on {t.device} "
                           "(needs CUDA, or TRITON_INTERPRET=1 on CPU, and fp32/fp16/bf16)")
    return ok


def _rows(v, M, device):
    return torch.as_tensor(v, dtype=torch.float32, device=device).expand(M).contiguous()


def fused_step(x, out, out_uncond=None, guidance=1.0, c_x=None, c_o=None, k_d=None, k_z=None, noise=None,
               want_x0=True, want_dx=True):
    """Guidance + conversion to x0 + step increment for rows ``(M, D)`` (any trailing shape is flattened).

    Args:
        x, out: states and network outputs. out_uncond: unconditional outputs (guidance on) or None.
        guidance: scale g. c_x, c_o: per-row x0 coefficients. k_d, k_z: per-row increment coefficients.
        noise: pre-drawn z or None. want_x0, want_dx: which outputs to compute.
    Returns:
        ``(x0, dx)`` shaped like ``x`` (None where not wanted).
    """
    shape, M = x.shape, x.shape[0]
    flat = lambda t: None if t is None else t.reshape(M, -1).contiguous()  # noqa: E731
    xs, os_, us, zs = flat(x), flat(out), flat(out_uncond), flat(noise)
    if not _use_triton(xs):
        x0, dx = fused_step_reference(xs, os_, us, guidance, c_x, c_o, k_d, k_z, zs, want_x0, want_dx)
    else:
        step, _ = _triton()
        D = xs.shape[1]
        x0 = torch.empty_like(xs) if want_x0 else xs.new_empty(1)
        dx = torch.empty_like(xs) if want_dx else xs.new_empty(1)
        coef = [_rows(c, M, xs.device) if c is not None else _rows(0.0, M, xs.device) for c in (c_x, c_o, k_d, k_z)]
        grid = (M, triton_cdiv(D, BLOCK))
        step.fused_step_kernel[grid](xs, os_, us if us is not None else xs, zs if zs is not None else xs, x0, dx,
                                     *coef, float(guidance), D, HAS_UNCOND=us is not None, HAS_NOISE=zs is not None,
                                     WRITE_X0=want_x0, WRITE_DX=want_dx, BLOCK=BLOCK)
        x0, dx = (x0 if want_x0 else None), (dx if want_dx else None)
    return (None if x0 is None else x0.view(shape)), (None if dx is None else dx.view(shape))


def picard_update(start, dx, old):
    """``start`` ``(B, *shape)``, ``dx`` and ``old`` ``(W, B, *shape)`` -> ``new`` ``(W, B, *shape)``, ``err``
    ``(W, B)`` (RMS over features of ``new - old``)."""
    W, B = dx.shape[:2]
    s, d, o = start.reshape(B, -1).contiguous(), dx.reshape(W, B, -1).contiguous(), old.reshape(W, B, -1).contiguous()
    if not _use_triton(s):
        new, err = picard_update_reference(s, d, o)
    else:
        _, picard = _triton()
        D = s.shape[1]
        new = torch.empty_like(d)
        err_sq = torch.zeros((W, B), dtype=torch.float32, device=s.device)
        picard.picard_update_kernel[(B, triton_cdiv(D, BLOCK))](s, d, o, new, err_sq, W, B, D, BLOCK=BLOCK)
        err = (err_sq / D).sqrt()
    return new.view(dx.shape), err


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
