"""Pictures without extra dependencies: a PNG writer, an image grid and a 2-D scatter plot."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .checks import check_int, check_number

__all__ = ["write_png", "image_grid", "scatter_image", "save_samples_png"]


def write_png(path: str | Path, pixels: np.ndarray) -> None:
    """Write ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 pixels as a PNG.

    Raises:
        ValueError: ``pixels`` not uint8 (a cast wrapped 300 to 44 and floats in [0, 1] to black), not ``(H, W)`` or
            ``(H, W, 3)``, or empty.
    """
    px = np.asarray(pixels)
    if px.dtype != np.uint8:
        raise ValueError(f"pixels: expected uint8 values, got {px.dtype}")
    px = np.ascontiguousarray(px)
    if px.ndim == 2:
        colour = 0
    elif px.ndim == 3 and px.shape[2] == 3:
        colour = 2
    else:
        raise ValueError(f"pixels: expected (H, W) or (H, W, 3), got {px.shape}")
    if px.size == 0:
        raise ValueError(f"pixels: expected at least one pixel, got {px.shape}")
    h, w = px.shape[:2]
    raw = b"".join(b"\x00" + px[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
                           + chunk(b"IEND", b""))


def image_grid(images: torch.Tensor, upscale: int = 8, pad: int = 2, nrow: int | None = None,
               value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """``(B, C, H, W)`` images in ``value_range`` to one uint8 grid (grey for C=1, RGB for C=3).

    Raises:
        ValueError: ``images`` not ``(B >= 1, 1 or 3, H, W)`` or not finite (NaN was cast to black);
            ``value_range`` not finite ``(lo, hi)`` with ``lo < hi``; ``upscale``, ``pad``, ``nrow`` out of range.
    """
    x = images.detach().float().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"images: expected (B, 1 or 3, H, W) with B >= 1, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images: contains NaN or inf")
    check_int("upscale", upscale, 1)
    check_int("pad", pad, 0)
    check_int("nrow", nrow, 1, none=True)
    if len(value_range) != 2 or not all(np.isfinite(value_range)) or not value_range[0] < value_range[1]:
        raise ValueError(f"value_range: expected finite (lo, hi) with lo < hi, got {value_range!r}")
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    B, C, H, W = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(B)))
    ncol = int(np.ceil(B / nrow))
    out = np.full((ncol * (H + pad) + pad, nrow * (W + pad) + pad, C), 0.5, dtype=np.float32)
    for i in range(B):
        r, c = divmod(i, nrow)
        out[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = \
            x[i].permute(1, 2, 0).numpy()
    out = (out * 255).round().astype(np.uint8)
    return out[..., 0] if C == 1 else out


def scatter_image(points: torch.Tensor, size: int = 512, extent: float | None = None,
                  reference: torch.Tensor | None = None) -> np.ndarray:
    """A 2-D scatter of ``(B, 2)`` points as RGB pixels (samples blue, optional reference points grey).

    Raises:
        ValueError: ``points`` not ``(B >= 1, 2)``; ``size`` < 1; ``extent`` not None or a finite number > 0 (0 was
            read as None, a negative one mirrored the plot).
    """
    p = points.detach().double().cpu()
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 1:
        raise ValueError(f"points: expected (B, 2) with B >= 1, got {tuple(p.shape)}")
    check_int("size", size, 1)
    check_number("extent", extent, 0, low_open=True, none=True)
    p = p[torch.isfinite(p).all(1)]           # a non-finite point is not drawn (one NaN blanked the whole plot)
    ext = extent if extent is not None else (float(p.abs().max()) if p.numel() else 1.0) * 1.1 + 1e-9
    img = np.full((size, size, 3), 255, dtype=np.uint8)

    def draw(q, colour):
        ij = ((q.numpy() / ext + 1) / 2 * (size - 1)).round().astype(int)
        for x, y in ij:
            if 0 <= x < size and 0 <= y < size:
                img[max(size - 1 - y - 1, 0):size - y + 1, max(x - 1, 0):x + 2] = colour

    if reference is not None:
        ref = reference.detach().double().cpu()
        draw(ref[torch.isfinite(ref).all(1)], (190, 190, 190))
    draw(p, (31, 119, 180))
    return img


def save_samples_png(path: str | Path, samples: torch.Tensor, **kw) -> None:
    """A PNG of samples: a scatter for ``(B, 2)``, an image grid for ``(B, C, H, W)``."""
    if samples.ndim == 2 and samples.shape[1] == 2:
        write_png(path, scatter_image(samples, **kw))
    else:
        write_png(path, image_grid(samples, **kw))
