"""Sequential and Picard sampling: exact answers, parallel == sequential, layout independence, bad input."""

import dataclasses
import math

import pytest
import torch

from paratime import NonFiniteOutputError, ParallelSampler
from paratime.noise import INITIAL, STEP, draw_noise
from paratime.zoo import ring_gmm

SOLVERS = ["ddim", "ddpm", "euler_maruyama", "heun", "dpmpp_2m"]


def _sample(solver="ddim", steps=40, method="picard", batch=32, seed=0, **kw):
    s = ParallelSampler("gmm", solver=solver, steps=steps, method=method, progress=False, **kw)
    return s.sample(batch, seed=seed)


def test_sequential_ddpm_is_the_ddpm_posterior_chain():
    """DDPM-1000 through paratime equals DDPM's own update x_{t-1} = mu(x_t, eps) + sqrt(beta_tilde) z, written
    here in the VP frame from the paper, with the same noise."""
    model = ring_gmm()
    B, seed = 16, 3
    res = ParallelSampler(model, solver="ddpm", steps=1000, method="sequential", progress=False).sample(B, seed=seed)
    ac = model.schedule.alphas_cumprod
    x = draw_noise(seed, B, (2,), None, INITIAL)
    z = draw_noise(seed, B, (2,), 1000, STEP)
    for n, t in enumerate(range(999, -1, -1)):
        a_t, a_prev = ac[t], (ac[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - a_t / a_prev
        eps = model.network(x, torch.full((B,), float(t)))
        mean = (x - beta / (1 - a_t).sqrt() * eps) / (1 - beta).sqrt()
        var = (1 - a_prev) / (1 - a_t) * beta
        x = mean + var.sqrt() * z[n]
    torch.testing.assert_close(res.samples, x, rtol=1e-9, atol=1e-9)


def test_sequential_ddim_is_the_ddim_update():
    model = ring_gmm()
    B, seed = 16, 1
    res = ParallelSampler(model, solver="ddim", steps=50, method="sequential", progress=False,
                          spacing="leading").sample(B, seed=seed)
    ac = model.schedule.alphas_cumprod
    x = draw_noise(seed, B, (2,), None, INITIAL)
    ts = list(range(980, -1, -20))
    for k, t in enumerate(ts):
        a_prev = ac[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        eps = model.network(x, torch.full((B,), float(t)))
        x0 = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(res.samples, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("window", [40, 7])
def test_picard_at_tol_zero_equals_sequential(solver, window):
    seq = _sample(solver, method="sequential")
    par = _sample(solver, method="picard", window=window, tol=0.0)
    torch.testing.assert_close(par.samples, seq.samples, rtol=0, atol=1e-9)
    assert par.stats.iterations <= 40
    assert all(par.stats.converged)


@pytest.mark.parametrize("solver", SOLVERS)
def test_picard_default_tol_within_documented_bound(solver):
    """Percentiles of the per-sample max |picard - sequential| (gmm, 100 steps, window 100, tol 0.1 in absolute
    units, 64 samples, seed 0). The guarantee is max <= tol; the typical sample sits far below it. Measured (seeds
    0-3): ODE p90 <= 0.0008, max <= 0.029 (seed 0's hardest sample, on every ODE solver); SDE p90 <= 0.0045, none
    > 0.1. A max of an SDE solver is set by a rare mode switch, so its check is on the p90 and the count off by
    > 0.1. At tol 1 every solver fails its check (ODE p90 0.0056..0.0068; SDE p90 0.049..0.076, 3-4 samples > 0.1)."""
    seq = _sample(solver, steps=100, method="sequential", batch=64)
    par = _sample(solver, steps=100, window=100, tol=0.1, batch=64, tol_units="absolute")   # the bounds' units
    diff = (par.samples - seq.samples).abs().amax(1)            # (64,) per-sample max over coordinates
    p90 = float(torch.quantile(diff, 0.9))
    if solver in ("ddim", "heun", "dpmpp_2m"):
        assert p90 <= 0.004 and float(diff.max()) <= 0.05, (p90, float(diff.max()))
    else:
        assert p90 <= 0.02 and int((diff > 0.1).sum()) <= 1, (p90, int((diff > 0.1).sum()))
    assert par.stats.iterations < 100


@pytest.mark.parametrize("shared, tol, max_rounds, max_diff", [
    (False, 0.1, 12, 0.1), (False, 1e-3, 20, 4e-3),      # per-sample windows (default): fewer NFE
    (True, 0.1, 12, 0.05), (True, 1e-3, 20, 2e-3),       # one window for the batch, as diffusers' ParaDiGMS
])
def test_picard_rounds_on_gmm_ddim100(shared, tol, max_rounds, max_diff):
    """The issue's reference setting: gmm, 256 samples, seed 0, DDIM-100, window 100 (bounds in the README)."""
    seq = _sample("ddim", steps=100, method="sequential", batch=256)
    par = _sample("ddim", steps=100, window=100, tol=tol, batch=256, shared_window=shared)
    assert par.stats.rounds <= max_rounds
    assert float((par.samples - seq.samples).abs().max()) <= max_diff


def test_same_seed_same_samples_whatever_window_or_batch_split():
    full = _sample("ddpm", window=40, tol=0.0, batch=24)
    small_window = _sample("ddpm", window=5, tol=0.0, batch=24)
    torch.testing.assert_close(small_window.samples, full.samples, rtol=0, atol=1e-9)
    s = ParallelSampler("gmm", solver="ddpm", steps=40, window=40, tol=0.1, progress=False)
    whole = s.sample(24, seed=5)
    parts = torch.cat([s.sample(10, seed=5).samples, s.sample(14, seed=5, first_sample=10).samples])
    torch.testing.assert_close(parts, whole.samples, rtol=0, atol=1e-12)


def test_converged_samples_stop_costing_evaluations():
    """Counted at the network: in round r it sees at least one and at most W rows per sample still running (none
    for a finished one), and the reported NFE is exactly what it saw."""
    model = ring_gmm()
    rows, per_round = [], []

    def net(x_in, t):
        rows.append(x_in.shape[0])
        return model.network(x_in, t)

    def on_round(info):
        per_round.append(sum(rows))
        rows.clear()

    W = 20
    res = ParallelSampler(dataclasses.replace(model, network=net), steps=100, window=W, tol=0.1,
                          progress=False).sample(64, seed=0, callback=on_round)
    finished = torch.tensor(res.stats.sample_rounds)
    assert int(finished.min()) < int(finished.max())        # samples finish at different rounds
    assert sum(per_round) == res.stats.nfe_total and len(per_round) == res.stats.iterations
    for r, n in enumerate(per_round, start=1):
        running = int((finished >= r).sum())
        assert running <= n <= W * running, (r, n, running)


def test_max_rounds_finishes_sequentially_and_exactly():
    seq = _sample("dpmpp_2m", method="sequential")
    par = _sample("dpmpp_2m", window=40, tol=0.0, max_rounds=3)
    torch.testing.assert_close(par.samples, seq.samples, rtol=0, atol=1e-9)
    assert not all(par.stats.converged)
    assert par.stats.iterations <= 3 + 40


def test_heun_counts_two_calls_per_round():
    seq = _sample("heun", steps=20, method="sequential")
    assert seq.stats.rounds == 2 * 20 - 1                  # no corrector on the last step to sigma = 0
    assert seq.stats.nfe == 2 * 20 - 1


def test_callback_and_stats():
    seen = []
    s = ParallelSampler("gmm", steps=30, window=10, progress=False)
    res = s.sample(8, seed=0, callback=seen.append)
    assert [r.round for r in seen] == list(range(1, res.stats.iterations + 1))
    assert len(res.stats.residuals) == res.stats.iterations
    assert int(seen[-1].begin.min()) == 30
    assert res.stats.wall_s > 0 and res.stats.nfe > 30


def _check_mixture(x, gmm, std_tol=0.03):
    n = x.shape[0]
    k = torch.cdist(x, gmm.means).argmin(1)
    counts = torch.bincount(k, minlength=8).double()
    chi2 = float(((counts - n / 8) ** 2 / (n / 8)).sum())
    assert chi2 < 24.3, chi2                                    # chi-square(7) 99.9% quantile
    for j in range(8):
        pts = x[k == j]
        se = 0.3 / math.sqrt(pts.shape[0])
        assert float((pts.mean(0) - gmm.means[j]).abs().max()) < 5 * se + 0.01
        assert abs(float(pts.std(0).mean()) - 0.3) < std_tol


@pytest.mark.parametrize("solver, steps, method", [("ddim", 100, "sequential"), ("ddim", 100, "picard"),
                                                   ("ddpm", 1000, "sequential"), ("dpmpp_2m", 50, "picard")])
def test_gmm_samples_have_the_mixture_statistics(solver, steps, method):
    """Against the exact mixture: per-mode weights (chi-square), per-mode mean and std."""
    model = ring_gmm()
    res = ParallelSampler(model, solver=solver, steps=steps, method=method, progress=False).sample(4000, seed=11)
    _check_mixture(res.samples, model.network.gmm)


def test_picard_ddpm_has_the_statistics_of_sequential_ddpm():
    """DDPM-100 itself under-disperses the modes (std ~0.275 instead of 0.3: discretisation); Picard at its default
    tolerance must reproduce the sequential sampler's distribution, mode weights and spread alike. Same seed on both
    sides (the step noise is drawn up front, so the fixed point is the sequential sample): measured, the per-mode
    std differs by 8.6e-6 and no sample changes mode; at tol 1 (absolute) 5.6e-3 and 67 of 4,000 change mode, at
    tol 3 6.9e-2 and 305, so each check below fails when the stop rule is loosened."""
    model = ring_gmm()
    seq = ParallelSampler(model, solver="ddpm", steps=100, method="sequential", progress=False).sample(4000, seed=2)
    par = ParallelSampler(model, solver="ddpm", steps=100, progress=False).sample(4000, seed=2)
    k_s = torch.cdist(seq.samples, model.network.gmm.means).argmin(1)
    k_p = torch.cdist(par.samples, model.network.gmm.means).argmin(1)
    assert int((k_s != k_p).sum()) <= 4                 # at most 0.1% of the samples switch modes
    for j in range(8):
        s_s, s_p = seq.samples[k_s == j].std(0).mean(), par.samples[k_p == j].std(0).mean()
        assert abs(float(s_s - s_p)) < 2e-3
    _check_mixture(par.samples, model.network.gmm, std_tol=0.05)


def test_non_finite_network_output_names_the_step():
    model = ring_gmm()

    def net(x, t):
        out = model.network(x, t)
        return torch.where((t < 500)[:, None], torch.full_like(out, float("nan")), out)

    s = ParallelSampler(net, steps=10, method="sequential", schedule=model.schedule, prediction="eps", progress=False)
    with pytest.raises(NonFiniteOutputError, match=r"step 5 .*model time=499"):
        s.sample((4, 2), seed=0)


@pytest.mark.parametrize("kw, match", [
    (dict(solver="rk45"), "solver"), (dict(method="magic"), "method"), (dict(tol=-1.0), "tol"),
    (dict(window=0), "window"), (dict(steps=0), "steps"), (dict(backend="mpi"), "backend"),
    (dict(eta=2.0), "eta"), (dict(spacing="odd"), "spacing"), (dict(max_rounds=0), "max_rounds"),
    (dict(solver="heun", eta=0.5), "eta"), (dict(tol=float("nan")), "tol"),
    (dict(method="parareal", window=8), "^window: applies only"), (dict(method="sequential", window=8), "^window"),
    (dict(method="parareal", stop="paradigms"), "^stop: applies only"),
    (dict(method="sequential", update="anderson"), "^update: applies only"),
    # options that would be ignored where they are given (each ran before, changing nothing)
    (dict(method="sequential", tol_units="absolute"), "^tol_units: applies only"),
    (dict(method="sequential", data_scale=2.0), "^data_scale: applies only"),
    (dict(method="auto", window=3), "^window: applies only"),
    (dict(method="parareal", coarse=lambda x, a, b: x, coarse_steps=3), "^coarse_steps: applies only"),
    (dict(classifier=lambda x, t: x.sum()), "^classifier: applies only"),
    (dict(classifier_scale=0.0), "^classifier_scale: given without"),
    (dict(steps=10, window=10, fill="copy"), "^fill: applies only to a sliding window"),
    # more coarse steps than a slice has fine ones were capped silently (and the stats counted the request)
    (dict(method="parareal", steps=9, slices=3, coarse_steps=4), r"^coarse_steps: at most the fine steps .* \(3 of"),
    (dict(method="parareal_pipelined", steps=9, coarse_steps=1000), "^coarse_steps: at most"),
    (dict(steps=10, window=12, fill="copy"), "^fill: applies only to a sliding window"),
])
def test_bad_options_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        ParallelSampler("gmm", progress=False, **kw)


def test_fill_is_taken_wherever_a_window_slides():
    """``fill`` applies to a window shorter than the grid and wider than one point, with or without ``max_rounds``,
    and to the planner's ``auto`` window (its sliding candidates): each is built and samples. The window of one point
    that ``max_rounds`` leaves after a whole grid reads no fill (refused, tests/test_inputs.py)."""
    for kw in (dict(window=4), dict(window=4, max_rounds=2), dict(window="auto"), dict(method="auto")):
        s = ParallelSampler("gmm", steps=10, fill="copy", progress=False, **kw)
        assert s.sample(4, seed=0).samples.shape == (4, 2), kw
    # A latency-bound cost makes the planner pick the whole grid: the fill, given for its sliding candidates, is
    # not this run's (the run is the planner's choice, not the user's: nothing to refuse).
    for method in ("picard", "auto"):
        res = ParallelSampler("gmm", steps=50, method=method, fill="copy", cost="latency", progress=False).sample(
            4, seed=0)
        assert (res.stats.method, res.stats.window) == ("picard", 50)


def test_bad_sample_inputs_name_the_argument():
    s = ParallelSampler("gmm", steps=5, progress=False)
    with pytest.raises(ValueError, match="shape"):
        s.sample((4, 3))
    with pytest.raises(ValueError, match="shape"):
        s.sample()
    with pytest.raises(ValueError, match="noise"):
        s.sample(noise=torch.full((4, 2), float("nan")))
    with pytest.raises(TypeError, match="noise"):
        s.sample(noise=torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="noise"):
        s.sample(noise=torch.ones(4, 2, device="meta"))
    with pytest.raises(ValueError, match="seed"):
        s.sample(4, seed=-1)
    with pytest.raises(ValueError, match="^shape: 5 samples but noise has a batch of 2"):
        s.sample(5, noise=torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="labels"):
        s.sample(4, labels=torch.zeros(3))
    with pytest.raises(TypeError, match="state_dtype"):
        ParallelSampler("gmm", state_dtype=torch.int32)
    with pytest.raises(ValueError, match="model"):
        ParallelSampler("nope")
    with pytest.raises(ValueError, match="schedule, prediction"):
        ParallelSampler(lambda x, t: x)


def test_initial_noise_argument_is_used():
    s = ParallelSampler("gmm", steps=20, method="sequential", progress=False)
    z = draw_noise(4, 6, (2,), None, INITIAL)
    torch.testing.assert_close(s.sample(noise=z).samples, s.sample(6, seed=4).samples)



class _SlowEvent:
    """A CUDA event whose copy has not landed when queried (as on a rank that runs ahead of its GPU)."""

    def __init__(self):
        self.waited = False

    def query(self):
        return False

    def synchronize(self):
        self.waited = True


@pytest.mark.parametrize("name, workers, lockstep", [("local", 1, False), ("torch", 1, False), ("torch", 2, True)])
def test_ranks_in_lockstep_read_the_rounds_flag_at_the_same_round(name, workers, lockstep):
    """A non-finite output must stop every rank of torch.distributed at the same round. The flag of a round lands
    on the host asynchronously; read only once landed, a rank whose GPU is behind stops a round later than the
    others, which by then wait in that round's collective until timeout_s. With more than one rank the check
    waits for the flag of the round before (one round late, on every rank alike); a single process still never
    waits. Simulated on the CPU: an event that has not landed, and a landed flag that says "not finite"."""
    from paratime.evaluator import Evaluator

    backend = type("Backend", (), {"name": name, "workers": workers})()
    ev = Evaluator(backend, ParallelSampler("gmm", steps=4, progress=False).grid, 1, torch.device("cpu"))
    assert ev.lockstep == lockstep
    ev._inflight = [(torch.tensor([float("nan")]), torch.tensor([2]), torch.tensor([0]))]
    ev._flag_np[0] = True
    ev._event = event = _SlowEvent()
    if lockstep:
        with pytest.raises(NonFiniteOutputError, match="step 2"):
            ev.check()
    else:
        ev.check()                                               # not landed: no wait, read at a later check
    assert event.waited == lockstep


def test_the_corrected_solver_is_named_with_its_base():
    """With the Langevin corrector the stats said langevin+langevin whatever the base solver."""
    for solver in ("ddim", "ddpm"):
        st = ParallelSampler("gmm", solver=solver, steps=5, corrector_snr=0.1, method="sequential",
                             progress=False).sample(2, seed=0).stats
        assert st.solver == f"{solver}+langevin"
    assert ParallelSampler("gmm", steps=5, progress=False).sample(2, seed=0).stats.solver == "ddim"


def test_a_meta_device_is_refused_naming_the_option():
    """meta tensors hold no data: accepted, it crashed in the first round's read."""
    with pytest.raises(ValueError, match="^device: unsupported device type 'meta'"):
        ParallelSampler("gmm", steps=5, device="meta", progress=False)


def test_a_non_finite_policy_observation_is_named():
    """A NaN observation was reported as the network's non-finite output at step 0."""
    obs = torch.zeros(1, 12)
    obs[0, 3] = float("nan")
    with pytest.raises(ValueError, match="^obs: contains NaN or inf"):
        ParallelSampler("policy", steps=5, progress=False).sample(1, obs=obs)


def test_a_window_of_one_point_costs_what_sequential_sampling_costs():
    """W = 1 (or what is left after max_rounds) evaluates one exact point a round: no initial-guess round (it never
    reads a guess) and no re-opened last window (its final point comes from the accepted point before it alone):
    12 rounds and 12 evaluations a sample for 10 steps before."""
    seq = ParallelSampler("gmm", steps=10, method="sequential", progress=False).sample(2, seed=0)
    for options in (dict(window=1, tol=1e-3), dict(window=1, tol=0.0), dict(window=1, tol=0.1, stop="paradigms")):
        res = ParallelSampler("gmm", steps=10, progress=False, **options).sample(2, seed=0)
        assert (res.stats.rounds, res.stats.nfe) == (10, 10.0), options
        torch.testing.assert_close(res.samples, seq.samples, rtol=0, atol=1e-12)
    after = ParallelSampler("gmm", steps=10, window=10, tol=1e-3, max_rounds=1, progress=False).sample(2, seed=0)
    assert after.stats.rounds == 10 and after.stats.converged == [False, False]


def test_data_units_decide_alike_at_every_scale_on_a_ve_model():
    """In data units acceptance is relative to the initial noise's scale (sigma_max on a VE model) at every data
    scale: a declared scale of exactly 1 was read as absolute units (acceptance 80x looser, 27 rounds against 30 at
    1 + 1e-9), and the same problem scaled by 2 as a whole did not decide alike."""
    from paratime import Denoiser
    from paratime.schedules import VESchedule

    means = torch.tensor([[0.9, 0.5], [-0.7, -0.8], [0.2, -0.9]], dtype=torch.float64)

    def mixture(scale):
        def network(x, sigma, **cond):            # the posterior mean of 3 equal modes, std 0.05 (data x scale)
            x, sig = x / scale, sigma.reshape(-1, 1).to(x) / scale
            var = 0.05 ** 2 + sig ** 2
            w = torch.softmax(-((x[:, None] - means) ** 2).sum(-1) / (2 * var), 1)
            post = (means[None] * sig[:, None] ** 2 + x[:, None] * 0.05 ** 2) / var[:, None]
            return scale * (w[..., None] * post).sum(1)

        network.data_range = (-scale, scale)
        return Denoiser.from_callable(network, schedule=VESchedule(1e-3 * scale, 80.0 * scale), sample_shape=(2,))

    def run(den, **options):
        return ParallelSampler(den, steps=50, window=8, tol=1e-3, progress=False, **options).sample(64, seed=0)

    one = run(mixture(1.0))
    for other in (run(mixture(1.0), data_scale=1.0 + 1e-9), run(mixture(2.0))):
        assert (other.stats.rounds, other.stats.nfe) == (one.stats.rounds, one.stats.nfe)
    assert one.stats.tol_units == "data" and one.stats.data_scale[0] == 1.0


def test_noise_of_another_sample_shape_is_named():
    with pytest.raises(ValueError, match=r"^noise: the model expects samples of shape \(2,\), got \(3,\)"):
        ParallelSampler("gmm", steps=4, progress=False).sample(noise=torch.randn(2, 3, dtype=torch.float64))
