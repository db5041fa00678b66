"""torch.distributed (gloo, 2 ranks on 127.0.0.1) and Ray (2 local actors) give the local backend's samples,
survive or report failures, and reject bad options."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paratime import ParallelSampler

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from dist_helper import CONFIGS, sample_all  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, args, timeout=240):
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dist_helper.py"), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _finish(procs, timeout):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return outs


@pytest.fixture(scope="module")
def local_samples():
    return sample_all("local")


@pytest.mark.parametrize("world", [1, 2])
def test_torch_distributed_equals_local(world, tmp_path, local_samples):
    out = tmp_path / "samples.pt"
    procs = _spawn(world, ["samples", str(out)])
    logs = _finish(procs, timeout=240)
    assert all(p.returncode == 0 for p in procs), logs
    got = torch.load(out)
    for name in CONFIGS:
        torch.testing.assert_close(got[name], local_samples[name], rtol=0, atol=1e-12, msg=name)


def test_torch_distributed_hung_rank_times_out_with_a_clear_error():
    t0 = time.perf_counter()
    procs = _spawn(2, ["hang", "3"])
    try:
        out0 = _finish(procs[:1], timeout=90)[0]
    finally:
        procs[1].kill()
        procs[1].wait(10)
    assert "TIMEOUT-OK" in out0, out0
    assert "did not complete" in out0 or "peer rank" in out0
    assert time.perf_counter() - t0 < 90


def test_torch_backend_without_group_says_how_to_start():
    from paratime.backends.torch_dist import TorchDistributedBackend

    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        with pytest.raises(ValueError, match="torchrun"):
            TorchDistributedBackend()
        with pytest.raises(ValueError, match="timeout_s"):
            TorchDistributedBackend(timeout_s=0)
    finally:
        os.environ.update(env)


@pytest.fixture(scope="module")
def ray_session():
    """The ``ray`` module with a local session (skips only the Ray tests when Ray is missing)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_equals_local(workers, ray_session, local_samples):
    from paratime.backends.ray_actors import RayBackend

    with RayBackend(workers=workers, timeout_s=60) as be:
        got = sample_all(be)
    for name in CONFIGS:
        torch.testing.assert_close(got[name], local_samples[name], rtol=0, atol=1e-12, msg=name)


def test_ray_plans_from_measured_work_outside_the_network(ray_session):
    """A measured curve on 2 Ray actors: every candidate is timed through the actors (the work outside the network
    includes their dispatch), no candidate runs each device alone (the driver holds no model to run), and the plan
    runs to the sequential sample within its tolerance."""
    from paratime.backends.ray_actors import RayBackend

    ref = ParallelSampler("gmm", steps=20, method="sequential", progress=False).sample(8, seed=1).samples
    with RayBackend(workers=2, model="gmm", timeout_s=60) as be:
        s = ParallelSampler("gmm", steps=20, method="auto", cost="measure", progress=False, backend=be)
        res = s.sample(8, seed=1)
    plan = res.stats.plan
    assert plan["devices"] == 2 and "sequential, 1 device" not in plan["candidates"] and not plan["alone"]
    assert "outside the network" in plan["reason"] and res.stats.predicted_wall_s > 0
    assert (res.samples - ref).abs().max() <= 2e-3 * ref.abs().max()


def test_ray_actor_killed_mid_sample_is_replaced(ray_session):
    from paratime.backends.ray_actors import RayBackend

    ref = ParallelSampler("gmm", solver="ddpm", steps=30, progress=False).sample(12, seed=3).samples
    with RayBackend(workers=2, model="gmm", timeout_s=60) as be:
        s = ParallelSampler("gmm", solver="ddpm", steps=30, progress=False, backend=be)
        killed = []

        def kill_one(info):
            if info.round == 2:
                killed.append(be.actors[0])
                ray_session.kill(be.actors[0], no_restart=True)

        res = s.sample(12, seed=3, callback=kill_one)
        assert killed and be.actors[0] is not killed[0]
    torch.testing.assert_close(res.samples, ref, rtol=0, atol=1e-12)


def test_ray_bad_options(ray_session):
    from paratime.backends.ray_actors import RayBackend

    with pytest.raises(ValueError, match="workers"):
        RayBackend(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        RayBackend(timeout_s=-1)
    with pytest.raises(ValueError, match="backend_options"):
        ParallelSampler("gmm", backend="local", backend_options={"nodes": 3})
