"""The embedded ``policy`` model: a diffusion policy for the ``reach`` task (:mod:`paratime.tasks.reach`).

Model: eps-prediction over an action chunk ``(H, 2) = (16, 2)`` of normalised velocities, conditioned on the
observation ``obs`` ``(M, 12)`` (robot, goal, last action, obstacles) and the DDPM timestep through FiLM (Perez et
al. 2018, as in Diffusion Policy, Chi et al. 2023): a residual MLP whose blocks scale and shift their hidden units by
a linear map of ``[time embedding, obs]``. About 0.3 M parameters: a call costs nearly the same for 1 row as for 100
on a CPU (it is dispatch-bound), the regime where Picard's batched window wins on wall-clock time.

Schedule: DDPM with 100 training steps and the ``squaredcos_cap_v2`` betas (Diffusion Policy's choice), so ``ddpm``
with ``steps=100`` visits every training timestep (DDPM-100).

Beside the policy the same file ships the unimodal baseline: :class:`MeanPolicy`, an MLP regressing the chunk on the
observation with a squared error. It learns the average of the expert's two modes, which runs into the obstacles.

Shipped weights: ``policy.safetensors`` beside this file (keys ``net.*`` and ``baseline.*``), made by
``paratime train-policy`` (see ``policy.json``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check_int, check_number
from ..denoiser import Denoiser
from ..models import load_weights, read_weights
from ..progress import progress_bar, training_step
from ..schedules import DiscreteVPSchedule
from ..tasks.reach import ReachConfig, make_dataset
# _read_meta: the record's reader, re-exported
from .digits import _check_placement, _read_meta, _timestep_embedding  # noqa: F401

__all__ = ["PolicyNet", "MeanPolicy", "policy_schedule", "load_policy_model", "load_baseline", "train_policy",
           "check_train_options", "WEIGHTS"]

log = logging.getLogger("paratime")
WEIGHTS = Path(__file__).with_name("policy.safetensors")
TRAIN_TIMESTEPS = 100


def policy_schedule() -> DiscreteVPSchedule:
    """DDPM, 100 training timesteps, squared-cosine betas."""
    return DiscreteVPSchedule.from_betas("squaredcos_cap_v2", TRAIN_TIMESTEPS)


class _FiLMBlock(nn.Module):
    """``h + W2 silu(FiLM(W1 silu(LN h), c))`` with ``FiLM(z, c) = z * (1 + scale(c)) + shift(c)``."""

    def __init__(self, width: int, cond: int):
        super().__init__()
        self.norm, self.lin1, self.lin2 = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, width)
        self.film = nn.Linear(cond, 2 * width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(c).chunk(2, dim=1)                   # (M, width) each
        z = self.lin1(F.silu(self.norm(h))) * (1 + scale) + shift
        return h + self.lin2(F.silu(z))


class PolicyNet(nn.Module):
    """eps-network ``(x (M, H, A), t (M,), obs (M, obs_dim)) -> (M, H, A)``.

    Args:
        obs_dim, horizon, action_dim: the task's sizes. width: hidden units. blocks: FiLM residual blocks.
        emb: sinusoidal time-embedding width. cond: width of the conditioning vector.
    """

    def __init__(self, obs_dim: int = 12, horizon: int = 16, action_dim: int = 2, width: int = 128, blocks: int = 4,
                 emb: int = 64, cond: int = 128):
        super().__init__()
        self.config = {"obs_dim": obs_dim, "horizon": horizon, "action_dim": action_dim, "width": width,
                       "blocks": blocks, "emb": emb, "cond": cond}
        self.emb_dim = emb
        self.cond = nn.Sequential(nn.Linear(emb + obs_dim, cond), nn.SiLU(), nn.Linear(cond, cond), nn.SiLU())
        self.inp = nn.Linear(horizon * action_dim, width)
        self.blocks = nn.ModuleList(_FiLMBlock(width, cond) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, horizon * action_dim))

    def check_cond(self, cond: dict, batch: int) -> None:
        """The sampler's conditioning hook (see :func:`paratime.config.check_cond`), run once per ``sample`` call:
        the policy needs ``obs``, a ``(batch, obs_dim)`` floating tensor.

        Raises:
            ValueError: ``obs`` missing, of the wrong shape, not finite, or another conditioning key. TypeError:
                not a floating-point tensor.
        """
        obs_dim = self.config["obs_dim"]
        unknown = sorted(set(cond) - {"obs"})
        if unknown:
            raise ValueError(f"{unknown[0]}: the policy takes only obs= as conditioning")
        obs = cond.get("obs")
        if obs is None:
            raise ValueError(f"obs: the policy needs the observation, a ({batch}, {obs_dim}) tensor "
                             f"(robot, goal, last action, obstacles; see paratime.tasks.reach)")
        if not isinstance(obs, torch.Tensor) or not obs.is_floating_point():
            raise TypeError(f"obs: expected a ({batch}, {obs_dim}) floating-point tensor, got "
                            f"{obs.dtype if isinstance(obs, torch.Tensor) else type(obs).__name__}")
        if tuple(obs.shape) != (batch, obs_dim):
            raise ValueError(f"obs: expected shape ({batch}, {obs_dim}), got {tuple(obs.shape)}")
        if not bool(torch.isfinite(obs).all()):         # once a call, before the work (else blamed on the network)
            raise ValueError("obs: contains NaN or inf")

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        c = self.cond(torch.cat([_timestep_embedding(t, self.emb_dim).to(x.dtype), obs.to(x.dtype)], 1))  # (M, cond)
        h = self.inp(x.flatten(1))                                                                      # (M, width)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h).view_as(x)


class MeanPolicy(nn.Module):
    """The unimodal baseline: ``obs (M, obs_dim) -> chunk (M, H, A)``, trained by squared error."""

    def __init__(self, obs_dim: int = 12, horizon: int = 16, action_dim: int = 2, width: int = 256):
        super().__init__()
        self.config = {"obs_dim": obs_dim, "horizon": horizon, "action_dim": action_dim, "width": width}
        self.shape = (horizon, action_dim)
        self.mlp = nn.Sequential(nn.Linear(obs_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, horizon * action_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mlp(obs).reshape(-1, *self.shape)


def _load_state(path: str | Path | None, prefix: str) -> tuple[Path, dict, dict]:
    path = Path(path) if path is not None else WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"path: no policy weights at {path}; run paratime train-policy to make them")
    state, meta = read_weights(path, prefix=prefix)
    return path, meta, state


def load_policy_model(path: str | Path | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> Denoiser:
    """The shipped diffusion policy as a :class:`Denoiser` (eps prediction, DDPM-100 schedule); condition it with
    ``obs=`` ``(B, obs_dim)`` when sampling ``(B, H, 2)`` chunks.

    Raises:
        FileNotFoundError: the weights file is missing.
        ValueError: an empty, truncated or foreign weights file (see :func:`paratime.models.read_weights`).
    """
    path, meta, state = _load_state(path, "net.")
    net = load_weights(PolicyNet, state, meta.get("config", {}), path, what="policy")
    _check_placement(device, dtype)
    net = net.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
    cfg = net.config
    # x0 clipped to the action range [-1, 1] (Diffusion Policy's clip_sample): at the first DDPM-100 steps
    # sqrt(alpha_bar) is ~1e-2, and an eps error there, divided by it, would throw the chunk far out of range.
    return Denoiser(net, policy_schedule(), "eps", clip_x0=1.0, sample_shape=(cfg["horizon"], cfg["action_dim"]))


def load_baseline(path: str | Path | None = None) -> MeanPolicy:
    """The shipped unimodal baseline (:class:`MeanPolicy`), in eval mode.

    Raises:
        FileNotFoundError: the weights file is missing.
    """
    path, meta, state = _load_state(path, "baseline.")
    base = load_weights(MeanPolicy, state, meta.get("baseline_config", {}), path, what="baseline policy")
    return base.eval().requires_grad_(False)


def _ema_update(ema_net: nn.Module, net: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema_net.parameters(), net.parameters()):
            pe.lerp_(p, 1 - decay)


def check_train_options(steps: int = 12000, batch: int = 256, lr: float = 1e-3, width: int = 128, blocks: int = 4,
                        episodes: int = 2000, seed: int = 0, ema: float = 0.999, baseline_steps: int | None = None,
                        threads: int | None = None) -> None:
    """The checks of :func:`train_policy`, before any data is made (the CLI runs them before it starts).

    Raises:
        TypeError: a non-integer ``steps``, ``batch``, ``width``, ``blocks``, ``episodes``, ``seed``,
            ``baseline_steps`` or ``threads``, or a non-number ``lr`` / ``ema``.
        ValueError: out of range: ``lr`` finite and > 0 (inf trains NaN weights), ``width``, ``blocks``, ``steps``,
            ``batch``, ``episodes`` >= 1, ``ema`` in [0, 1), ``threads`` >= 1 or None.
    """
    for name, value in (("steps", steps), ("batch", batch), ("width", width), ("blocks", blocks),
                        ("episodes", episodes)):
        check_int(name, value, 1)
    check_int("seed", seed, 0)
    check_int("baseline_steps", baseline_steps, 1, none=True)
    check_int("threads", threads, 1, none=True)
    check_number("lr", lr, 0, low_open=True)
    check_number("ema", ema, 0, 1)
    if ema == 1:
        raise ValueError(f"ema: must lie in [0, 1), got {ema!r}")


def train_policy(out: str | Path | None = None, steps: int = 12000, batch: int = 256, lr: float = 1e-3,
                 width: int = 128, blocks: int = 4, episodes: int = 2000, seed: int = 0, ema: float = 0.999,
                 baseline_steps: int | None = None, progress: bool = True, threads: int | None = None) -> dict:
    """Train the diffusion policy (DDPM eps-loss) and the mean-regression baseline on expert demonstrations.

    Same seed, same options and same thread count give the same losses and weights.

    Args:
        out: safetensors path to write (None: don't write). steps, batch, lr, seed, ema: the usual (AdamW, one-cycle
            learning rate, EMA of the policy's weights). width, blocks: the policy network's size.
        episodes: expert demonstrations (:func:`paratime.tasks.reach.make_dataset` with this seed).
        baseline_steps: training steps of the baseline (default ``steps // 4``). threads: torch threads while it
            trains (restored after; None: leave as is).
    Returns:
        ``{"losses": [...], "baseline_losses": [...], "seconds": ..., "meta": {...}, "net": PolicyNet,
        "baseline": MeanPolicy}``.
    Raises:
        ValueError, TypeError: see :func:`check_train_options`.
    """
    check_train_options(steps=steps, batch=batch, lr=lr, width=width, blocks=blocks, episodes=episodes, seed=seed,
                        ema=ema, baseline_steps=baseline_steps, threads=threads)
    baseline_steps = max(1, steps // 4) if baseline_steps is None else baseline_steps
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(out, steps, batch, lr, width, blocks, episodes, seed, ema, baseline_steps, progress)
    finally:
        torch.set_num_threads(before)


def _train(out, steps, batch, lr, width, blocks, episodes, seed, ema, baseline_steps, progress) -> dict:
    task = ReachConfig()
    t0 = time.perf_counter()
    obs_all, act_all = make_dataset(episodes, seed=seed, config=task)            # (n, obs_dim), (n, H, 2)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = PolicyNet(task.obs_dim, task.horizon, 2, width=width, blocks=blocks)
    ema_net = PolicyNet(**net.config)
    ema_net.load_state_dict(net.state_dict())
    ema_net.requires_grad_(False)
    base = MeanPolicy(task.obs_dim, task.horizon, 2)
    ac = policy_schedule().alphas_cumprod.float()
    def fit(model, n_steps, loss_fn, desc, on_step=None):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n_steps,
                                                    pct_start=min(0.3, max(0.05, 3.0 / n_steps)))
        losses: list[float] = []
        bar = progress_bar(n_steps, desc, unit="step") if progress else None
        for it in range(n_steps):
            idx = torch.randint(0, obs_all.shape[0], (batch,), generator=g)
            loss = loss_fn(obs_all[idx], act_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(it)
            losses.append(float(loss.detach()))
            training_step(bar, losses, it, 100)
        if bar is not None:
            bar.close()
        return losses

    def eps_loss(obs, x0):
        # A timestep per sample, noise, the eps-prediction loss.
        t = torch.randint(0, ac.numel(), (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t][:, None, None]
        return F.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float(), obs), eps)

    losses = fit(net, steps, eps_loss, "train-policy",
                 lambda it: _ema_update(ema_net, net, min(ema, (1 + it) / (10 + it))))
    base_losses = fit(base, baseline_steps, lambda obs, x0: F.mse_loss(base(obs), x0), "train-baseline")
    seconds = time.perf_counter() - t0
    tail = losses[-200:]
    meta = {"config": ema_net.config, "baseline_config": base.config, "task": asdict(task),
            "steps": steps, "baseline_steps": baseline_steps, "batch": batch, "lr": lr, "seed": seed, "ema": ema,
            "episodes": episodes, "samples": int(obs_all.shape[0]), "final_loss": sum(tail) / len(tail),
            "baseline_final_loss": sum(base_losses[-200:]) / len(base_losses[-200:]),
            "params": sum(p.numel() for p in ema_net.parameters()), "train_seconds": round(seconds, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if out is not None:
        from safetensors.torch import save_file

        state = {f"net.{k}": v.detach().contiguous() for k, v in ema_net.state_dict().items()}
        state.update({f"baseline.{k}": v.detach().contiguous() for k, v in base.state_dict().items()})
        save_file(state, str(out), metadata={"paratime": json.dumps(meta)})
        log.info("wrote %s", out)
    return {"losses": losses, "baseline_losses": base_losses, "seconds": seconds, "meta": meta,
            "net": ema_net.eval(), "baseline": base.eval()}
