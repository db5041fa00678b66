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
