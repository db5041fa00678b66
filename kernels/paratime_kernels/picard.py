"""Fused Picard update: cumulative sum of the increments from the window start, and each point's residual.

A tiled scan with a carry. Grid: (B, ceil(D / BLOCK)), parallel over samples and feature blocks (the dispatcher
picks a small BLOCK when B * D is small, so one Stable Diffusion latent still fills the GPU). Each program walks its
sample's feature block through the window WT points at a time: it loads a ``(WT, BLOCK)`` tile of increments and
old values at once (WT rows of loads in flight instead of one), scans the tile along the window
(``tl.cumsum(axis=0)``), adds the carry (the window start plus every earlier tile's increments, in float32
registers), stores the WT new points, and carries the tile's last row on. Each point's squared change over the block
goes to its own slot ``part[k, b, block]``. No atomics: the caller sums the slots in a fixed order
(``part.sum(-1)``), so the residual, and every decision taken from it, is bitwise the same on every run and rank.

Shapes: ``start`` (B, D), ``dx``, ``old``, ``new`` (W, B, D) contiguous; ``part`` (W, B, NBLK) float32.
"""

import triton
import triton.language as tl


@triton.jit
def picard_update_kernel(start_ptr, dx_ptr, old_ptr, new_ptr, part_ptr, W, B, D, NBLK, BLOCK: tl.constexpr,
                         WT: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)                  # (BLOCK,) features of this program
    fmask = offs < D
    ks = tl.arange(0, WT)                                     # (WT,) window points of one tile
    # Carry: y_p + sum of the increments of the tiles before, (BLOCK,) in float32.
    carry = tl.load(start_ptr + b.to(tl.int64) * D + offs, mask=fmask, other=0.0).to(tl.float32)
    for t in range(0, W, WT):
        k = t + ks                                            # (WT,) points of this tile
        rows = (k * B + b).to(tl.int64)                       # (WT,) row k of (W, B)
        idx = rows[:, None] * D + offs[None, :]               # (WT, BLOCK)
        m = (k < W)[:, None] & fmask[None, :]
        d = tl.load(dx_ptr + idx, mask=m, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + idx, mask=m, other=0.0).to(tl.float32)
        # new_k = carry + sum_{i <= k in the tile} dx_i (masked rows add 0, so the last row holds the tile's total).
        new = tl.cumsum(d, axis=0) + carry[None, :]
        tl.store(new_ptr + idx, new.to(new_ptr.dtype.element_ty), mask=m)
        carry = tl.sum(tl.where((ks == WT - 1)[:, None], new, 0.0), axis=0)
        diff = tl.where(m, new - old, 0.0)
        # This block's share of each point's squared change: its own slot, summed later in a fixed order.
        tl.store(part_ptr + rows * NBLK + blk, tl.sum(diff * diff, axis=1), mask=k < W)
