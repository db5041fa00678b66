"""The model contract: every parameterisation and schedule gives the exact denoiser of a Gaussian mixture, and the
conversions match their closed forms."""

import math

import numpy as np
import pytest
import torch

from paratime import ContinuousVPSchedule, Denoiser, DiscreteVPSchedule, EDMSchedule, VESchedule
from paratime.denoiser import from_x0, to_x0
from paratime.zoo import GaussianMixture

SCHEDULES = {
    "discrete_vp": DiscreteVPSchedule.from_betas("linear"),
    "scaled_linear": DiscreteVPSchedule.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine_discrete": DiscreteVPSchedule.from_betas("squaredcos_cap_v2"),
    "vp_linear": ContinuousVPSchedule("linear"),
    "vp_cosine": ContinuousVPSchedule("cosine"),
    "ve": VESchedule(0.01, 50.0),
    "edm": EDMSchedule(),
}


def _mixture():
    return GaussianMixture(torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]]), torch.tensor([0.3, 0.5, 0.2]),
                           torch.tensor([0.2, 0.5, 0.3]))


def _input_scale(schedule, sigma):
    """a(sigma), written from the papers: VP alpha_t = 1 / sqrt(1 + sigma^2); VE 1; EDM c_in = 1 / sqrt(sigma^2 +
    sigma_data^2)."""
    if isinstance(schedule, EDMSchedule):
        return 1 / (sigma**2 + schedule.sigma_data**2).sqrt()
    if isinstance(schedule, VESchedule):
        return torch.ones_like(sigma)
    return 1 / (1 + sigma**2).sqrt()


class _ClosedFormNetwork:
    """The exact network of a mixture at the grid points, written from closed forms (no paratime conversion code):
    it looks its sigma up from the model time, undoes the input scaling, takes the exact posterior mean x0 and
    eps = (x - x0) / sigma, and outputs

        eps:   eps
        x0:    x0
        v:     (a eps - b x0) / sqrt(a^2 + b^2),  b = a sigma  (VP: alpha_t eps - sigma_t x0, Salimans & Ho)
        score: grad log p(x_in) = -eps / b                    (VP: -eps / sigma_t; VE: -(x - x0) / sigma^2)
        edm:   F = (x0 - c_skip x) / c_out,  c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2)
    """

    def __init__(self, gmm, schedule, prediction, grid):
        self.gmm, self.schedule, self.prediction = gmm, schedule, prediction
        self.sigmas, self.times = grid.sigmas, grid.model_times.to(torch.float32)

    def __call__(self, x_in, model_time):
        k = (model_time[:, None] - self.times[None]).abs().argmin(1)       # the grid point of each row
        sigma = self.sigmas[k][:, None]
        a = _input_scale(self.schedule, sigma)
        x = x_in / a
        x0 = self.gmm.denoise(x, sigma[:, 0])
        eps = (x - x0) / sigma
        b = a * sigma
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        if self.prediction == "v":
            return (a * eps - b * x0) / (a**2 + b**2).sqrt()
        if self.prediction == "score":
            return -eps / b
        sd = self.schedule.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        return (x0 - c_skip * x) / c_out


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score", "edm"])
def test_every_parameterisation_gives_the_exact_denoiser(sched, prediction):
    """Discrete and continuous VP, VE and EDM, every prediction type: the adapter turns the closed-form network
    back into the mixture's exact posterior mean E[x0 | x] (float64 throughout, so to rounding)."""
    schedule = SCHEDULES[sched]
    if prediction == "edm" and not isinstance(schedule, EDMSchedule):
        with pytest.raises(ValueError, match="prediction"):
            Denoiser(lambda x, t: x, schedule, prediction)
        return
    gmm = _mixture()
    grid = schedule.grid(20)
    den = Denoiser(_ClosedFormNetwork(gmm, schedule, prediction, grid), schedule, prediction)
    sig = grid.sigmas[:-1].repeat_interleave(8)
    times = grid.model_times[:-1].repeat_interleave(8)
    g = torch.Generator().manual_seed(0)
    x = gmm.sample(sig.numel(), g)[0] + sig[:, None] * torch.randn(sig.numel(), 2, generator=g, dtype=torch.float64)
    # x0 = x - sigma eps (and the like) cancels digits in proportion to sigma; hence the error is scaled by 1 + sigma.
    err = (den(x, sig, times) - gmm.denoise(x, sig)).abs() / (1 + sig[:, None])
    assert float(err.max()) < 1e-9


def test_shipped_mixture_network_is_the_closed_form_one():
    """The zoo's mixture networks (used by every sampling test) output what the closed forms above give."""
    gmm = _mixture()
    g = torch.Generator().manual_seed(2)
    for sched in ("discrete_vp", "vp_linear", "ve", "edm"):
        schedule = SCHEDULES[sched]
        grid = schedule.grid(10)
        for prediction in ("eps", "v", "score") + (("edm",) if sched == "edm" else ()):
            ref = _ClosedFormNetwork(gmm, schedule, prediction, grid)
            net = gmm.network(schedule, prediction)
            sig = grid.sigmas[:-1].repeat_interleave(3)
            t = grid.model_times[:-1].repeat_interleave(3).to(torch.float32)
            x_in = _input_scale(schedule, sig)[:, None] * torch.randn(sig.numel(), 2, dtype=torch.float64, generator=g)
            # The shipped network recovers sigma from the float32 time: ~1e-5 off where 1 / sigma amplifies it.
            torch.testing.assert_close(net(x_in, t), ref(x_in, t), rtol=1e-4, atol=1e-4, msg=f"{sched}/{prediction}")


def test_vp_conversions_match_closed_forms():
    """eps <-> x0 <-> v <-> score in the VP frame, as DDPM / diffusers write them."""
    g = torch.Generator().manual_seed(1)
    abar = torch.rand(16, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x0, eps = torch.randn(2, 16, 3, generator=g, dtype=torch.float64)
    a, s = abar.sqrt()[:, None], (1 - abar).sqrt()[:, None]
    x_t = a * x0 + s * eps                              # VP frame
    sigma = (s / a)                                     # VE sigma
    x = x_t / a                                         # VE state
    outs = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s}
    for pred, out in outs.items():
        torch.testing.assert_close(to_x0(pred, out, x, sigma, a), x0)
        torch.testing.assert_close(from_x0(pred, x0, x, sigma, a), out)
    # diffusers' own v -> x0: x0 = sqrt(abar) x_t - sqrt(1 - abar) v
    torch.testing.assert_close(a * x_t - s * outs["v"], x0)


def test_edm_scalings_match_the_paper():
    sched = EDMSchedule(sigma_data=0.5)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)[:, None]
    x0, F = torch.randn(2, 3, 4, dtype=torch.float64)
    x = x0 + sigma * torch.randn(3, 4, dtype=torch.float64)
    c_skip = 0.25 / (sigma**2 + 0.25)
    c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
    torch.testing.assert_close(to_x0("edm", F, x, sigma, sched.input_scale(sigma), sched), c_skip * x + c_out * F)
    torch.testing.assert_close(sched.model_time(sigma), sigma.log() / 4)


def test_plain_callable_is_a_ve_x0_denoiser():
    den = Denoiser.from_callable(lambda x, sigma: x / (1 + sigma[:, None] ** 2))
    x = torch.randn(4, 2, dtype=torch.float64)
    sigma = torch.full((4,), 2.0, dtype=torch.float64)
    torch.testing.assert_close(den(x, sigma, sigma), x / 5)


def test_bad_contract_arguments_name_the_argument():
    with pytest.raises(ValueError, match="prediction"):
        Denoiser(lambda x, t: x, VESchedule(), "noise")
    with pytest.raises(TypeError, match="network"):
        Denoiser(3, VESchedule(), "eps")
    with pytest.raises(TypeError, match="schedule"):
        Denoiser(lambda x, t: x, "vp", "eps")
    with pytest.raises(ValueError, match="clip_x0"):
        Denoiser(lambda x, t: x, VESchedule(), "eps", clip_x0=-1.0)
    den = Denoiser(lambda x, t: x[:, :1], VESchedule(), "eps")
    with pytest.raises(ValueError, match="output shape"):
        den(torch.ones(2, 3), torch.ones(2), torch.ones(2))


def test_gmm_denoiser_is_posterior_mean_by_monte_carlo():
    """E[x0 | x] from the closed form equals a Monte-Carlo posterior mean (independent check of the mixture)."""
    gmm = _mixture()
    g = torch.Generator().manual_seed(3)
    x0, _ = gmm.sample(400_000, g)
    sigma = 0.7
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # Bin a small region around a query point and average x0 there.
    q = torch.tensor([0.8, 0.4], dtype=torch.float64)
    near = ((x - q).norm(dim=1) < 0.2)
    mc = x0[near].mean(0)
    exact = gmm.denoise(q[None], torch.tensor([sigma], dtype=torch.float64))[0]
    se = x0[near].std(0) / math.sqrt(int(near.sum()))
    assert int(near.sum()) > 500
    assert bool(((mc - exact).abs() < 5 * se + 0.03).all()), (mc, exact, se)


def test_gmm_denoiser_is_tweedies_formula():
    """E[x0 | x] = x + sigma^2 grad log p_sigma(x) (Tweedie), with p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I)
    written here from the normal density and differentiated by autograd: the closed form to rounding, at every
    noise level and wherever x lies (the Monte-Carlo check above resolves ~0.1, and one point)."""
    gmm = _mixture()
    g = torch.Generator().manual_seed(4)
    sig = torch.tensor([0.05, 0.3, 0.7, 2.0, 20.0], dtype=torch.float64).repeat_interleave(6)
    x = (gmm.sample(sig.numel(), g)[0] + sig[:, None] * torch.randn(sig.numel(), 2, generator=g,
                                                                     dtype=torch.float64)).requires_grad_()
    var = gmm.stds[None] ** 2 + sig[:, None] ** 2                                        # (M, K)
    normal = torch.distributions.Normal(gmm.means[None], var.sqrt()[..., None])          # (M, K, 2)
    log_p = torch.logsumexp(gmm.weights.log() + normal.log_prob(x[:, None]).sum(-1), dim=1)
    (score,) = torch.autograd.grad(log_p.sum(), x)
    tweedie = (x + sig[:, None] ** 2 * score).detach()
    torch.testing.assert_close(gmm.denoise(x.detach(), sig), tweedie, rtol=1e-9, atol=1e-9)


def test_a_network_returning_a_model_output_without_sample():
    """diffusers' BaseOutput is an ordered dict, not a tuple: one whose field is not ``sample`` is read by its first
    entry, as before the non-tensor check (which refused it)."""
    from dataclasses import dataclass

    pytest.importorskip("diffusers")
    from diffusers.utils import BaseOutput

    from paratime import ParallelSampler

    @dataclass
    class Out(BaseOutput):
        pred: torch.Tensor

    res = ParallelSampler(lambda x, t: Out(pred=0 * x), schedule=VESchedule(), prediction="eps", steps=3,
                          method="sequential", progress=False).sample((2, 3), seed=0)
    assert res.samples.shape == (2, 3) and torch.isfinite(res.samples).all()


# -- clip_x0 after the classifier term, from_callable's schedule, classifier labels, numpy guidance (review, stop 47)

def _classifier_5x(x_in, t):
    return torch.stack([5 * x_in.sum(1), torch.zeros(len(x_in), dtype=x_in.dtype)], 1)


def test_clip_x0_bounds_the_classifier_guided_x0():
    net = lambda x_in, t, **k: torch.full_like(x_in, 0.9)
    D = Denoiser(net, VESchedule(), "x0", clip_x0=1.0, classifier=_classifier_5x, classifier_scale=1.0)
    x, sigma = torch.zeros(2, 3), torch.tensor([1.0, 2.0])
    x0 = D(x, sigma, sigma, y=torch.tensor([0, 0]))
    assert float(x0.abs().max()) <= 1.0
    # clamp(unclipped x0 + s sigma^2 grad): 0.9 + 2.5 sigma^2 above 1 on every element
    assert torch.allclose(x0, torch.ones(2, 3))


def test_clip_x0_with_classifier_and_cfg():
    net = lambda x_in, t, c: torch.full_like(x_in, 0.9) * c[:, None]
    D = Denoiser(net, VESchedule(), "x0", clip_x0=1.0, guidance=2.0, classifier=_classifier_5x, classifier_scale=1.0)
    x, sigma = torch.zeros(2, 3), torch.tensor([0.1, 0.1])
    # guided x0 = 0 + 2 (0.9 - 0) = 1.8, the classifier adds 0.025: clamp(1.825) = 1, not clamp(1.8) + 0.025
    x0 = D(x, sigma, sigma, y=torch.tensor([0, 0]), c=torch.ones(2), uncond={"c": torch.zeros(2)})
    assert torch.allclose(x0, torch.ones(2, 3))
    # below the bound the classifier term is kept whole
    D2 = Denoiser(net, VESchedule(), "x0", clip_x0=5.0, guidance=2.0, classifier=_classifier_5x, classifier_scale=1.0)
    x0 = D2(x, sigma, sigma, y=torch.tensor([0, 0]), c=torch.ones(2), uncond={"c": torch.zeros(2)})
    assert torch.allclose(x0, torch.full((2, 3), 1.825))


@pytest.mark.parametrize("schedule", [EDMSchedule(), DiscreteVPSchedule.from_betas("linear", 1000)])
def test_from_callable_refuses_a_schedule_that_does_not_feed_x_and_sigma(schedule):
    seen = {}

    def fn(x, sigma):
        seen["sigma"] = sigma
        return torch.zeros_like(x)

    try:
        D = Denoiser.from_callable(fn, schedule=schedule)
    except ValueError as e:
        assert str(e).startswith("schedule:")
        return
    sigma = torch.tensor([0.5, 2.0])
    D(torch.zeros(2, 2), sigma, schedule.model_time(sigma))
    assert torch.allclose(seen["sigma"].double(), sigma.double()), f"fn(x, sigma) got sigma={seen['sigma']}"


def test_from_callable_ve_still_gets_x_and_sigma():
    D = Denoiser.from_callable(lambda x, s: x * 0 + s[:, None], schedule=VESchedule(0.002, 80.0))
    sigma = torch.tensor([0.5, 2.0])
    assert torch.allclose(D(torch.ones(2, 2), sigma, sigma), sigma[:, None].expand(2, 2))


def test_classifier_labels_of_the_wrong_length_are_refused_naming_y():
    net = lambda x_in, t: torch.zeros_like(x_in)
    clf = lambda x_in, t: torch.stack([5 * x_in.sum(1), torch.zeros(len(x_in), dtype=x_in.dtype)], 1)
    D = Denoiser(net, VESchedule(), "x0", classifier=clf, classifier_scale=1.0)
    x, sigma = torch.zeros(4, 3), torch.ones(4)
    with pytest.raises(ValueError, match="^y:"):
        D(x, sigma, sigma, y=torch.tensor([0]))       # guided row 0 only, silently


def test_guidance_accepts_a_numpy_float32():
    assert Denoiser(lambda x, t, **k: x, guidance=np.float32(7.5)).guidance == 7.5


@pytest.mark.parametrize("name, sigma, model_time", [
    ("sigma", torch.ones(2), torch.ones(4)), ("model_time", torch.ones(4), torch.ones(3)),
    ("sigma", torch.tensor(1.0), torch.ones(4)), ("sigma", 1.0, torch.ones(4))])
def test_a_direct_call_with_one_noise_level_per_row_or_a_clear_error(name, sigma, model_time):
    """A direct call D(x, sigma, t) with levels not one per row: broadcasting gave a bare torch error (2 of 4 rows) or
    one level silently applied to every row (a 0-d sigma)."""
    D = Denoiser(lambda x_in, t: torch.zeros_like(x_in), VESchedule(), "eps")
    with pytest.raises(ValueError, match=f"^{name}: expected one entry per row of x, shape \\(4,\\)"):
        D(torch.zeros(4, 3), sigma, model_time)
