"""The pre-flight memory bound counts what a Picard round really holds: the peak of live tensor bytes during a run
(benchmarks/live_bytes.py, every tensor the run allocates) stays under ``SamplerConfig.check_memory``'s figure, and near
it, for every solver kind and update, at Stable Diffusion's latent size too (4x64x64, N = 1000, W = 500, B = 1,
float32), where the old bound (the trajectory, the noise and 4 window buffers) was 2.5x short."""

import pytest
import torch

from paratime.bench.live_bytes import LiveBytes

from paratime import ParallelSampler
from paratime.backends.memory import WORK_BUFFERS, request_bytes
from paratime.denoiser import Denoiser
from paratime.schedules import DiscreteVPSchedule


class _Enough(Exception):
    """Raised from the round callback: the rounds measured are done."""


# kernels="torch": the interpreted Triton kernels (tests/conftest.py) allocate the same outputs, 100x slower.
def _trivial(x, t, **cond):
    return 0.1 * x                         # a network that costs nothing: the figure is the sampler's own memory


def _peak_and_bound(solver, update, steps, window, side, batch, rounds, **options):
    den = Denoiser(_trivial, DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02), "eps",
                   sample_shape=(4, side, side))
    sampler = ParallelSampler(den, solver=solver, steps=steps, window=window, update=update, init="noise",
                              state_dtype=torch.float32, progress=False, kernels="torch", **options)

    def stop_after(info):
        if info.round >= rounds:
            raise _Enough

    with LiveBytes() as live, pytest.raises(_Enough):
        sampler.sample(batch, seed=0, callback=stop_after)
    shape = (batch, 4, side, side)
    return live.peak, sampler.config.check_memory(shape, torch.device("cpu"), torch.float32, sampler.solver)


def test_live_bytes_counts_storages_once_and_frees_them():
    with LiveBytes() as live:
        a = torch.zeros(1000)              # 4000 bytes
        v = a.view(10, 100)                # a view: no new storage
        a.add_(1)                          # in place: nothing new
        b = a * 2                          # 4000 more
        del b
        c = torch.ones(250)                # 1000
    assert live.peak == 8000 and live.current == 5000 and v.shape == (10, 100) and c.numel() == 250


def test_bound_holds_a_stable_diffusion_size_round():
    """SD-1.5 latent, N = 1000, W = 500, B = 1, float32, DDIM with the default secant update, three rounds (the
    second and third hold the secant history)."""
    peak, bound = _peak_and_bound("ddim", "secant", 1000, 500, 64, 1, 3)
    old = request_bytes((1, 4, 64, 64), 1000, torch.float32, 0, 500, WORK_BUFFERS)
    assert peak > 2 * old, (peak, old)                         # what the old bound missed
    assert 0.6 * bound < peak <= bound, (peak / 2**20, bound / 2**20)


@pytest.mark.parametrize("solver, update, options", [
    ("ddim", "picard", {}), ("ddpm", "anderson", {}), ("heun", "secant", {}), ("plms", "anderson", {}),
    ("dpmpp_3m", "secant", {}), ("ddpm", "secant", dict(corrector_snr=0.2))])
def test_bound_holds_every_kind_and_update(solver, update, options):
    """Small latents, enough rounds for Anderson's three-round history; N = 100, W = 50, B = 2."""
    peak, bound = _peak_and_bound(solver, update, 100, 50, 16, 2, 4, **options)
    assert 0.75 * bound < peak <= bound, (peak / bound)
