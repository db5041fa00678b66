"""The Ray backend's edges (review, stop 47): a closed backend refuses every later use and starts nothing, a call of 0
rows returns the empty result, and weights changed in place after the sampler was built reach the actors. The first
test runs before any Ray of this module is up (it checks that none is started)."""
import pytest
import torch

ray = pytest.importorskip("ray")
from paratime import ParallelSampler  # noqa: E402
from paratime.backends import LocalBackend  # noqa: E402
from paratime.backends.ray_actors import RayBackend  # noqa: E402


def test_a_closed_ray_backend_refuses_log_likelihood_and_starts_nothing():
    assert not ray.is_initialized()
    s = ParallelSampler("gmm", steps=8, progress=False, backend="ray",
                        backend_options=dict(workers=2, num_cpus=0.5, timeout_s=60))
    x = s.sample(3, seed=0).samples
    s.close()
    assert not ray.is_initialized()
    try:
        with pytest.raises(RuntimeError, match="closed"):
            s.log_likelihood(x)
        assert not s.backend.actors and not ray.is_initialized()
    finally:
        s.backend.close()
        if ray.is_initialized():
            ray.shutdown()


def test_ray_zero_row_call_matches_local():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        with RayBackend(workers=2, num_cpus=0.5, timeout_s=60) as be:
            den = ParallelSampler("gmm", steps=8, progress=False).denoiser
            be.bind(den)
            local = LocalBackend()
            local.bind(den)
            x = torch.zeros(0, 2, dtype=torch.float64)
            for raw in (False, True):
                got, want = be.evaluate(x, x[:, 0], x[:, 0], raw=raw), local.evaluate(x, x[:, 0], x[:, 0], raw=raw)
                got, want = (got, want) if raw else ((got,), (want,))
                for g, w in zip(got, want):
                    assert (g is None) == (w is None)
                    if g is not None:
                        assert g.shape == w.shape and g.dtype == w.dtype
    finally:
        if started:
            ray.shutdown()


KW = dict(steps=12, method="picard", window=6, tol=0.0, progress=False)


@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_ray_weights_changed_in_place_are_shipped_again(ray_session):
    local = ParallelSampler("gmm", **KW)
    with ParallelSampler(local.denoiser, backend="ray",
                         backend_options=dict(workers=2, num_cpus=0.5, timeout_s=60), **KW) as s:
        assert torch.equal(s.sample(5, seed=0).samples, local.sample(5, seed=0).samples)
        buf = next(b for b in local.denoiser.network.buffers() if b.is_floating_point())
        with torch.no_grad():
            buf.mul_(1.5)                       # e.g. a training step or load_state_dict after the sampler was built
        assert torch.equal(s.sample(5, seed=0).samples, local.sample(5, seed=0).samples)
