"""Test set-up: Triton kernels run in the interpreter on CPU (must be set before any @triton.jit is defined)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def gmm():
    from paratime.zoo import ring_gmm

    return ring_gmm()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (two threads on a loaded 2-core machine spin for seconds
    per call); the previous count is restored after the module. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
