"""The backend protocol against exact answers (mutation-guided): rows evaluated through the local backend in chunks
(``max_batch``), padded to buckets, or under classifier-free guidance equal the denoiser's one call on the same rows
bit for bit (the network below is row-independent float64), the conditioning of row r is sample ``samples[r]``'s;
two gloo ranks give the same rows, their byte counts follow from the tensor sizes, and a collective honours the
backend's ``timeout_s`` on a group passed in."""

import sys
from pathlib import Path

import pytest
import torch

from paratime.backends.base import cond_bytes, moments_agree, weight_moments
from paratime.backends.local import LocalBackend
from paratime.denoiser import Denoiser

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from dist_helper import run_ranks  # noqa: E402


class RowNet:
    """A row-independent float64 network reading per-row conditioning (a 1-D label, a nested per-row tensor) and a
    0-dim scale; it records the rows of every call."""

    def __init__(self):
        self.widths = []

    def __call__(self, x, t, labels, extra, scale):
        self.widths.append(x.shape[0])
        return x * (1 + t[:, None]) + labels.to(x.dtype)[:, None] + extra["w"] * scale


def _uncond(cond):
    return {**cond, "labels": torch.full_like(cond["labels"], 7)}


def _problem(M=7, B=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, 2, generator=g, dtype=torch.float64)
    sigma = torch.rand(M, generator=g, dtype=torch.float64) + 0.5
    model_time = torch.rand(M, generator=g, dtype=torch.float64)
    samples = torch.tensor([2, 0, 1, 2, 1, 0, 2][:M])
    cond = {"labels": torch.tensor([10, 20, 30])[:B], "extra": {"w": torch.randn(B, 2, generator=g,
                                                                             dtype=torch.float64)},
            "scale": torch.tensor(0.5, dtype=torch.float64)}
    return x, sigma, model_time, samples, cond


def _rows(cond, samples):
    """The per-row conditioning written out by hand: sample samples[r]'s for row r."""
    rows = {"labels": cond["labels"][samples], "extra": {"w": cond["extra"]["w"][samples]}, "scale": cond["scale"]}
    return {**rows, "y": cond["y"][samples]} if "y" in cond else rows


@pytest.mark.parametrize("guidance", [None, 2.0])
@pytest.mark.parametrize("options", [{}, {"max_batch": 2}, {"max_batch": 3}, {"max_batch": 5}, {"buckets": (4,)},
                                     {"max_batch": 8, "buckets": (2, 8)}, {"max_batch": 8, "buckets": (2, 4)}])
def test_chunks_and_buckets_give_the_one_call_bit_for_bit_with_each_rows_conditioning(options, guidance):
    x, sigma, model_time, samples, cond = _problem()
    net = RowNet()
    den = Denoiser(net, prediction="x0", guidance=guidance, uncond_fn=_uncond)
    ref = den(x, sigma, model_time, **_rows(cond, samples))
    ref_raw = den.network_outputs(x, sigma, model_time, **_rows(cond, samples))
    with LocalBackend(**options) as be:
        be.bind(den)
        be.prepare(cond)
        net.widths.clear()
        got = be.evaluate(x, sigma, model_time, samples=samples)
        got_raw = be.evaluate(x, sigma, model_time, samples=samples, raw=True)
        # Per-row conditioning given with the call (no samples): used as it is.
        got_rows = be.evaluate(x, sigma, model_time, cond=_rows(cond, samples))
        # Per-sample conditioning given with the call wins over the prepared one.
        be.prepare({**cond, "labels": cond["labels"] + 1})
        got_given = be.evaluate(x, sigma, model_time, cond=cond, samples=samples)
        assert be.calls == 4
        be.release()
        assert be.rows_cond(None, samples) == {}        # nothing prepared is left for the next sample() call
    assert torch.equal(got, ref) and torch.equal(got_rows, ref) and torch.equal(got_given, ref)
    assert torch.equal(got_raw[0], ref_raw[0])
    assert (got_raw[1] is None) if guidance is None else torch.equal(got_raw[1], ref_raw[1])
    # Network rows per call: at most max_batch (each row twice under guidance), padded to a bucket when given.
    limit = options.get("max_batch")
    assert limit is None or max(net.widths) <= limit, net.widths
    if "buckets" in options:
        assert set(net.widths) <= {b * (2 if guidance else 1) for b in options["buckets"]}, net.widths


def test_guided_rows_per_call_are_half_of_an_odd_max_batch():
    """max_batch=5 under guidance: 2 rows a call (4 network rows), never 3 (6 network rows)."""
    x, sigma, model_time, samples, cond = _problem()
    net = RowNet()
    with LocalBackend(max_batch=5) as be:
        be.bind(Denoiser(net, prediction="x0", guidance=2.0, uncond_fn=_uncond))
        assert be.batch_limit() == 2
        be.prepare(cond)
        be.evaluate(x, sigma, model_time, samples=samples)
    assert net.widths == [4, 4, 4, 2]


def test_the_first_calls_probe_derives_max_batch_per_network_row_and_again_for_a_new_model(monkeypatch):
    """Without max_batch on CUDA the first call evaluates a probe of PROBE_ROWS rows, measuring its peak memory per
    row; under guidance its network call held each row twice, so the bytes per network row are half the measured
    per row. Its outputs are the first rows of the answer. Binding another model probes again. Simulated on the
    CPU: the probe path taken, the measurement and the derivation stubbed."""
    import paratime.backends.base as base

    derived = []
    monkeypatch.setattr(base.Backend, "_measures_memory", staticmethod(lambda x: True))
    monkeypatch.setattr(base, "measure_rows", lambda call, rows, device: (call(), 100.0))
    monkeypatch.setattr(base, "default_max_batch", lambda device, per_row=None: derived.append(per_row) or 4)
    x, sigma, model_time, samples, cond = _problem()
    x, sigma, model_time = x.repeat(2, 1)[:12], sigma.repeat(2)[:12], model_time.repeat(2)[:12]
    samples = samples.repeat(2)[:12]
    net = RowNet()
    den = Denoiser(net, prediction="x0", guidance=2.0, uncond_fn=_uncond)
    ref = den(x, sigma, model_time, **_rows(cond, samples))
    with LocalBackend() as be:
        be.bind(den)
        be.prepare(cond)
        net.widths.clear()
        assert torch.equal(be.evaluate(x, sigma, model_time, samples=samples), ref)
        assert derived == [50.0] and net.widths == [2 * base.PROBE_ROWS] + [4] * ((12 - base.PROBE_ROWS) // 2)
        be.evaluate(x, sigma, model_time, samples=samples)
        assert derived == [50.0]                   # derived once per model
        be.bind(Denoiser(net, prediction="x0"))
        be.evaluate(x, sigma, model_time, samples=samples)
        assert derived == [50.0, 100.0]


def test_limits_at_their_boundaries():
    """max_batch 1 is a limit and 0 is not; a max_batch equal to the smallest bucket holds it; off CUDA the limit in
    force before the first call is the CPU constant (halved under guidance)."""
    from paratime.backends.memory import CPU_MAX_BATCH

    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="^max_batch: must be an integer >= 1"):
            LocalBackend(max_batch=bad)
    assert LocalBackend(max_batch=1).max_batch == 1
    assert LocalBackend(max_batch=4, buckets=(4, 8)).buckets == (4, 8)
    be = LocalBackend()
    assert be.batch_limit("cpu") == CPU_MAX_BATCH and be.batch_limit() is None
    be.bind(Denoiser(RowNet(), prediction="x0", guidance=2.0, uncond_fn=_uncond))
    assert be.batch_limit(torch.device("cpu")) == CPU_MAX_BATCH // 2


def test_cond_bytes_counts_every_tensor_at_its_element_size():
    cond = {"a": torch.zeros(3, 2, dtype=torch.float64), "n": {"b": torch.zeros(4, dtype=torch.int32)},
            "s": torch.tensor(1.0), "k": "text"}
    assert cond_bytes(cond) == 3 * 2 * 8 + 4 * 4 + 4


def test_weight_moments_tell_apart_nearby_and_swapped_weights():
    """Replicas whose weights differ by 1e-6 relative, or hold two tensors' values swapped, are not the same
    network (the fingerprint's tolerance is 1e-9 of the weights' scale)."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)).double()
    near = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)).double()
    near.load_state_dict({k: v * (1 + 1e-6) for k, v in a.state_dict().items()})
    swapped = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)).double()
    sa = a.state_dict()
    swapped.load_state_dict({"0.weight": sa["1.weight"], "1.weight": sa["0.weight"], "0.bias": sa["1.bias"],
                             "1.bias": sa["0.bias"]})

    def agree(*nets):
        rows = [[*m, float(c)] for m, c in map(weight_moments, nets)]
        return moments_agree([max(c) for c in zip(*rows)], [min(c) for c in zip(*rows)])

    assert agree(a, a)
    assert not agree(a, near)
    assert not agree(a, swapped)


# -- two gloo ranks ---------------------------------------------------------------------------------------------------

RANKS = '''
import datetime, os, sys, time, types
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS"])
from test_mutants_backends import RowNet, _problem, _rows, _uncond
from paratime.backends import torch_dist
from paratime.backends.torch_dist import DistributedTimeoutError, TorchDistributedBackend
from paratime.denoiser import Denoiser

torch.set_num_threads(1)
r = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=r, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
clock = [0.0]

def tick():
    clock[0] += 1.0
    return clock[0]

torch_dist.time = types.SimpleNamespace(perf_counter=tick)      # each gather lasts 1 "second"
be = TorchDistributedBackend(group=dist.group.WORLD, timeout_s=60, max_batch=2)
M = 5                                   # 3 rows on rank 0, 2 (and 1 padding row) on rank 1
x, sigma, model_time, samples, cond = _problem(M)
x32 = x.float()
checks = {}
for name, den in (("plain", Denoiser(RowNet(), prediction="x0", dtype=torch.float64)),
                  ("guided", Denoiser(RowNet(), prediction="x0", dtype=torch.float64, guidance=2.0,
                                      uncond_fn=_uncond)),
                  ("classified", Denoiser(RowNet(), prediction="x0", dtype=torch.float64,
                                          classifier=lambda x, t: torch.stack([x.sum(1), -x.sum(1)], 1),
                                          classifier_scale=0.5))):
    be.bind(den)
    c = {**cond, "y": torch.tensor([0, 1, 1])} if name == "classified" else cond
    be.prepare(c)
    bytes0, calls0 = be.comm_bytes, be.calls
    got = be.evaluate(x32, sigma.float(), model_time.float(), samples=samples)
    ref = den(x32, sigma.float(), model_time.float(), **_rows(c, samples))
    checks[name] = torch.equal(got, ref)
    # What travels: 3 rows a rank of the float64 network's output (plain), or float32 x0 (guided, classified).
    per_row = 2 * (8 if name == "plain" else 4)
    checks[name + "-bytes"] = be.comm_bytes - bytes0 == 3 * per_row
    checks[name + "-rows"] = torch.equal(be.evaluate(x32, sigma.float(), model_time.float(),
                                                     cond=_rows(c, samples)), ref)
    if den.fusable:
        bytes0 = be.comm_bytes
        raw = be.evaluate(x32, sigma.float(), model_time.float(), samples=samples, raw=True)
        want = den.network_outputs(x32, sigma.float(), model_time.float(), **_rows(cond, samples))
        checks[name + "-raw"] = torch.equal(raw[0], want[0]) and (
            raw[1] is None if want[1] is None else torch.equal(raw[1], want[1]))
        checks[name + "-raw-bytes"] = be.comm_bytes - bytes0 == (2 if den.guided else 1) * 3 * 2 * 8
    be.release()
checks["calls"] = be.calls == 8
checks["comm_s"] = be.timings["comm_s"] == 8.0 and be.timings["comm_bytes"] == be.comm_bytes
checks["primary"] = be.is_primary == (r == 0)
print("CHECKS", {k: v for k, v in checks.items() if not v} or "ALL-OK", flush=True)
# A collective on a group made with a 60 s timeout honours the backend's own timeout_s (1.5 s): rank 1 stays away.
dist.barrier()
if r == 1:
    time.sleep(8)
else:
    short = TorchDistributedBackend(group=dist.group.WORLD, timeout_s=1.5)
    t0 = time.monotonic()
    try:
        short.barrier()
        print("NO-TIMEOUT", flush=True)
    except DistributedTimeoutError:
        print(f"TIMEOUT {time.monotonic() - t0:.1f}", flush=True)
os._exit(0)
'''


def test_two_gloo_ranks_give_each_row_its_conditioning_and_count_the_bytes(tmp_path, monkeypatch):
    """M=5 rows over 2 ranks (shares of 3, the second padded) with max_batch=2: plain, guided (raw halves too) and
    classifier-guided rows equal the denoiser's one call bit for bit, conditioning following the samples; each
    rank receives the peer's 3 padded rows per call (in the network's float64, or x0's float32); comm_s adds every
    gather's time. A group made with a 60 s timeout: the backend's timeout_s=1.5 holds."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    monkeypatch.setenv("TESTS", str(HERE))
    logs = run_ranks(script, timeout=120)
    for log in logs:
        assert "CHECKS ALL-OK" in log, logs
    line = next((x for x in logs[0].splitlines() if x.startswith(("TIMEOUT", "NO-TIMEOUT"))), None)
    assert line is not None and line.startswith("TIMEOUT"), logs
    assert float(line.split()[1]) < 6, line
