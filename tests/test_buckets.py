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


def test_max_batch_between_buckets_runs_chunks_of_the_largest_bucket_under_it():
    """A chunk is padded up to a bucket, so with max_batch 3 and buckets (2, 8) a call runs as chunks of 2 rows (it
    ran chunks of 3 padded to 8: calls over max_batch), and the plan prices those chunks."""
    sizes = []
    ref = _run(LocalBackend(), "picard", [])
    got = _run(LocalBackend(max_batch=3, buckets=(2, 8)), "picard", sizes)
    assert set(sizes) == {2} and torch.equal(got.samples, ref.samples)
    st = got.stats
    assert st.round_sce == pytest.approx([-(-rows // 2) for rows in st.round_device_rows])   # latency: per chunk


@pytest.mark.parametrize("max_batch, buckets, guided", [(1, (2, 8), False), (3, (4,), False), (6, (4, 8), True)])
def test_max_batch_under_the_smallest_bucket_is_refused(max_batch, buckets, guided):
    """Every call is padded to a bucket: a max_batch under the smallest (halved under classifier-free guidance)
    could never hold, and is refused naming both options, at construction or where the guidance is bound."""
    if not guided:
        with pytest.raises(ValueError, match="max_batch, buckets: .* under the smallest bucket"):
            LocalBackend(max_batch=max_batch, buckets=buckets)
        return
    den = Denoiser(lambda x, t: x * 0.1, DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02), "eps",
                   sample_shape=(3,), guidance=2.0)
    with pytest.raises(ValueError, match="max_batch, buckets: 3 rows a call under classifier-free guidance"):
        ParallelSampler(den, backend=LocalBackend(max_batch=max_batch, buckets=buckets), progress=False)


@pytest.mark.parametrize("window, batch", [("auto", 1), (4, 16)])
def test_the_first_calls_memory_probe_fits_the_buckets(monkeypatch, window, batch):
    """On CUDA without max_batch the first call probes 8 rows to measure memory; under buckets (1, 2, 4) no bucket
    held them (a bare StopIteration: on a plan's probe even for one sample, and on any call of 8 rows or more).
    The probe is now at most the largest bucket. Simulated on the CPU: the probe path taken, its measurement
    stubbed."""
    import paratime.backends.base as base

    own = base.Backend.batch_limit
    monkeypatch.setattr(base.Backend, "batch_limit", lambda self, device=None: own(self, None))
    monkeypatch.setattr(base.Backend, "_measures_memory", staticmethod(lambda x: True))
    monkeypatch.setattr(base, "measure_rows", lambda call, rows, device: (call(), 1e3))
    sizes = []
    got = _run(LocalBackend(buckets=(1, 2, 4)), "picard", sizes) if window == 4 else None
    if got is None:
        den = Denoiser(lambda x, t: sizes.append(x.shape[0]) or torch.tanh(x) * 0.01,
                       DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02), "eps", sample_shape=(3, 5))
        got = ParallelSampler(den, solver="ddim", steps=10, window="auto", cost="latency", progress=False,
                              backend=LocalBackend(buckets=(1, 2, 4))).sample(batch, seed=0)
    assert set(sizes) <= {1, 2, 4} and torch.isfinite(got.samples).all()


def test_a_call_no_bucket_holds_is_named():
    from paratime.cost import bucket_rows

    with pytest.raises(ValueError, match="^buckets: no bucket holds a call of 8 rows"):
        bucket_rows((1, 2, 4), 8)
