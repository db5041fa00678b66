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
