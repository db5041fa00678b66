"""Triton kernels fused around each network call, each beside its torch reference, behind one dispatcher.

Modules: :mod:`.step` (guidance + parameterisation conversion + step increment), :mod:`.picard` (cumulative sum
from the window start + per-point residuals), :mod:`.dispatch` (which implementation runs), :mod:`.aot`
(ahead-of-time compilation for sm_80 / sm_90 with register and spill counts).
"""

from .dispatch import (SAMPLER_LAUNCHES, Launch, fused_step, kernel_mode, kernels, launch_device, picard_update,
                       record_launches, set_kernel_mode, triton_missing, triton_usable)
from .reference import cumsum0

__all__ = ["fused_step", "picard_update", "kernels", "set_kernel_mode", "kernel_mode", "triton_usable",
           "triton_missing", "Launch", "SAMPLER_LAUNCHES", "record_launches", "cumsum0", "launch_device"]
