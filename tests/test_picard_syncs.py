"""Host syncs in the Picard loop, counted on CPU: at most two device reads per round (the loop makes one), none in
the window's network calls, for every update and stopping rule.

A ``TorchFunctionMode`` sees every torch call; the ones counted are those that copy device data to the host on CUDA
(``item``, ``__bool__``, ``tolist``, ``nonzero``, boolean-mask indexing, ``bincount``, ``repeat_interleave`` without
``output_size``, ...)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from paratime.methods import Problem, sample_picard, sample_sequential
from paratime.methods.picard import UPDATES
from paratime.noise import INITIAL, STEP, draw_noise
from paratime.solvers import make_solver
from paratime.zoo import ring_gmm

_ALWAYS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__int__,
           torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.argwhere,
           torch.Tensor.bincount, torch.bincount, torch.Tensor.cpu, torch.Tensor.numpy, torch.masked_select,
           torch.Tensor.masked_select, torch.unique, torch.Tensor.unique}


def _bool_index(idx) -> bool:
    idx = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)


class SyncCounter(TorchFunctionMode):
    """Counts calls that would force a device-to-host copy on CUDA."""

    def __init__(self):
        super().__init__()
        self.count, self.names = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = func in _ALWAYS
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_):
            sync = _bool_index(args[1])
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
            sync = kwargs.get("output_size") is None and isinstance(args[1] if len(args) > 1 else None,
                                                                    torch.Tensor)
        if func is torch.where and len(args) == 1:
            sync = True
        if func is torch.Tensor.to and any(a == "cpu" or a == torch.device("cpu") for a in args[1:]):
            sync = True
        if sync:
            self.count += 1
            self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def _problem(solver: str, steps: int, batch: int, seed: int = 0):
    """The gmm trajectory with a sync-free ``evaluate`` (the exact mixture denoiser called directly)."""
    model = ring_gmm()
    grid = model.schedule.grid(steps, None)
    sig = grid.sigmas.to(torch.float64)
    times = grid.model_times
    solver = make_solver(solver)
    noise = draw_noise(seed, batch, (2,), steps, STEP) if solver.stochastic else None
    x_T = draw_noise(seed, batch, (2,), None, INITIAL) * model.schedule.prior_std(grid.sigmas[:1])
    calls = {"syncs": [], "mode": None}

    def evaluate(x, i, b):
        before = calls["mode"].count if calls["mode"] is not None else 0
        out = model(x, sig[i], times[i])
        if calls["mode"] is not None:
            calls["syncs"].append(calls["mode"].count - before)
        return out

    problem = Problem(sig, grid.ancestral_std().to(torch.float64), grid.frame_scales.to(torch.float64), solver,
                      evaluate, noise)
    return x_T, problem, calls


_INITS = [dict(init="x0", fill="path"), dict(init="noise", fill="path")]
#: each sample's own data scale on a sliding window: acceptance reads D at the window end (no read of its own)
_OWN_SCALE = [dict(init="x0", fill="path", tol_scale=None), dict(init="x0", fill="copy", tol_scale=None)]


@pytest.mark.parametrize("solver, stop, update, window, shared, options", [
    ("ddim", "final", "secant", 30, False, {}), ("ddpm", "final", "secant", 7, False, {}),
    ("dpmpp_2m", "final", "secant", 7, True, {}), ("ddpm", "final", "picard", 7, False, {}),
    ("dpmpp_2m", "paradigms", "picard", 30, False, {}), ("ddim", "paradigms", "secant", 7, True, {}),
    *[(solver, "final", update, window, shared, opt) for update in UPDATES
      for solver, window, shared, opt in (("ddpm", 7, False, _INITS[0]), ("dpmpp_2m", 7, True, _INITS[0]),
                                          ("ddim", 30, False, _INITS[1]))],
    ("ddpm", "final", "secant", 7, False, _OWN_SCALE[0]), ("dpmpp_2m", "final", "secant", 7, False, _OWN_SCALE[1])])
def test_one_device_read_per_picard_round(solver, stop, update, window, shared, options):
    steps = 30
    x_T, problem, calls = _problem(solver, steps, batch=6)
    per_round = []
    counter = SyncCounter()
    calls["mode"] = counter

    def on_round(info):
        per_round.append(counter.count)
        counter.count = 0

    problem = Problem(problem.sigmas, problem.noise_levels, problem.frame_scales, problem.solver, problem.evaluate,
                      problem.noise, on_round)
    with counter:
        out = sample_picard(x_T, problem, window, 1e-3, shared_window=shared, stop=stop, update=update, **options)
    assert out.rounds >= 3 and len(per_round) == out.rounds
    reads = per_round[1:] if options.get("init") == "x0" or (window < steps and not options) else per_round
    assert per_round[0] <= 1 and max(reads) == 1, (per_round, counter.names)   # once a round (the x0 round: none)
    assert calls["syncs"] and max(calls["syncs"]) == 0          # the network calls themselves never read back
    assert counter.count == 0             # nothing after the last round but the returned record


def test_counter_sees_the_sync_forcing_calls():
    """The counter is not blind: each of these would stall a CUDA stream."""
    t = torch.arange(6.0)
    expected = 0
    with SyncCounter() as c:
        bool(t.any()); expected += 1                      # noqa: E702
        t.max().item(); expected += 1                     # noqa: E702
        t.tolist(); expected += 1                         # noqa: E702
        t.nonzero(); expected += 1                        # noqa: E702
        t[t > 2]; expected += 1                           # noqa: E702
        torch.bincount(t.long()); expected += 1           # noqa: E702
        torch.repeat_interleave(t, t.long()); expected += 1   # noqa: E702
        torch.repeat_interleave(t, t.long(), output_size=15)  # known size: no sync
        t[t.long().clamp_max(3)]                              # integer gather: no sync
    assert c.count == expected, c.names


def test_sync_free_problem_gives_the_sequential_sample():
    """The helper problem above is the real trajectory: Picard at tol 0 on it equals sequential sampling."""
    x_T, problem, _ = _problem("ddpm", 30, batch=6)
    seq = sample_sequential(x_T, problem).x
    par = sample_picard(x_T, problem, 8, 0.0).x
    torch.testing.assert_close(par, seq, rtol=0, atol=1e-9)
