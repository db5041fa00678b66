"""Host syncs through the whole stack: ``ParallelSampler.sample`` -> evaluator -> local backend -> fused step, with
the Triton kernels forced (the interpreter on CPU), for every solver and method: no sync inside a network call and
at most one device read per round (Picard's packed read, Parareal's one read per iteration; sequential steps: none).

Counted: what :class:`test_picard_syncs.SyncCounter` sees (``item``, ``__bool__``, ``tolist``, ``nonzero``, boolean
indexing, ...: device-to-host reads) and host-to-device copies, which that mode cannot see (``torch.tensor(v,
device=...)``, ``torch.as_tensor(v, device=...)`` from host data copy from pageable memory and synchronise on
CUDA): those two constructors are wrapped while the counter runs. A sample call's set-up (grid, noise, conditioning
checks, before the first network call) and its end (the one waiting NaN check, the records) are not per round."""

import weakref

import pytest
import torch

from test_picard_syncs import SyncCounter       # tests/ is on sys.path (rootdir-relative test modules)

from paratime import ParallelSampler
from paratime.backends import LocalBackend
from paratime.kernels import record_launches


class StackCounter(SyncCounter):
    """:class:`SyncCounter` plus host-to-device copies by ``torch.tensor`` / ``torch.as_tensor`` with a device.

    Tensors made from host data without a device (``torch.tensor(list)``) live in host memory on CUDA too: moving or
    reading them (``.to(device)`` from pinned memory, ``.tolist()``) is no device sync, so calls on them are not
    counted (on the CPU the counter could not tell them from states otherwise)."""

    def __enter__(self):
        self._orig = torch.tensor, torch.as_tensor
        tensor, as_tensor = self._orig
        self._host: dict[int, weakref.ref] = {}          # id -> tensor made from host data

        def counted(fn, name):
            def wrapper(data, *args, **kwargs):
                dev = kwargs.get("device")
                already = isinstance(data, torch.Tensor) and dev is not None and data.device == torch.device(dev)
                if dev is not None and not already:
                    self.count += 1
                    self.names.append(f"{name}(device=)")
                out = fn(data, *args, **kwargs)
                if dev is None and not isinstance(data, torch.Tensor):
                    self._host[id(out)] = weakref.ref(out)
                return out
            return wrapper

        torch.tensor, torch.as_tensor = counted(tensor, "tensor"), counted(as_tensor, "as_tensor")
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self._orig
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        ref = self._host.get(id(args[0])) if args else None
        if ref is not None and ref() is args[0]:
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


class CountingBackend(LocalBackend):
    """The local backend, recording the syncs made inside each network call."""

    def __init__(self, counter):
        super().__init__()
        self.counter, self.per_call = counter, []

    def evaluate(self, *args, **kwargs):
        before = self.counter.count
        out = super().evaluate(*args, **kwargs)
        self.per_call.append(self.counter.count - before)
        return out


def test_counter_sees_host_to_device_copies():
    """The wrapper is not blind: each constructor with a device and host data counts, device-side fills do not."""
    x = torch.zeros(3)
    with StackCounter() as c:
        torch.tensor([1.0, 2.0], device=x.device)
        torch.as_tensor(0.0, device=x.device)
        torch.as_tensor(x, device=x.device)              # already there: no copy
        h = torch.tensor([1.0])                          # host tensor: no device
        h.to(x.device), h.tolist()                       # host memory: no device read
        x.tolist()                                       # a state's read is still counted
        x.new_zeros(3), x.new_full((3,), 2.0), torch.full((2,), 1.0, device=x.device)
    assert c.count == 3, c.names


def _run(method, solver, steps=12, batch=3, **options):
    pytest.importorskip("triton")                 # kernels="triton" below
    counter = StackCounter()
    backend = CountingBackend(counter)
    per_round, marks = [], {}

    def callback(info):
        per_round.append(counter.count - marks.get("last", 0))
        marks["last"] = counter.count

    sampler = ParallelSampler("gmm", solver=solver, method=method, steps=steps, dtype=torch.float32,
                              state_dtype=torch.float32,
                              backend=backend, progress=False, kernels="triton", **options)
    with record_launches() as launched, counter:
        # Set-up (grid, noise, the first call's batch limit) is counted in the first round; later rounds are clean.
        out = sampler.sample(batch, seed=0, callback=callback)
    return out, per_round, backend.per_call, launched, counter


CASES = [("sequential", s, {}) for s in ("ddim", "ddpm", "heun", "plms")] + [
    ("sequential", "ddpm", dict(corrector_snr=0.2)),
    *(("picard", s, dict(window=6)) for s in ("ddim", "ddpm", "plms", "heun")),
    ("picard", "dpmpp_2m", dict(window=12)), ("picard", "ddim", dict(window=12, update="picard")),
    ("picard", "ddpm", dict(window=6, update="anderson")),
    ("parareal", "ddim", {}), ("parareal", "heun", {}), ("parareal_pipelined", "ddpm", {}),
    # Staggered through the stack: a read a tick at most (its ticks pass host steps, so Heun's and PLMS's second
    # calls read nothing back).
    *(("staggered", s, dict(window=4)) for s in ("ddim", "heun", "plms")),
]


@pytest.mark.parametrize("method, solver, options", CASES)
def test_whole_stack_reads_at_most_once_a_round(method, solver, options):
    out, per_round, per_call, launched, counter = _run(method, solver, **options)
    assert per_call and max(per_call) == 0, (per_call, counter.names)       # no sync inside a network call
    later = per_round[1:]
    bound = 0 if method == "sequential" else 1
    # Two-call steps (Heun, the corrector) read once per grid whether the last step reaches sigma = 0.
    once = 1 if solver == "heun" or "corrector_snr" in options else 0
    assert later and sum(max(0, c - bound) for c in later) <= once, (per_round, counter.names)
    assert torch.isfinite(out.samples).all()
    if solver in ("ddim", "ddpm", "euler_ancestral") and "corrector_snr" not in options:
        assert any(x.kernel == "fused_step" for x in launched), launched    # the fused Triton step ran
    if method == "picard":
        assert any(x.kernel == "picard_update" for x in launched), launched


@pytest.mark.parametrize("method", ["parareal", "parareal_pipelined", "picard", "staggered"])
def test_the_reported_window_starts_are_host_data(method):
    """The progress bar reads ``int(info.begin.min())`` each round: Parareal reported device tensors there, so a bar
    (on by default) added one device read an iteration (pipelined: a tick) on a GPU. Every method now reports the
    starts as host data, from the round's own read: tensors made from host lists (what the counter tracks as host
    memory), and no more reads a round than before."""
    counter = StackCounter()
    host, per_round, last = [], [], [0]

    def callback(info):
        ref = counter._host.get(id(info.begin))
        host.append(ref is not None and ref() is info.begin)
        per_round.append(counter.count - last[0])
        last[0] = counter.count

    options = dict(window=2) if method in ("picard", "staggered") else {}
    sampler = ParallelSampler("gmm", solver="ddim", method=method, steps=12, dtype=torch.float32,
                              state_dtype=torch.float32, backend=LocalBackend(), progress=False, **options)
    with counter:
        sampler.sample(3, seed=0, callback=callback)
    assert host and all(host), host
    assert len(per_round) > 1 and max(per_round[1:]) <= 1, (per_round, counter.names)     # set-up aside


def test_true_indices_are_nonzeros_order_without_a_read():
    """``true_indices`` (the sized nonzero of Parareal, staggered and two-call steps) equals ``nonzero`` on random
    masks of 1-3 dimensions, and ``torch.nonzero_static`` (no CUDA kernel before torch 2.6, which the package does
    not require) is used nowhere."""
    from pathlib import Path

    from paratime.solvers import true_indices

    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (9,), (4, 7), (3, 2, 5)]:
        for p in (0.1, 0.5, 0.9):
            m = torch.rand(shape, generator=g) < p
            count = int(m.sum())
            with StackCounter() as c:
                got = true_indices(m, count)
            assert torch.equal(got, m.nonzero()) and c.count == 0, (shape, p, c.names)
    src = Path(__file__).parents[1] / "paratime"
    assert not [f for f in src.rglob("*.py") if "torch.nonzero_static(" in f.read_text()]


@pytest.mark.parametrize("method, solver, options", [("sequential", "ddim", {}), ("picard", "ddim", dict(window=6)),
                                                     ("parareal", "ddim", {}), ("parareal_pipelined", "ddpm", {}),
                                                     ("staggered", "ddim", dict(window=4))])
def test_the_ends_reads_do_not_grow_with_the_batch(method, solver, options):
    """After the last round, the records are read in a fixed number of reads, not one per sample: on an H100 the
    Parareal stats read ``sample_rounds`` sample by sample (8 syncs for a batch of 8, over the GPU test's budget)."""
    ends = []
    for batch in (2, 8):
        out, per_round, _, _, counter = _run(method, solver, batch=batch, **options)
        ends.append(counter.count - sum(per_round))
    assert ends[0] == ends[1], ends


def test_the_records_read_together_come_back_exact_in_their_own_dtype_and_shape():
    """The end's one read per device returns what ``tolist()`` would: int64 past 2**53 exactly (a float64 pass
    would round 2**53 + 1 down), bools, float32's own value, shapes; anything not a tensor as it is."""
    from paratime.sampler import _read_together

    values = {"big": torch.tensor([2 ** 53 + 1, -3]), "flags": torch.tensor([True, False, True]),
              "scale": torch.tensor([0.1, 2.5], dtype=torch.float32), "grid": torch.arange(6, dtype=torch.int16)
              .reshape(2, 3), "one": torch.tensor(7.25, dtype=torch.float64), "none": None, "list": [1, 2]}
    got = _read_together(values)
    for k, v in values.items():
        want = v.tolist() if isinstance(v, torch.Tensor) else v
        assert got[k] == want and type(got[k]) is type(want), (k, got[k], want)
    assert got["big"][0] == 2 ** 53 + 1 and got["flags"] == [True, False, True]


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "dpmpp_2m"])
def test_picard_copies_nothing_from_the_host_to_the_device(solver):
    """A Picard call's constants are made on the device: no ``torch.tensor(v, device=...)`` from host data anywhere in
    the call (each such copy from pageable memory is a host sync on CUDA; the window's two 0-d constants were two of
    an H100 run's set-up syncs)."""
    out, per_round, _, _, counter = _run("picard", solver, window=6)
    assert not [n for n in counter.names if "device=" in n], counter.names
