"""GPU checks (skipped without CUDA): compiled kernels equal their references on CUDA tensors, the samplers run on
the GPU, and the torch backend works over NCCL with one rank. Run them with the interpreter off:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_gpu.py
"""

import os
import socket

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compiled_kernels_match_references_on_cuda(dtype):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("run with TRITON_INTERPRET=0 to test the compiled kernels")
    from paratime.kernels import fused_step, picard_update, triton_usable
    from paratime.kernels.reference import fused_step_reference, picard_update_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    M, D = 37, 4 * 64 * 64 + 3
    x, c, u, z = (torch.randn(M, D, device="cuda", generator=g).to(dtype) for _ in range(4))
    coef = [torch.randn(M, device="cuda", generator=g) for _ in range(4)]
    assert triton_usable(x)
    got = fused_step(x, c, u, 7.5, *coef, noise=z)
    ref = fused_step_reference(x, c, u, 7.5, *coef, noise=z)
    tol = dict(rtol=1.6e-2, atol=1.6e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    start, dx, old = (torch.randn(s, device="cuda", generator=g).to(dtype) for s in ((5, D), (17, 5, D), (17, 5, D)))
    n1, e1 = picard_update(start, dx, old)
    n2, e2 = picard_update_reference(start, dx, old)
    torch.testing.assert_close(n1.float(), n2.float(), **tol)
    torch.testing.assert_close(e1, e2, rtol=1e-4, atol=1e-4)


@cuda
def test_picard_on_cuda_equals_sequential():
    from paratime import ParallelSampler
    from paratime.zoo import load_model

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
    from paratime.zoo import load_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    be = TorchDistributedBackend(dist_backend="nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                 timeout_s=60)
    try:
        assert dist.get_backend() == "nccl"
        model = load_model("digits")
        model.network.cuda()
        local = ParallelSampler(model, steps=30, progress=False).sample(8, seed=0)
        dist_res = ParallelSampler(model, steps=30, progress=False, backend=be).sample(8, seed=0)
        torch.testing.assert_close(dist_res.samples, local.samples, rtol=0, atol=1e-6)
    finally:
        be.close()
