"""Gaps found by mutation testing solvers.py / schedules.py / noise.py / denoiser.py: each test holds a step to an
exact answer (a Gaussian model's closed-form variance, a one-step grid's Tweedie end point, the fine steps a coarse
jump stands for, diffusers' own schedulers at the boundaries of their order rules)."""

import math

import pytest
import torch

from paratime.denoiser import Denoiser
from paratime.schedules import (ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, FlowSchedule, TimeGrid,
                                VESchedule, betas_for, karras_sigmas)
from paratime.solvers import (SIGMA_LINEAR_RATIO, PLMS, Ancestral, DPMSolverPP, EulerMaruyama, FlowHeun, Heun,
                              LangevinCorrected, constant_d_jump, constant_d_path, make_solver)

MU, S0 = 1.5, 0.5          # the data: N(MU, S0^2), whose denoiser is exact in closed form (VE frame)


def _gauss_den(sigmas):
    def den(x, i, b):
        s = sigmas[i].reshape(-1, *([1] * (x.ndim - 1)))
        return MU + S0**2 / (S0**2 + s**2) * (x - MU)
    return den


# -- Euler-Maruyama at eta != 1: every member of the SDE family keeps the data's marginals --------------------------

@pytest.mark.parametrize("eta", [0.5, 2.0])
@pytest.mark.parametrize("form", ["next_state", "increment"])
def test_euler_maruyama_family_ends_on_the_data_variance_for_any_eta(eta, form):
    """On N(MU, S0^2) data with the exact denoiser a step is affine in (x - MU) and z, so the variance is propagated
    exactly (no sampling) from the marginal's S0^2 + sigma_0^2; every eta's reverse SDE has the data's marginals,
    so the end variance is S0^2 up to the O(1/N) error of Euler-Maruyama. (eta = 1, the only one tested before,
    cannot tell eta from eta^2.)"""
    solver = EulerMaruyama(eta=eta)
    sigmas = karras_sigmas(400, 0.002, 40.0)
    den = _gauss_den(sigmas)
    x = torch.tensor([[MU + 1.0], [MU]], dtype=torch.float64)      # rows: the (x - MU) and the z coefficients
    z = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    b = torch.arange(2)
    var = S0**2 + float(sigmas[0]) ** 2
    for n in range(sigmas.numel() - 1):
        i = torch.full((2,), n)
        d = den(x, i, b)
        if form == "next_state":
            out = solver.next_state(x, i, b, d, None, z, sigmas, den, host_steps=n)
        else:
            out = x + solver.increment(x, i, b, d, None, z, sigmas, den, host_steps=n)
        a, k = float(out[0, 0] - MU), float(out[1, 0] - MU)
        var = a * a * var + k * k
    assert var == pytest.approx(S0**2, rel=0.06), var        # 4.4% at eta 0.5; a wrong eta is off by 50% or more


# -- DDIM's clip in the increment form --------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_clipped_ddim_increment_is_the_next_state_step(eta):
    """``increment`` is the public step map: with ``clip`` it must clamp the x0 term as ``next_state`` does."""
    solver = Ancestral(eta=eta, clip=0.5)
    sigmas = karras_sigmas(6, 0.01, 10.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64) * 5
    d = torch.randn(4, 3, generator=g, dtype=torch.float64) * 2          # many entries beyond the clip
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    i, b = torch.tensor([0, 2, 4, 5]), torch.arange(4)
    args = (x, i, b, d, None, z, sigmas, None)
    torch.testing.assert_close(x + solver.increment(*args), solver.next_state(*args), rtol=1e-12, atol=1e-12)


# -- second calls found without host steps (one nonzero), on rows at mixed steps --------------------------------

@pytest.mark.parametrize("solver", [Heun(), FlowHeun(), PLMS(), LangevinCorrected(make_solver("ddim"), 0.3)],
                         ids=["heun", "flow_heun", "plms", "langevin"])
def test_second_calls_pick_the_right_rows_with_and_without_host_steps(solver):
    """Rows at mixed steps, the step to sigma = 0 first: the batched step equals each row stepped alone, with the
    host steps and without them (the ``nonzero`` fallback), and the step to sigma = 0 lands on D (Tweedie)."""
    sigmas = karras_sigmas(5, 0.01, 10.0)
    N = sigmas.numel() - 1
    den = _gauss_den(sigmas)
    steps = [N - 1, 0, N - 1, 2, 0]
    M = len(steps)
    i, b = torch.tensor(steps), torch.arange(M)
    x = torch.linspace(-3, 3, M, dtype=torch.float64)[:, None] * sigmas[i][:, None] + MU
    d = den(x, i, b)
    noise = (None, torch.linspace(-1, 1, M, dtype=torch.float64).reshape(M, 1, 1)) if solver.stochastic else None

    def step(rows, host, form):
        r = torch.tensor(rows)
        nz = None if noise is None else (None, noise[1][r])
        h = solver.history_value(x[r], d[r], i[r], sigmas)          # each row's own value as its whole history
        prev = tuple(h for _ in range(solver.history_depth)) if solver.uses_history else None
        prev = prev[0] if prev is not None and solver.history_depth == 1 else prev
        args = (x[r], i[r], b[r], d[r], prev, nz, sigmas, den)
        host_steps = [steps[k] for k in rows] if host else None
        if form == "next_state":
            return solver.next_state(*args, host_steps=host_steps)
        return x[r] + solver.increment(*args, host_steps=host_steps)

    alone = torch.cat([step([k], True, "next_state") for k in range(M)])
    assert torch.isfinite(alone).all()
    for host in (True, False):
        for form in ("next_state", "increment"):
            torch.testing.assert_close(step(list(range(M)), host, form), alone, rtol=1e-12, atol=1e-12)
    last = [k for k in range(M) if steps[k] == N - 1]
    torch.testing.assert_close(alone[last], d[last], rtol=1e-12, atol=1e-12)


def test_plms_on_a_one_step_grid_is_tweedie_without_host_steps():
    """One step to sigma = 0 has no point to take Heun's second call at: x' = x - sigma e = D, also when the rows'
    steps are found on the device (host_steps=None)."""
    sigmas = torch.tensor([3.0, 0.0], dtype=torch.float64)
    den = _gauss_den(sigmas)
    x, i, b = torch.tensor([[4.0], [-2.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.long), torch.arange(2)
    d = den(x, i, b)
    e = (x - d) / 3.0
    out = PLMS().next_state(x, i, b, d, (e, e, e), None, sigmas, den, host_steps=None)
    torch.testing.assert_close(out, d, rtol=1e-12, atol=1e-12)


# -- DPM-Solver++ SDE's coarse jump is its fine steps under a constant D ------------------------------------------

@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmpp_sde_jump_equals_its_fine_steps_with_d_held(order):
    """With D held the divided differences vanish and each SDE step is x' = q x + (1 - q) D + s' sqrt(1 - q) z_m
    (q = (s'/s)^2): the jump from i to j must carry the same pre-drawn noise (the documented DDPM jump), not drop it
    (the deterministic DDIM jump, what Parareal's coarse solver would otherwise take)."""
    solver = DPMSolverPP(order=order, sde=True)
    sigmas = karras_sigmas(10, 0.02, 20.0)
    g = torch.Generator().manual_seed(1)
    B = 3
    noise = torch.randn(sigmas.numel() - 1, B, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(B, 2, generator=g, dtype=torch.float64) * 20
    D = torch.randn(B, 2, generator=g, dtype=torch.float64)
    e, j, b = torch.tensor([1, 2, 0]), torch.tensor([5, 9, 10]), torch.arange(B)
    got = solver.jump(x0, D, e, j, b, noise, sigmas, span=10)
    for r in range(B):
        x = x0[r:r + 1]
        for n in range(int(e[r]), int(j[r])):
            prev = D[r:r + 1] if solver.history_depth == 1 else (D[r:r + 1],) * solver.history_depth
            x = solver.next_state(x, torch.tensor([n]), b[r:r + 1], D[r:r + 1], prev, noise[n, r:r + 1], sigmas,
                                  None, host_steps=n)
        torch.testing.assert_close(got[r:r + 1], x, rtol=1e-10, atol=1e-10)


# -- the constant-D path past the grid's end ----------------------------------------------------------------------

def test_constant_d_path_holds_the_state_at_n_past_the_grid():
    """Points past N repeat the state at N (documented); the points up to N are the closed-form jump's. The grid ends
    at sigma_min > 0: on a grid ending at 0 the state at N is D, which a path that drops to D past N also gives."""
    solver = make_solver("ddpm")
    sigmas = karras_sigmas(6, 0.05, 10.0)[:-1]
    N, B = sigmas.numel() - 1, 2
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(N, B, 3, generator=g, dtype=torch.float64)
    x, D = torch.randn(B, 3, generator=g, dtype=torch.float64) * 10, torch.randn(B, 3, generator=g, dtype=torch.float64)
    e, b = torch.tensor([N - 3, N - 2]), torch.arange(B)
    path = torch.cat([p for _, p in constant_d_path(solver, sigmas, noise, x, D, e, b, span=6, chunk=2)])  # (6, B, 3)
    for k in range(6):
        j = (e + k + 1).clamp_max(N)
        torch.testing.assert_close(path[k], constant_d_jump(solver, sigmas, noise, x, D, e, j, b, span=6),
                                   rtol=1e-10, atol=1e-10)


# -- the order rules at their boundaries, against diffusers' schedulers ------------------------------------------

try:
    import diffusers
except ImportError:         # the tests above need no diffusers
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")


def _compare(sch, steps):
    from test_diffusers import compare         # tests/ is on sys.path (rootdir-relative test modules)

    return max(compare(sch, steps=steps, methods=(("sequential", None),)).values())


SD_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@needs_diffusers
@pytest.mark.parametrize("steps", [14, 15])
@pytest.mark.parametrize("make", [
    lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, solver_order=3),
    lambda: diffusers.DEISMultistepScheduler(**SD_BETAS, solver_order=2),
    lambda: diffusers.DEISMultistepScheduler(**SD_BETAS, solver_order=3),
], ids=["dpmpp3", "deis2", "deis3"])
def test_lower_order_final_switches_off_at_exactly_15_steps(make, steps):
    """diffusers lowers the last two orders on grids of *fewer than* 15 steps: 14 and 15 steps pin the boundary.
    Near sigma = 0 a third order against a second moves the sample by ~5e-5 only, so the bound is 1e-5 (not
    test_diffusers' 1e-4); paratime is within ~5e-7 of the loop."""
    assert _compare(make(), steps) <= 1e-5


@needs_diffusers
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_without_lower_order_final_reproduces_diffusers(order):
    """lower_order_final=False keeps the full order to the end (a grid ending at sigma_min, where diffusers'
    last step has a finite h)."""
    sch = diffusers.UniPCMultistepScheduler(**SD_BETAS, solver_order=order, lower_order_final=False,
                                            final_sigmas_type="sigma_min")
    assert _compare(sch, 8) <= 1e-4


# -- the Langevin corrector's snr and the sigma-linear guard's threshold -----------------------------------------

def test_langevin_step_has_the_requested_signal_to_noise_ratio():
    """score-SDE's snr is ||e g|| / ||sqrt(2 e) z|| with ||g|| = ||z|| / sigma' (point-mass data, x = sigma' z): the
    corrector's drift and noise terms, read off one step, must stand in that ratio."""
    snr = 0.3
    solver = LangevinCorrected(make_solver("ddim"), snr)
    sigmas = torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64)
    zero = lambda x, i, b: torch.zeros_like(x)                                          # noqa: E731  D = 0
    v = torch.tensor([[0.6, -0.8]], dtype=torch.float64)                                  # unit norm
    i, b = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    # x = sigma_0 v: the DDIM step to sigma' = 2 lands on sigma' v; the corrector then adds drift + noise.
    x = float(sigmas[0]) * v
    landed = solver.base.next_state(x, i, b, zero(x, i, b), None, None, sigmas, zero)
    torch.testing.assert_close(landed, float(sigmas[1]) * v)
    no_noise = solver.next_state(x, i, b, zero(x, i, b), None, (None, torch.zeros(1, 1, 2, dtype=torch.float64)),
                                 sigmas, zero, host_steps=0)
    with_noise = solver.next_state(x, i, b, zero(x, i, b), None, (None, v[:, None]), sigmas, zero, host_steps=0)
    drift, noise = (no_noise - landed).norm(), (with_noise - no_noise).norm()
    assert float(drift / noise) == pytest.approx(snr, rel=1e-9)


@needs_diffusers
def test_karras_spacing_of_a_discrete_schedule_is_diffusers_karras_sigmas():
    """Spacing 'karras' on a DDPM schedule is diffusers' use_karras_sigmas grid (EDM's rho = 7 between the
    training sigmas' ends; diffusers' float32 alphas_cumprod costs it ~4e-5 relative at sigma_min)."""
    sch = diffusers.EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True)
    ours = DiscreteVPSchedule.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
    for steps in (4, 10, 25):
        sch.set_timesteps(steps)
        torch.testing.assert_close(ours.grid(steps, "karras").sigmas, sch.sigmas.double(), rtol=1e-4, atol=0)


def test_sigma_linear_steps_are_refused_just_above_the_ratio_and_taken_just_below():
    for name in ("heun", "plms", "euler_maruyama"):
        solver = make_solver(name)
        solver.check_grid(torch.tensor([SIGMA_LINEAR_RATIO * 0.99, 1.0, 0.0], dtype=torch.float64))
        with pytest.raises(ValueError, match="^solver:"):
            solver.check_grid(torch.tensor([SIGMA_LINEAR_RATIO * 1.01, 1.0, 0.0], dtype=torch.float64))
    make_solver("ddim").check_grid(torch.tensor([1e7, 1.0, 0.0], dtype=torch.float64))   # exponential: any ratio



# -- schedules: spacings and options that only their defaults exercised ------------------------------------------

def test_ve_linspace_grid_is_geometric_between_the_ends():
    """score-SDE's VE grid: sigma_min (sigma_max / sigma_min)^t at t uniform in [0, 1], i.e. geometric."""
    s = VESchedule(0.01, 50.0)
    want = torch.exp(torch.linspace(math.log(50.0), math.log(0.01), 7, dtype=torch.float64))
    torch.testing.assert_close(s.grid(7, "linspace").sigmas, torch.cat([want, want.new_zeros(1)]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("make", [
    lambda: DiscreteVPSchedule.from_betas("linear"),
    lambda: DiscreteVPSchedule.from_betas("squaredcos_cap_v2"),
    lambda: ContinuousVPSchedule("linear"),
    lambda: ContinuousVPSchedule("cosine"),
    lambda: FlowSchedule(),
], ids=["ddpm", "ddpm-cosine", "vp-linear", "vp-cosine", "flow"])
def test_the_prior_is_unit_noise_in_the_models_frame(make):
    """VP and flow sampling start from x_native = eps: prior_std(sigma) * frame_scale(sigma) = 1 at every sigma
    (a VP prior of std sigma is off by sqrt(1 + sigma^2) / sigma, invisible at sigma_max ~ 150)."""
    s = make()
    sig = torch.tensor([0.1, 1.0, 10.0, s.sigma_range[1]], dtype=torch.float64)
    torch.testing.assert_close(s.prior_std(sig) * s.frame_scale(sig), torch.ones_like(sig), rtol=1e-12, atol=0)


def test_continuous_vp_time_scale_conditions_the_network_and_inverts():
    """score-SDE's DDPM++ nets take 999 t: model_time = time_scale t(sigma), and sigma_of_model_time inverts it."""
    plain, scaled = ContinuousVPSchedule(), ContinuousVPSchedule(time_scale=999.0)
    sig = torch.tensor([0.05, 1.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(scaled.model_time(sig), 999.0 * plain.model_time(sig), rtol=1e-12, atol=0)
    torch.testing.assert_close(scaled.sigma_of_model_time(scaled.model_time(sig)), sig, rtol=1e-9, atol=0)


@needs_diffusers
def test_cosine_betas_are_diffusers_squaredcos_cap_v2():
    """Nichol & Dhariwal's cosine betas, capped at 0.999, as diffusers' betas_for_alpha_bar makes them."""
    from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

    torch.testing.assert_close(betas_for("squaredcos_cap_v2", 1000), betas_for_alpha_bar(1000).double(), rtol=1e-6,
                               atol=0)


@needs_diffusers
@pytest.mark.parametrize("rho", [3.0, 7.0])
def test_edm_grid_takes_its_rho_as_diffusers_edm_euler(rho):
    sch = diffusers.EDMEulerScheduler(rho=rho)
    sch.set_timesteps(6)
    torch.testing.assert_close(EDMSchedule(rho=rho).grid(6).sigmas, sch.sigmas.double(), rtol=1e-5, atol=0)


def test_a_final_alpha_equal_to_the_last_steps_is_refused_naming_it():
    """final_alpha_cumprod equal to alpha_bar at the grid's last timestep would be a zero-length last step."""
    ac = DiscreteVPSchedule.from_betas("linear").alphas_cumprod
    with pytest.raises(ValueError, match="^final_alpha_cumprod:"):
        DiscreteVPSchedule(ac, final_alpha_cumprod=float(ac[0])).grid(1000, "trailing")


def test_a_grid_that_repeats_a_sigma_is_refused():
    """Strictly decreasing: a repeated sigma is a zero-length step (the step maps divide by log(s / s') = 0)."""
    sig = torch.tensor([4.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="^sigmas: a time grid must be strictly decreasing"):
        TimeGrid(sig, sig.clone(), torch.ones_like(sig))


# -- denoiser: flow outputs off the flow schedule, guidance's halves, guidance 1 ---------------------------------

@pytest.mark.parametrize("schedule", [DiscreteVPSchedule.from_betas("linear"), VESchedule()], ids=["vp", "ve"])
def test_a_flow_velocity_gives_x0_on_any_schedule(schedule):
    """x_in = a x0 + b eps and v = eps - x0 give x0 = (a x - b v) / (a + b) exactly, also where a + b != 1."""
    x0 = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64)
    eps = torch.tensor([[1.0, 0.4], [-0.7, 2.2]], dtype=torch.float64)
    sigma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    x = x0 + sigma[:, None] * eps                                              # VE frame
    den = Denoiser(lambda x_in, t: eps - x0, schedule, "flow")
    torch.testing.assert_close(den(x, sigma, sigma), x0, rtol=1e-12, atol=1e-12)


def test_guidance_halves_take_a_key_missing_on_one_side_from_the_other():
    """A conditioning key given on one side only is the same on both halves of the doubled batch (documented)."""
    seen = {}

    def net(x_in, t, emb, shift):
        seen["emb"], seen["shift"] = emb.clone(), shift.clone()
        return x_in * 0 + emb[:, None] + shift[:, None]

    den = Denoiser(net, VESchedule(), "x0", guidance=3.0)
    x, sigma = torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    emb, neg, shift = (torch.tensor(v, dtype=torch.float64) for v in ([1.0, 2.0], [0.0, 0.5], [10.0, 20.0]))
    out = den(x, sigma, sigma, uncond={"emb": neg}, emb=emb, shift=shift)          # shift only on the cond side
    torch.testing.assert_close(seen["shift"], torch.cat([shift, shift]))
    torch.testing.assert_close(out, (neg + 3.0 * (emb - neg) + shift)[:, None].expand(2, 2))
    den(x, sigma, sigma, uncond={"emb": neg, "shift": shift}, emb=emb)              # shift only on the uncond side
    torch.testing.assert_close(seen["shift"], torch.cat([shift, shift]))


def test_guidance_one_is_the_conditional_call_alone():
    """Scale 1 is the conditional output: one call on the rows themselves, no unconditional inputs needed."""
    calls = []

    def net(x_in, t):
        calls.append(x_in.shape[0])
        return x_in * 0.5

    den = Denoiser(net, VESchedule(), "x0", guidance=1.0)
    x, sigma = torch.ones(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(den(x, sigma, sigma), 0.5 * x)
    assert calls == [3] and not den.guided


# -- named variants and options that only solver_for's instances exercised ---------------------------------------

@needs_diffusers
def test_euler_ancestral_by_name_is_diffusers_euler_ancestral_step():
    """make_solver("euler_ancestral") takes EulerAncestralDiscreteScheduler.step: x + (down - s) d + up z with the
    scheduler's own noise (a deterministic DDIM step under that name would drop up z)."""
    sch = diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS)
    sch.set_timesteps(6)
    sigmas = sch.sigmas.double()
    solver = make_solver("euler_ancestral")
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 2, 4, 4, generator=g) * float(sigmas[2]), torch.randn(1, 2, 4, 4, generator=g)
    sch._step_index = 2
    want = sch.step(eps, sch.timesteps[2], x, generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(7)).double()
    i, b, xd = torch.tensor([2]), torch.tensor([0]), x.double()
    got = solver.next_state(xd, i, b, xd - sigmas[2] * eps.double(), None, z, sigmas, None)
    assert solver.stochastic
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)


@needs_diffusers
def test_euler_at_final_reproduces_diffusers_on_a_sigma_min_grid():
    """euler_at_final=True: the last step (to sigma_min > 0, 16 steps: no lower_order_final) is first order."""
    sch = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, solver_order=2, euler_at_final=True,
                                                final_sigmas_type="sigma_min")
    assert _compare(sch, 16) <= 1e-5
