"""Log-likelihood through the probability-flow ODE: analytic answers, method equivalences, Hutchinson's estimator.

Reference densities are closed forms under the forward process: data ``N(mu, s^2 I)`` (or a mixture of such) smoothed
by noise of std ``sigma`` is ``N(mu, (s^2 + sigma^2) I)`` (or the mixture of those). ``delta + log p_{sigma_max}(x_T)``
isolates the discretisation error (the prior ``N(0, prior_std^2 I)`` differs from ``p_{sigma_max}`` by the documented
prior mismatch, which no step count removes).
"""

import math

import pytest
import torch

from paratime import ParallelSampler
from paratime.denoiser import Denoiser
from paratime.likelihood_cli import mixture_log_density
from paratime.methods.likelihood import bits_per_dim
from paratime.schedules import VESchedule
from paratime.zoo import GaussianMixture


def gaussian_model(dim: int) -> tuple[GaussianMixture, Denoiser]:
    """``N(mu, 0.5^2 I)`` with the exact eps network under a VE schedule (sigma 0.01 .. 50)."""
    gmm = GaussianMixture(torch.linspace(-1.0, 1.5, dim)[None], 0.5)
    schedule = VESchedule(0.01, 50.0)
    return gmm, Denoiser(gmm.network(schedule, "eps"), schedule, "eps", dtype=torch.float64, sample_shape=(dim,))


def discretisation_error(sampler, gmm, x, steps, solver):
    r = sampler.log_likelihood(x, solver=solver, steps=steps, method="sequential")
    exact_prior = r.delta + mixture_log_density(gmm, r.latents, r.sigma_max)
    return float((exact_prior - mixture_log_density(gmm, x, r.sigma_min)).abs().max()), r


# Errors (nats, max over the batch) of the discretised ODE at the step counts used below, as measured: Gaussian (VE,
# 2-D) euler 20 / 40 steps 2.0 / 0.94, heun 0.24 / 0.06; gmm (VP, karras) euler 25 / 50 0.53 / 0.28, heun 0.11 /
# 0.030. The tests check that the ratio of errors is the solver's 2^order (within 25%).
ORDER = {"euler": 1, "heun": 2}


@pytest.mark.parametrize("dim,solver", [(1, "euler"), (1, "heun"), (2, "euler"), (2, "heun")])
def test_gaussian_log_likelihood_converges_to_closed_form_at_solver_order(dim, solver):
    gmm, den = gaussian_model(dim)
    x, _ = gmm.sample(8, torch.Generator().manual_seed(0))
    sampler = ParallelSampler(den, progress=False)
    e1, _ = discretisation_error(sampler, gmm, x, 20, solver)
    e2, r2 = discretisation_error(sampler, gmm, x, 40, solver)
    assert e1 / e2 == pytest.approx(2 ** ORDER[solver], rel=0.25)
    # The full answer (model prior) is within the discretisation error plus the prior mismatch.
    analytic = mixture_log_density(gmm, x, r2.sigma_min)
    mismatch = (r2.prior - mixture_log_density(gmm, r2.latents, r2.sigma_max)).abs()
    assert bool(((r2.nats - analytic).abs() <= e2 + mismatch + 1e-9).all())
    # The prior mismatch (no step count removes it), bounded from log N(x; 0, a^2) - log N(x; mu, a^2 + s^2):
    # <= n s^2 / (2 a^2) + |x|^2 s^2 / (2 a^4) + (|mu|^2 + 2 |x . mu|) / (2 a^2), a = sigma_max (VE prior std).
    a2, s2, mu, xT = r2.sigma_max**2, 0.25, gmm.means[0], r2.latents
    bound = dim * s2 / (2 * a2) + xT.pow(2).sum(1) * s2 / (2 * a2**2) + (mu @ mu + 2 * (xT @ mu).abs()) / (2 * a2)
    assert bool((mismatch <= bound).all())


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_gmm_log_likelihood_converges_to_analytic_density_at_solver_order(gmm, solver):
    mix, steps = gmm.network.gmm, 25
    x, _ = mix.sample(8, torch.Generator().manual_seed(0))
    sampler = ParallelSampler(gmm, spacing="karras", progress=False)
    e1, _ = discretisation_error(sampler, mix, x, steps, solver)
    e2, r = discretisation_error(sampler, mix, x, 2 * steps, solver)
    assert e1 / e2 == pytest.approx(2 ** ORDER[solver], rel=0.25)
    analytic = mixture_log_density(mix, x, r.sigma_min)
    assert float((r.nats - analytic).abs().max()) <= e2 + 1e-3           # prior mismatch < 1e-3 nats for gmm
    assert r.stats.rounds == 2 * steps * ORDER[solver] and r.stats.nfe == r.stats.rounds


@pytest.mark.parametrize("method,solver", [("picard", "heun"), ("picard", "euler"), ("parareal", "heun"),
                                           ("parareal_pipelined", "euler")])
def test_parallel_methods_at_tol_zero_equal_sequential(gmm, method, solver):
    x, _ = gmm.network.gmm.sample(4, torch.Generator().manual_seed(1))
    sampler = ParallelSampler(gmm, steps=24, tol=0.0, window=8, spacing="karras", progress=False)
    seq = sampler.log_likelihood(x, solver=solver, method="sequential")
    par = sampler.log_likelihood(x, solver=solver, method=method)
    torch.testing.assert_close(par.nats, seq.nats, rtol=0, atol=1e-9)
    torch.testing.assert_close(par.latents, seq.latents, rtol=0, atol=1e-9)
    assert par.stats.method == method and par.stats.rounds <= 2 * seq.stats.rounds


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_picard_at_default_tol_is_within_bound_in_far_fewer_rounds(gmm, solver):
    """Documented bound: at tol 0.1 Picard's log-likelihood is within 5e-3 nats of the sequential one (measured:
    6e-4) in at most a tenth of the sequential rounds (measured: 6 of 100 steps)."""
    x, _ = gmm.network.gmm.sample(4, torch.Generator().manual_seed(0))
    sampler = ParallelSampler(gmm, steps=100, tol=0.1, spacing="karras", progress=False)
    seq = sampler.log_likelihood(x, solver=solver, method="sequential")
    pic = sampler.log_likelihood(x, solver=solver, method="picard")
    assert float((pic.nats - seq.nats).abs().max()) <= 5e-3
    assert pic.stats.iterations <= seq.stats.iterations // 10
    assert pic.stats.rounds <= seq.stats.rounds // 10


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_its_standard_error(gmm, probe):
    """One data point repeated: each copy gets its own probes (seed, sample), so the copies' integrated divergences
    are independent estimates of the exact one on the same path."""
    x = gmm.network.gmm.sample(1, torch.Generator().manual_seed(3))[0].repeat(128, 1)
    sampler = ParallelSampler(gmm, steps=12, spacing="karras", progress=False)
    exact = sampler.log_likelihood(x[:1], method="sequential")
    est = sampler.log_likelihood(x, method="sequential", divergence="hutchinson", probe=probe, seed=5)
    se = float(est.delta.std()) / math.sqrt(est.delta.numel())
    assert se > 1e-3                                                        # the estimator is random...
    assert abs(float(est.delta.mean() - exact.delta[0])) <= 4 * se           # ...and unbiased
    torch.testing.assert_close(est.latents, exact.latents.expand_as(est.latents), rtol=0, atol=1e-12)
    # More probes: the same mean, a smaller spread.
    more = sampler.log_likelihood(x[:32], method="sequential", divergence="hutchinson", probe=probe, probes=16)
    assert float(more.delta.std()) < 0.5 * float(est.delta.std())


def test_hutchinson_probes_depend_on_seed_and_sample_only(gmm):
    x, _ = gmm.network.gmm.sample(6, torch.Generator().manual_seed(2))
    sampler = ParallelSampler(gmm, steps=10, tol=0.0, progress=False)
    whole = sampler.log_likelihood(x, method="picard", divergence="hutchinson", seed=7)
    head = sampler.log_likelihood(x[:2], method="sequential", divergence="hutchinson", seed=7)
    tail = sampler.log_likelihood(x[2:], method="sequential", divergence="hutchinson", seed=7, first_sample=2)
    torch.testing.assert_close(torch.cat([head.nats, tail.nats]), whole.nats, rtol=0, atol=1e-9)
    other = sampler.log_likelihood(x, method="sequential", divergence="hutchinson", seed=8)
    assert not torch.allclose(other.nats, whole.nats)


def test_bits_per_dim_uses_the_declared_quantisation_bin():
    """8-bit data in [-1, 1]: the bin is 2/255, so bits/dim adds log(127.5) nats per dimension."""
    gmm, den = gaussian_model(2)
    x = torch.tensor([[-0.5, 0.25], [0.0, 1.0]], dtype=torch.float64)
    sampler = ParallelSampler(den, steps=20, progress=False)
    plain = sampler.log_likelihood(x, method="sequential")
    quantised = sampler.log_likelihood(x, method="sequential", data_range=(-1.0, 1.0), levels=256)
    torch.testing.assert_close(plain.bits_per_dim, -plain.nats / (2 * math.log(2)))
    torch.testing.assert_close(quantised.bits_per_dim, plain.bits_per_dim + math.log(127.5) / math.log(2))
    torch.testing.assert_close(bits_per_dim(plain.nats, 2, 2 / 255), quantised.bits_per_dim)
    deq = sampler.log_likelihood(x, method="sequential", data_range=(-1.0, 1.0), levels=256, dequantize=True)
    # Dequantised: the likelihood of x plus U(-bin/2, bin/2), that noise made from the (seed 0, sample) normal draws
    # of its stream through the normal CDF; the data moved, by less than half a bin.
    from paratime.noise import DEQUANT, draw_noise

    u = (2 / 255) * (torch.special.ndtr(draw_noise(0, 2, (2,), None, DEQUANT)) - 0.5)
    assert 0 < float(u.abs().min()) and float(u.abs().max()) <= 1 / 255
    moved = sampler.log_likelihood(x + u, method="sequential")
    torch.testing.assert_close(deq.nats, moved.nats, rtol=0, atol=1e-12)
    torch.testing.assert_close(deq.latents, moved.latents, rtol=0, atol=1e-12)


def test_digits_real_images_are_likelier_than_noise():
    """The trained digits model: real digits cost fewer bits/dim than uniform noise on the same 17 levels."""
    pytest.importorskip("sklearn")
    from paratime.zoo.digits import load_digits_data

    real = load_digits_data()[0][:2].double()
    noise = (torch.randint(0, 17, real.shape, generator=torch.Generator().manual_seed(0)) / 8.0 - 1).double()
    sampler = ParallelSampler("digits", steps=8, spacing="karras", progress=False)
    r = sampler.log_likelihood(torch.cat([real, noise]), method="sequential", data_range=(-1.0, 1.0), levels=17,
                               divergence="hutchinson")
    assert float(r.bits_per_dim[:2].max()) < float(r.bits_per_dim[2:].min())


def test_float32_state_differentiates_past_the_fused_kernel(gmm):
    """In float32 the denoiser's x0 conversion runs the fused Triton kernel (interpreted on CPU), which has no
    backward: rows that autograd differentiates take the torch reference, so the divergence still flows."""
    x, _ = gmm.network.gmm.sample(4, torch.Generator().manual_seed(0))
    r64 = ParallelSampler(gmm, steps=10, progress=False).log_likelihood(x, method="sequential")
    r32 = ParallelSampler(gmm, steps=10, state_dtype=torch.float32, progress=False).log_likelihood(
        x.float(), method="sequential")
    torch.testing.assert_close(r32.nats.double(), r64.nats, rtol=0, atol=1e-3)


@pytest.mark.parametrize("x,kw,match", [
    (torch.zeros(4, 3, dtype=torch.float64), {}, r"x: the model expects samples of shape \(2,\)"),
    (torch.zeros(4, dtype=torch.float64), {}, r"x: expected \(B, \*sample_shape\)"),
    (torch.tensor([[0.0, float("nan")]], dtype=torch.float64), {}, "x: contains NaN or inf"),
    (torch.tensor([[0.0, 1.5]], dtype=torch.float64), {"data_range": (-1.0, 1.0)}, r"x: .*outside the data range"),
    (torch.zeros(2, 2, dtype=torch.float64), {"data_range": (1.0, -1.0)}, "data_range"),
    (torch.zeros(2, 2, dtype=torch.float64), {"levels": 1}, "levels"),
    (torch.zeros(2, 2, dtype=torch.float64), {"divergence": "trace"}, "divergence: unknown 'trace'"),
    (torch.zeros(2, 2, dtype=torch.float64), {"solver": "ddpm"}, "solver: the likelihood ODE takes euler, heun"),
    (torch.zeros(2, 2, dtype=torch.float64), {"probes": 0}, "probes"),
    (torch.zeros(2, 2, dtype=torch.float64), {"probe": "sphere"}, "probe: unknown 'sphere'"),
    (torch.zeros(2, 2, dtype=torch.float64), {"method": "euler"}, "method: unknown 'euler'"),
    (torch.zeros(2, 2, dtype=torch.float64), {"steps": 0}, "steps"),
    (torch.zeros(2, 2, dtype=torch.float64), {"dequantize": True}, "dequantize: needs data_range"),
    (torch.zeros(2, 2, dtype=torch.float64), {"divergence_probes": torch.zeros(2, 1, 2)}, "divergence_probes"),
])
def test_bad_input_raises_naming_the_argument(gmm, x, kw, match):
    sampler = ParallelSampler(gmm, steps=4, progress=False)
    with pytest.raises(ValueError, match=match):
        sampler.log_likelihood(x, **kw)


def test_non_tensor_data_and_a_clipping_model_range():
    gmm, den = gaussian_model(2)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        ParallelSampler(den, steps=4, progress=False).log_likelihood([[0.0, 0.0]])
    clipped = ParallelSampler(den, steps=4, clip_x0=1.0, progress=False)      # the model declares [-1, 1]
    with pytest.raises(ValueError, match=r"outside the data range \[-1.0, 1.0\]"):
        clipped.log_likelihood(torch.tensor([[0.0, 2.0]], dtype=torch.float64))


def test_cli_likelihood_reports_rounds_and_the_analytic_density(capsys, tmp_path):
    from paratime.cli import main

    out = tmp_path / "lik.json"
    assert main(["likelihood", "--model", "gmm", "--samples", "4", "--steps", "10", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "picard" in text and "analytic log p" in text and out.exists()
    # The record against the API (the command's defaults: euler, karras, one Rademacher probe, seed 0) and the
    # closed-form density of the same draws (the gmm's, seed 0) at the grid's sigma_min.
    import json

    rec = json.loads(out.read_text())
    mix = ParallelSampler("gmm", progress=False).denoiser.network.gmm
    x = mix.sample(4, torch.Generator().manual_seed(0))[0]
    seq = ParallelSampler("gmm", spacing="karras", progress=False).log_likelihood(
        x, solver="euler", steps=10, method="sequential", divergence="hutchinson", seed=0)
    exact = mixture_log_density(mix, x, seq.sigma_min)
    rows = rec["sets"]["gmm"]
    assert [r["method"] for r in rows] == ["sequential", "picard"] and rows[0]["rounds"] == seq.stats.rounds == 10
    assert rows[0]["nats"] == pytest.approx(float(seq.nats.mean()), rel=1e-12)
    assert rec["analytic_nats"] == pytest.approx(float(exact.mean()), rel=1e-12)
    assert rec["max_abs_nats_error"] == pytest.approx(float((seq.nats - exact).abs().max()), rel=1e-9)
    assert main(["likelihood", "--sets", "real,blurred", "--samples", "2"]) == 2
    assert "--sets: unknown 'blurred'" in capsys.readouterr().err


def test_torch_distributed_backend_gives_the_local_answer(gmm):
    """The torch backend gathers raw network outputs and converts them after: for the augmented model the raw output
    is D~ itself (one gloo rank in this process); the backend is bound to the model again afterwards."""
    import socket

    from paratime.backends.torch_dist import TorchDistributedBackend, release_default_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x, _ = gmm.network.gmm.sample(4, torch.Generator().manual_seed(0))
    local = ParallelSampler(gmm, steps=12, progress=False)
    ref = local.log_likelihood(x, method="picard", divergence="hutchinson")
    backend = TorchDistributedBackend(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                      dist_backend="gloo")
    with ParallelSampler(gmm, steps=12, backend=backend, progress=False) as dist_sampler:
        got = dist_sampler.log_likelihood(x, method="picard", divergence="hutchinson")
        assert dist_sampler.backend.denoiser is dist_sampler.denoiser
        torch.testing.assert_close(dist_sampler.sample(4).samples, local.sample(4).samples, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.nats, ref.nats, rtol=0, atol=1e-9)
    assert got.stats.backend == "torch"
    assert release_default_group()          # closed: the group it made goes, and this process is as it was


# -- issue 23: the sampler's solver, any valid steps, the memory bound, convergence on every spacing --------------

def _ring_error(sampler, mix, x, steps):
    """Mean |discretisation error| (nats) against the closed-form ring density, and the result."""
    r = sampler.log_likelihood(x, steps=steps, method="sequential")
    disc = r.delta + mixture_log_density(mix, r.latents, r.sigma_max) - mixture_log_density(mix, x, r.sigma_min)
    return float(disc.abs().mean()), r


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading", "karras"])
@pytest.mark.parametrize("solver,ladder", [("heun", (25, 50, 100, 200)), ("ddim", (25, 50, 100))])
def test_error_shrinks_at_the_solver_order_on_every_spacing(gmm, spacing, solver, ladder):
    """Each doubling of the steps divides the error by at least 0.75 * 2^order (Heun 2, DDIM = Euler 1), the
    sampler's own solver integrating. Measured (mean over 16 points, Heun): trailing 0.19 / 0.056 / 0.015 / 0.0040 /
    0.0011 nats at 25 / 50 / 100 / 200 / 400 steps; before the trailing grid's extra timestep was fixed, 200 steps
    gave +0.13 (every evaluation one grid point off). Leading spacing beats the order: its sigma_max moves with the
    steps. The ladder to 400 on every spacing: ``benchmarks/likelihood.py --convergence`` (about a minute)."""
    mix = gmm.network.gmm
    x, _ = mix.sample(8, torch.Generator().manual_seed(0))
    order = ORDER["heun" if solver == "heun" else "euler"]
    errors = []
    for steps in ladder:
        sampler = ParallelSampler(gmm, solver=solver, spacing=spacing, progress=False)
        e, r = _ring_error(sampler, mix, x, steps)
        assert r.stats.solver == ("heun" if solver == "heun" else "euler") and r.stats.steps == steps
        assert r.stats.rounds == steps * order                     # exactly the steps asked for, on every spacing
        errors.append(e)
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert min(ratios) >= 0.75 * 2 ** order, (errors, ratios)


def test_the_default_solver_is_the_samplers(gmm):
    x, _ = gmm.network.gmm.sample(3, torch.Generator().manual_seed(0))
    heun = ParallelSampler(gmm, solver="heun", steps=12, method="sequential", progress=False)
    default, given = heun.log_likelihood(x), heun.log_likelihood(x, solver="heun")
    torch.testing.assert_close(default.nats, given.nats, rtol=0, atol=0)
    assert default.stats.solver == "heun" and default.stats.rounds == 2 * 12
    assert float((heun.log_likelihood(x, solver="euler").nats - default.nats).abs().max()) > 1e-3
    ddim = ParallelSampler(gmm, solver="ddim", steps=12, method="sequential", progress=False)
    torch.testing.assert_close(ddim.log_likelihood(x).nats, heun.log_likelihood(x, solver="euler").nats,
                               rtol=0, atol=0)
    for solver, kw in (("ddpm", {}), ("dpmpp_2m", {}), ("ddim", {"eta": 1.0}), ("heun", {"corrector_snr": 0.1})):
        sampler = ParallelSampler(gmm, solver=solver, steps=4, progress=False, **kw)
        with pytest.raises(ValueError, match=r"solver: the sampler's solver .* pass solver= one of euler, heun"):
            sampler.log_likelihood(x)
        assert sampler.log_likelihood(x, solver="euler").stats.solver == "euler"   # an explicit ODE solver works


def test_every_step_count_of_the_discrete_schedule(gmm):
    """1 to T - 1 steps on the 1000-step schedule: steps intervals between steps + 1 of its trained levels (the
    sampler's T-th step is the one to sigma = 0, where the drift is singular); T names the limit in the user's
    terms, not the internal steps + 1 ("got 1001" before)."""
    from paratime.methods.likelihood import likelihood_grid

    x, _ = gmm.network.gmm.sample(1, torch.Generator().manual_seed(0))
    sampler = ParallelSampler(gmm, steps=1000, method="sequential", progress=False)   # a valid sampling request
    for spacing in ("trailing", "linspace", "leading"):
        grid = likelihood_grid(gmm.schedule, 999, spacing)
        assert grid.steps == 999 and bool((grid.sigmas[1:] < grid.sigmas[:-1]).all())
        assert float(grid.sigmas[-1]) == pytest.approx(float(gmm.schedule.train_sigmas[0]))   # all T levels
    r = sampler.log_likelihood(x, steps=1)
    assert r.stats.steps == 1 and r.stats.rounds == 1 and bool(torch.isfinite(r.nats).all())
    with pytest.raises(ValueError, match=r"steps: .* at most 999 steps, got 1000"):
        sampler.log_likelihood(x)
    with pytest.raises(ValueError, match="steps: must be an integer >= 1"):
        sampler.log_likelihood(x, steps=0)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="steps: expected an integer"):
            sampler.log_likelihood(x, steps=bad)


def test_a_batch_too_large_is_refused_before_allocation():
    """The memory bound of sample() over the augmented (B, n + 1) rows: terabytes are refused naming the batch of x,
    before the trajectory exists (the raw allocator error came first before). Picard (the default method) keeps the
    trajectory: 100,001 states of 16 MB; sequential keeps a few states, and this request would fit it."""
    from paratime.backends import DeviceMemoryError

    den = Denoiser.from_callable(lambda x, sigma: 0 * x)
    sampler = ParallelSampler(den, steps=100_000, progress=False)
    with pytest.raises(DeviceMemoryError, match=r"x: a batch of 2 samples .* GiB"):
        sampler.log_likelihood(torch.zeros(2, 1_000_000, dtype=torch.float64))


@pytest.mark.parametrize("kw,match,exc", [
    ({"data_range": (-math.inf, math.inf)}, r"data_range: expected finite \(lo, hi\)", ValueError),
    ({"data_range": (-1.0, math.nan)}, "data_range: expected finite", ValueError),
    ({"data_range": (False, True)}, "data_range", ValueError),
    ({"levels": 17}, "levels: applies only with data_range", ValueError),
    ({"data_range": (-9.0, 9.0), "levels": 2.5}, "levels: must be an integer >= 2", ValueError),
    ({"probes": 4}, "probes: applies only to divergence='hutchinson'", ValueError),
    ({"probe": "gaussian"}, "probe: applies only to divergence='hutchinson'", ValueError),
    ({"divergence": "hutchinson", "probe": "sphere"}, "probe: unknown 'sphere'", ValueError),
    ({"dequantize": 1}, "dequantize: expected True or False", TypeError),
    ({"solver": "ddpm"}, "solver: the likelihood ODE takes euler, heun", ValueError),
    ({"solver": "nope"}, "solver: the likelihood ODE takes euler, heun, got 'nope'", ValueError),
    ({"seed": -1, "divergence": "hutchinson"}, r"seed: must be an integer in \[0", ValueError),
    ({"seed": 0}, "seed: draws Hutchinson's probes and the dequantisation noise only", ValueError),
    ({"seed": 3, "data_range": (-9.0, 9.0)}, "seed: .* not divergence='exact' without dequantize", ValueError),
])
def test_more_bad_inputs_are_named(gmm, kw, match, exc):
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        ParallelSampler(gmm, steps=4, progress=False).log_likelihood(x, **kw)


def test_seed_draws_the_dequantisation_noise(gmm):
    """With ``dequantize=True`` the seed is used (it was accepted, and ignored, with neither probes nor
    dequantisation before): two seeds give different likelihoods, the same seed the same one."""
    x = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    sampler = ParallelSampler(gmm, steps=4, method="sequential", progress=False)
    kw = dict(data_range=(-9.0, 9.0), dequantize=True)
    a, b = (sampler.log_likelihood(x, seed=s, **kw).nats for s in (1, 2))
    assert not torch.equal(a, b)
    assert torch.equal(a, sampler.log_likelihood(x, seed=1, **kw).nats)
    assert torch.equal(sampler.log_likelihood(x, seed=0, **kw).nats, sampler.log_likelihood(x, **kw).nats)


def test_picard_tol_is_absolute_on_the_flow_whatever_the_samplers_units(gmm):
    """The likelihood's final rule bounds the flow's end state (x_T, the log-density over sqrt(n)) in absolute
    units, and the stats say so; a sampler's ``data_scale`` (sample()'s units) is not applied to it silently."""
    x = torch.randn(3, 2, dtype=torch.float64)
    plain = ParallelSampler("gmm", steps=10, tol=0.1, progress=False).log_likelihood(x, solver="euler")
    scaled = ParallelSampler("gmm", steps=10, tol=0.1, tol_units="data", data_scale=2.0,
                             progress=False).log_likelihood(x, solver="euler")
    for st in (plain.stats, scaled.stats):
        assert st.tol_units == "absolute" and st.tol_abs == [0.1] * 3
    assert torch.equal(plain.nats, scaled.nats)


def test_likelihood_command_reports_units_and_more_rounds_honestly(capsys):
    from paratime.cli import main

    assert main(["likelihood", "--model", "gmm", "--steps", "20", "--method", "parareal", "--samples", "8",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tol=0.1 (noise level)" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("rounds: parareal") and "more" in last, last     # 28 vs 20 read "0.7x fewer" before


def test_the_divergence_differentiates_through_the_classifier_gradient():
    """Classifier guidance adds ``scale sigma^2 grad log p(y|x)`` to D, so tr dD/dx holds the classifier's Hessian:
    the gradient was taken on a detached copy, and the trace (hence the log-density) missed it (up to 3.5 nats on
    this mixture). Checked against central differences of the guided Denoiser itself."""
    from paratime.methods.likelihood import flow_denoiser

    sch = VESchedule(0.01, 50.0)
    gmm = GaussianMixture(torch.zeros(1, 2), 1.0)
    net = gmm.network(sch, "eps")
    W = torch.tensor([[3.0, 0.0], [-3.0, 1.0]], dtype=torch.float64)
    den = Denoiser(lambda x_in, t: net(x_in, t), sch, "eps", dtype=torch.float64, sample_shape=(2,),
                   classifier=lambda x_in, t: torch.tanh(x_in.double()) @ W.T, classifier_scale=2.0)
    x, y = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64), torch.tensor([0, 1])
    flow = flow_denoiser(den, (2,), "exact")
    for level in (0.05, 1.0, 10.0):
        s = torch.full((2,), level, dtype=torch.float64)
        t = sch.model_time(s)
        h, fd = 1e-3, torch.zeros(2, dtype=torch.float64)
        for j in range(2):
            e = torch.zeros_like(x)
            e[:, j] = h
            fd += (den(x + e, s, t, y=y)[:, j] - den(x - e, s, t, y=y)[:, j]) / (2 * h)
        out = flow(torch.cat([x, torch.zeros(2, 1, dtype=torch.float64)], 1), s, t, y=y)   # w = 0: D~_w = -s dw/ds
        trace = 2 + out[:, 2] * math.sqrt(2) * sch.frame_scale(s)
        torch.testing.assert_close(trace, fd, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_a_rectified_flow_converges_to_the_closed_form_at_solver_order(shift):
    """Rectified flow (t_max = 1 - 1e-7: the grid's last interval reaches sigma ~1e7). The divergence integrated in
    the model's frame stays bounded there; integrated in the VE frame it was 12-16 bits/dim off at any step count.
    Measured (2-D Gaussian, max over 8 points, nats): euler 20 / 40 steps 0.069 / 0.036 (shift 1), 0.13 / 0.080
    (shift 3); heun 0.012 / 0.0037, 0.019 / 0.0054."""
    from paratime.schedules import FlowSchedule

    gmm = GaussianMixture(torch.linspace(-1.0, 1.5, 2)[None], 0.5)
    schedule = FlowSchedule(shift=shift)
    den = Denoiser(gmm.network(schedule, "flow"), schedule, "flow", dtype=torch.float64, sample_shape=(2,))
    x, _ = gmm.sample(8, torch.Generator().manual_seed(0))
    sampler = ParallelSampler(den, progress=False)
    for solver, order in ORDER.items():
        e1, _ = discretisation_error(sampler, gmm, x, 20, solver)
        e2, r = discretisation_error(sampler, gmm, x, 40, solver)
        assert e2 < 0.1 and e1 / e2 >= 0.75 * 2 ** order
        # prior N(0, (1 + sigma_max)^2): off p_sigma_max by the data's own scale over 1e7, so the answer is the
        # discretisation error
        analytic = mixture_log_density(gmm, x, r.sigma_min)
        assert float((r.nats - analytic).abs().max()) <= e2 + 1e-5
    # Picard and Parareal at tol 0 solve the same augmented ODE
    ref = sampler.log_likelihood(x, solver="euler", steps=40, method="sequential")
    for method in ("picard", "parareal"):
        out = ParallelSampler(den, method=method, tol=0, progress=False).log_likelihood(x, solver="euler", steps=40)
        torch.testing.assert_close(out.nats, ref.nats, rtol=0, atol=1e-10)
        assert out.stats.method == method and (method != "picard" or out.stats.rounds < 40)


def test_the_grid_of_a_schedule_ending_above_zero_has_its_own_points_and_the_tolerance_its_ddpm_scale():
    """A grid that ends above sigma 0 (diffusers' final_sigmas_type='sigma_min') is the steps-step grid itself (steps
    intervals between steps + 1 positive levels); the flow problem's tolerance scale at point j is the noise std of
    the DDPM step between the grid's points N - j and N - j + 1, as documented (mutation testing, stop 47)."""
    diffusers = pytest.importorskip("diffusers")

    from paratime.integrations.diffusers import from_diffusers
    from paratime.methods.likelihood import flow_problem, likelihood_grid

    sch = from_diffusers(lambda x, t: x, diffusers.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")).schedule
    grid = likelihood_grid(sch, 5)
    assert grid.sigmas.numel() == 6 and float(grid.sigmas[-1]) > 0
    torch.testing.assert_close(grid.sigmas, sch.grid(5).sigmas)
    problem = flow_problem(grid, "euler", lambda x, j, b: x, torch.float64, "cpu")
    torch.testing.assert_close(problem.noise_levels, grid.ancestral_std().flip(0).to(torch.float64))
