"""``reach``: a 2-D point robot that must reach a goal past obstacles, with a scripted *bimodal* expert.

Layout of one episode (all coordinates in the unit box ``[-1, 1]^2``):

    start  s = (-0.8, U(-0.3, 0.3)),   goal  g = (0.8, U(-0.3, 0.3)),   u = (g - s) / |g - s|,  n = u rotated +90 deg
    K obstacles (discs) on the segment s -> g at fractions f_k = (k + 1) / (K + 1) + U(-0.03, 0.03), moved along
    n by U(-0.02, 0.02), radii r_k ~ U(0.11, 0.15). Every obstacle blocks the straight path.

Dynamics: ``p <- p + v`` per step with ``|v| <= max_speed``. An episode succeeds when ``|p - g| <= goal_tol`` before
``max_steps`` and fails at the first step that ends inside a disc (a collision).

Expert: per episode and obstacle it picks a side ``side_k`` in {-1, +1} at random (the two modes), and steers at
full speed through two waypoints beside each disc, ``w_k^{in, out} = c_k -+ r_k u + side_k (r_k + margin) n`` (so it
passes every disc at ``margin`` and crosses between discs clear of both), then to the goal (slowing to land on it).
It is a feedback law of the position and the sides only: the current waypoint is the first one the robot has not yet
passed along ``u``. The *mean* over the modes heads straight into the first obstacle.

Actions are normalised velocities ``a = v / max_speed`` (norm <= 1); a chunk is ``(H, 2)``, the next H actions.
Observations are ``(B, 6 + 3K)``: ``[p, g - p, a_prev, (c_k - p, r_k) for each k]``, float32, with ``a_prev`` the
last executed action (0 at the start). Without it a re-planning robot between two waypoints cannot tell which side
it was heading for, and a chunk drawn from the other mode steers it into the disc (Diffusion Policy conditions on
two observation steps for the same reason).

Every function is vectorised over episodes; randomness depends on ``(seed, episode index)`` only, never on how
episodes are batched. This module is pure torch: it imports nothing from paratime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int, check_number

__all__ = ["ReachConfig", "Episodes", "make_episodes", "observe", "step", "expert_actions", "expert_chunk",
           "rollout_expert", "make_dataset", "collides", "clearance", "chunk_path", "mean_path_fails"]


@dataclass(frozen=True)
class ReachConfig:
    """The task's constants.

    Attributes:
        obstacles: K, discs per episode. horizon: H, actions per chunk. n_exec: actions of a chunk executed
        before re-planning. max_speed: distance per step at action norm 1. goal_tol: success radius.
        max_steps: episode length limit. margin: the expert's clearance beyond each disc's radius.
    """

    obstacles: int = 2
    horizon: int = 16
    n_exec: int = 8
    max_speed: float = 0.05
    goal_tol: float = 0.05
    max_steps: int = 80
    margin: float = 0.15

    def __post_init__(self):
        for name in ("obstacles", "horizon", "n_exec", "max_steps"):
            check_int(name, getattr(self, name), 1)
        if self.n_exec > self.horizon:
            raise ValueError(f"n_exec: must be <= horizon={self.horizon}, got {self.n_exec}")
        for name in ("max_speed", "goal_tol", "margin"):
            check_number(name, getattr(self, name), 0, low_open=True)

    @property
    def obs_dim(self) -> int:
        return 6 + 3 * self.obstacles


@dataclass
class Episodes:
    """A batch of episodes: fixed layouts, the expert's side choices, and the moving state.

    Attributes (B episodes, K obstacles; float64): start, goal, pos, last_action ``(B, 2)``; centers ``(B, K, 2)``;
    radii ``(B, K)``; sides ``(B, K)`` in {-1, +1} (the expert's mode); steps ``(B,)`` long; success, collided
    ``(B,)`` bool.
    """

    start: torch.Tensor
    goal: torch.Tensor
    centers: torch.Tensor
    radii: torch.Tensor
    sides: torch.Tensor
    pos: torch.Tensor
    steps: torch.Tensor
    success: torch.Tensor
    collided: torch.Tensor
    last_action: torch.Tensor | None = None

    def __post_init__(self):
        if self.last_action is None:
            self.last_action = torch.zeros_like(self.pos)

    @property
    def done(self) -> torch.Tensor:
        return self.success | self.collided

    def __len__(self) -> int:
        return self.pos.shape[0]


def _check_config(config) -> ReachConfig:
    if config is None:
        return ReachConfig()
    if not isinstance(config, ReachConfig):
        raise TypeError(f"config: expected a ReachConfig, got {type(config).__name__}")
    return config


def make_episodes(n: int, seed: int = 0, first: int = 0, config: ReachConfig | None = None) -> Episodes:
    """Episodes ``first .. first + n - 1`` of the seeded set ``seed`` (each one's layout and expert sides depend on
    ``(seed, index)`` only).

    Args:
        n: number of episodes. seed: the set's seed. first: index of the first episode.
        config: the task's constants (default :class:`ReachConfig`).
    Returns:
        :class:`Episodes` at their start positions.
    Raises:
        TypeError: a non-integer ``n``, ``first`` or ``seed`` (bool included). ValueError: ``n`` < 1, a negative
            ``first``.
    """
    config = _check_config(config)
    check_int("n", n, 1)
    check_int("first", first, 0)
    check_int("seed", seed)
    K = config.obstacles
    # One generator per episode, keyed by (seed, index): the same episode whatever the batch it is made in.
    # Columns of u01: start y, goal y, then K each of along-path jitter, lateral jitter, radius, expert side.
    u01 = torch.empty(n, 2 + 4 * K, dtype=torch.float64)
    for e in range(n):
        g = torch.Generator().manual_seed((seed * 1_000_003 + first + e) % 2**62)
        u01[e] = torch.rand(2 + 4 * K, generator=g, dtype=torch.float64)
    jitter, lateral, radius, side = u01[:, 2:].reshape(n, 4, K).unbind(1)        # (B, K) each
    start = torch.stack([torch.full((n,), -0.8, dtype=torch.float64), 0.6 * u01[:, 0] - 0.3], 1)
    goal = torch.stack([torch.full((n,), 0.8, dtype=torch.float64), 0.6 * u01[:, 1] - 0.3], 1)
    u, nrm = _axes(start, goal)
    length = (goal - start).norm(dim=1, keepdim=True)                             # (B, 1)
    frac = torch.arange(1, K + 1, dtype=torch.float64) / (K + 1) + 0.06 * jitter - 0.03
    centers = (start[:, None] + (frac * length)[..., None] * u[:, None]
               + (0.04 * lateral - 0.02)[..., None] * nrm[:, None])               # (B, K, 2)
    return Episodes(start, goal, centers, 0.11 + 0.04 * radius, torch.where(side < 0.5, -1.0, 1.0).double(),
                    start.clone(), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool),
                    torch.zeros(n, dtype=torch.bool))


def _axes(start: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit path direction ``u`` and its normal ``n`` (u rotated by +90 degrees), ``(B, 2)`` each."""
    u = (goal - start) / (goal - start).norm(dim=1, keepdim=True)
    return u, torch.stack([-u[:, 1], u[:, 0]], 1)


def observe(ep: Episodes) -> torch.Tensor:
    """The policy's observation ``[p, g - p, a_prev, (c_k - p, r_k) for each k]``, ``(B, 6 + 3K)`` float32."""
    rel = torch.cat([ep.centers - ep.pos[:, None], ep.radii[..., None]], 2)       # (B, K, 3)
    return torch.cat([ep.pos, ep.goal - ep.pos, ep.last_action, rel.flatten(1)], 1).float()


def clearance(pos: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Signed distance from points ``(..., 2)`` to the nearest disc edge (negative inside), ``(...)``.

    ``centers`` ``(B, K, 2)`` and ``radii`` ``(B, K)``; ``pos`` is ``(B, 2)`` or ``(B, T, 2)``.
    """
    if pos.ndim == 3:
        d = (pos[:, :, None] - centers[:, None]).norm(dim=-1) - radii[:, None]    # (B, T, K)
    else:
        d = (pos[:, None] - centers).norm(dim=-1) - radii                         # (B, K)
    return d.min(-1).values


def collides(pos: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether points ``(B, 2)`` (or ``(B, T, 2)``) lie inside any disc, boolean ``(B,)`` (or ``(B, T)``)."""
    return clearance(pos, centers, radii) < 0


def step(ep: Episodes, actions: torch.Tensor, config: ReachConfig | None = None) -> Episodes:
    """Apply one normalised action per episode to the episodes not yet done (in place), and return them.

    Actions are clipped to norm 1 (speed ``max_speed``). Success is checked after the move, then collisions.

    Raises:
        TypeError: ``actions`` is not a tensor. ValueError: ``actions`` is not ``(B, 2)``, or not finite where an
            episode is still running (a NaN action moved the robot to NaN, an episode that then ran to its time
            limit uncounted as a failure of the policy).
    """
    config = _check_config(config)
    if not isinstance(actions, torch.Tensor):
        raise TypeError(f"actions: expected a tensor, got {type(actions).__name__}")
    if actions.shape != (len(ep), 2):
        raise ValueError(f"actions: expected shape ({len(ep)}, 2), got {tuple(actions.shape)}")
    a = actions.to(torch.float64)
    live = ~ep.done & (ep.steps < config.max_steps)
    if not bool(torch.isfinite(a[live]).all()):
        raise ValueError("actions: not finite for a running episode (the policy's output)")
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1.0)
    ep.pos = torch.where(live[:, None], ep.pos + config.max_speed * a, ep.pos)
    ep.last_action = torch.where(live[:, None], a, ep.last_action)
    ep.steps = ep.steps + live.long()
    ep.collided = ep.collided | (live & collides(ep.pos, ep.centers, ep.radii))
    ep.success = ep.success | (live & ~ep.collided & ((ep.pos - ep.goal).norm(dim=1) <= config.goal_tol))
    return ep


def expert_actions(pos: torch.Tensor, ep: Episodes, config: ReachConfig | None = None) -> torch.Tensor:
    """The expert's normalised action at positions ``pos`` ``(B, 2)`` for the episodes' layouts and sides.

    Waypoints ``w_k^{in, out} = c_k -+ r_k u + side_k (r_k + margin) n``; the target is the first waypoint not yet
    passed along the path axis ``u``, else the goal, approached at full speed (the goal: at most the remaining
    distance).
    """
    config = _check_config(config)
    u, nrm = _axes(ep.start, ep.goal)
    beside = ep.centers + (ep.sides * (ep.radii + config.margin))[..., None] * nrm[:, None]     # (B, K, 2)
    along_r = ep.radii[..., None] * u[:, None]                                                  # (B, K, 2)
    way = torch.stack([beside - along_r, beside + along_r], 2).flatten(1, 2)                   # (B, 2K, 2) in order
    way = torch.cat([way, ep.goal[:, None]], 1)                                                # (B, 2K + 1, 2)
    along = ((way - ep.start[:, None]) * u[:, None]).sum(-1)                                   # (B, K + 1)
    here = ((pos - ep.start) * u).sum(-1, keepdim=True)                                        # (B, 1)
    passed = along[:, :-1] <= here + 1e-9
    k = passed.long().sum(1)                                                    # waypoints are ordered along u
    target = way[torch.arange(len(pos)), k]                                                    # (B, 2)
    delta = target - pos
    dist = delta.norm(dim=1, keepdim=True).clamp_min(1e-12)
    speed = torch.where(k[:, None] == way.shape[1] - 1, (dist / config.max_speed).clamp_max(1.0), 1.0)
    return delta / dist * speed


def expert_chunk(ep: Episodes, config: ReachConfig | None = None) -> torch.Tensor:
    """The expert's next ``H`` normalised actions from the current positions, ``(B, H, 2)`` float64."""
    config = _check_config(config)
    pos, out = ep.pos.clone(), []
    for _ in range(config.horizon):
        a = expert_actions(pos, ep, config)
        out.append(a)
        pos = pos + config.max_speed * a
    return torch.stack(out, 1)


def chunk_path(pos: torch.Tensor, chunk: torch.Tensor, config: ReachConfig | None = None) -> torch.Tensor:
    """Positions visited by executing a chunk ``(B, H, 2)`` from ``pos`` ``(B, 2)``: ``(B, H, 2)``."""
    config = _check_config(config)
    a = chunk.to(torch.float64)
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1.0)
    return pos[:, None] + config.max_speed * a.cumsum(1)


def rollout_expert(ep: Episodes, config: ReachConfig | None = None, noise: float = 0.0,
                   generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the expert closed loop (in place) until every episode is done or out of time.

    Args:
        noise: std of a Gaussian push added to the position after every step (DART-style data augmentation: the
            expert's labels then cover states off its own path). generator: for that noise.
    Returns:
        ``(observations, chunks)``: per step, the observations ``(B_t, obs_dim)`` and the expert chunks
        ``(B_t, H, 2)`` of the episodes still running at that step.
    """
    config = _check_config(config)
    obs, chunks = [], []
    while True:
        live = ~ep.done & (ep.steps < config.max_steps)
        if not bool(live.any()):
            return obs, chunks
        chunk = expert_chunk(ep, config)
        obs.append(observe(ep)[live])
        chunks.append(chunk[live].float())
        step(ep, chunk[:, 0], config)
        if noise > 0:
            push = noise * torch.randn(ep.pos.shape, generator=generator, dtype=torch.float64)
            ep.pos = torch.where((~ep.done)[:, None], ep.pos + push, ep.pos)


def make_dataset(episodes: int, seed: int = 0, config: ReachConfig | None = None,
                 noise: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert demonstrations: every visited state's observation and the expert's chunk from it.

    Args:
        episodes: number of demonstrations: episodes ``0 .. episodes - 1`` of the set ``seed`` (sets with other
            seeds have other layouts). seed: data seed. noise: DART push std per step (see :func:`rollout_expert`).
    Returns:
        ``obs`` ``(M, obs_dim)`` and ``chunks`` ``(M, H, 2)``, float32; states whose expert chunk would hit a disc
        (rare pushes into an obstacle) are dropped.
    Raises:
        TypeError, ValueError: ``episodes`` not an integer >= 1, ``noise`` not a finite number >= 0.
    """
    config = _check_config(config)
    check_int("episodes", episodes, 1)
    check_number("noise", noise, 0)
    ep = make_episodes(episodes, seed=seed, config=config)
    gen = torch.Generator().manual_seed(seed)
    obs, chunks = rollout_expert(ep, config, noise, gen)
    obs, chunks = torch.cat(obs), torch.cat(chunks)
    K = config.obstacles
    rel = obs[:, 6:].reshape(-1, K, 3)
    path = chunk_path(torch.zeros(len(obs), 2, dtype=torch.float64), chunks, config)        # relative to p
    keep = clearance(path, rel[..., :2].double(), rel[..., 2].double()).min(1).values > 0
    return obs[keep], chunks[keep]


def mean_path_fails(ep: Episodes, config: ReachConfig | None = None) -> torch.Tensor:
    """Whether the *average* of the expert's modes, rolled out closed loop, fails: ``(B,)`` bool.

    At each position the action is the mean over all ``2^K`` side choices, what a unimodal regressor of the expert
    learns: the modes' sideways parts cancel, so it heads straight at the first disc and either hits it or, as its
    forward part vanishes near the waypoints, stalls in front of it until time runs out. The task needs a generative
    policy where this fails.
    """
    config = _check_config(config)
    K = config.obstacles
    combos = torch.tensor([[1.0 if (c >> k) & 1 else -1.0 for k in range(K)] for c in range(2 ** K)],
                          dtype=torch.float64)                                               # (2^K, K)
    probe = Episodes(ep.start, ep.goal, ep.centers, ep.radii, ep.sides, ep.start.clone(),
                     torch.zeros(len(ep), dtype=torch.long), torch.zeros(len(ep), dtype=torch.bool),
                     torch.zeros(len(ep), dtype=torch.bool))
    while bool((~probe.done & (probe.steps < config.max_steps)).any()):
        acts = []
        for c in combos:
            probe.sides = c.expand(len(ep), K)
            acts.append(expert_actions(probe.pos, probe, config))
        step(probe, torch.stack(acts).mean(0), config)
    return ~probe.success
