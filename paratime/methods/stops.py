"""Stop rules of Picard-type methods: when a sample is returned, and the window-slide (acceptance) tolerance that
goes with it.

A stop rule is one small object made per sample call by :func:`make_stop`:

    rule.accept                 the acceptance tolerance, noise-level units: point j+1 is accepted (and the window
                                slides past it) when rms(y_{j+1}^new - y_{j+1}^old) <= accept * n_{j+1}
    rule.start(B, x0, noise)    fresh per-sample state (``x0``: the initial state ``(B, *shape)``, model frame,
                                which gives device and dtype and, under the ``final`` rule, the first bound on each
                                sample's own scale; ``noise``: the initial noise's std in the model frame, 0-d)
    rule.trust(start)           records the window starts ``start`` ``(B, *shape)`` (accepted points) each round: the
                                ``final`` rule caps each sample's own scale by them (:data:`TRUST_SCALE`)
    rule.bound(values, old)     ``final``: the window's new values ``(W, B, *shape)`` with those past the cap held at
                                their previous values ``old``, and ``(W, B)`` which (:meth:`FinalPointStop.bound`)
    rule.accept_scale(final)    ``(B,)`` factor on each sample's acceptance threshold this round, or None (1); ``final``
                                ``(B, *shape)`` the final points' current values (model frame; a sliding window
                                that ends before N passes its estimate there, D at the window end)
    rule(done, moved, final, window_moved)
                                -> done, after each round: ``done`` ``(B,)`` the samples whose every point is accepted,
                                ``moved`` ``(B,)`` the max-abs change of each sample's final point this round (inf
                                while the final point is outside its window), ``window_moved`` ``(B,)`` the largest
                                max-abs change of any point of its window this round; returns the samples to stop
    rule.reopen                 after a call: ``(B,)`` the samples whose every point was accepted but whose final
                                point still moved by more than the tolerance (their window re-opens), or None

Rules are elementwise on device tensors (no host read), so every rank of an SPMD backend decides the same.

    paradigms   stop when every point is accepted, accept = tol (ParaDiGMS's tolerance and rule)
    final       stop when the final point moved by <= 2 tol (max-abs, data units: tol times the data scale) in
                each of the last two rounds, by no more than in the round before each (a change that grows is not
                quiet), the remaining error estimated from their contraction is <= tol, and no point of the window
                moved by more than tol / 10 in the last round (the whole window is quiet). Under the secant update
                with a deterministic solver (``carried``) the window is quiet too when no point of it moved by more
                than the final point (and where the contraction slowed, the estimate reads its trend, up to 10x the
                last change), and one quiet round is enough when the final point's last three changes contracted by
                <= 0.3 each and 8x the estimate (its trend read too) is <= tol. Or when every point is accepted and
                the final point moved by <= tol (else the last window re-opens).
                Acceptance: accept = accept_tol (default :func:`default_accept_tol`: an accepted point is frozen, so
                its error must stay well below the target) times the data scale, tightened by tol / (final point's
                last change) while that change exceeds tol
"""

from __future__ import annotations

import torch

from .common import max_abs
from .updates import CARRIES, UPDATES

__all__ = ["STOPS", "DEFAULT_TOL", "TAIL_FRACTION", "default_accept_tol", "gain_limit", "make_stop", "FinalPointStop",
           "AllAcceptedStop"]

STOPS = ("final", "paradigms")
#: tolerance used when none is given: max |sample - sequential sample| for ``final``; ParaDiGMS's for ``paradigms``
DEFAULT_TOL = {"final": 2e-3, "paradigms": 0.1}
#: ``final`` rule: a sample stops after QUIET_ROUNDS rounds whose final-point change is <= QUIET_SCALE x tol, when
#: ESTIMATE_SAFETY x its estimated remaining error is <= tol too and no point of its window moved by more than
#: WINDOW_QUIET_SCALE x tol in the last round (see :class:`FinalPointStop`)
QUIET_ROUNDS, QUIET_SCALE, ESTIMATE_SAFETY, WINDOW_QUIET_SCALE = 2, 2.0, 1.0, 0.1
#: ``final`` rule, ``carried`` (secant update, deterministic solver): one quiet round is enough when the final point's
#: last three changes contracted by <= QUICK_RATIO each and QUICK_SAFETY x the estimate is <= tol (see ``__call__``)
QUICK_RATIO, QUICK_SAFETY = 0.3, 8.0
#: ``final`` rule, ``carried``: where the ratio of the final point's successive changes rose, the contraction estimate
#: reads the next ratio the trend predicts (``ratio^2 / previous``), at most TREND_CAP: 10 / 11, whose tail is 10x the
#: last change, so a sample whose contraction slows stops only once its final point moved by <= WINDOW_QUIET_SCALE x
#: tol (the level the window's absolute test asks of every point, which the carried test relaxes; see ``__call__``).
#: Cost: +0.7% evaluations a sample over the whole-grid secant rows of ``python -m paratime.bench.bound_hunt --models
#: mix3,gmm --solvers plms,lms,dpmpp_2m,dpmpp_3m,deis,unipc,ddim,heun --windows all`` (seed 0, tol 2e-3 and 0.1; a
#: batch's rounds 795 -> 802 summed); sliding windows as before it (``python -m paratime.bench.accuracy_sweep --cases
#: mix3-ddim20-w8,gmm-dpmpp2m20-w8,mix3-dpmpp2m20-w8 --tols 0.1,0.01``, 4,000 samples: five rows the same, one 47.8 ->
#: 47.9 evaluations a sample); the headline unchanged
TREND_CAP = 1 / (1 + WINDOW_QUIET_SCALE)
ROUNDING = 1e-9                 # final-point changes below ROUNDING x tol count as none
#: ``final`` rule, any update: a sample whose window stretches its iterates' changes by more than its gain
#: limit in one round (a trajectory crossing between modes) is rolled back to ROLLBACK x its window start (the grid's
#: start: every point it kept was accepted at the plain acceptance), once, with acceptance TIGHTEN x stricter from
#: then on (see :meth:`FinalPointStop.amplified`). The limit is the acceptance's margin under the target times the
#: budget (``GAIN_BUDGET[sliding] * tol / accept``, at least GAIN_MIN; see :func:`gain_limit`): a quarter in a window
#: of the whole grid, a sixth in a sliding window
GAIN_BUDGET, GAIN_MIN, ROLLBACK, TIGHTEN = (1 / 4, 1 / 6), 2.0, 0.0, 0.01
#: ``final`` rule, each sample's own scale (``scale`` None): at most TRUST_SCALE x the largest max-abs of a point it
#: has accepted (the initial state, then each window start) or the initial noise's std (:meth:`FinalPointStop.trust`).
#: A window whose iterates diverge (the plain update on the guided ring's consistency step, window 32: they grow ~5x a
#: round) read its own scale from them (D at the window end, the final point) and met a tolerance relative to it with
#: samples ~1e5 off; the default secant update on ``gmm``'s consistency step (100 steps, windows 32 and 100) froze
#: points accepted relative to such a transient (a scale of 1e7 for a sample of max-abs 2.9), ending 350-1,070x over
#: tol in another mode (9 of 64 samples of seed 1 at window 32; all within 0.05 of tol with the cap). The final
#: points and window ends of converging runs read up to 51x the cap's base (gmm DDPM-100, a whole window's early
#: rounds; 19x the guided ring at guidance 3) in tests/test_accuracy.py, test_equivalence.py and test_picard_*.py, so
#: 100 leaves them as they were; the divergence passes it within a few rounds. The cap only tightens acceptance and
#: the stop, and at any scale holds the window's points past it at their previous values
#: (:meth:`FinalPointStop.bound`: the plain update on the policy's consistency step overflowed float32 at its fixed
#: scale).
TRUST_SCALE = 100.0
#: ``final`` rule: acceptance relative to the target, and how much stricter it is for a stochastic solver in a window
#: of the whole grid (False) or a sliding one (True; see :func:`default_accept_tol`)
ACCEPT_SCALE, STOCHASTIC_SCALE = 1 / 30, (1 / 10, 1 / 100)
#: ``final`` rule, default acceptance of a deterministic solver: the points of the last TAIL_FRACTION[sliding] of the
#: grid accept TAIL_SCALE[sliding] x more strictly, in a window of the whole grid (False) or a sliding one (True; see
#: :func:`default_accept_tol`)
TAIL_FRACTION, TAIL_SCALE = (1 / 4, 1 / 2), (1 / 10, 3 / 10)


def default_accept_tol(tol: float, stochastic: bool = False, sliding: bool = False) -> float:
    """The window-slide tolerance (noise-level units) of the ``final`` rule: ``tol / 30``, and for a ``stochastic``
    solver ``tol / 300`` in a window of the whole grid, ``tol / 3000`` in a ``sliding`` one; a deterministic solver's
    late points accept more strictly still (:data:`TAIL_FRACTION`, :data:`TAIL_SCALE`; :class:`FinalPointStop`
    ``tail``).

    An accepted point is frozen, and its error reaches the final point amplified, so acceptance must be stricter than
    the target. How much stricter depends on what acceptance buys:

    - In a window of the whole grid the final point decides when a sample stops, and acceptance only saves
      evaluations; there the margin is wide. An ordinary ODE trajectory amplifies a frozen error up to ~5x (``gmm``
      DDIM-100, a sample near a mode boundary; the secant iterates' cumulative defect underestimates their error up
      to ~3x more); a stochastic solver's far more (the reverse SDE's drift pulls apart twice as hard as the ODE's:
      on ``gmm`` DDPM-100, 1 sample in 4,000 moves ~3e4x per unit change of a mid-trajectory point, and ``tol / 30``
      left it 49x over tol, issue 17; with the amplification guard, at its limit 7.5, still 3.1x at tol 0.1 on seed
      0 and 12.6x at 0.03 on seed 1, rolling back 339-384 of 4,000 samples), so ``tol / 300`` there, its guard at 75
      for the rarer sample that stretches more: on ``gmm`` and the 3-D mixture DDPM-100, seeds 0-3, the worst of
      4,000 samples at 0.05-0.48 of tol, 0-6 rolled back, for 4-6% fewer evaluations than the ``tol / 3000`` of
      before (``gmm`` 876 -> 834, the mixture 1140 -> 1074 at tol 0.1, seed 0; a batch's rounds equal or one
      fewer) and the tiny SD pipeline's DDPM-100 922 -> 899 per sample (diffusers' ParaDiGMS class: 902).
      ``tol / 10`` here fails the 3-D mixture's DPM++(2M) at tol 0.1 (8.6x) and ``tol / 300`` costs the digits
      U-Net 31% more evaluations (DDIM-100, batch 16), so the whole grid keeps ``tol / 30``, except on the last
      quarter of a deterministic solver's grid (:data:`TAIL_FRACTION`), which accepts at ``tol / 300``: the 3-D
      mixture's two most sensitive samples of held-out seed 1 (one moving 1,580x per unit change of its initial
      noise) cross between modes in the last steps, and points accepted there at ``tol / 30`` left them 10.5x over
      tol 0.1 (the first half strict: still 10.5x; the last quarter: 0.22x), for 2-3% more evaluations on digits
      DDIM-100 (rounds unchanged). :class:`FinalPointStop` ``tail`` carries that factor.
    - In a sliding window acceptance drives the slide, so the rounds: ``tol / 10`` takes 4-11% fewer rounds than
      ``tol / 30`` (digits DDIM-50, window 4: 19.5 -> 17.3 mean rounds at tol 0.1), but the error it freezes can grow
      along the whole path at a rate no window sees. Digits DDIM-50 at the default tol, each sample alone, windows
      sized to K compute-bound devices: sample 105 of 512 stretches errors ~1.3x a step over its last 15 steps (~100x
      from step 32 to 50; its 8-point window gain read 1.6-1.9) and ended 1.48x over tol at ``tol / 10`` (window 8);
      ``tol / 20`` held it (0.45x), but on 2,048 samples sample 881 (~1.4x a step over its last 12) ended at 0.77x
      of tol (window 4), and ``tol / 30`` holds both windows' worst at 0.36x for 1% more cost on K devices (N / SCE
      2.01x -> 2.00x on 4, 2.92x -> 2.89x on 8). But 881's margin was the luck of those windows: on windows of 3 / 5 / 7
      it ended 0.99x / 1.77x / 1.06x of tol, from points accepted in the
      grid's second half that its late stretch then amplified, so a deterministic solver's sliding window accepts
      the last half of its grid at 0.3 of that (:data:`TAIL_FRACTION`, :data:`TAIL_SCALE`: ``tol / 100``; at
      ``tol / 60``, 881 reached 0.67x on a window of 12). Over 4,096 digits DDIM-50 samples
      (``benchmarks/sliding_worst.py``) the worst was then 0.04-0.24 of tol on each window of 2-8 and 16, 0.47 on 12
      (881), against 0.17-1.77 before, for 0.1-0.8 more rounds a sample (1-3%); with the carried stop (and the
      trend, :data:`TREND_CAP`) 0.05-0.30 on 2-8, 0.46 on 12, 0.23 on 16 (README, *Windows between the planner's*).
      The rarer trajectory that amplifies more within a window is caught by the amplification guard
      (:func:`gain_limit`: 5 here).
    - A stochastic solver's sliding window accepts at ``tol / 3000`` (:data:`STOCHASTIC_SCALE`). Digits DDPM-50 window 8
      (0.14x) and DDPM-100 window 16 (0.20x) held at ``tol / 20``, but ``gmm`` DDPM-100 window 8 at fixed data scales
      (the batch's median or max sample max-abs, or 1; 4,000 samples, seeds 0-3, tol 0.1-0.01, every update: 108 runs)
      did not at ``tol / 30``: sample 1566 (seed 1) ended 1.59x over tol 0.1 (scale 1, secant) and 7.7x over 0.03 (scale
      4.87, secant; 8.8x picard), 2691 (seed 2) up to 17.8x (picard, tol 0.01; ``python -m
      paratime.bench.fixed_scale_worst --accept 30``), each rolled back by the guard too late: errors frozen before it
      stretch along the path after the window has passed (each sample's own scale hid this while it read the final
      point's stale first guess, ~65x stricter). Nor at ``tol / 300`` (208, seed 0, 1.28x; 1566 7.0x), at ``tol / 300``
      with its guard held at 5 (2691, picard, rolled back: 1.78x) or at ``tol / 1000`` (1566, picard, scale 4.87, tol
      0.1: 2.10x; ``tol / 500`` 2.55x: a sample this sensitive, ~3e4x per unit change of a mid-trajectory point, is not
      monotone in acceptance below ~``tol / 2000``). At ``tol / 3000`` (its guard at 500, idle: no sample rolled back in
      any of the runs below) the worst of the 108 is 0.09 of tol (``tol / 2000``: 0.14); with each sample's own scale (D
      at the window end) gmm DDPM-100 window 8 (seeds 0-3, tol 0.1-1e-4) 0.046, the 3-D mixture's (seeds 0-1, tol
      0.1-1e-3) 0.057 and digits DDPM-50 windows 4 and 8 (64 samples, tol 0.1-2e-3) 0.039 of tol, every update. Its cost
      on the headline cases, rounds / evaluations against ``tol / 30``: gmm DDPM-1000 (window 100) 45 / 4,086 against 45
      / 3,774 (diffusers' class 48 / 4,470), the policy's DDPM-100 (window 32) 26 / 710 against 24 / 567 (class 26 /
      597), digits DDPM-1000 (window 100) 53 / 4,764 against 44 / 3,646 (class 53 / 4,195)."""
    return tol * ACCEPT_SCALE * (STOCHASTIC_SCALE[sliding] if stochastic else 1.0)


def gain_limit(tol: float, accept: float, sliding: bool = False) -> float:
    """The amplification guard's limit for acceptance ``accept`` under target ``tol`` (both per unit data scale) in a
    ``sliding`` window or one of the whole grid: ``GAIN_BUDGET[sliding] * tol / accept``, at least :data:`GAIN_MIN`,
    inf when ``accept`` is 0 (nothing is frozen early).

    A point is accepted with an error up to ``accept`` per unit noise level; a window that stretches such errors by
    more than a fraction of the margin ``tol / accept`` could carry them past that fraction of the target. On the
    whole grid the fraction is a quarter: 7.5 with its ``tol / 30``, and 75 with the stochastic
    whole grid's ``tol / 300`` (it rolls back 0-6 of 4,000 ``gmm`` and 3-D mixture DDPM-100 samples, see
    :func:`default_accept_tol`; 750 with the ``tol / 3000`` of before left it idle). A third (10) let the 3-D
    mixture's sample 942 (held-out seed 3, DDIM-100, tol 0.1; 2,410x per unit change of its initial noise, rank 1 of
    4,000) converge steadily to another mode, 8.6x over tol, its window stretching 8.1x; a quarter rolls it back
    (0.22x) for no change of a sample's mean rounds on seeds 0, 1, 3 and 5 (5 run once, after the change). A sliding
    window takes a sixth (5 with its ``tol / 30``; 3.3 with the ``tol / 20`` of before): no sweep sample needs less
    there (the limit rolls back the mixture's sample 1534, whose window stretches 7.5x; a stochastic solver's
    ``tol / 3000`` gives 500, idle: its frozen errors grow past the window, see :func:`default_accept_tol`), and a
    rollback costs the batch the rounds its window must redo (at 2.5 the policy's batch of 64, window 32, took 28
    rounds instead of 23)."""
    return max(GAIN_MIN, GAIN_BUDGET[sliding] * tol / accept) if accept > 0 else float("inf")


class AllAcceptedStop:
    """``paradigms``: a sample stops when every point is accepted, at ``accept = tol`` (noise-level units)."""

    name = "paradigms"

    def __init__(self, tol: float):
        self.tol = self.accept = tol
        self.tail, self.tail_fraction = 1.0, 0.0

    def start(self, B: int, x0: torch.Tensor, noise_scale: torch.Tensor | None = None) -> None:
        pass

    reopen = None
    scale_b = None          # no data scale: its tolerance is in noise-level units

    def trust(self, start: torch.Tensor) -> None:
        """No data scale to cap."""

    def accept_scale(self, final: torch.Tensor) -> None:
        return None

    def __call__(self, done: torch.Tensor, moved: torch.Tensor, final: torch.Tensor,
                 window_moved: torch.Tensor | None, from_last: torch.Tensor | None = None) -> torch.Tensor:
        return done


def _finite(change: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(change)`` of a change (a max-abs: >= 0, inf or NaN) in one call (isfinite takes four): inf
    and NaN compare false."""
    return change < torch.inf


class FinalPointStop:
    """``final``: a sample stops when its final point is quiet, judged in data units ``tol_b = tol * scale_b``.

    ``scale``: the data scale ``tol`` is relative to, a number (1: absolute units; a model's declared scale), or
    None for each sample's own: the max-abs of its final point's current value (read from the trajectory each
    round, so it follows the sample as it converges; :meth:`accept_scale` reads what the caller passes, which for a
    sliding window that ends before N is D at the window end, :func:`paratime.methods.picard.sample_picard`: the
    final point there still holds its first guess, on ``gmm`` a median 0.015x the sample's max-abs, which made
    acceptance ~65x stricter than meant), at most :data:`TRUST_SCALE` x the largest max-abs of a point the sample
    has accepted (:meth:`trust`) or of the initial noise's std. It stops when its final point was quiet (moved by <=
    ``tol_b * QUIET_SCALE`` and by no more than the round before) for :data:`QUIET_ROUNDS` rounds and the error
    estimate from the contraction of those changes is
    <= ``tol_b / ESTIMATE_SAFETY`` (see ``__call__``); ``tol = 0`` waits for every point to be accepted (the exact
    fixed point). ``carried``: one quiet round suffices when the last three changes contracted fast
    (:data:`QUICK_RATIO`, :data:`QUICK_SAFETY`), and the window counts as quiet when no point of it moved by more
    than the final point; where the contraction slowed, the estimate reads its trend (:data:`TREND_CAP`).

    Acceptance (:meth:`accept_scale`) is in the same units, ``accept * scale_b`` per unit noise level, and tightens
    while the final point still moves: by ``tol_b / moved_b`` (the last round's change) when that is below 1, so a
    sample is never finished by acceptance alone while its final point moves by more than its tolerance (frozen
    points carry their error to the end). A sliding window that has not reached the final point (``moved`` inf)
    keeps the plain tolerance: the slide is not slowed. ``tail``: the factor on the acceptance of the grid's last
    ``tail_fraction`` of points (:data:`TAIL_FRACTION` of the window's kind; 0 where ``tail`` is 1). State per
    sample: the quiet count and the last change.
    ``sliding``: the window is shorter than the grid (it sets the amplification guard's limit, :func:`gain_limit`).
    ``carried``: the update carries each point's change down the window within the round and the solver is
    deterministic (the secant update's Newton recurrence on an ODE solver's steps; see ``__call__``)."""

    name = "final"

    def __init__(self, tol: float, accept: float, scale: float | None = 1.0, tail: float = 1.0,
                 sliding: bool = False, carried: bool = False, relative: bool | None = None):
        self.tol, self.accept, self.scale, self.tail, self.carried = tol, accept, scale, tail, carried
        # Data units (relative to a scale, even one of exactly 1) or absolute; None: data units unless scale is 1
        self.relative = scale != 1.0 if relative is None else relative
        self.tail_fraction = TAIL_FRACTION[sliding] if tail != 1.0 else 0.0
        self.gain_limit = gain_limit(tol, accept, sliding)

    def start(self, B: int, x0: torch.Tensor, noise_scale: torch.Tensor | None = None) -> None:
        # Data units: acceptance per unit data scale is relative to the initial noise's scale in the model frame
        # (``noise_scale``: 1 for VP latents, sigma_max in VE), so a problem scaled as a whole decides alike; a data
        # scale of exactly 1 too (it was read as absolute units: acceptance sigma_max times looser on a VE model).
        self.noise_scale = noise_scale if self.relative and noise_scale is not None else 1.0
        self.quiet = torch.zeros(B, dtype=torch.long, device=x0.device)
        # The previous ratio; carried: stacked on the previous ratio of two finite changes (inf: none), (2, B), so a
        # rollback resets both in one fill
        self.last_ratio = torch.full((2, B) if self.carried else (B,), float("inf"), dtype=x0.dtype,
                                     device=x0.device)
        self.last_moved = torch.full((B,), float("inf"), dtype=x0.dtype, device=x0.device)   # previous change
        self.finished = torch.zeros(B, dtype=torch.bool, device=x0.device)
        self.reopen = self.finished                                           # samples to re-open this round
        self.scale_b = torch.full((B,), self.scale or 1.0, dtype=x0.dtype, device=x0.device)
        self.tight = torch.ones(B, dtype=x0.dtype, device=x0.device)    # acceptance factor of amplified samples
        # each sample's gain limit: inf once rolled back (at most once)
        self.limit = torch.full((B,), self.gain_limit, dtype=x0.dtype, device=x0.device)
        self._inf = torch.full((), float("inf"), dtype=x0.dtype, device=x0.device)
        if self.carried:        # the two estimates' safety factors (2, 1), filled, not copied
            self._safety = torch.full((2, 1), QUICK_SAFETY, dtype=x0.dtype, device=x0.device)
            self._safety[0] = ESTIMATE_SAFETY
        self.tol_b = self.tol * self.scale_b
        # The cap (B,): TRUST_SCALE x the largest max-abs of an accepted point (the initial state here, then each
        # window start, :meth:`trust`) or the initial noise's std (1 when not given), whichever is larger. It bounds
        # each sample's own scale and, at any scale, the window's iterates (:meth:`bound`); a declared scale is a
        # point's largest max-abs too (data of that scale must never be held)
        held = max_abs(x0)
        held = held.clamp_min(1.0) if noise_scale is None else torch.maximum(held, noise_scale)
        if self.scale is not None:
            held = held.clamp_min(self.scale)
        self.cap = TRUST_SCALE * held
        self._multiples()

    def _multiples(self) -> None:
        """The multiples of ``tol_b`` that ``__call__`` compares with: once per call where the scale is fixed, each
        round where it is the sample's own (:meth:`_refresh`)."""
        self._tol_tiny, self._tol_quiet = ROUNDING * self.tol_b, self.tol_b * QUIET_SCALE
        self._tol_window = WINDOW_QUIET_SCALE * self.tol_b

    def trust(self, start: torch.Tensor) -> None:
        """Record the window starts ``start`` ``(B, *shape)`` (model frame; accepted points) in :attr:`cap`."""
        self.cap = torch.maximum(self.cap, TRUST_SCALE * max_abs(start))

    def bound(self, values: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, wild)``: the window's new values ``(W, B, *shape)`` with each point whose max-abs exceeds its
        sample's :attr:`cap` kept at its previous value ``old`` ``(W, B, *shape)`` (bounded: written under the cap,
        or a guess), and ``(W, B)`` those points (their change this round reads as inf,
        :meth:`~paratime.methods.window.SlidingWindow.write`: a point held is no convergence, so their sample's
        window is not quiet). An update whose model of the step is wrong grows the unaccepted points geometrically
        (the plain update on the policy's consistency step, whose Jacobian is ~0: ~5x a round, non-finite in float32
        by step 78); held, they stay bounded while the window's first point, an exact step, slides it on. Converging
        runs never meet the cap (:data:`TRUST_SCALE`): the same bits. (Held at the window start instead, the
        points' window gain reads stretches: gmm's consistency step under the plain update, window 32, rolled back
        40 of 64 samples, 128 rounds for 100 steps against 94.)"""
        wild = max_abs(values, 2) > self.cap                                           # (W, B)
        values = torch.where(wild.reshape(*wild.shape, *([1] * (values.ndim - 2))), old, values)
        return values, wild

    def _refresh(self, final: torch.Tensor) -> None:
        """``scale_b``, ``tol_b`` ``(B,)`` from the final points ``(B, *shape)`` (model frame: the returned sample's
        units) when the scale is each sample's own: their max-abs, at most :attr:`cap`."""
        if self.scale is None:
            self.scale_b = torch.minimum(max_abs(final), self.cap)
            self.tol_b = self.tol * self.scale_b

    def accept_scale(self, final: torch.Tensor) -> torch.Tensor:
        """``(B,)`` the factor on each sample's acceptance threshold ``accept * n_j``: its data scale over the noise
        scale (1 in absolute units) times ``min(1, tol_b / moved_b)`` (1 while its final point is outside the
        window)."""
        self._refresh(final)
        # min(1, tol_b / moved_b) x tight as where(.., q x tight, tight): 1 x tight is tight (the same bits); x
        # scale_b only where it is not exactly 1 (a fixed scale of 1), / noise_scale where not the number 1
        gate = torch.where(_finite(self.last_moved) & (self.last_moved > self.tol_b),
                           self.tol_b / self.last_moved * self.tight, self.tight)
        if self.scale != 1.0:
            gate = gate * self.scale_b
        return gate if isinstance(self.noise_scale, float) and self.noise_scale == 1.0 else gate / self.noise_scale

    def amplified(self, gain: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``(B,)`` the samples to roll back this round: active, not rolled back before, and whose window stretched
        the iterates' changes by more than :func:`gain_limit` (:func:`paratime.methods.updates._window_gain`). A point
        accepted before such a stretch carries its error (up to ``accept * n_j``, which is sized for ordinary
        trajectories) into it: mixture samples crossing between modes end 10-35x over tol from points accepted in
        the low-noise half. Each such sample's acceptance tightens by :data:`TIGHTEN` for the rest of the run; the
        caller moves its window back to the grid's start (:data:`ROLLBACK`) and reads its final point's change this
        round as inf, which restarts its quiet count and its contraction chain (``__call__``). Never a second time
        (no endless rollbacks).

        To the grid's start, in a sliding window too: every point before its window was accepted at the plain
        acceptance, and a window whose iterates have converged reads no stretch (their changes fall under the gain's
        floor), so a stretch it has passed is not seen again. The 3-D mixture's sample 4 (seed 0, LMS-20, tol 2e-3;
        7,330x per unit change of its initial noise) on a window of 8 was rolled back at a gain of 5.65 (limit 5) from
        point 15 to half that, 7: the points it kept (errors up to 6e-3 of tol, accepted in its first three window
        rounds, while its gain read at most 1) reach its last steps, which stretch errors ~30x a step (4e-3 of tol at
        point 17, 3.8x at point 20); its window's gain then read 1 in every round and it ended 4.85x over tol
        (``picard``: 4.84x; tests/test_accuracy.py). A stricter acceptance after the rollback (TIGHTEN 1e-3 or 1e-4)
        leaves it there (4.89x); from the start it ends at 0.09x (``picard``: 0.004x). Half the start, with a second
        rollback to the start at a gain over the whole margin ``tol / accept`` (30), was the sliding window's rule
        before: a window of 8 at tol 0.1 under ``anderson`` ended 1.14x over tol (0.008x from the start), and where the
        second came it cost more rounds than one to the start (window 4: 33 against 26; windows of 32: 12% more of a
        batch's rounds). One to the start costs a batch whose one sample it rolls back late the rounds to redo the grid:
        +6.6-10.9% of a batch's rounds summed over sliding windows of 4, 8 and 32 on gmm and the mixture, up to +26 on
        a 100-step grid; a sample's mean rounds +0.1-1.6% (README, *Amplification guard*). A window of the whole grid
        went to the start already (it covers every point, so only acceptance is undone: no slide to redo); half its
        start left the mixture's sample 4 at tol 0.1 4.5x over and gmm's sample 212 (DPM++(2M) SDE-100, seed 1,
        Anderson) 3.4x, meeting gains up to 962 after it (0.21x and 0.82x from the start), for +0 / +6% of a batch's
        rounds summed over the whole grids at tol 2e-3 / 0.1 (+2 to +3 on 20-step grids)."""
        if not self.tol > 0:
            return torch.zeros_like(active)
        back = active & (gain > self.limit)
        self.limit = self.limit.masked_fill(back, torch.inf)
        self.tight = self.tight.masked_fill(back, TIGHTEN)
        return back

    def __call__(self, done: torch.Tensor, moved: torch.Tensor, final: torch.Tensor,
                 window_moved: torch.Tensor, from_last: torch.Tensor | None = None) -> torch.Tensor:
        self._refresh(final)
        if self.tol > 0:
            if self.scale is None:
                self._multiples()
            # Every point accepted is not enough while the final point still moves by more than tol_b: its error then
            # sits in frozen points, so the sample's window re-opens (:attr:`reopen`) instead; not where a window of
            # one point started at the last step's point (``from_last``): the final point came from that accepted
            # point alone, and the re-opened window (the same one) would compute the same value.
            self.reopen = done & ~self.finished & (moved > self.tol_b)
            if from_last is not None:
                self.reopen = self.reopen & ~from_last
            done = done ^ self.reopen                                      # done & ~reopen: reopen is within done
            # Quiet: moved <= QUIET_SCALE * tol_b and no more than the round before, in QUIET_ROUNDS successive rounds.
            # Changes below ROUNDING * tol_b count as none (float rounding, not convergence, decides them).
            tiny = moved <= self._tol_tiny
            quiet = (moved <= self._tol_quiet) & ((moved <= self.last_moved) | tiny)
            self.quiet = (self.quiet + 1) * quiet                          # count on, or restart at 0
            # And the error estimate: with the contraction r of the final point's changes over the last two rounds
            # (the larger ratio; both < 1), the changes still to come sum to ~ moved r / (1 - r), which must be
            # <= tol_b / ESTIMATE_SAFETY. It rejects the plateaus of a stochastic full window (changes 1.14, 0.146,
            # 0.127, then 1.0: r = 0.87 estimates 0.85 to come) that two quiet rounds alone took for convergence.
            # Carried: where the ratio rose, r is at least the next ratio its trend predicts (ratio^2 / the previous,
            # at most TREND_CAP): a contraction that slows is not yet the rate of what follows, and the final point's
            # change, which the carried window test trusts above WINDOW_QUIET_SCALE * tol_b (below), must then meet
            # that level itself (10x it to come). Secant, PLMS-100, the 3-D mixture's sample 196 (seed 0, tol 0.1):
            # its final point changed by 3.79, 2.03, 0.188, 0.117 (ratios 0.09, 0.62: 0.19 to come, under tol_b
            # 0.212) while its error grew, 0.038, 0.15, 0.257; the next change was 0.256. Its last step (to sigma 0:
            # Adams-Bashforth of the last four points' eps) amplifies their previous round's states, and the secant's
            # own-point model of it carried the final point away (0.115 of its 0.117 was the secant's correction;
            # Picard's one-step defect read 0.058; the window's largest change was the final point's). DEIS-100's
            # sample 196 (ratios 0.14, 0.33) and LMS-100's 26 (0.14, 0.37) drifted alike, to 0.89x / 0.87x of tol.
            # Not carried, the window test's absolute level bounds the final point's change already (the trend
            # would change nothing). fmax: 0 / 0 (two changes below ROUNDING) is no trend.
            ratio = (moved / self.last_moved).masked_fill_(tiny, 0.0)       # inf / inf = nan: not contracting
            if self.carried:                                                # the chain's too (see below)
                ratios = torch.stack([ratio, torch.where(_finite(self.last_moved), ratio, self._inf)])   # (2, B)
                # the trend's previous ratio is the chain's (row 1): inf, no trend, after a change with no finite
                # predecessor, where row 0 holds moved / inf = 0 (read as a rise, it held every sample's second
                # change to tol / 10: +2.7% evaluations on windows of 8)
                rs = torch.fmax(torch.maximum(ratios, self.last_ratio),
                                (ratios * (ratios / self.last_ratio[1:])).clamp_max(TREND_CAP))
            else:
                ratios = ratio
                rs = torch.maximum(ratio, self.last_ratio)
            # the estimates x their safety, ESTIMATE_SAFETY (carried: and QUICK_SAFETY on the chain's), against tol_b
            # (r < 1 below: 1 - r > 0)
            estimates = moved * rs / (1 - rs)
            if self.carried:
                (r, r_quick), (small, small_quick) = rs.unbind(0), (estimates * self._safety <= self.tol_b).unbind(0)
            else:
                r = rs
                small = (estimates if ESTIMATE_SAFETY == 1 else ESTIMATE_SAFETY * estimates) <= self.tol_b
            # And the whole window quiet: the final point can sit still while earlier points still move, their change
            # reaching it rounds later, amplified (a trajectory on a boundary between modes: gmm DDPM-100, sample
            # 2625 at tol 0.1, final point quiet at round 4 with its error 6x tol; it moved again from round 5).
            # No point may have moved by more than WINDOW_QUIET_SCALE * tol_b this round (data units: each point's
            # change in the VP frame of data at scale_b, see :meth:`paratime.methods.window.SlidingWindow.write`).
            # Carried (the secant update, a deterministic solver): or by no more than the final point. The secant's
            # Newton recurrence carries each point's change down the window within the round, so the final point's
            # change already holds theirs (to its Jacobian models' accuracy) and its contraction estimate bounds what
            # follows; where the final point sits still while an earlier point moves more, the test still waits.
            # A stochastic solver's full window plateaus: there the relative test let samples end 6-14x over tol
            # under every update (gmm DDPM-100 at tol 0.1 and 0.03); Picard's and Anderson's updates do not carry a
            # change down the window within the round (Picard moves it one point a round), so they keep the
            # absolute test.
            window_calm = window_moved <= self._tol_window
            if self.carried:
                window_calm = window_calm | (_finite(moved) & (window_moved <= moved))
            # r < 1: both ratios < 1 (a NaN in either makes r NaN, which compares false)
            calm = (self.quiet >= QUIET_ROUNDS) & (r < 1) & small                # & window_calm, below
            # Carried, a fast contraction: one quiet round is enough when the last three changes (all finite: the
            # first change after the final point enters its window has no predecessor) contracted by <= QUICK_RATIO
            # each and QUICK_SAFETY x their estimate is <= tol_b. The secant converges superlinearly at the end of a
            # window; a steady contraction near 1 or a first change read as a contraction waits for two rounds.
            # (Only the carried rule reads the chain: ratios[1], r_quick above.) quiet: the count is >= 1. Both tests
            # need the window calm.
            if self.carried:
                calm = calm | (quiet & (r_quick <= QUICK_RATIO) & small_quick)
            self.last_moved, self.last_ratio = moved, ratios.nan_to_num_(nan=float("inf"))
            done = done | (calm & window_calm)
        self.finished = done
        return done


def make_stop(stop: str, tol: float | None, accept_tol: float | None = None, scale: float | None = 1.0,
              stochastic: bool = False, sliding: bool = False,
              update: str = "secant", relative: bool | None = None) -> AllAcceptedStop | FinalPointStop:
    """The stop rule ``stop`` at ``tol`` (None: :data:`DEFAULT_TOL`).

    Args:
        stop: one of :data:`STOPS`.
        tol: ``final``: the bound on max |returned - sequential sample| aimed at; ``paradigms``: ParaDiGMS's
            tolerance (noise-level units). 0 runs to the exact fixed point.
        accept_tol: ``final`` only: the acceptance tolerance (noise-level units); None: :func:`default_accept_tol`.
        scale: ``final`` only: the data scale ``tol`` and ``accept_tol`` are relative to (None: each sample's own
            max-abs, see :class:`FinalPointStop`). relative: ``final`` only: data units (True) or absolute (False,
            with ``scale`` 1); None: data units unless ``scale`` is 1.
        stochastic: the solver draws step noise (stricter default acceptance: tol / 300 in a window of the whole
            grid, tol / 3000 in a sliding one).
        sliding: a window shorter than the grid (acceptance drives the slide: a deterministic solver's tol / 30,
            its last half at tol / 100, where the whole grid's last quarter is at tol / 300; a stochastic solver's
            tol / 3000).
        update: the window update in use (:data:`paratime.methods.updates.UPDATES`): ``final``'s window-quiet test
            is relative to the final point's change under ``secant`` with a deterministic solver
            (:class:`FinalPointStop` ``carried``).
    Returns:
        the rule (see the module docstring).
    Raises:
        ValueError: an unknown ``stop`` or ``update``, a negative ``tol`` or ``accept_tol``, a ``scale`` <= 0, or
            a ``scale`` other than 1 or an ``accept_tol`` with ``paradigms`` (its tolerance is in noise-level units
            and is its acceptance).
    """
    if stop not in STOPS:
        raise ValueError(f"stop: unknown {stop!r}; allowed: {', '.join(STOPS)}")
    if update not in UPDATES:
        raise ValueError(f"update: unknown {update!r}; allowed: {', '.join(UPDATES)}")
    tol = DEFAULT_TOL[stop] if tol is None else float(tol)
    if not tol >= 0 or (accept_tol is not None and not accept_tol >= 0):
        raise ValueError(f"tol, accept_tol: must be >= 0, got {tol!r}, {accept_tol!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale: must be > 0 or None (the sample's own), got {scale!r}")
    if relative is False and scale != 1.0:
        raise ValueError(f"scale: absolute units (relative=False) take scale 1, got {scale!r}")
    if stop == "paradigms":
        if scale != 1.0 or relative:
            raise ValueError("scale: applies only to stop='final'; 'paradigms' takes tol in noise-level units")
        if accept_tol is not None:
            raise ValueError("accept_tol: applies only to stop='final'; 'paradigms' accepts a point at tol")
        return AllAcceptedStop(tol)
    accept = default_accept_tol(tol, stochastic, sliding) if accept_tol is None else float(accept_tol)
    # The default's stricter tail (a deterministic solver); a given accept_tol is flat.
    tail = TAIL_SCALE[sliding] if accept_tol is None and not stochastic else 1.0
    return FinalPointStop(tol, accept, scale, tail, sliding, carried=update in CARRIES and not stochastic,
                          relative=relative)
