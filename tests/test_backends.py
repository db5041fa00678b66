"""torch.distributed (gloo, 2 ranks on 127.0.0.1) and Ray (2 local actors) give the local backend's samples,
survive or report failures, and reject bad options."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from paratime import ParallelSampler

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from dist_helper import CONFIGS, run_ranks, sample_all  # noqa: E402


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


def test_a_rank_that_cannot_fit_the_call_stops_every_rank_before_the_first_round():
    """The memory check agrees across ranks: rank 1's device all but full, both ranks raise DeviceMemoryError at
    once (rank 0 naming the other rank); before, rank 0 went on into the first round's collective and failed
    there with a timeout ("a peer rank died")."""
    procs = _spawn(2, ["memory"])
    outs = _finish(procs, timeout=90)
    assert all(p.returncode == 0 for p in procs), outs
    for rank, out in enumerate(outs):
        line = next(x for x in out.splitlines() if x.startswith("MEMORY-ERROR"))
        assert float(line.split()[1]) < 10, line                  # no wait for the backend's 30 s timeout
        assert ("another rank's device cannot fit" in line) == (rank == 0), line


def test_samplers_one_after_another_on_the_torch_backend_share_the_group_they_made():
    """Closing a backend destroyed the default group it made, and the next backend's init_process_group met the old
    rendezvous on the same store and port: a second sampler under torchrun hung or failed in 8 of 16 runs. The group
    now lives until the process exits, and each later backend joins it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    # Under torchrun (its agent's store outlives a destroyed group: what made the old rendezvous meet the new one).
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(HERE / "dist_helper.py"), "twice"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.count("TWICE-OK") == 2, run.stdout + run.stderr[-3000:]


def test_ranks_with_different_network_weights_are_refused_naming_model():
    """An unseeded factory builds another network on each rank: both ranks refuse it when the sampler is built
    (Picard differed from sequential by 28 before)."""
    procs = _spawn(2, ["weights"])
    outs = _finish(procs, timeout=90)
    assert all(p.returncode == 0 for p in procs), outs
    for out in outs:
        assert "SAME-OK" in out, out                # a -inf mask buffer made equal networks "differ" before
        line = next(x for x in out.splitlines() if x.startswith("WEIGHTS-ERROR"))
        assert "model: the network's weights differ across the ranks" in line, line


def test_init_method_rank_and_world_size_are_checked_before_the_rendezvous():
    """An out-of-range rank waited out the rendezvous (49.6 s) and ended in a message not naming it."""
    from paratime.backends.torch_dist import MAX_TIMEOUT_S, TorchDistributedBackend

    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        url = f"tcp://127.0.0.1:{_free_port()}"
        for kw, name in ((dict(rank=2, world_size=2), "rank"), (dict(rank=-1, world_size=1), "rank"),
                         (dict(rank=0, world_size=0), "world_size"), (dict(rank=0), "world_size"),
                         (dict(rank=True, world_size=2), "rank")):
            with pytest.raises(ValueError, match=f"^{name}: with init_method="):
                TorchDistributedBackend(init_method=url, timeout_s=5, **kw)
        with pytest.raises(ValueError, match="^timeout_s: at most"):
            TorchDistributedBackend(timeout_s=MAX_TIMEOUT_S * 2)
    finally:
        os.environ.update(env)


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


@pytest.mark.parametrize("env, kw, name", [
    ({}, dict(timeout_s=float("nan")), "timeout_s"),
    ({}, dict(timeout_s=float("inf")), "timeout_s"),
    ({}, dict(rank=3), "rank"),                            # without init_method: the environment gives it
    ({"RANK": "abc", "WORLD_SIZE": "2"}, {}, "RANK"),      # int()'s message before
    ({"RANK": "1", "WORLD_SIZE": "1"}, {}, "RANK"),        # a timeout waiting for a peer that cannot exist before
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"}, {}, "MASTER_PORT"),
])
def test_torch_backend_options_and_environment_are_named(env, kw, name, monkeypatch):
    from paratime.backends.torch_dist import TorchDistributedBackend

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError) as info:
        TorchDistributedBackend(**kw)
    assert str(info.value).startswith(f"{name}:"), str(info.value)


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
    for kw, name in ((dict(timeout_s=float("nan")), "timeout_s"), (dict(start_timeout_s=float("inf")),
                     "start_timeout_s"), (dict(threads=-1), "threads"), (dict(num_cpus=0), "num_cpus"),
                     (dict(num_gpus=-1), "num_gpus"), (dict(address=123), "address"),
                     (dict(workers=True), "workers"), (dict(max_retries=True), "max_retries"),
                     # a Ray is up in this process: it would be used, not the address
                     (dict(address="ray://nowhere:1"), "address")):
        with pytest.raises(ValueError) as info:
            RayBackend(**{"workers": 1, **kw})
        assert str(info.value).startswith(f"{name}:"), (kw, str(info.value))
    # A constructor's own TypeError is not reported as an unknown option (all three keys are the backend's).
    with pytest.raises(ValueError, match="^address:"):
        ParallelSampler("gmm", backend="ray", backend_options={"workers": 1, "address": 123})


def test_ray_actor_dead_between_calls_is_replaced_and_a_closed_backend_says_so(ray_session):
    from paratime.backends.ray_actors import RayBackend

    ref = ParallelSampler("gmm", steps=10, progress=False).sample(4, seed=1).samples
    be = RayBackend(workers=1, model="gmm", timeout_s=60)
    s = ParallelSampler("gmm", steps=10, progress=False, backend=be)
    s.sample(4, seed=1)
    dead = be.actors[0]
    ray_session.kill(dead, no_restart=True)           # between sample() calls: prepare() met it dead before
    torch.testing.assert_close(s.sample(4, seed=1).samples, ref, rtol=0, atol=1e-12)
    assert be.actors[0] is not dead
    be.close()
    with pytest.raises(RuntimeError, match="^backend: this Ray backend has no actors"):
        s.sample(4, seed=1)                           # an IndexError before


def test_ray_actors_that_build_another_network_from_model_are_refused(ray_session):
    """``model=`` a factory: each actor builds its own network. An unseeded factory built another network on each
    (max |diff| 197 from sequential on 2 actors through the CLI): the driver compares every actor's weights with the
    sampler's and refuses them naming model; a seeded factory runs."""
    from paratime import Denoiser, DiscreteVPSchedule
    from paratime.backends.ray_actors import RayBackend
    from paratime.zoo.digits import DigitsUNet

    def make(seed=None):                  # local: pickled by value for the actors; an untrained U-Net
        if seed is not None:
            torch.manual_seed(seed)
        return Denoiser(DigitsUNet(channels=8, emb=16), DiscreteVPSchedule.from_betas("linear"), "eps",
                        sample_shape=(1, 8, 8))

    with pytest.raises(ValueError, match="^model: actor 0 built another network than this sampler's"):
        ParallelSampler(make(), steps=4, progress=False, backend=RayBackend(workers=2, model=make, timeout_s=60))
    with ParallelSampler(make(0), steps=4, progress=False,
                         backend=RayBackend(workers=2, model=lambda: make(0), timeout_s=60)) as s:
        assert s.sample(2, seed=0).samples.shape == (2, 1, 8, 8)


def test_a_replaced_ray_actor_that_builds_another_network_is_refused(ray_session, tmp_path):
    """An actor that replaces a dead one runs the ``model=`` factory anew; the weights it built are checked as the
    first actors' were (it was re-bound unchecked: a factory that gave another network then sampled with it)."""
    from paratime import Denoiser, DiscreteVPSchedule
    from paratime.backends.ray_actors import RayBackend
    from paratime.zoo.digits import DigitsUNet

    flag = str(tmp_path / "other-seed")

    def make():                           # seed 0, or seed 1 once the flag file exists (read in the actor)
        import os

        torch.manual_seed(1 if os.path.exists(flag) else 0)
        return Denoiser(DigitsUNet(channels=8, emb=16), DiscreteVPSchedule.from_betas("linear"), "eps",
                        sample_shape=(1, 8, 8))

    with ParallelSampler(make(), steps=4, progress=False,
                         backend=RayBackend(workers=2, model=make, timeout_s=60)) as s:
        first = s.sample(2, seed=0).samples
        open(flag, "w").close()
        ray_session.kill(s.backend.actors[1], no_restart=True)
        for _ in range(2):                # the refused actor is not kept: the next call meets it again
            with pytest.raises(ValueError, match="^model: actor 1 built another network than this sampler's"):
                s.sample(2, seed=0)
        os.remove(flag)
        torch.testing.assert_close(s.sample(2, seed=0).samples, first, rtol=0, atol=0)


def test_ray_actors_that_cannot_start_are_cleaned_up(ray_session, monkeypatch):
    """Actors that cannot be scheduled (a GPU on a CPU machine) raise RayWorkerError, and the backend is closed
    (its pending actors killed, a Ray it started shut down): nothing is left for a caller without a handle."""
    from paratime.backends.ray_actors import RayBackend, RayWorkerError

    closed = []
    monkeypatch.setattr(RayBackend, "close", lambda self: closed.append(list(self.actors)))
    with pytest.raises(RayWorkerError, match="could not be scheduled"):
        ParallelSampler("gmm", progress=False, backend="ray",
                        backend_options={"workers": 1, "num_gpus": 1, "start_timeout_s": 2})
    assert closed and len(closed[0]) == 1


def test_ray_agrees_with_local_on_a_float32_network_to_its_rounding(ray_session):
    """The digits U-Net's float32 output depends on a call's row count (the GEMM's blocking), so 2 actors, each
    evaluating half the rows, agree with one local call to float32 rounding, not bit for bit (the mixtures, in
    float64 and analytic, agree exactly: test_ray_equals_local)."""
    from paratime.backends.ray_actors import RayBackend

    labels = torch.arange(6) % 10
    local = ParallelSampler("digits", steps=12, tol=0.0, progress=False).sample(6, seed=1, labels=labels).samples
    with RayBackend(workers=2, model="digits", timeout_s=60) as be:
        got = ParallelSampler("digits", steps=12, tol=0.0, progress=False, backend=be).sample(
            6, seed=1, labels=labels).samples
    assert (got - local).abs().max() <= 1e-5


def test_a_ray_address_that_does_not_answer_is_named_within_its_bound():
    """The backend checks an explicit address itself (the CLI did, the API waited in ray.init for minutes)."""
    from paratime.backends.ray_actors import check_ray_address

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="^address: nothing answers at 127.0.0.1:1"):
        check_ray_address("127.0.0.1:1", 2.0)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match="^address: expected auto, HOST:PORT"):
        check_ray_address("nowhere", 2.0)
    check_ray_address(None, 2.0)
    check_ray_address("auto", 2.0)


# -- a network error on one torch rank only (review, stop 47) ------------------------------------------------------

ONE_RANK_RAISES = textwrap.dedent('''
    import os, time, torch
    from dataclasses import replace
    from paratime import ParallelSampler
    from paratime.backends.torch_dist import TorchDistributedBackend
    from paratime.zoo import ring_gmm

    torch.set_num_threads(1)
    rank, calls, base = int(os.environ["RANK"]), [0], ring_gmm()

    def net(x, t, **cond):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            raise RuntimeError("network failed on rank 1 only")
        return base.network(x, t, **cond)

    be = TorchDistributedBackend(timeout_s=30)
    s = ParallelSampler(replace(base, network=net), steps=12, method="picard", window=6, tol=0.0, progress=False,
                        backend=be)
    t0 = time.perf_counter()
    try:
        s.sample(4, seed=0)
        print("NO-ERROR", flush=True)
    except Exception as e:
        print(f"ERROR {time.perf_counter() - t0:.1f} {type(e).__name__}: {e}", flush=True)
    again = s.sample(4, seed=0).samples          # the group still works: both ranks sample again
    ref = ParallelSampler("gmm", steps=12, method="picard", window=6, tol=0.0, progress=False).sample(4, seed=0)
    print("AGAIN-OK" if torch.equal(again, ref.samples) else "AGAIN-DIFFERS", flush=True)
''')


def test_a_network_error_on_one_rank_is_raised_on_every_rank_at_once(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(ONE_RANK_RAISES)
    logs = run_ranks(script)
    errors = [next((line.split(" ", 3) for line in log.splitlines() if line.startswith("ERROR")), None)
              for log in logs]
    assert all(errors), logs
    assert "network failed on rank 1 only" in errors[1][3], logs
    assert "rank(s) [1]" in errors[0][3], logs          # rank 0 names the failed rank, not a timeout
    assert all(float(e[1]) < 10 for e in errors), logs  # at once, not after timeout_s=30
    assert all("AGAIN-OK" in log for log in logs), logs


# -- group= on a rank outside the group (review, stop 47) ---------------------------------------------------------

OUTSIDE_GROUP = textwrap.dedent('''
    import datetime, os, torch.distributed as dist
    from paratime.backends.torch_dist import TorchDistributedBackend
    r = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=r, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    sub = dist.new_group([0])
    try:
        be = TorchDistributedBackend(group=sub, timeout_s=30)
        print("BUILT", be.rank, be.workers, flush=True)
    except ValueError as e:
        print("ERROR", e, flush=True)
    dist.barrier()
''')


def test_torch_backend_on_a_rank_outside_group_names_group(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(OUTSIDE_GROUP)
    logs = run_ranks(script, timeout=120, cwd=tmp_path)
    assert "BUILT 0 1" in logs[0], logs
    assert "ERROR group:" in logs[1] and "not a member" in logs[1], logs
