"""Behaviour of the likelihood path that mutation testing found unpinned (paratime/methods/likelihood.py, the
likelihood part of paratime/sampler.py, paratime/likelihood_cli.py): Hutchinson's estimator against an Euler
integration of the change of variables written out here (probe stream, probe kind, the 1/K average), the Rademacher
probe's exact trace on a diagonal Jacobian, dequantisation per (seed, sample), the default quantisation levels, the
entry checks' boundaries, and the ``likelihood`` command's data sets and record.

The reference model is a diagonal Gaussian ``N(mu, diag(a^2))`` under a VE schedule: its denoiser
``D(x, s) = mu + a^2 / (a^2 + s^2) (x - mu)`` has the diagonal Jacobian ``c(s) = a^2 / (a^2 + s^2)``, so every trace
and every probe's ``z^T J z = sum_j c_j z_j^2`` is known by hand.
"""

import json
import math

import pytest
import torch

from paratime import ParallelSampler
from paratime.denoiser import Denoiser
from paratime.methods import likelihood as lk
from paratime.noise import PROBE, draw_noise
from paratime.schedules import VESchedule

F64 = torch.float64
MU = torch.tensor([0.3, -1.0], dtype=F64)
A2 = torch.tensor([0.25, 4.0], dtype=F64)          # a^2: stds 0.5 and 2, so J is diagonal but not a multiple of I
SCHEDULE = VESchedule(0.01, 50.0)


def _c(sigma: torch.Tensor) -> torch.Tensor:
    """``c(s) = a^2 / (a^2 + s^2)`` per coordinate, ``(M,) -> (M, 2)``; ``s`` at the network's float32 time (the
    model contract: VE networks see sigma as their float32 time)."""
    s = sigma.float().double()[:, None]
    return A2 / (A2 + s**2)


def _diagonal_gaussian() -> Denoiser:
    return Denoiser.from_callable(lambda x, sigma: MU + _c(sigma) * (x - MU), schedule=SCHEDULE, dtype=F64,
                                  sample_shape=(2,))


def _geometric_grid(steps: int) -> torch.Tensor:
    """The VE ``linspace`` likelihood grid written out: the (steps + 1)-step geometric sampling grid less its 0,
    ascending (sigma_min first, as the flow runs)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
    return (0.01 * (50.0 / 0.01) ** t).flip(0)


def _euler_log_likelihood(x: torch.Tensor, steps: int, trace) -> torch.Tensor:
    """Euler on the instantaneous change of variables, upward in sigma (VE: the frame is constant):
    ``x += h (x - D) / s``, ``l += h (n - trace(s)) / s``; then ``log N(x_T; 0, sigma_max^2 I) + l``."""
    sig, n = _geometric_grid(steps), x.shape[1]
    l = torch.zeros(x.shape[0], dtype=F64)
    for s, s_next in zip(sig[:-1], sig[1:]):
        sv = s.expand(x.shape[0])
        h, c = s_next - s, _c(sv)
        drift = (x - (MU + c * (x - MU))) / s
        l = l + h * (n - trace(c)) / s
        x = x + h * drift
    s_max = sig[-1]
    prior = -0.5 * x.pow(2).sum(1) / s_max**2 - n * torch.log(s_max) - 0.5 * n * math.log(2 * math.pi)
    return prior + l


def _data() -> torch.Tensor:
    return torch.tensor([[0.5, -0.2], [-0.4, 1.3], [1.1, -2.5]], dtype=F64)


# -- the divergence: exact, Hutchinson's probes and their stream -------------------------------------------------------
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_matches_an_euler_integration_with_the_probe_streams_draws(probe):
    """Hutchinson with K = 3 probes per sample: ``(1/K) sum_k sum_j c_j z_kj^2`` with ``z`` the (seed, sample) draws
    of the documented probe stream (:data:`paratime.noise.PROBE`), as drawn (``gaussian``) or their signs
    (``rademacher``), the same at every time point, the batch starting at ``first_sample``. The reference integrator
    is checked first on the exact trace ``c_1 + c_2``."""
    x, K, seed, first = _data(), 3, 11, 5
    sampler = ParallelSampler(_diagonal_gaussian(), steps=10, method="sequential", progress=False)
    exact = sampler.log_likelihood(x, solver="euler")
    torch.testing.assert_close(exact.nats, _euler_log_likelihood(x, 10, lambda c: c.sum(1)), rtol=0, atol=1e-9)
    z = draw_noise(seed, x.shape[0], (K, 2), None, PROBE, first)                       # (B, K, n)
    if probe == "rademacher":
        z = torch.where(z >= 0, 1.0, -1.0).to(z)
    per_sample = z.pow(2).mean(1)                                                      # (B, n): (1/K) sum_k z_kj^2
    want = _euler_log_likelihood(x, 10, lambda c: (c * per_sample).sum(1))
    got = sampler.log_likelihood(x, solver="euler", divergence="hutchinson", probe=probe, probes=K, seed=seed,
                                 first_sample=first)
    torch.testing.assert_close(got.nats, want, rtol=0, atol=1e-9)


def test_the_default_rademacher_probe_is_exact_on_a_diagonal_jacobian():
    """Rademacher probes have ``z_j^2 = 1``, so ``z^T J z`` is the exact trace for a diagonal ``J``: the default
    probe gives the exact divergence's answer; Gaussian probes do not."""
    x = _data()
    sampler = ParallelSampler(_diagonal_gaussian(), steps=8, method="sequential", progress=False)
    exact = sampler.log_likelihood(x, solver="euler")
    default = sampler.log_likelihood(x, solver="euler", divergence="hutchinson", seed=2)
    torch.testing.assert_close(default.nats, exact.nats, rtol=0, atol=1e-12)
    gaussian = sampler.log_likelihood(x, solver="euler", divergence="hutchinson", probe="gaussian", seed=2)
    assert float((gaussian.nats - exact.nats).abs().min()) > 1e-3


# -- dequantisation and bits per dimension -----------------------------------------------------------------------------
def test_dequantisation_noise_depends_on_seed_and_sample_only():
    """A batch split across calls with ``first_sample`` is dequantised like the whole batch (sample i's uniform
    noise is sample i's in every layout)."""
    x = torch.tensor([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5], [0.0, 0.0]], dtype=F64)
    sampler = ParallelSampler(_diagonal_gaussian(), steps=6, method="sequential", progress=False)
    kw = dict(solver="euler", data_range=(-3.0, 3.0), levels=7, dequantize=True, seed=4)
    whole = sampler.log_likelihood(x, **kw)
    tail = sampler.log_likelihood(x[2:], first_sample=2, **kw)
    torch.testing.assert_close(tail.nats, whole.nats[2:], rtol=0, atol=1e-12)
    torch.testing.assert_close(tail.latents, whole.latents[2:], rtol=0, atol=1e-12)


def test_a_data_range_without_levels_means_256_levels():
    """``levels`` defaults to 256 (8-bit data): over [-1, 1] the bin is 2/255, so bits/dim adds
    ``log2(127.5)`` to the density's own."""
    x = torch.tensor([[-0.5, 0.25], [0.0, 1.0]], dtype=F64)
    sampler = ParallelSampler(_diagonal_gaussian(), steps=6, method="sequential", progress=False)
    plain = sampler.log_likelihood(x, solver="euler")
    ranged = sampler.log_likelihood(x, solver="euler", data_range=(-1.0, 1.0))
    torch.testing.assert_close(ranged.nats, plain.nats, rtol=0, atol=0)
    torch.testing.assert_close(ranged.bits_per_dim, plain.bits_per_dim + math.log2(127.5), rtol=0, atol=1e-12)


# -- entry checks at their boundaries ----------------------------------------------------------------------------------
@pytest.mark.parametrize("x,kw,match", [
    ([[0.0, 0.5]], {"data_range": (-1.0, 1.0), "levels": 1}, r"levels: must be an integer >= 2, got 1"),
    ([[1.0, 1.0]], {"data_range": (1.0, 1.0)}, r"data_range: expected finite \(lo, hi\) with lo < hi"),
    ([[-1.5, 0.0]], {"data_range": (-1.0, 1.0)}, r"x: sample 0 has values in \[-1.5, 0\], outside the data range"),
    ([[0.0, 0.0]], {"divergence": "hutchinson", "probes": 0}, r"probes: must be an integer >= 1, got 0"),
])
def test_entry_checks_refuse_the_boundary_values(x, kw, match):
    """One level (a bin of ``(hi - lo) / 0``), an empty range, data below ``lo`` and zero probes with Hutchinson
    (where probes apply) are refused with the argument's own message."""
    sampler = ParallelSampler(_diagonal_gaussian(), steps=4, progress=False)
    with pytest.raises(ValueError, match=match):
        sampler.log_likelihood(torch.tensor(x, dtype=F64), **kw)


def test_check_request_refuses_data_on_another_device_than_the_samplers():
    """No accelerator needed: the check compares device types, so CPU data for a (nominal) CUDA sampler is refused
    naming ``x`` before anything runs."""
    cfg = ParallelSampler(_diagonal_gaussian(), steps=4, progress=False).config
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"x: on cpu but the sampler runs on cuda"):
        lk.check_request(x, (2,), torch.device("cuda"), None, None, "euler", "exact", None, 1, False, {}, cfg)


def test_flow_problem_refuses_a_stochastic_ddim_solver():
    """DDIM with eta > 0 is an SDE step, not the ODE's Euler: a :class:`Solver` object given to ``flow_problem`` is
    checked like a name."""
    from paratime.solvers import make_solver

    grid = lk.likelihood_grid(SCHEDULE, 3)
    with pytest.raises(ValueError, match="solver: the likelihood ODE takes euler, heun"):
        lk.flow_problem(grid, make_solver("ddim", eta=1.0), lambda x, j, b: x, F64, "cpu")


def test_the_probe_key_is_reserved_for_a_model_that_takes_conditioning():
    """A network that accepts any keyword conditioning (no ``check_cond`` hook to refuse it): ``divergence_probes``
    is still refused, rather than replaced by the drawn probes (Hutchinson) or silently ignored (exact)."""
    den = Denoiser.from_callable(lambda x, sigma, **cond: MU + _c(sigma) * (x - MU), schedule=SCHEDULE, dtype=F64,
                                 sample_shape=(2,))
    sampler = ParallelSampler(den, steps=4, method="sequential", progress=False)
    x = _data()
    for divergence in ("exact", "hutchinson"):
        with pytest.raises(ValueError, match="divergence_probes: reserved for Hutchinson's probes"):
            sampler.log_likelihood(x, solver="euler", divergence=divergence, divergence_probes=torch.ones(3, 1, 2))


# -- the likelihood command --------------------------------------------------------------------------------------------
def test_digits_sets_are_the_held_out_images_their_shuffles_and_all_17_levels():
    """``real``: scikit-learn's held-out digits (0..16) mapped to [-1, 1] by ``v / 8 - 1``; ``shuffled``: each real
    image's own pixels permuted (a different image, the same multiset); ``uniform``: all 17 levels occur."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from paratime.likelihood_cli import DIGITS_LEVELS, digits_sets

    d = load_digits()
    held_out = train_test_split(d.data, d.target, test_size=0.3, random_state=0)[1]
    sets = digits_sets(64)
    real = sets["real"].reshape(64, 64)
    torch.testing.assert_close(real, torch.tensor(held_out[:64], dtype=F64) / 8 - 1, rtol=0, atol=0)
    assert DIGITS_LEVELS == len(set(d.data.ravel().tolist())) == 17
    shuffled = sets["shuffled"].reshape(64, 64)
    torch.testing.assert_close(shuffled.sort(1).values, real.sort(1).values, rtol=0, atol=0)
    assert not torch.equal(shuffled, real)
    levels = torch.unique(sets["uniform"])
    torch.testing.assert_close(levels, torch.arange(17, dtype=F64) / 8 - 1, rtol=0, atol=0)


def test_digits_command_passes_17_levels_and_dequantises_unless_told_not_to(monkeypatch):
    """The command's call for digits: the data range [-1, 1] with 17 levels (bin 2/16), dequantised by default and
    not with ``--no-dequantize``; no solve runs (the call is recorded and stopped)."""
    import paratime.likelihood_cli as cli_mod
    from paratime.cli import main

    seen = []

    def record(self, x, **kw):
        seen.append(kw)
        raise ValueError("recorded")

    monkeypatch.setattr(ParallelSampler, "log_likelihood", record)
    monkeypatch.setattr(cli_mod, "digits_sets", lambda count, seed=0: {s: torch.zeros(count, 1, 8, 8, dtype=F64)
                                                                        for s in cli_mod.DIGITS_SETS})
    for flag, dequantize in (([], True), (["--no-dequantize"], False)):
        assert main(["likelihood", "--samples", "2", "--steps", "3", "--no-progress", *flag]) == 2
        kw = seen.pop()
        assert (kw["data_range"], kw["levels"], kw["dequantize"]) == ((-1.0, 1.0), 17, dequantize)


def test_likelihood_record_seed_reference_row_and_standard_error(tmp_path):
    """``--seed 3`` draws the gmm points and Hutchinson's probes with seed 3 (the API's ``seed=3``); the first row is
    the reference (``max_abs_bpd_diff`` 0), the second's difference is against it; the standard error is the
    bits/dim's std over sqrt(samples); ``--threads`` sets torch's thread count (restored here)."""
    from paratime.cli import main

    threads = torch.get_num_threads()
    want_threads = 2 if threads == 1 else 1
    out = tmp_path / "lik.json"
    try:
        assert main(["likelihood", "--model", "gmm", "--samples", "4", "--steps", "6", "--seed", "3", "--no-progress",
                     "--threads", str(want_threads), "--json", str(out)]) == 0
        assert torch.get_num_threads() == want_threads
    finally:
        torch.set_num_threads(threads)
    rec = json.loads(out.read_text())
    assert rec["threads"] == want_threads
    mix = ParallelSampler("gmm", progress=False).denoiser.network.gmm
    x = mix.sample(4, torch.Generator().manual_seed(3))[0]
    sampler = ParallelSampler("gmm", steps=6, tol=0.1, spacing="karras", progress=False)
    kw = dict(solver="euler", divergence="hutchinson", seed=3)
    seq, par = (sampler.log_likelihood(x, method=m, **kw) for m in ("sequential", "picard"))
    rows = rec["sets"]["gmm"]
    assert rows[0]["nats"] == pytest.approx(float(seq.nats.mean()), rel=1e-12)
    assert rows[0]["max_abs_bpd_diff"] == 0.0
    assert rows[1]["max_abs_bpd_diff"] == pytest.approx(float((par.bits_per_dim - seq.bits_per_dim).abs().max()),
                                                        rel=1e-9, abs=1e-15)
    assert rows[0]["bits_per_dim_se"] == pytest.approx(float(seq.bits_per_dim.std()) / 2, rel=1e-12)


def test_likelihood_command_refuses_a_negative_seed_before_loading_data(capsys, monkeypatch):
    """``--seed -1`` is the command's error, naming the flag, before the digits are split (scikit-learn's own
    message about ``random_state`` came otherwise)."""
    import paratime.likelihood_cli as cli_mod
    from paratime.cli import main

    def work(*a, **k):
        raise AssertionError("data loaded before --seed was checked")

    monkeypatch.setattr(cli_mod, "_data", work)
    assert main(["likelihood", "--seed", "-1", "--no-progress"]) == 2
    assert "--seed" in capsys.readouterr().err
