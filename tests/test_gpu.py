"""GPU checks (skipped without CUDA): every compiled kernel variant the samplers launch equals its reference on CUDA
tensors and is bitwise repeatable; Picard and Parareal run on the GPU with a diffusers UNet in fp16 and bf16 and
match the sequential sampler; host syncs per round are counted with ``torch.cuda.set_sync_debug_mode``; max_batch is
derived from the measured memory; the torch backend works over NCCL with one rank. Run with the interpreter off:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_gpu.py        (benchmarks/gpu_checks.sh runs them all)
"""

import os
import socket
import warnings
from collections import Counter

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
compiled = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                              reason="run with TRITON_INTERPRET=0 to test the compiled kernels")


def _launches(kernel):
    from paratime.kernels import SAMPLER_LAUNCHES

    return [x for x in SAMPLER_LAUNCHES if x.kernel == kernel]


@cuda
@compiled
@pytest.mark.parametrize("launch", _launches("fused_step"), ids=lambda x: x.name)
def test_compiled_fused_step_matches_reference_on_cuda(launch):
    pytest.importorskip("triton")
    from paratime.kernels import fused_step, triton_usable
    from paratime.kernels.reference import fused_step_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    M, D = 37, 4 * 64 * 64 + 3
    x, z = (torch.randn(M, D, device="cuda", generator=g, dtype=launch.state) for _ in range(2))
    c, u = (torch.randn(M, D, device="cuda", generator=g).to(launch.out) for _ in range(2))
    coef = [torch.randn(M, device="cuda", generator=g) for _ in range(4)]
    args = (x, c, u if launch.uncond else None, 7.5, *coef)
    kw = dict(noise=z if launch.noise else None, want_x0=launch.x0, want_dx=launch.dx)
    assert triton_usable(x)
    got, ref = fused_step(*args, **kw), fused_step_reference(*args, **kw)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@cuda
@compiled
@pytest.mark.parametrize("launch", _launches("picard_update"), ids=lambda x: x.name)
def test_compiled_picard_update_matches_reference_and_repeats_bitwise(launch):
    from paratime.kernels import picard_update
    from paratime.kernels.reference import picard_update_reference

    g = torch.Generator(device="cuda").manual_seed(1)
    D = 4 * 64 * 64 + 3
    start, dx, old = (torch.randn(s, device="cuda", generator=g) for s in ((5, D), (17, 5, D), (17, 5, D)))
    n1, e1 = picard_update(start, dx, old, block=launch.block)
    n2, e2 = picard_update_reference(start, dx, old)
    torch.testing.assert_close(n1, n2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(e1, e2, rtol=1e-5, atol=1e-5)
    for _ in range(5):                       # no atomics: the residuals, and decisions from them, never change
        assert torch.equal(picard_update(start, dx, old, block=launch.block)[1], e1)


def _unet():
    """A small diffusers UNet (untrained, seed 0) with a DDIM schedule, on CUDA (the sampler casts it)."""
    pytest.importorskip("diffusers")
    from paratime.models import load_model

    import paratime.bench  # noqa: F401 - registers the benchmark fixture ``unet``

    den = load_model("unet")
    den.network.to("cuda")
    return den


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["picard", "parareal"])
def test_parallel_methods_on_cuda_with_a_diffusers_unet_in_half_precision(dtype, method):
    """At tol 0 the fixed point is the sequential sample, up to the half-precision network's batch-size effects: a
    call of 120 rows runs other kernels than one of 4 (on an H100, after 30 steps of this untrained UNet, whose
    samples reach 394: fp16 0.056, bf16 0.49). Their size here is measured, not guessed:
    sequential sampling with every call padded to 128 rows (the backend's buckets) against the same sampling
    unpadded; the parallel sample must be within a few times that, and that effect itself within half precision's
    reach (5e-3 of the samples' scale; bf16 measured 1.2e-3), so that a broken padding path cannot widen the test."""
    from paratime import ParallelSampler
    from paratime.backends import LocalBackend

    den = _unet()
    kw = dict(steps=30, progress=False, dtype=dtype)
    seq = ParallelSampler(den, method="sequential", **kw).sample(4, seed=0)
    padded = ParallelSampler(den, method="sequential", backend=LocalBackend(buckets=(128,)), **kw).sample(4, seed=0)
    par = ParallelSampler(den, method=method, tol=0.0, **kw).sample(4, seed=0)
    assert par.samples.is_cuda and par.samples.dtype == torch.float32
    floor = (padded.samples - seq.samples).abs().max().item()
    err = (par.samples - seq.samples).abs().max().item()
    print(f"{method} {dtype}: max|par - seq| {err:.3g}, batch-size effect (128-row calls vs 4) {floor:.3g}, "
          f"max|seq| {seq.samples.abs().max().item():.3g}")
    assert floor <= 5e-3 * seq.samples.abs().max().item()
    assert err <= 4 * floor + 1e-3


@cuda
@compiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_step_inside_the_samplers_on_cuda(dtype, monkeypatch):
    """A guided DDPM step reads the raw half-precision outputs in one compiled launch, and gives the two-pass result
    (x0 first, then the step) to float32 rounding."""
    from paratime import ParallelSampler
    from paratime.evaluator import Evaluator
    from paratime.kernels import Launch, record_launches
    from paratime.models import load_model

    model = load_model("digits")
    model.network.cuda()
    kw = dict(solver="ddpm", steps=20, dtype=dtype, guidance=2.0, method="picard", tol=0.0, progress=False)
    labels = torch.tensor([1, 4, 7, 9], device="cuda")
    with record_launches() as seen:
        fused = ParallelSampler(model, **kw).sample(4, seed=0, labels=labels)
    assert Launch("fused_step", torch.float32, dtype, uncond=True, noise=True, x0=True, dx=True) in seen
    monkeypatch.setattr(Evaluator, "fusable", property(lambda self: False))
    two = ParallelSampler(model, **kw).sample(4, seed=0, labels=labels)
    torch.testing.assert_close(fused.samples, two.samples, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("method", ["sequential", "picard", "parareal"])
def test_host_syncs_per_round_on_cuda(method):
    """torch.cuda.set_sync_debug_mode counts every synchronising call; the engine's budget is one per round
    (Picard: the convergence read; Parareal: one per iteration; sequential steps: none; the NaN flag travels
    asynchronously), plus a fixed set-up and end (grid, noise, the one waiting NaN check, the records)."""
    from paratime import ParallelSampler
    from paratime.models import load_model

    model = load_model("digits")
    model.network.cuda()
    s = ParallelSampler(model, steps=50, method=method, window=16, progress=False) if method == "picard" else \
        ParallelSampler(model, steps=50, method=method, progress=False)
    s.sample(8, seed=0)                                   # warm-up (derives max_batch, compiles kernels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            res = s.sample(8, seed=0)
            n_run = len(caught)
            float(torch.ones(1, device="cuda").sum())     # a known sync: the counter must see it
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught[:n_run]
                    if "synchroniz" in str(w.message))
    syncs = sum(sites.values())
    assert any("synchroniz" in str(w.message) for w in caught[n_run:]), "the sync counter saw no known sync"
    print(f"{method}: {syncs} host syncs over {res.stats.iterations} rounds/iterations, {res.stats.rounds} calls; "
          f"where: {dict(sites.most_common())}")
    assert syncs <= (0 if method == "sequential" else res.stats.iterations) + 16


@cuda
def test_max_batch_is_derived_from_measured_memory_and_a_huge_request_is_refused(monkeypatch):
    import paratime.backends.base as base
    from paratime import ParallelSampler
    from paratime.backends import DeviceMemoryError, LocalBackend, check_memory
    from paratime.models import load_model

    derived, real = [], base.default_max_batch

    def record(device, per_row):
        derived.append((device, per_row, real(device, per_row)))
        return derived[-1][2]

    monkeypatch.setattr(base, "default_max_batch", record)
    model = load_model("digits")
    model.network.cuda()
    be = LocalBackend()
    ParallelSampler(model, steps=20, progress=False, backend=be).sample(8, seed=0)
    print(f"derived max_batch on {torch.cuda.get_device_name(0)}: {be.batch_limit()}")
    # Derived once, on the CUDA device, from a measured per-row peak (not the CPU constant).
    assert len(derived) == 1 and torch.device(derived[0][0]).type == "cuda" and derived[0][1] > 0
    assert be.batch_limit() == derived[0][2] >= 1
    free = torch.cuda.mem_get_info()[0]
    B = int(free // (4 * 4 * 128 * 128 * 2000)) + 1        # trajectory + noise alone exceed the free memory
    with pytest.raises(DeviceMemoryError, match="GiB"):
        check_memory((B, 4, 128, 128), 1000, torch.float32, "cuda", 1, 1000)


@cuda
def test_picard_on_cuda_equals_sequential(monkeypatch):
    from paratime import ParallelSampler
    from paratime.models import load_model

    # float32 without TF32 (on by default for cuDNN's convolutions: 1e-3 relative per call, 2.9e-4 apart after 50
    # steps on an H100): the batch-size effects that remain are float32's.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = load_model("digits")
    model.network.cuda()
    seq = ParallelSampler(model, steps=50, method="sequential", progress=False).sample(16, seed=0)
    par = ParallelSampler(model, steps=50, tol=0.0, progress=False).sample(16, seed=0)
    assert seq.samples.is_cuda
    torch.testing.assert_close(par.samples, seq.samples, rtol=1e-4, atol=1e-4)


@cuda
def test_torch_backend_over_nccl_with_one_rank():
    import torch.distributed as dist

    from paratime import ParallelSampler
    from paratime.backends.torch_dist import TorchDistributedBackend
    from paratime.models import load_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    be = TorchDistributedBackend(dist_backend="nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                 timeout_s=60)
    try:
        assert dist.get_backend() == "nccl"
        model = load_model("digits")
        model.network.cuda()
        # A given window: with cost="auto" on CUDA the planner times calls, and two runs may size the window apart
        # (each sample then within tol of sequential's, not of each other's).
        kw = dict(steps=30, progress=False, method="picard", window=8)
        local = ParallelSampler(model, **kw).sample(8, seed=0)
        dist_res = ParallelSampler(model, **kw, backend=be).sample(8, seed=0)
        assert be.device.type == "cuda"
        torch.testing.assert_close(dist_res.samples, local.samples, rtol=0, atol=1e-6)
        assert be.timings["comm_s"] >= 0
    finally:
        be.close()
