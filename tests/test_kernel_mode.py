"""The kernel mode is a context (a context manager or a per-sampler option), not a process-wide switch."""

import threading

import pytest
import torch

from paratime import ParallelSampler
from paratime.kernels import kernel_mode, kernels, record_launches


def test_context_manager_restores_the_previous_mode_also_on_error():
    assert kernel_mode() == "auto"
    with kernels("torch"):
        assert kernel_mode() == "torch"
        with pytest.raises(RuntimeError):
            with kernels("triton"):
                assert kernel_mode() == "triton"
                raise RuntimeError("boom")
        assert kernel_mode() == "torch"
    assert kernel_mode() == "auto"


def test_modes_do_not_leak_across_threads():
    seen = []
    with kernels("torch"):
        t = threading.Thread(target=lambda: seen.append(kernel_mode()))
        t.start()
        t.join(timeout=10)
    assert seen == ["auto"]


def test_unknown_modes_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="mode"):
        with kernels("cuda"):
            pass
    with pytest.raises(ValueError, match="kernels"):
        ParallelSampler("gmm", steps=5, kernels="fast")


def test_per_sampler_mode_forces_the_torch_reference():
    pytest.importorskip("triton")                  # auto launches kernels only where Triton is installed
    # With the interpreter on (conftest), float32 state launches Triton kernels in auto mode; kernels="torch" none.
    kw = dict(steps=5, state_dtype=torch.float32, progress=False)
    with record_launches() as auto:
        a = ParallelSampler("gmm", **kw).sample(4, seed=0).samples
    with record_launches() as forced:
        b = ParallelSampler("gmm", kernels="torch", **kw).sample(4, seed=0).samples
    assert auto and not forced
    assert kernel_mode() == "auto"
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
