"""The torch backend's device comes from the model's weights, and a disagreement with ``device=`` or LOCAL_RANK is
an error naming both (``--device cuda`` under torchrun put every rank's weights on cuda:0, then its rows on cuda:r);
the NCCL error-handling default that turns a dead peer into an error instead of a killed process."""

import pytest
import torch

from paratime.backends.torch_dist import NCCL_ERROR_HANDLING, nccl_environment, rank_device

CUDA0, CUDA1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")


@pytest.mark.parametrize("weights, requested, local_rank, nccl, expected", [
    (CUDA1, None, 1, True, CUDA1),            # torchrun, model on cuda:LOCAL_RANK
    (CUDA1, None, None, True, CUDA1),         # no LOCAL_RANK: the weights decide
    (CUDA0, CUDA0, 0, True, CUDA0),
    (CPU, None, 1, False, CPU),               # gloo on CPU under torchrun: LOCAL_RANK is no CUDA device
    (CUDA1, None, 3, False, None),            # CUDA weights disagree with LOCAL_RANK under gloo too
    (None, None, 2, True, torch.device("cuda", 2)),   # a plain function: LOCAL_RANK
    (None, None, None, True, torch.device("cuda", 5)),  # ... else the current device
    (None, CUDA1, 0, True, CUDA1),            # device= where nothing else decides
    (None, None, None, False, CPU)])
def test_rank_device(weights, requested, local_rank, nccl, expected):
    if expected is None:
        with pytest.raises(ValueError, match=r"cuda:1.*LOCAL_RANK=3"):
            rank_device(weights, requested, local_rank, nccl, current_cuda=5)
        return
    assert rank_device(weights, requested, local_rank, nccl, current_cuda=5) == expected


def test_weights_on_cuda0_under_torchrun_rank1_name_both():
    """``--device cuda`` on rank 1: weights on cuda:0, LOCAL_RANK 1."""
    with pytest.raises(ValueError, match=r"weights are on cuda:0 but LOCAL_RANK=1 .*cuda:1"):
        rank_device(CUDA0, None, 1, True)


def test_requested_device_must_match_the_weights():
    with pytest.raises(ValueError, match=r"device: cuda:1 was given but the model's weights are on cuda:0"):
        rank_device(CUDA0, CUDA1, None, True)
    with pytest.raises(ValueError, match="NCCL needs CUDA"):
        rank_device(CPU, None, None, True)


def test_nccl_error_handling_default_keeps_the_users_choice():
    env = {}
    nccl_environment(env)
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": NCCL_ERROR_HANDLING}
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    nccl_environment(env)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_gloo_backend_takes_the_weights_device_and_refuses_a_disagreement(monkeypatch):
    """One gloo rank in this process: the backend's device is the weights' (CPU) under torchrun's LOCAL_RANK, and a
    ``device=`` that disagrees with the weights is refused at the first use, naming both."""
    import socket

    from paratime.backends.torch_dist import TorchDistributedBackend, release_default_group
    from paratime.denoiser import Denoiser
    from paratime.schedules import VESchedule

    monkeypatch.setenv("LOCAL_RANK", "1")
    den = Denoiser(torch.nn.Linear(2, 2), VESchedule(), "x0")
    for device in (None, "cuda:1"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with TorchDistributedBackend(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                     dist_backend="gloo", timeout_s=30, device=device) as backend:
            backend.bind(den)
            assert not release_default_group()          # an open backend uses it
            if device is None:
                assert backend.device == CPU
            else:
                with pytest.raises(ValueError, match=r"device: cuda:1 was given but the model's weights are on cpu"):
                    backend.device
    # A backend with the same options joins the group kept alive, at its timeout: another timeout is refused (it
    # would have been ignored, the group's own timing out first).
    with TorchDistributedBackend(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, dist_backend="gloo",
                                 timeout_s=30) as joined:
        assert joined.workers == 1 and not joined.owns_group
    with pytest.raises(ValueError, match="^timeout_s: the process group this process's earlier backend created"):
        TorchDistributedBackend(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, dist_backend="gloo",
                                timeout_s=60)
    # Other options on the same rendezvous are not a new group there (its old state met the new one): refused.
    with pytest.raises(ValueError, match="^world_size: the process group this process's earlier backend created"):
        TorchDistributedBackend(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2, dist_backend="gloo",
                                timeout_s=30)
    # Every backend closed: the group they made goes (a second one with another init_method replaced the first).
    assert release_default_group() and not torch.distributed.is_initialized()
