"""Fixed-shape rounds: with ``buckets=`` every network call is padded to a bucket size (so a compiled network or a
CUDA graph sees a few shapes), and the samples are those of the unpadded run."""

import pytest
import torch

from paratime import ParallelSampler
from paratime.backends import LocalBackend
from paratime.denoiser import Denoiser
from paratime.schedules import DiscreteVPSchedule


def _run(backend, method, sizes):
    def net(x, t):                     # row-wise: padding cannot change a row's output
        sizes.append(x.shape[0])
        return torch.tanh(x) * (t[:, None, None] / 1000)

    den = Denoiser(net, DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02), "eps", sample_shape=(3, 5))
    window = dict(window=12) if method == "picard" else {}     # an option a method does not read is refused
    return ParallelSampler(den, solver="ddpm", steps=30, method=method, backend=backend, progress=False,
                           tol=1e-3, **window).sample(3, seed=0)


@pytest.mark.parametrize("method", ["picard", "parareal"])
def test_padded_rounds_give_the_same_samples_and_only_bucket_shapes(method):
    plain, padded = [], []
    ref = _run(LocalBackend(), method, plain)
    got = _run(LocalBackend(buckets=(4, 16, 32)), method, padded)
    assert len(set(plain)) > 3                                   # unpadded: the rows change round by round
    assert set(padded) <= {4, 16, 32}
    assert torch.equal(got.samples, ref.samples)
    assert got.stats.nfe == ref.stats.nfe and got.stats.rounds == ref.stats.rounds   # padding is not counted


@pytest.mark.parametrize("bad", [(), (4, 4), (8, 2), (0, 4), [1.5], "8", (True, 4)])
def test_bad_buckets_are_refused(bad):
    with pytest.raises(ValueError, match="buckets"):
        LocalBackend(buckets=bad)
