"""The benchmarks' per-sample score (benchmarks/scoring.py): each sample's max |Δ| against its reference and that over
the tolerance in force for it, on tensors small enough to check by hand."""

import pytest
import torch

from paratime.bench.scoring import sample_errors


def test_each_samples_max_abs_error_and_its_ratio_to_its_own_tolerance():
    ref = torch.tensor([[1.0, 1.0], [0.0, 0.0], [3.0, -3.0]], dtype=torch.float64)
    x = torch.tensor([[1.5, -1.0], [0.1, 0.0], [3.0, -3.0]], dtype=torch.float64)      # |Δ|: (0.5, 2), (0.1, 0), 0
    err, ratio = sample_errors(x, ref, [4.0, 0.05, 1.0])
    assert err.tolist() == [2.0, pytest.approx(0.1, rel=1e-15), 0.0]
    assert ratio.tolist() == [0.5, pytest.approx(2.0, rel=1e-15), 0.0]                 # sample 1 is over its tol
    assert err.dtype == ratio.dtype == torch.float64 and err.shape == ratio.shape == (3,)


def test_the_max_runs_over_every_element_of_a_sample_and_one_tolerance_serves_all():
    ref = torch.zeros(2, 1, 2, 2, dtype=torch.float32)                                  # (B, C, H, W)
    x = ref.clone()
    x[0, 0, 1, 0], x[1, 0, 0, 1] = -0.25, 0.5
    err, ratio = sample_errors(x, ref, 0.5)
    assert err.tolist() == [0.25, 0.5] and ratio.tolist() == [0.5, 1.0]                # 1.0: at tol, not over
    assert err.dtype == torch.float64                                                    # float32 in, float64 out


def test_the_difference_is_taken_in_float64():
    # float32 rounds 1 - 2^-30 to 1; in float64 it is exact: the helper casts before it subtracts (as the suite did).
    x, ref = torch.tensor([[1.0]]), torch.tensor([[2.0**-30]])                          # float32
    assert sample_errors(x, ref, [1.0])[0].tolist() == [1 - 2.0**-30]


@pytest.mark.parametrize("ref_shape, tol_abs, match", [
    ((3, 3), [1.0] * 3, r"^reference: shape \(3, 3\), expected the samples' \(3, 2\)"),
    ((2, 2), [1.0] * 3, r"^reference: shape \(2, 2\)"),
    ((3, 2), [1.0] * 2, r"^tol_abs: expected one value or 3 \(one per sample\), got shape \(2,\)"),
    ((3, 2), [[1.0] * 3], r"^tol_abs: .* got shape \(1, 3\)"),
])
def test_a_mismatched_shape_names_the_argument(ref_shape, tol_abs, match):
    with pytest.raises(ValueError, match=match):
        sample_errors(torch.zeros(3, 2), torch.zeros(ref_shape), tol_abs)


def test_no_samples_is_refused():
    with pytest.raises(ValueError, match=r"^samples: expected \(B, \*shape\) with B >= 1, got shape \(0, 2\)"):
        sample_errors(torch.zeros(0, 2), torch.zeros(0, 2), [])
