"""DEIS (log-rho) against diffusers' ``DEISMultistepScheduler`` with diffusers' own arithmetic in float64.

test_diffusers holds DEIS within 1e-4 of the shipped loop. That gap is diffusers' precision, not a different method:
``set_timesteps`` stores ``sigmas`` as float32, so ``_sigma_to_alpha_sigma_t`` and the closed-form ``ind_fn``
integrals of ``multistep_deis_{second,third}_order_update`` run in float32, and ``ind_fn(rho_t) - ind_fn(rho_s0)``
cancels: the third-order coefficients come out 2e-6 (8 steps) to 5e-4 (50 steps) off the exact integrals (second
order: 5e-7 to 2e-5), which moves the sample by ~1e-7 to 1e-5 of its scale. With ``sigmas`` promoted to float64
(the same grid values paratime reads) the loop is diffusers' own method in float64, and paratime must equal it to
rounding; and paratime's coefficient table must equal the Lagrange basis in log rho integrated by quadrature.
"""

import os
import types

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from paratime import ParallelSampler  # noqa: E402
from paratime.integrations.diffusers import from_diffusers, sample_latents, solver_for  # noqa: E402
from paratime.solvers import DEIS  # noqa: E402

# diffusers' ind_fn calls np.log on 0-d tensors (numpy 2's __array_wrap__ deprecation, once per term)
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")

BOUND = 1e-10   # float64: paratime's float64 tables against diffusers' float64 arithmetic (seen: <= 2e-14)
SHAPE = (2, 2, 8, 8)
SD_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class GaussianEps(torch.nn.Module):
    """The exact eps (or v) prediction for data N(mu, 0.5^2) (per element), at integer timestep t: every step of a
    multistep solver sees a history that varies with sigma, so every coefficient shows in the sample."""

    def __init__(self, alphas_cumprod, prediction="epsilon"):
        super().__init__()
        self.register_buffer("ac", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.register_buffer("mu", torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(0),
                                               dtype=torch.float64))
        self.prediction, self.s2 = prediction, 0.25

    def forward(self, x, t):
        t = torch.as_tensor(t).reshape(-1).round().long().to(x.device)
        a2 = self.ac[t].reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        a, s = a2.sqrt(), (1 - a2).sqrt()
        x0 = self.mu + a * self.s2 * (x - a * self.mu) / (a2 * self.s2 + s * s)
        eps = (x - a * x0) / s
        return types.SimpleNamespace(sample=a * eps - s * x0 if self.prediction == "v_prediction" else eps)


def _diffusers_loop_float64(net, sch, steps, latents):
    sch.set_timesteps(steps)
    sch.sigmas = sch.sigmas.to(torch.float64)       # the same values; diffusers' arithmetic now runs in float64
    x = latents
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(net(sch.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def _gap(order, steps, prediction="epsilon", method="sequential", solver=None):
    sch = diffusers.DEISMultistepScheduler(**SD_BETAS, solver_order=order, prediction_type=prediction)
    net = GaussianEps(sch.alphas_cumprod, prediction)
    den = from_diffusers(net, sch, dtype=torch.float64, sample_shape=SHAPE[1:])
    solver = solver or solver_for(sch)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = _diffusers_loop_float64(net, sch, steps, latents * sch.init_noise_sigma)
    opts = {"tol": 0.0} if method == "picard" else {}
    s = ParallelSampler(den, solver=solver, steps=steps, method=method, progress=False, **opts)
    got = sample_latents(s, latents * sch.init_noise_sigma).samples
    assert got.dtype == torch.float64
    return float((got - want).abs().max() / want.abs().max().clamp_min(1))


# 14 / 15: diffusers' lower_order_final ("fewer than 15 steps") boundary; 25: third order to the end.
@pytest.mark.parametrize("steps", [8, 14, 15, 16, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_equals_diffusers_float64_loop(order, steps):
    assert _gap(order, steps) <= BOUND


def test_deis_o3_v_prediction_and_picard_equal_diffusers_float64_loop():
    assert _gap(3, 12, prediction="v_prediction") <= BOUND
    assert _gap(3, 12, method="picard") <= BOUND


def test_float32_rounded_coefficients_are_caught():
    """The bound sees what test_diffusers' 1e-4 cannot: coefficients rounded to float32 once (diffusers' own
    rounding is larger still) move the sample by ~1e-8."""
    class Rounded(DEIS):
        def _coefficient_table(self, sigmas):
            return super()._coefficient_table(sigmas).float().double()

    assert _gap(3, 16, solver=Rounded(order=3, lower_order_final=False)) > 100 * BOUND


def _lagrange_integrals(sig, i, p, nodes=64):
    """int_{s_i}^{s_{i+1}} prod_{m != j} (log r - log s_{i-m}) / (log s_{i-j} - log s_{i-m}) dr, j < p, by
    Gauss-Legendre in r (exact to rounding: the integrand is smooth and the step short against s_{i+1})."""
    u, w = np.polynomial.legendre.leggauss(nodes)
    a, b = sig[i], sig[i + 1]
    r = (a + b) / 2 + (b - a) / 2 * u
    logs = [np.log(sig[i - m]) for m in range(p)]
    out = []
    for j in range(p):
        basis = np.ones_like(r)
        for m in range(p):
            if m != j:
                basis *= (np.log(r) - logs[m]) / (logs[j] - logs[m])
        out.append((b - a) / 2 * float((w * basis).sum()))
    return out


@pytest.mark.parametrize("steps", [8, 25, 50])
@pytest.mark.parametrize("order", [2, 3])
def test_deis_coefficients_are_the_log_rho_lagrange_integrals(order, steps):
    """Zhang & Chen's log-rho DEIS: ``x' = x + sum_j c_j eps_{i-j}`` with c_j the Lagrange basis in log rho through
    the last ``p`` points integrated over rho in [s_i, s_{i+1}] (VE frame: rho = sigma / alpha is the VE sigma)."""
    sch = diffusers.DEISMultistepScheduler(**SD_BETAS, solver_order=order)
    sch.set_timesteps(steps)
    sig = sch.sigmas.to(torch.float64)
    table = DEIS(order=order, lower_order_final=False)._coefficient_table(sig)
    s = sig.tolist()
    for i in range(len(s) - 1):
        p = min(order, i + 1)
        want = _lagrange_integrals(s, i, p)
        scale = max(abs(c) for c in want)
        for j in range(p):
            assert abs(float(table[i, j]) - want[j]) <= 1e-10 * scale, (i, j, float(table[i, j]), want[j])
