"""Scoring samples against their sequential reference, one figure per sample: the benchmarks that check a tolerance
(``bound_hunt``, ``sliding_worst``, ``fixed_scale_worst``, ``accuracy_sweep``, the suite) all judge a sample by its
largest element error over the tolerance in force for it (``SampleStats.tol_abs``, in the sample's own units).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["sample_errors"]


def sample_errors(samples: torch.Tensor, reference: torch.Tensor,
                  tol_abs: Sequence[float] | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's max |Δ| against ``reference`` and that over its tolerance, in float64.

    Args:
        samples: ``(B, *shape)`` the samples scored (B >= 1).
        reference: ``(B, *shape)`` their sequential twins (the same noise).
        tol_abs: the tolerance in force per sample, B values (``SampleStats.tol_abs``), or one for every sample.
    Returns:
        ``(err, ratio)``, both float64 ``(B,)``: ``err[b] = max |samples[b] - reference[b]|`` over the sample's
        elements (the difference taken in float64) and ``ratio[b] = err[b] / tol_abs[b]`` (> 1: over tol).
    Raises:
        ValueError: ``reference``'s shape is not ``samples``', ``samples`` holds no sample, or ``tol_abs`` is not B
            values.
    """
    if reference.shape != samples.shape:
        raise ValueError(f"reference: shape {tuple(reference.shape)}, expected the samples' {tuple(samples.shape)}")
    if samples.ndim == 0 or len(samples) == 0:
        raise ValueError(f"samples: expected (B, *shape) with B >= 1, got shape {tuple(samples.shape)}")
    err = (samples.double() - reference.double()).reshape(len(samples), -1).abs().amax(1)     # (B,)
    tol = torch.as_tensor(tol_abs, dtype=torch.float64, device=err.device)
    if tol.ndim > 1 or (tol.ndim == 1 and len(tol) != len(err)):
        raise ValueError(f"tol_abs: expected one value or {len(err)} (one per sample), got shape {tuple(tol.shape)}")
    return err, err / tol                                                                         # (B,), (B,)
