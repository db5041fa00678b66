"""Fused Picard update: cumulative sum of the increments from the window start, and each point's residual.

Grid: (B, ceil(D / BLOCK)), parallel over samples and feature blocks (the dispatcher picks a small BLOCK when
B * D is small, so one Stable Diffusion latent still fills the GPU). Each program walks the W window points of one
sample's feature block, keeping the running sum in float32 registers, stores the new trajectory point and writes the
block's squared change to its own slot ``part[k, b, block]``. No atomics: the caller sums the slots in a fixed
order (``part.sum(-1)``), so the residual, and every decision taken from it, is bitwise the same on every run and
every rank.
"""

import triton
import triton.language as tl


@triton.jit
def picard_update_kernel(start_ptr, dx_ptr, old_ptr, new_ptr, part_ptr, W, B, D, NBLK, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    acc = tl.load(start_ptr + b.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
    for k in range(0, W):
        row = (k * B + b).to(tl.int64)
        idx = row * D + offs
        acc += tl.load(dx_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(new_ptr + idx, acc.to(new_ptr.dtype.element_ty), mask=mask)
        diff = tl.where(mask, acc - old, 0.0)
        # This block's share of the squared change of point k: its own slot, summed later in a fixed order.
        tl.store(part_ptr + row * NBLK + blk, tl.sum(diff * diff, axis=0))
