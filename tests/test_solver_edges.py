"""Solver and schedule edges (review, stop 47): a step to sigma = 0 at first order, solver flags and corrector
options checked by type, the cosine VP grid at any step count."""
import math

import pytest
import torch

from paratime import ParallelSampler
from paratime.schedules import ContinuousVPSchedule, karras_sigmas
from paratime.solvers import DEIS, DPMSolverPP, DPMSolverSinglestep, LangevinCorrected, UniPC, make_solver


# -- a step to sigma = 0 (h = inf) is taken at first order, as DPMSolverPP does ----------------------------------

MU, S0, SMAX = 1.5, 0.5, 40.0


def _run(solver, sigmas, x):
    """The sequential loop on N(MU, S0^2) data with its exact denoiser (VE frame)."""
    def den(xx, ii, bb):
        s = sigmas[ii][:, None]
        return MU + S0**2 / (S0**2 + s**2) * (xx - MU)
    b, hist = torch.arange(x.shape[0]), []
    for n in range(sigmas.numel() - 1):
        i = torch.full((x.shape[0],), n, dtype=torch.long)
        d = den(x, i, b)
        prev = (hist[0] if solver.history_depth == 1 else tuple(hist)) if hist else None
        x_next = solver.next_state(x, i, b, d, prev, None, sigmas, den, host_steps=n)
        hist = [solver.history_value(x, d, i, sigmas)] + hist[:solver.history_depth - 1]
        x = x_next
    return x


@pytest.mark.parametrize("solver", [UniPC(order=2, lower_order_final=False), UniPC(order=3, lower_order_final=False),
                                    DPMSolverSinglestep(order=2, final_first_order=False),
                                    DPMSolverSinglestep(order=3, final_first_order=False, lower_order_final=True)],
                         ids=["unipc2", "unipc3", "singlestep2", "singlestep3"])
def test_step_to_zero_sigma_is_finite_and_accurate(solver):
    sigmas = karras_sigmas(20, 0.01, SMAX)
    x_T = torch.tensor([[-30.0], [10.0], [40.0]], dtype=torch.float64)
    exact = MU + (x_T - MU) * S0 / math.sqrt(S0**2 + SMAX**2)       # the probability-flow ODE's end point
    x = _run(solver, sigmas, x_T)
    assert torch.isfinite(x).all()
    assert float((x - exact).abs().max()) < 5e-2


def test_unipc_without_lower_order_final_samples_gmm():
    sampler = ParallelSampler("gmm", solver=UniPC(order=2, lower_order_final=False), steps=20, method="sequential")
    assert torch.isfinite(sampler.sample(4, seed=0).samples).all()


# -- solver flags are True or False, eta is no bool, the corrector's options are named ----------------------------

@pytest.mark.parametrize("make, name", [
    (lambda: DPMSolverPP(lower_order_final="False"), "lower_order_final"),
    (lambda: DPMSolverPP(euler_at_final="no"), "euler_at_final"),
    (lambda: make_solver("dpmpp_3m", lower_order_final=0), "lower_order_final"),
    (lambda: DEIS(lower_order_final="False"), "lower_order_final"),
    (lambda: UniPC(lower_order_final="False"), "lower_order_final"),
    (lambda: DPMSolverSinglestep(lower_order_final="False"), "lower_order_final"),
    (lambda: DPMSolverSinglestep(final_first_order="False"), "final_first_order"),
])
def test_flags_must_be_bool(make, name):
    with pytest.raises(TypeError, match=f"^{name}:"):
        make()


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "euler_maruyama"])
def test_eta_refuses_bool(solver):
    with pytest.raises(ValueError, match="^eta:"):
        make_solver(solver, eta=True)


@pytest.mark.parametrize("kw, name", [({"snr": float("inf")}, "corrector_snr"), ({"snr": "0.1"}, "corrector_snr"),
                                      ({"snr": 0.1, "corrector_steps": True}, "corrector_steps")])
def test_corrector_options_named(kw, name):
    with pytest.raises((TypeError, ValueError), match=f"^{name}:"):
        LangevinCorrected(make_solver("ddim"), **kw)


def test_valid_flags_still_build():
    DPMSolverPP(order=3, lower_order_final=False, euler_at_final=True)
    DPMSolverSinglestep(lower_order_final=True, final_first_order=False)
    LangevinCorrected(make_solver("ddim"), 0.16, 2)


# -- the cosine continuous VP grid at any step count -----------------------------------------------------------

@pytest.mark.parametrize("steps", [16_000, 100_000])
def test_cosine_linspace_grid_any_steps(steps):
    s = ContinuousVPSchedule(schedule="cosine")
    g = s.grid(steps, "linspace")
    assert g.steps == steps
    assert float(g.sigmas[0]) == pytest.approx(s.sigma_range[1])
    assert float(g.sigmas[-2]) == pytest.approx(s.sigma_range[0])
    # model times still invert the sigmas
    torch.testing.assert_close(s.sigma_of_model_time(g.model_times[:-1]), g.sigmas[:-1], rtol=1e-9, atol=0)


def test_cosine_linspace_grid_small_unchanged_in_sigma_range():
    g = ContinuousVPSchedule(schedule="cosine").grid(50, "linspace")
    assert float(g.sigmas[0]) == pytest.approx(1e4, rel=1e-6) and float(g.sigmas[-1]) == 0.0
