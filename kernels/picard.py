"""Fused Picard update: cumulative sum of the increments from the window start, and each point's residual.

Grid: (B, ceil(D / BLOCK)). Each program walks the W window points of one sample's feature block, keeping the
running sum in float32 registers, stores the new trajectory point and adds the block's squared change to
``err_sq[k, b]`` (float32, atomically; the caller takes ``sqrt(err_sq / D)``).
"""

import triton
import triton.language as tl


@triton.jit
def picard_update_kernel(start_ptr, dx_ptr, old_ptr, new_ptr, errsq_ptr, W, B, D, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    acc = tl.load(start_ptr + b.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
    for k in range(0, W):
        idx = (k * B + b).to(tl.int64) * D + offs
        acc += tl.load(dx_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(new_ptr + idx, acc.to(new_ptr.dtype.element_ty), mask=mask)
        diff = tl.where(mask, acc - old, 0.0)
        tl.atomic_add(errsq_ptr + k * B + b, tl.sum(diff * diff, axis=0))
