"""Rectified flow in paratime's model contract: ``FlowSchedule`` + ``prediction="flow"`` (velocity ``eps - x0``), for
any flow model, checked on analytic velocity fields; and diffusers' flow-matching scheduler with dynamic shifting."""

import math
import os

import pytest
import torch

from paratime import Denoiser, ParallelSampler
from paratime.denoiser import from_x0, to_x0
from paratime.schedules import FlowSchedule

MU, STD = 1.5, 0.5          # data N(MU, STD^2) per feature


def gaussian_velocity(x_t, t, **_):
    """The exact rectified-flow velocity E[eps - x0 | x_t] for N(MU, STD^2) data: x_t = (1-t) x0 + t eps."""
    t = t.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1))) / 1000.0
    var = (1 - t) ** 2 * STD**2 + t**2
    x0 = MU + (1 - t) * STD**2 / var * (x_t - (1 - t) * MU)
    return (x_t - x0) / t


def _flow_model():
    return Denoiser(gaussian_velocity, FlowSchedule(shift=3.0, time_scale=1000.0), "flow")


def test_flow_prediction_converts_to_x0_and_back():
    sched = FlowSchedule()
    sigma = sched.sigma_of_t(torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)).reshape(3, 1)
    a = sched.input_scale(sigma)
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    x = x0 + sigma * eps                                          # VE frame; x_in = a x = (1 - t) x0 + t eps
    v = eps - x0
    torch.testing.assert_close(to_x0("flow", v, x, sigma, a), x0)
    torch.testing.assert_close(from_x0("flow", x0, x, sigma, a), v)


def test_schedule_shift_pure_noise_and_validation():
    sched = FlowSchedule(shift=3.0, time_scale=1000.0)
    grid = sched.grid(4)
    t = torch.linspace(1, 0, 5, dtype=torch.float64)
    t_shift = 3 * t / (1 + 2 * t)
    torch.testing.assert_close(grid.frame_scales[1:], 1 - t_shift[1:])       # x_native = (1 - t) x in the VE frame
    assert float(grid.model_times[0]) == 1000.0                               # pure noise is conditioned on t = 1
    assert float(grid.sigmas[-1]) == 0.0 and float(grid.frame_scales[0]) == pytest.approx(1e-7)
    for bad in (dict(shift=0.0), dict(t_max=1.0), dict(t_min=0.5, t_max=0.4)):
        with pytest.raises(ValueError):
            FlowSchedule(**bad)


def test_exact_velocity_transports_noise_to_the_data_gaussian():
    """The probability-flow ODE of Gaussian data is linear: noise z ends at MU + STD z; the flow-matching Euler step
    converges to it at first order."""
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for steps in (50, 400):
        res = ParallelSampler(_flow_model(), solver="euler", steps=steps, method="sequential", progress=False).sample(
            noise=z)
        errs.append(float((res.samples - (MU + STD * z)).abs().max()))
    assert errs[1] < errs[0] / 4 and errs[1] < 2e-2, errs


def test_point_mass_flow_is_exact_in_one_euler_step():
    """Data at a single point: the straight path; one Euler step from pure noise lands on it (to t_max's 1e-7)."""
    target = torch.full((1, 4), 0.7, dtype=torch.float64)
    net = lambda x_t, t: (x_t - target) / (t.to(x_t.dtype)[:, None] / 1000.0)  # noqa: E731 - v = (x_t - x0) / t
    den = Denoiser(net, FlowSchedule(time_scale=1000.0), "flow")
    out = ParallelSampler(den, solver="euler", steps=1, method="sequential", progress=False).sample((2, 4)).samples
    torch.testing.assert_close(out, target.expand(2, 4), rtol=0, atol=1e-6)


def test_every_solver_a_flow_sampler_accepts_lands_on_the_data_and_the_others_are_refused():
    """A rectified-flow grid starts at sigma ~1e7 (t_max): a step linear in sigma there blew samples up to a std of
    50-7,000 (heun, plms, euler_maruyama were accepted silently); a step shrinking the noise level more than 100x
    is refused for them when the sampler is built, and every other solver lands on the data Gaussian."""
    from paratime.solvers import SOLVERS
    z = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    refused = []
    for name in SOLVERS:
        try:
            sampler = ParallelSampler(_flow_model(), solver=name, steps=20, method="sequential", progress=False)
        except ValueError as e:
            assert str(e).startswith("solver:") and "rectified-flow" in str(e), e
            refused.append(name)
            continue
        out = sampler.sample(noise=z, seed=0 if sampler.draws_step_noise else None).samples
        # Consistency (a distilled sampler run on a non-distilled model) and the ancestral samplers at 20 steps are
        # coarse; a blown-up step is off by orders of magnitude.
        assert abs(float(out.mean()) - MU) < 0.1 and 0.25 < float(out.std()) < 0.75, (name, out.mean(), out.std())
    assert sorted(refused) == ["euler_maruyama", "heun", "plms"]
    # The corrector wraps its base solver: refused with it.
    with pytest.raises(ValueError, match="solver: 'heun'"):
        ParallelSampler(_flow_model(), solver="heun", corrector_snr=0.1, steps=8, progress=False)
    # The rule is the step's noise-level ratio, not the schedule: a flow grid from t_max = 0.99 (sigma 99, a first
    # step of 6x on 20 steps) runs them, and lands on the data.
    den = Denoiser(gaussian_velocity, FlowSchedule(shift=3.0, time_scale=1000.0, t_max=0.99), "flow")
    for name in ("heun", "plms"):
        out = ParallelSampler(den, solver=name, steps=20, method="sequential", progress=False).sample(noise=z).samples
        assert abs(float(out.mean()) - MU) < 0.1 and abs(float(out.std()) - STD) < 0.05, (name, out.std())


@pytest.mark.parametrize("method", ["picard", "parareal"])
def test_parallel_methods_reach_the_sequential_flow_sample(method):
    den = _flow_model()
    seq = ParallelSampler(den, solver="euler", steps=12, method="sequential", progress=False).sample((2, 6), seed=3)
    par = ParallelSampler(den, solver="euler", steps=12, method=method, tol=0.0, progress=False).sample((2, 6), seed=3)
    torch.testing.assert_close(par.samples, seq.samples, rtol=1e-9, atol=1e-9)


def test_diffusers_flow_matching_with_dynamic_shifting():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    diffusers = pytest.importorskip("diffusers")
    from paratime.integrations.diffusers import from_diffusers, sample_latents, solver_for, with_timestep_kwargs

    sch = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu, steps = math.log(2.5), 7
    latents = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    sch.set_timesteps(steps, mu=mu)
    x = latents
    for t in sch.timesteps:
        x = sch.step(gaussian_velocity(x, t.expand(2)), t, x).prev_sample
    den = with_timestep_kwargs(from_diffusers(gaussian_velocity, sch, dtype=torch.float64), mu=mu)
    got = sample_latents(ParallelSampler(den, solver=solver_for(sch), steps=steps, method="sequential",
                                         progress=False), latents).samples
    assert float((got - x).abs().max()) <= 1e-4 * max(1.0, float(x.abs().max()))
