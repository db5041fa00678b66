"""GPU-grade engine, proven on CPU: bounded memory (max_batch in every backend, refusal of requests that cannot fit),
no host syncs in Parareal's ticks, identical decisions on every rank on the kernel path, the network in its own
dtype (bf16 digits within a stated distance of fp32), lean Ray traffic, and kernels launched exactly as listed."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from paratime import ParallelSampler
from paratime.backends import DeviceMemoryError, LocalBackend, check_memory
from paratime.backends.memory import CPU_MAX_BATCH, default_max_batch, max_batch_for, request_bytes

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_helper  # noqa: E402
from dist_helper import capped_gmm  # noqa: E402

# -- counting what would force a device-to-host copy on CUDA -------------------------------------------------------
SYNC_CALLS = {"item", "__bool__", "tolist", "__int__", "__float__", "__index__", "nonzero", "bincount", "unique",
              "masked_select", "numpy", "cpu"}


def _bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    """Counts calls that read a device tensor on the host: ``item``, ``bool()``, ``tolist``, ``nonzero``,
    ``bincount``, ``unique``, boolean-mask indexing, ... (MACHINES.md: the CPU stand-in for
    ``torch.cuda.set_sync_debug_mode``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_CALLS or (name in ("__getitem__", "__setitem__") and len(args) > 1 and _bool_index(args[1])):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_sync_counter_sees_what_it_must():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        bool(x.sum() > 0), x[x > 2], x.nonzero(), float(x.max()), x.tolist(), x[torch.tensor([1, 2])]
    assert c.calls == ["__bool__", "__getitem__", "nonzero", "__float__", "tolist"]


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
@pytest.mark.parametrize("method", ["parareal", "parareal_pipelined"])
def test_parareal_ticks_make_no_host_syncs(method, solver):
    """Sweep Parareal reads the host once per iteration (the next layout and the residual), never inside its fine
    ticks or coarse jumps (DDPM's carries the pre-drawn noise over a host-bounded stretch); pipelined Parareal reads
    only when a new iterate reaches the frontier."""
    from paratime.methods import Problem
    from paratime.methods.parareal import sample_parareal, sample_parareal_pipelined
    from paratime.noise import STEP, draw_noise

    s = ParallelSampler("gmm", solver=solver, steps=60, method="sequential", progress=False)
    g, den = s.grid, s.denoiser
    ticks = []

    def evaluate(x, i, b):                  # the network call, recording how many syncs happened before it
        ticks.append(len(counter.calls))
        return den(x, g.sigmas[i], g.model_times[i])

    noise = draw_noise(0, 16, (2,), 60, STEP) if s.solver.stochastic else None
    problem = Problem(g.sigmas, g.ancestral_std(), g.frame_scales, s.solver, evaluate, noise)
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * float(g.sigmas[0])
    counter, tol = SyncCounter(), 0.1
    with counter:
        if method == "parareal":
            out = sample_parareal(x, problem, slices=6, tol=tol)
        else:
            out = sample_parareal_pipelined(x, problem, slices=6, tol=tol)
    syncs = len(counter.calls)
    setup = ticks[0]                                     # host reads of the set-up (slice bounds, levels)
    if method == "parareal":
        assert syncs - setup <= out.rounds, counter.calls   # one per iteration
    else:
        frontier_reads = len(out.residuals)              # one read per acceptance test at the frontier
        assert syncs - setup <= frontier_reads + 1, counter.calls
    assert len(ticks) > 4 * (syncs - setup + 1)          # far more ticks than host reads
    seq = ParallelSampler("gmm", solver=solver, steps=60, method="sequential", progress=False).sample(
        noise=x / float(g.sigmas[0]) / float(den.schedule.prior_std(g.sigmas[:1]) / g.sigmas[0]))
    # The run counted is a Parareal sample: within its tolerance of the sequential one (as in test_parareal).
    assert seq.samples.shape == out.x.shape and float((out.x - seq.samples).abs().max()) <= tol


# -- bounded memory ---------------------------------------------------------------------------------------------------
def test_local_backend_honours_max_batch_and_gives_the_same_samples():
    # The window given: the planner prices max_batch's chunks, so a capped backend may plan another window.
    ref = ParallelSampler("gmm", steps=16, progress=False, window=16).sample(6, seed=0).samples
    got = ParallelSampler(capped_gmm(5), steps=16, progress=False, backend=LocalBackend(max_batch=5),
                          window=16).sample(6, seed=0).samples
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="max_batch violated"):
        ParallelSampler(capped_gmm(5), steps=16, progress=False, backend=LocalBackend(max_batch=6)).sample(6, seed=0)
    with pytest.raises(ValueError, match="max_batch"):
        LocalBackend(max_batch=0)


def test_default_max_batch_on_cpu_is_the_stated_constant(monkeypatch):
    import paratime.backends.memory as memory

    assert default_max_batch("cpu") == CPU_MAX_BATCH
    monkeypatch.setattr(memory, "CPU_MAX_BATCH", 7)
    be = LocalBackend()
    ParallelSampler(capped_gmm(7), steps=16, progress=False, backend=be).sample(6, seed=0)   # 6 x 16 rows/round
    assert be.batch_limit() == 7


def test_guided_calls_count_the_doubled_rows():
    """With classifier-free guidance the network sees each row twice: max_batch bounds the network's rows."""
    from dataclasses import replace

    den = replace(capped_gmm(6), guidance=2.0, uncond_fn=lambda c: c)
    ParallelSampler(den, steps=12, progress=False, backend=LocalBackend(max_batch=6)).sample(4, seed=0)


def test_derived_max_batch_keeps_an_sd_size_model_far_below_8000_rows():
    """SD 1.5 at 512x512 in fp16 peaks at roughly 0.3 GB of activations per UNet row (attention over 4096 tokens);
    on a 141 GB H200 the derived bound is a few hundred rows, not one 8,000-row call."""
    rows = max_batch_for(free_bytes=141e9, bytes_per_row=0.3e9)
    assert 100 < rows < 8000 and rows == math.floor(0.5 * 141e9 / 0.3e9)
    assert max_batch_for(free_bytes=10, bytes_per_row=1e9) == 1
    with pytest.raises(ValueError, match="bytes_per_row"):
        max_batch_for(1e9, 0)


def test_a_request_that_cannot_fit_is_refused_before_allocating():
    need = request_bytes((4, 3, 64, 64), 1000, torch.float32, noise_draws=1, window=100)
    assert need == 4 * 3 * 64 * 64 * 4 * (1001 + 1000 + 4 * 100)
    assert check_memory((4, 3, 64, 64), 1000, torch.float32, "cpu", 1, 100, available=need) == need
    with pytest.raises(DeviceMemoryError, match=r"shape, steps: .* GiB .* reduce the batch"):
        check_memory((4, 3, 64, 64), 1000, torch.float32, "cpu", 1, 100, available=need - 1)
    # Through the sampler: a trajectory of terabytes is refused before the step noise or trajectory exist.
    from paratime.denoiser import Denoiser

    s = ParallelSampler(Denoiser.from_callable(lambda x, sigma: 0 * x), solver="ddpm", steps=100_000, progress=False)
    with pytest.raises(DeviceMemoryError, match="GiB"):
        s.sample((2, 1_000_000))


# -- precision --------------------------------------------------------------------------------------------------------
#: bf16 / fp16 digits samples (pixels in [-1, 1]) against fp32, DDIM-20 sequential: measured on 8 samples bf16 max
#: 0.057, rms 0.0084, fp16 max 0.013. Stated bounds: max <= 0.15, rms <= 0.02.
HALF_MAX, HALF_RMS = 0.15, 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_digits_network_in_half_precision_is_close_to_fp32(dtype):
    ref = ParallelSampler("digits", steps=20, method="sequential", progress=False).sample(4, seed=0)
    s = ParallelSampler("digits", steps=20, method="sequential", progress=False, dtype=dtype)
    assert next(s.denoiser.network.parameters()).dtype == dtype
    got = s.sample(4, seed=0)
    assert got.samples.dtype == torch.float64            # the state stays in the state dtype
    d = (got.samples - ref.samples).double()
    assert float(d.abs().max()) <= HALF_MAX and float(d.pow(2).mean().sqrt()) <= HALF_RMS


def test_half_precision_state_is_upcast_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="paratime"):
        s = ParallelSampler("gmm", steps=10, progress=False, state_dtype=torch.bfloat16)
    assert s.state_dtype == torch.float32 and "state_dtype" in caplog.text


# -- kernels ------------------------------------------------------------------------------------------------------
def test_picard_kernel_has_no_atomics_and_is_bitwise_repeatable():
    pytest.importorskip("triton")
    import inspect

    from paratime.kernels import picard as picard_kernel

    assert "atomic" not in inspect.getsource(picard_kernel.picard_update_kernel.fn)
    errs, _ = dist_helper.residuals_at_threshold()
    assert all(torch.equal(errs[0], e) for e in errs[1:])


@pytest.mark.parametrize("block", [128, 1024])
def test_picard_kernel_blocks_match_the_reference(block):
    from paratime.kernels import picard_update
    from paratime.kernels.reference import picard_update_reference

    g = torch.Generator().manual_seed(2)
    start, dx, old = torch.randn(3, 1500, generator=g), torch.randn(5, 3, 1500, generator=g), \
        torch.randn(5, 3, 1500, generator=g)
    new, err = picard_update(start, dx, old, block=block)
    rn, re_ = picard_update_reference(start, dx, old)
    torch.testing.assert_close(new, rn, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(err, re_, rtol=1e-5, atol=1e-6)


def test_picard_block_fills_the_device_for_one_sd_latent():
    from paratime.kernels.dispatch import picard_block

    assert picard_block(1, 4 * 64 * 64) == 128            # 128 programs instead of 16
    assert picard_block(64, 4 * 64 * 64) == 1024          # 1024 programs already


def test_samplers_launch_only_listed_variants():
    """Every Triton launch of the samplers (fp32 state, guided and unguided, ODE and SDE) is in SAMPLER_LAUNCHES,
    the list the AOT compiler and the kernel benchmark take their variants from."""
    pytest.importorskip("triton")
    from paratime.kernels import SAMPLER_LAUNCHES, record_launches, set_kernel_mode

    try:
        set_kernel_mode("triton")
        with record_launches() as seen:
            for solver in ("ddim", "ddpm", "euler_maruyama"):
                ParallelSampler("gmm", solver=solver, steps=6, state_dtype=torch.float32, progress=False).sample(
                    2, seed=0)
            ParallelSampler("digits", steps=3, state_dtype=torch.float32, guidance=2.0, progress=False).sample(
                2, seed=0, labels=torch.tensor([1, 7]))
    finally:
        set_kernel_mode("auto")
    assert seen and seen <= set(SAMPLER_LAUNCHES), seen - set(SAMPLER_LAUNCHES)
    assert any(x.kernel == "picard_update" for x in seen)


# -- ranks agree on the kernel path (2 gloo ranks) --------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_agree_on_the_kernel_path(tmp_path):
    pytest.importorskip("triton")
    out, port = tmp_path / "agree.pt", _free_port()
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dist_helper.py"), "agree", str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    got = torch.load(out)
    # Residuals at the threshold: the same bits and the same accept/reject decisions on both ranks, every launch.
    assert torch.equal(got["errs"][0], got["errs"][1]) and all(got["repeats"])
    assert torch.equal(got["decisions"][0], got["decisions"][1])
    # A Picard sample with max_batch=3 rows per network call (the capped network raises otherwise).
    assert torch.equal(got["samples"][0], got["samples"][1]) and torch.equal(got["rounds"][0], got["rounds"][1])
    ref = ParallelSampler("gmm", steps=10, state_dtype=torch.float32, tol=0.1, progress=False, window=4).sample(
        6, seed=0)
    torch.testing.assert_close(got["samples"][0], ref.samples, rtol=1e-5, atol=1e-5)
    # Raw outputs gathered in the network's dtype (the mixture's network is float64, the state float32): each rank
    # receives the peer's half of every call's rows (padded to equal shares), 2 values of 8 bytes per row.
    assert got["comm_bytes"] == pytest.approx(got["nfe_total"] / 2 * 2 * 8, rel=0.05)
    bf16 = ParallelSampler("digits", steps=4, method="sequential", dtype=torch.bfloat16, progress=False).sample(
        4, seed=0).samples
    torch.testing.assert_close(got["bf16"], bf16, rtol=0, atol=1e-3)


# -- Ray: per-round traffic, re-binding, unschedulable actors ----------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")       # here, not at module level: without Ray only the Ray tests are skipped
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(dist_helper)
    yield
    ray.shutdown()


def test_ray_sends_rows_not_conditioning_and_honours_max_batch(ray_session):
    """Per network call only rows travel (state, sigma, model time, sample index in; output out): the labels are
    placed once per sample() call. With max_batch=3 no actor's network call exceeds 3 rows."""
    from dataclasses import replace

    from paratime.backends.ray_actors import RayBackend

    labels = torch.arange(6) % 3
    den = replace(capped_gmm(3), network=dist_helper.CappedNetwork(dist_helper.LabelledNet(), 3))
    with RayBackend(workers=2, timeout_s=60, max_batch=3) as be:
        res = ParallelSampler(den, steps=12, progress=False, backend=be, window=12).sample(6, seed=0, labels=labels)
        per_row = 2 * 8 + 8 + 8 + 8 + 2 * 8          # x (2 x fp64), sigma, model time, sample index (8 each), output
        assert be.timings["comm_bytes"] == res.stats.nfe_total * per_row
        assert be.prepare_bytes == labels.numel() * 8
    ref = ParallelSampler(replace(den, network=dist_helper.LabelledNet()), steps=12, progress=False,
                          window=12).sample(6, seed=0, labels=labels)
    torch.testing.assert_close(res.samples, ref.samples, rtol=0, atol=1e-12)


def test_ray_backend_rebinds_to_a_new_model_and_refuses_a_foreign_one(ray_session):
    from paratime.backends.ray_actors import RayBackend

    with RayBackend(workers=1, timeout_s=60) as be:
        a = ParallelSampler("gmm", steps=10, progress=False, backend=be).sample(4, seed=0).samples
        b = ParallelSampler(capped_gmm(1000), steps=10, progress=False, backend=be, guidance=None,
                            clip_x0=0.5).sample(4, seed=0).samples
    ref_b = ParallelSampler(capped_gmm(1000), steps=10, progress=False, clip_x0=0.5).sample(4, seed=0).samples
    torch.testing.assert_close(b, ref_b, rtol=0, atol=1e-12)
    assert not torch.equal(a, b)
    with RayBackend(workers=1, model="gmm", timeout_s=60) as be:
        with pytest.raises(ValueError, match="model"):
            ParallelSampler("digits", steps=10, progress=False, backend=be)


def test_unschedulable_ray_actors_say_so(ray_session):
    from paratime.backends.ray_actors import RayBackend, RayWorkerError

    with RayBackend(workers=1, num_gpus=1, timeout_s=10, start_timeout_s=3) as be:
        with pytest.raises(RayWorkerError, match="could not be scheduled"):
            ParallelSampler("gmm", steps=10, progress=False, backend=be)
