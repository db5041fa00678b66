import numpy as np
import pytest
import torch

from paratime import ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, VESchedule
from paratime.schedules import karras_sigmas


def test_discrete_spacings_match_diffusers_definitions():
    s = DiscreteVPSchedule.from_betas("linear")
    assert s.timesteps(10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert s.timesteps(10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert s.timesteps(10, "linspace").tolist() == np.linspace(0, 999, 10).round()[::-1].astype(int).tolist()
    s1 = DiscreteVPSchedule.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    assert s1.timesteps(4, "leading").tolist() == [751, 501, 251, 1]


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_discrete_spacings_equal_diffusers_set_timesteps(spacing):
    """Every step count 1..1000, with and without steps_offset, against diffusers' own ``set_timesteps``. Known
    departures left out: diffusers' float arange gives N + 1 trailing timesteps at N = 61, 103, ... (paratime keeps
    N), and leading with steps_offset=1 at N = 1000 starts at t = 1000, past the table (paratime refuses it, naming
    steps and steps_offset: clipped to 999 it repeated a timestep)."""
    diffusers = pytest.importorskip("diffusers")
    for offset in (0, 1):
        ours = DiscreteVPSchedule.from_betas("linear", steps_offset=offset)
        sch = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        bad = []
        for n in range(1, 1001):
            if offset and spacing == "leading" and n == 1000:
                with pytest.raises(ValueError, match="^steps, steps_offset:"):
                    ours.timesteps(n, spacing)
                continue
            sch.set_timesteps(n)
            want = np.clip(sch.timesteps.numpy()[:n], 0, 999)
            if not np.array_equal(ours.timesteps(n, spacing), want):
                bad.append(n)
        assert bad == [], (offset, len(bad), bad[:10])


def test_discrete_grid_uses_alphas_cumprod_and_final_alpha():
    s = DiscreteVPSchedule.from_betas("linear")
    g = s.grid(10, "trailing")
    ac = s.alphas_cumprod
    torch.testing.assert_close(g.sigmas[0], ((1 - ac[999]) / ac[999]).sqrt())
    assert float(g.sigmas[-1]) == 0.0
    torch.testing.assert_close(g.frame_scales[:-1], ac[g.model_times[:-1].long()].sqrt())
    s2 = DiscreteVPSchedule(ac, final_alpha_cumprod=float(ac[0]))
    assert float(s2.grid(10).sigmas[-1]) == pytest.approx(float(((1 - ac[0]) / ac[0]).sqrt()))


def test_karras_sigmas_endpoints_and_rho():
    sig = karras_sigmas(5, 0.002, 80.0, 7.0)
    assert sig.shape == (6,) and float(sig[-1]) == 0.0
    assert float(sig[0]) == pytest.approx(80.0) and float(sig[-2]) == pytest.approx(0.002)
    mid = (80.0 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert float(sig[2]) == pytest.approx(mid)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_continuous_vp_time_inverts_sigma(kind):
    s = ContinuousVPSchedule(kind)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(s.t_of_sigma(s.sigma_of_t(t)), t)


def test_discrete_model_time_interpolates_integer_steps():
    s = DiscreteVPSchedule.from_betas("linear")
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(s.model_time(s.train_sigmas[t]), t.double())


def test_ancestral_std_is_ddpm_posterior_std():
    s = DiscreteVPSchedule.from_betas("linear")
    g = s.grid(1000)
    ac = s.alphas_cumprod
    t = torch.arange(999, 0, -1)
    beta_tilde = (1 - ac[t - 1]) / (1 - ac[t]) * (1 - ac[t] / ac[t - 1])
    torch.testing.assert_close(g.ancestral_std()[:999], beta_tilde.sqrt())
    assert float(g.ancestral_std()[-1]) == 0.0


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteVPSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="spacing"):
        DiscreteVPSchedule.from_betas("linear").grid(10, "quadratic")
    with pytest.raises(ValueError, match="steps"):
        VESchedule().grid(0)
    with pytest.raises(ValueError, match="steps"):
        DiscreteVPSchedule.from_betas("linear").grid(2000)
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteVPSchedule.from_betas("sigmoid")
    with pytest.raises(ValueError, match="sigma_min"):
        EDMSchedule(sigma_min=5, sigma_max=1)
    with pytest.raises(ValueError, match="spacing"):
        EDMSchedule().grid(10, "trailing")
    # Named, not torch's or numpy's own errors (or an error about the grid's sigmas, later).
    from paratime.schedules import FlowSchedule

    for call, error, name in ((lambda: EDMSchedule(sigma_min="a"), TypeError, "sigma_min"),
                              (lambda: FlowSchedule(shift="2"), TypeError, "shift"),
                              (lambda: FlowSchedule(shift=float("inf")), ValueError, "shift"),
                              (lambda: DiscreteVPSchedule.from_betas(num_train_timesteps=1.5), TypeError,
                               "num_train_timesteps"),
                              (lambda: DiscreteVPSchedule.from_betas(beta_end=2.0), ValueError, "beta_end"),
                              (lambda: DiscreteVPSchedule.from_betas(beta_end=1.0), ValueError, "beta_end"),
                              (lambda: karras_sigmas(10, 0.0, 80.0), ValueError, "sigma_min"),
                              (lambda: DiscreteVPSchedule.from_betas(steps_offset=1).grid(1000, "leading"),
                               ValueError, "steps, steps_offset")):
        with pytest.raises(error) as info:
            call()
        assert str(info.value).startswith(f"{name}:"), str(info.value)


def test_flow_grid_times_are_exact_below_t_min():
    """A flow grid of more than 1 / t_min steps has points below t_min: their model time is t itself (it was
    clamped to t_min: 5e-4 read 1e-3 at 2,000 steps), and the range's upper end is t_max / (1 - t_max) in float64
    (float32 read 8,388,607 for 9,999,999)."""
    from paratime.schedules import FlowSchedule

    flow = FlowSchedule(time_scale=1000.0)
    grid = flow.grid(2000)
    sig = grid.sigmas[:-1]
    torch.testing.assert_close(grid.model_times[:-1], 1000.0 * torch.where(sig >= flow.sigma_range[1], 1.0,
                                                                           sig / (1 + sig)), rtol=1e-12, atol=0)
    assert float(grid.model_times[-2]) == pytest.approx(1000.0 / 2000, rel=1e-9)
    assert flow.sigma_range[1] == pytest.approx(flow.t_max / (1 - flow.t_max), rel=1e-12)


def test_a_first_timestep_without_noise_keeps_model_times_finite():
    """alphas_cumprod[0] = 1 (a first beta of 0, which diffusers takes): sigma 0 at timestep 0 made log sigma -inf,
    and every sigma below the second timestep's a NaN model time."""
    ac = torch.cumprod(1 - torch.linspace(0, 0.02, 1000, dtype=torch.float64), 0)
    s = DiscreteVPSchedule(ac)
    sig = torch.tensor([0.0, 1e-5, float(s.train_sigmas[1]), float(s.train_sigmas[7])], dtype=torch.float64)
    t = s.model_time(sig)
    assert torch.isfinite(t).all() and t[0] == 0 and t[2] == 1 and torch.allclose(t[3], torch.tensor(7.0).double())
    assert 0 < t[1] < 1 and torch.allclose(s.sigma_of_model_time(t[1:]), sig[1:], rtol=1e-9)
