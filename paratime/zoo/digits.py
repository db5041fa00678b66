"""The embedded ``digits`` model: a small label-conditional U-Net trained on scikit-learn's 8x8 digits.

Data: ``sklearn.datasets.load_digits`` (1,797 grey-scale 8x8 images, values 0..16), scaled to [-1, 1].
Model: eps-prediction U-Net (8x8 -> 4x4 -> 8x8, one skip), sinusoidal time embedding, a label embedding with an
extra "no label" class (labels are dropped 10% of the time in training, so the model samples unconditionally by
default and supports classifier-free guidance). DDPM linear betas 1e-4 .. 0.02 over 1000 steps.

Shipped weights: ``digits.safetensors`` beside this file, made by ``paratime train-digits`` (see ``digits.json``).
scikit-learn is needed for training and evaluation only.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check_device, check_int, check_number
from ..denoiser import Denoiser
from ..models import load_weights, read_weights
from ..progress import progress_bar, training_step
from ..schedules import DiscreteVPSchedule

__all__ = ["DigitsUNet", "load_digits_model", "load_digits_data", "train_digits", "check_train_options", "WEIGHTS",
           "NULL_LABEL"]

log = logging.getLogger("paratime")
WEIGHTS = Path(__file__).with_name("digits.safetensors")
NULL_LABEL = 10


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) DDPM timesteps, ``(M,) -> (M, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """eps-prediction U-Net for ``(M, 1, 8, 8)`` inputs, timesteps ``(M,)`` and optional labels ``(M,)``.

    Args:
        channels: width at 8x8 (twice that at 4x4).
        emb: time/label embedding width.
    """

    data_range = (-1.0, 1.0)        # the training data's (load_digits_data); tol_units="data" is relative to it

    def __init__(self, channels: int = 32, emb: int = 128):
        super().__init__()
        c = channels
        self.config = {"channels": channels, "emb": emb}
        self.time_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(NULL_LABEL + 1, emb)
        self.inp = nn.Conv2d(1, c, 3, padding=1)
        self.down1 = _ResBlock(c, c, emb)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(2 * c, 2 * c, emb)
        self.mid2 = _ResBlock(2 * c, 2 * c, emb)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.up1 = _ResBlock(2 * c, c, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))
        self.emb_dim = emb

    def check_cond(self, cond: dict, batch: int) -> None:
        """The sampler's conditioning hook (see :func:`paratime.config.check_cond`), run once per ``sample`` call:
        ``labels`` must be a ``(batch,)`` integer tensor of classes 0..9 (omit it for unconditional samples).

        Raises:
            TypeError: ``labels`` is not an integer tensor. ValueError: wrong shape, a class outside 0..9, or an
                unknown conditioning key.
        """
        unknown = sorted(set(cond) - {"labels", "uncond", "y"})
        if unknown:
            raise ValueError(f"{unknown[0]}: the digits model takes only labels= (and uncond=, y= for guidance) "
                             f"as conditioning")
        if cond.get("labels") is not None:
            _check_labels(cond["labels"], batch, "labels", NULL_LABEL - 1)
        uncond = cond.get("uncond")
        if isinstance(uncond, dict):        # (not a dict: the sampler's check names it)
            unknown = sorted(set(uncond) - {"labels"})
            if unknown:
                raise ValueError(f"uncond.{unknown[0]}: the digits model's unconditional inputs take only labels=")
            if uncond.get("labels") is not None:    # negative conditioning: any class, or the null class
                _check_labels(uncond["labels"], batch, "uncond.labels", NULL_LABEL)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            labels = torch.full((x.shape[0],), NULL_LABEL, dtype=torch.long, device=x.device)
        e = self.time_mlp(_timestep_embedding(t, self.emb_dim).to(x.dtype)) + self.label_emb(labels.long())
        h0 = self.down1(self.inp(x), e)                  # (M, c, 8, 8)
        h = self.mid2(self.mid1(self.down(h0), e), e)    # (M, 2c, 4, 4)
        h = self.up1(torch.cat([self.up(h), h0], 1), e)  # (M, c, 8, 8)
        return self.out(h)


def _check_labels(labels, batch: int, name: str, top: int) -> None:
    """``labels`` (named ``name``) is a ``(batch,)`` integer tensor of classes ``0..top``; one host read (before any
    work)."""
    if (not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex()
            or labels.dtype == torch.bool):
        got = f"a {labels.dtype} tensor" if isinstance(labels, torch.Tensor) else repr(labels)
        raise TypeError(f"{name}: expected a ({batch},) integer tensor of classes 0..{top}, "
                        f"e.g. torch.full(({batch},), 3), got {got}")
    if labels.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > top:
        bad = lo if lo < 0 else hi
        more = " (omit labels for unconditional samples)" if top < NULL_LABEL else f" ({NULL_LABEL}: no label)"
        raise ValueError(f"{name}: classes must lie in 0..{top}, got {bad}{more}")


def digits_schedule() -> DiscreteVPSchedule:
    return DiscreteVPSchedule.from_betas("linear", 1000, 1e-4, 0.02)


def _check_placement(device, dtype) -> None:
    """A shipped model's ``device`` (one this machine has) and ``dtype`` (a floating torch.dtype or None), named."""
    check_device(device)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")


def load_digits_model(path: str | Path | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> Denoiser:
    """The shipped digits model as a :class:`Denoiser` (eps prediction, DDPM linear schedule).

    Raises:
        FileNotFoundError: the weights file is missing.
        ValueError: an empty, truncated or foreign weights file (see :func:`paratime.models.read_weights`).
    """
    path = Path(path) if path is not None else WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"path: no digits weights at {path}; run paratime train-digits to make them")
    state, meta = read_weights(path)
    net = load_weights(DigitsUNet, state, meta.get("config", {}), path, what="digits")
    _check_placement(device, dtype)
    net = net.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
    return Denoiser(net, digits_schedule(), "eps", sample_shape=(1, 8, 8), uncond_fn=_null_labels)


def _null_labels(cond: dict) -> dict:
    """Unconditional inputs for classifier-free guidance: the "no label" class."""
    labels = cond.get("labels")
    if labels is None:
        raise ValueError("labels: guidance on the digits model needs labels=")
    return {**cond, "labels": torch.full_like(labels, NULL_LABEL)}


def _read_meta(path: Path) -> dict:
    """The training record stored beside the weights (``paratime`` metadata)."""
    return read_weights(path)[1]


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(1797, 1, 8, 8)`` float32 in [-1, 1] and ``(1797,)`` labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


def check_train_options(steps: int = 8000, batch: int = 256, lr: float = 2e-3, channels: int = 32, seed: int = 0,
                        ema: float = 0.999, label_drop: float = 0.1, threads: int | None = None) -> None:
    """The checks of :func:`train_digits`, before any data is loaded (the CLI runs them before it starts).

    Raises:
        TypeError: a non-integer ``steps``, ``batch``, ``channels``, ``seed`` or ``threads`` (None allowed), or a
            non-number ``lr``.
        ValueError: out of range: ``channels`` must be a multiple of 8 (GroupNorm's groups), ``ema`` and
            ``label_drop`` in [0, 1), ``lr`` finite and > 0.
    """
    check_int("steps", steps, 1)
    check_int("batch", batch, 1)
    check_int("channels", channels, 8)
    if channels % 8:
        raise ValueError(f"channels: must be a multiple of 8 (GroupNorm with 8 groups), got {channels}")
    check_int("seed", seed, 0)
    check_int("threads", threads, 1, none=True)
    check_number("lr", lr, 0, low_open=True)
    for name, value in (("ema", ema), ("label_drop", label_drop)):
        check_number(name, value, 0, 1)
        if value == 1:
            raise ValueError(f"{name}: must lie in [0, 1), got {value!r}")


def train_digits(out: str | Path | None = None, steps: int = 8000, batch: int = 256, lr: float = 2e-3,
                 channels: int = 32, seed: int = 0, ema: float = 0.999, label_drop: float = 0.1,
                 progress: bool = True, threads: int | None = None) -> dict:
    """Train the digits model (DDPM eps-loss, AdamW, cosine learning rate, EMA of the weights).

    Args:
        out: safetensors path to write (None: don't write). steps, batch, lr, seed, ema: the usual.
        channels: network width. label_drop: probability of training a sample with the "no label" class.
        threads: torch's thread count while training (None: as it is); restored afterwards.
    Returns:
        ``{"losses": [...], "seconds": ..., "meta": {...}}``.
    Raises:
        ValueError, TypeError: see :func:`check_train_options`.
    """
    check_train_options(steps=steps, batch=batch, lr=lr, channels=channels, seed=seed, ema=ema,
                        label_drop=label_drop, threads=threads)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(out, steps, batch, lr, channels, seed, ema, label_drop, progress)
    finally:
        torch.set_num_threads(before)


def _train(out, steps, batch, lr, channels, seed, ema, label_drop, progress) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = load_digits_data()
    net = DigitsUNet(channels=channels)
    ema_net = DigitsUNet(channels=channels)
    ema_net.load_state_dict(net.state_dict())
    ema_net.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=min(0.3, max(0.05, 3.0 / steps)))
    ac = digits_schedule().alphas_cumprod.float()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = progress_bar(steps, "train-digits", unit="step") if progress else None
    for it in range(steps):
        # Sample a batch, a timestep per sample, noise; the eps-prediction loss.
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(batch, generator=g) < label_drop, NULL_LABEL, y)
        t = torch.randint(0, ac.numel(), (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(net(xt, t.float(), y), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema, (1 + it) / (10 + it))
            for pe, p in zip(ema_net.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        training_step(bar, losses, it, 50)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    meta = {"config": ema_net.config, "steps": steps, "batch": batch, "lr": lr, "seed": seed, "ema": ema,
            "label_drop": label_drop, "final_loss": sum(losses[-200:]) / len(losses[-200:]),
            "train_seconds": round(seconds, 1), "torch": torch.__version__}
    if out is not None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in ema_net.state_dict().items()}
        save_file(state, str(out), metadata={"paratime": json.dumps(meta)})
        log.info("wrote %s", out)
    return {"losses": losses, "seconds": seconds, "meta": meta}
