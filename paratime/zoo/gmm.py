"""An analytic Gaussian-mixture "model" whose denoiser is exact under every noise schedule.

For data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x = x0 + sigma eps`` (VE frame), ``x ~ sum_k w_k N(mu_k,
(s_k^2 + sigma^2) I)`` and the ideal denoiser is the posterior mean

    D(x, sigma) = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),   r_k = responsibilities of x.

:meth:`GaussianMixture.network` turns it into a network of any prediction type for any schedule, so the adapters
in :mod:`paratime.denoiser` are tested against exact answers.
"""

from __future__ import annotations

import math

import torch

from ..denoiser import Denoiser, from_x0
from ..schedules import DiscreteVPSchedule, NoiseSchedule

__all__ = ["GaussianMixture", "AnisotropicMixture", "ring_gmm", "mixture_3d"]


class GaussianMixture(torch.nn.Module):
    """Isotropic Gaussian mixture in ``dim`` dimensions.

    Args:
        means: ``(K, dim)``. stds: ``(K,)``. weights: ``(K,)``, normalised here.
    """

    def __init__(self, means, stds, weights=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        K = means.shape[0] if means.ndim == 2 else 0
        weights = (torch.ones(K, dtype=torch.float64) if weights is None
                   else torch.as_tensor(weights, dtype=torch.float64))
        if means.ndim != 2 or K < 1 or stds.ndim > 1 or (stds.ndim == 1 and stds.shape != (K,)) or \
                weights.shape != (K,):
            raise ValueError(f"means, stds, weights: need (K, dim) means, a number or (K,) stds, (K,) weights; got "
                             f"shapes {tuple(means.shape)}, {tuple(stds.shape)}, {tuple(weights.shape)}")
        stds = stds.expand(K).clone()
        if not (bool(torch.isfinite(means).all()) and bool((stds > 0).all()) and bool(torch.isfinite(stds).all())
                and bool((weights >= 0).all()) and bool(torch.isfinite(weights).all()) and float(weights.sum()) > 0):
            raise ValueError("means, stds, weights: need finite means, finite positive stds, and finite non-negative "
                             "weights with a positive sum")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``(M, K)`` posterior mode probabilities of VE-frame points ``x`` ``(M, dim)`` at noise ``sigma`` ``(M,)``."""
        var = self.stds[None] ** 2 + sigma[:, None].to(self.stds) ** 2                 # (M, K)
        d2 = ((x[:, None, :].to(self.means) - self.means[None]) ** 2).sum(-1)          # (M, K)
        logp = self.weights.log()[None] - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.softmax(logp, dim=1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact ``E[x0 | x]`` for VE-frame ``x`` ``(M, dim)`` and ``sigma`` ``(M,)``."""
        r = self.responsibilities(x, sigma)                                             # (M, K)
        var0 = self.stds[None] ** 2
        shrink = var0 / (var0 + sigma[:, None].to(var0) ** 2)                          # (M, K)
        xm = x[:, None, :].to(self.means)
        post = self.means[None] + shrink[..., None] * (xm - self.means[None])          # (M, K, dim)
        return (r[..., None] * post).sum(1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact draws: ``(n, dim)`` points and their ``(n,)`` mode labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z, k

    def network(self, schedule: NoiseSchedule, prediction: str = "eps") -> "_MixtureNetwork":
        """A network of the given ``prediction`` type under ``schedule`` (inputs ``a x``, conditioned on model time)."""
        return _MixtureNetwork(self, schedule, prediction)


class _MixtureNetwork(torch.nn.Module):
    """The exact network: recovers sigma from the model time through the schedule, then converts."""

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule, prediction: str):
        super().__init__()
        self.gmm, self.schedule, self.prediction = gmm, schedule, prediction

    def check_cond(self, cond: dict, batch: int) -> None:
        """The sampler's conditioning hook (see :func:`paratime.config.check_cond`): a mixture takes none.

        Raises:
            ValueError: any conditioning key, named.
        """
        if cond:
            raise ValueError(f"{sorted(cond)[0]}: the mixture model takes no conditioning")

    def forward(self, x_in: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
        sigma = self.schedule.sigma_of_model_time(model_time)
        a = self.schedule.input_scale(sigma)
        x = x_in.to(torch.float64) / a[:, None]
        x0 = self.gmm.denoise(x, sigma)
        out = from_x0(self.prediction, x0, x, sigma[:, None], a[:, None], self.schedule)
        return out.to(x_in.dtype)


def ring_gmm(prediction: str = "eps") -> Denoiser:
    """The named model ``gmm``: 8 Gaussians on a ring of radius 4, std 0.3, equal weights, under DDPM linear betas
    1e-4 .. 0.02 over 1000 steps, exposed as a ``prediction``-type network."""
    angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    gmm = GaussianMixture(4 * torch.stack([angles.cos(), angles.sin()], 1), 0.3)
    schedule = DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02)
    return Denoiser(gmm.network(schedule, prediction), schedule, prediction, dtype=torch.float64, sample_shape=(2,))


class AnisotropicMixture(GaussianMixture):
    """A Gaussian mixture with full covariances ``C_k = Q_k diag(lam_k) Q_k^T``: in each mode's eigenbasis,
    ``z = Q_k^T (x - mu_k)``, the noisy density is ``N(0, diag(lam_k + sigma^2))`` and the posterior mean is
    ``mu_k + Q_k (lam_k / (lam_k + sigma^2) z)``; ``D(x, sigma) = sum_k r_k(x) (that mean)``."""

    def __init__(self, means, covs, weights):
        super().__init__(means, 1.0, weights)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        K, d = self.means.shape
        if covs.shape != (K, d, d) or not bool(torch.isfinite(covs).all()) or \
                not torch.allclose(covs, covs.transpose(1, 2)):
            raise ValueError(f"covs: need finite symmetric (K, dim, dim) = ({K}, {d}, {d}) covariances, got shape "
                             f"{tuple(covs.shape)}")
        lam, q = torch.linalg.eigh(covs)
        if not bool((lam > 0).all()):
            raise ValueError(f"covs: need positive definite covariances, smallest eigenvalue {float(lam.min()):.3g}")
        self.register_buffer("lam", lam)                  # (K, d)
        self.register_buffer("q", q)                      # (K, d, d), columns the eigenvectors

    def _modes(self, x, sigma):
        z = torch.einsum("kde,mkd->mke", self.q, x[:, None, :].to(torch.float64) - self.means[None])   # (M, K, d)
        var = self.lam[None] + (sigma.to(torch.float64) ** 2)[:, None, None]                            # (M, K, d)
        return z, var

    def responsibilities(self, x, sigma):
        z, var = self._modes(x, sigma)
        logp = self.weights.log()[None] - 0.5 * (z * z / var + torch.log(2 * math.pi * var)).sum(-1)     # (M, K)
        return torch.softmax(logp, dim=1)

    def denoise(self, x, sigma):
        z, var = self._modes(x, sigma)
        r = self.responsibilities(x, sigma)                                                              # (M, K)
        post = self.means[None] + torch.einsum("kde,mke->mkd", self.q, self.lam[None] / var * z)        # (M, K, d)
        return (r[..., None] * post).sum(1).to(x.dtype)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64) * self.lam[k].sqrt()
        return self.means[k] + torch.einsum("nde,ne->nd", self.q[k], z), k


def mixture_3d() -> Denoiser:
    """Three modes with weights 0.6 / 0.3 / 0.1, covariances with axis stds from 0.05 to 0.6, rotated."""
    rot = torch.linalg.qr(torch.tensor([[1.0, 0.4, -0.3], [0.2, 1.0, 0.5], [-0.6, 0.1, 1.0]],
                                       dtype=torch.float64))[0]
    scales = torch.tensor([[0.6, 0.2, 0.05], [0.3, 0.3, 0.1], [0.5, 0.08, 0.2]], dtype=torch.float64)
    covs = torch.stack([rot @ torch.diag(s**2) @ rot.T for s in scales])
    means = torch.tensor([[2.0, 0.0, 0.0], [-1.0, 1.5, 0.5], [-1.0, -1.5, -0.5]], dtype=torch.float64)
    mix = AnisotropicMixture(means, covs, [0.6, 0.3, 0.1])
    schedule = DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02)
    return Denoiser(mix.network(schedule, "eps"), schedule, "eps", dtype=torch.float64, sample_shape=(3,))
