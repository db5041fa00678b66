"""Torch references: the arithmetic every Triton kernel must reproduce (and the path CPU users run).

Notation (per row r, features flattened to D):
    guided      o = u + g (c - u)                      (classifier-free guidance; o = c without it)
    x0          x0 = c_x[r] x + c_o[r] o                (every prediction type is linear in x and o)
    increment   dx = k_d[r] (x - x0) + k_z[r] z          (DDIM / DDPM / Euler-Maruyama with pre-drawn z)
    Picard      new[k] = start + sum_{i<=k} dx[i];  err[k] = rms(new[k] - old[k])
Accumulation is in float32 (float64 storage stays float64).
"""

from __future__ import annotations

import torch

__all__ = ["fused_step_reference", "picard_update_reference"]


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fused_step_reference(x, out, out_uncond=None, guidance=1.0, c_x=None, c_o=None, k_d=None, k_z=None, noise=None,
                         want_x0=True, want_dx=True):
    """Rows ``(M, D)``; per-row coefficients ``(M,)``. Returns ``(x0, dx)`` (None where not wanted)."""
    acc = _acc(x)
    xf, o = x.to(acc), out.to(acc)
    if out_uncond is not None:
        u = out_uncond.to(acc)
        o = u + guidance * (o - u)
    col = lambda c: c.to(acc)[:, None]  # noqa: E731
    x0 = col(c_x) * xf + col(c_o) * o
    dx = None
    if want_dx:
        dx = col(k_d) * (xf - x0)
        if noise is not None:
            dx = dx + col(k_z) * noise.to(acc)
        dx = dx.to(x.dtype)
    return (x0.to(x.dtype) if want_x0 else None), dx


def picard_update_reference(start, dx, old):
    """``start`` ``(B, D)``, ``dx`` and ``old`` ``(W, B, D)``. Returns ``new`` ``(W, B, D)`` and ``err`` ``(W, B)``."""
    acc = _acc(start)
    new = start.to(acc)[None] + dx.to(acc).cumsum(0)
    err = (new - old.to(acc)).pow(2).mean(-1).sqrt()
    return new.to(start.dtype), err.to(acc)
