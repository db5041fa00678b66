"""Langevin correction (predictor-corrector) on the Gaussian mixture."""

import pytest
import torch

from paratime import ParallelSampler
from paratime.zoo import ring_gmm


def _mode_std(x, means):
    k = torch.cdist(x, means).argmin(1)
    return float(torch.stack([x[k == j].std(0).mean() for j in range(8)]).mean()), torch.bincount(k, minlength=8)


def test_corrector_moves_the_marginal_towards_the_target():
    """DDPM-100 under-disperses the modes (std ~0.273 for 0.3). Langevin steps at each noise level pull the
    samples towards p_sigma, so the per-mode std comes back to 0.3 while the mode weights stay uniform."""
    model = ring_gmm()
    means = model.network.gmm.means
    plain = ParallelSampler(model, solver="ddpm", steps=100, method="sequential", progress=False).sample(4000, seed=3)
    corr = ParallelSampler(model, solver="ddpm", steps=100, method="sequential", corrector_snr=1.0,
                           corrector_steps=2, progress=False).sample(4000, seed=3)
    std_plain, _ = _mode_std(plain.samples, means)
    std_corr, counts = _mode_std(corr.samples, means)
    assert abs(std_plain - 0.3) > 0.02
    assert abs(std_corr - 0.3) < 0.012, std_corr
    chi2 = float(((counts.double() - 500) ** 2 / 500).sum())
    assert chi2 < 24.3
    assert corr.stats.rounds == 100 + 2 * 99        # one predictor call, two corrector calls (none at sigma = 0)


@pytest.mark.parametrize("method", ["picard", "parareal"])
def test_corrector_inside_parallel_methods_reaches_the_sequential_sample(method):
    model = ring_gmm()
    kw = dict(solver="ddim", steps=20, corrector_snr=0.5, progress=False)
    seq = ParallelSampler(model, method="sequential", **kw).sample(16, seed=1)
    par = ParallelSampler(model, method=method, tol=0.0, **kw).sample(16, seed=1)
    torch.testing.assert_close(par.samples, seq.samples, rtol=0, atol=1e-9)


def test_corrector_options_are_checked():
    with pytest.raises(ValueError, match="corrector_snr"):
        ParallelSampler("gmm", corrector_snr=0.0)
    with pytest.raises(ValueError, match="corrector_steps"):
        ParallelSampler("gmm", corrector_snr=0.1, corrector_steps=0)
