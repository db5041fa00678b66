"""Named models shipped with paratime, registered in :mod:`paratime.models` on import: ``gmm`` (analytic
8-Gaussian ring) and ``digits`` (a small trained U-Net)."""

from __future__ import annotations

from ..denoiser import Denoiser
from ..models import MODELS, load_model, register_model
from .gmm import GaussianMixture, ring_gmm

__all__ = ["MODELS", "load_model", "GaussianMixture", "ring_gmm"]


# The loaders' own signatures, spelled here so the registry names an option they do not take (their modules load
# on first use).
def _digits(path=None, device="cpu", dtype=None) -> Denoiser:
    from .digits import load_digits_model

    return load_digits_model(path, device, dtype)


def _policy(path=None, device="cpu", dtype=None) -> Denoiser:
    from .policy import load_policy_model

    return load_policy_model(path, device, dtype)


register_model("gmm", ring_gmm)
register_model("digits", _digits)
register_model("policy", _policy)     # diffusion policy for paratime.tasks.reach
