"""Window update rules for Picard-type methods: ``picard``, ``secant`` and ``anderson`` (see
:mod:`paratime.methods.picard` for the maths and the notation: window start ``p``, slot ``k`` holds point ``p + k`` and
produces the new value of point ``p + k + 1``).

An :class:`UpdateRule` takes one round's step increments at the window points and returns Picard's new values, their
rms change (which decides acceptance under every rule) and the rule's own values; it keeps, per window slot, the
history it needs (secant: the point's last evaluation; anderson: its last values and residuals), shifted with the
window by :meth:`UpdateRule.shift`.

Shapes: window tensors are ``(W, B, *shape)``; flattened features ``D``; history stacks ``(m, W, B, ...)``, newest
first.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from paratime.kernels import cumsum0, picard_update

from ..checks import check_int

__all__ = ["UPDATES", "CARRIES", "HISTORY", "UpdateRule", "SAFEGUARD", "ANDERSON_REG", "gain_span"]

UPDATES = ("secant", "picard", "anderson")
#: the updates whose values carry each point's change down the window within the round (the secant's Newton
#: recurrence; Picard moves a change one point a round, Anderson mixes past iterates): the final stop rule reads it
#: (:class:`~paratime.methods.stops.FinalPointStop` ``carried``)
CARRIES = frozenset({"secant"})
#: past rounds each update keeps per window point: secant its last evaluation (:attr:`UpdateRule.last`), anderson
#: its last m values and residuals (ParaTAA's memory, less the current round; :attr:`UpdateRule.hist`)
HISTORY = {"picard": 0, "secant": 1, "anderson": 3}
SAFEGUARD = 10.0   # largest accepted ratio of a secant correction to the Picard one
#: the window gain counts a point only when its change exceeds GAIN_FLOOR x its step (smaller: converged)
GAIN_FLOOR = 1e-3
#: ... and over GAIN_SHARE of the grid's points, at least 2 and at most GAIN_SPAN (see :func:`gain_span`)
GAIN_SPAN, GAIN_SHARE = 8, 0.08
#: Tikhonov weight of the Anderson least squares, relative to the mean diagonal of its normal matrix (scale-free:
#: ParaTAA's absolute 1e-3, sized for 4x32x32 latents, is ~all of the normal matrix on a 2-D model)
ANDERSON_REG = 1e-3


def gain_span(steps: int) -> int:
    """The points the window gain is taken over on a grid of ``steps`` steps: :data:`GAIN_SHARE` of them (the same
    share of the trajectory on every grid), at least 2, at most :data:`GAIN_SPAN` (8 on the 100-step grids the
    amplification guard was tuned on; 2 on 20 steps, 4 on 50).

    A coarse grid's larger steps stretch an iterate's change more per point: over 8 points of a 20-step grid (40% of
    the trajectory) the digits U-Net's DPM++(2M) windows read gains up to 16 on ordinary samples, and 8 of 64 were
    rolled back for nothing (each within 0.15 of tol without the guard; a batch of 64 on a window of 8 took 17 rounds
    instead of 12). Over 2 points none is, and the 3-D mixture and ``gmm`` on 20-step grids (DDIM, DPM++(2M), 4,000
    samples, tol 1e-1 ... 1e-4) still hold every row."""
    return min(GAIN_SPAN, max(2, round(GAIN_SHARE * steps)))


class UpdateRule:
    """One of :data:`UPDATES` with its per-slot history (explicit state, made once per sample call).

    Args:
        name: ``picard``, ``secant`` or ``anderson``.
        gain: measure the window's gain (:attr:`gain`, which the amplification guard reads) under every rule:
            ``picard`` and ``anderson`` then keep each point's last evaluation too (the secant's history, two more
            window-sized buffers). Without it no rule measures it, the secant included (where no guard runs, as under
            ``stop="paradigms"``, it took 45 of the secant's 170 us a round on the policy).
        span: the consecutive points the gain is taken over (:func:`gain_span` of the grid).
    Raises:
        ValueError: an unknown ``name``, a ``span`` < 1. TypeError: a ``span`` that is not an integer.
    """

    def __init__(self, name: str, gain: bool = False, span: int = GAIN_SPAN):
        if name not in UPDATES:
            raise ValueError(f"update: unknown {name!r}; allowed: {', '.join(UPDATES)}")
        check_int("span", span, 1)
        self.name, self.span = name, span
        #: each window point's last evaluation ``(y, dy, ok)``, ``(W, B, ...)``: the secant's pairs, and what the
        #: window's gain is measured from (kept by the secant always, by ``picard`` / ``anderson`` with ``gain``)
        self.last: tuple[torch.Tensor, ...] | None = None
        self.keep_last = gain or name == "secant"
        self.measures = gain                                          # take the window's gain each round
        #: anderson: its ``(m, W, B, ...)`` stacks of past values, residuals and ok, newest first
        self.hist: tuple[torch.Tensor, ...] | None = None
        self.depth = HISTORY[name] if name == "anderson" else 0
        #: the rule's own change can stall while the one-step defect does not (Anderson's least squares): a stop rule
        #: must read the larger of the two
        self.stalls = name == "anderson"
        #: ``(B,)`` this round's window gain (:func:`_window_gain`), None before a round with a last evaluation (and
        #: without ``gain``)
        self.gain: torch.Tensor | None = None
        self._b_row: torch.Tensor | None = None                      # (1, B) sample index of :meth:`shift`

    def __call__(self, start: torch.Tensor, dy: torch.Tensor, old: torch.Tensor, y_win: torch.Tensor,
                 valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One round's update of the window's points ``p+1 .. p+W``.

        Args:
            start: ``(B, *shape)`` the window starts ``y_p``. dy: ``(W, B, *shape)`` step increments at the window
                points (0 at invalid slots). old: ``(W, B, *shape)`` the current values of points ``p+1 .. p+W``.
            y_win: ``(W, B, *shape)`` the states the increments were taken at. valid: ``(W, B)`` slots in use.
        Returns:
            ``(new, err, new_rule)``: Picard's values ``(W, B, *shape)``, their rms change ``(W, B)`` (the cumulative
            one-step defect from the window start: it decides acceptance under every rule, as a small accelerated
            change does not imply a small defect), and the rule's values (``new`` itself for ``picard`` and in the
            first round).
        """
        new, err = picard_update(start, dy, old)                      # fused kernel or reference
        new_rule, self.gain = new, None
        W, B = dy.shape[:2]
        if self.last is not None:         # no previous evaluation anywhere in the first round
            hy, hd, ok = (h if h.shape[0] == W else h[:W] for h in self.last)
            ok = ok & valid
            if self.name == "secant":
                dy_sec, self.gain = _secant_increment(dy, new, old, y_win, hy, hd, ok,
                                                      self.span if self.measures else None)
                new_rule, _ = picard_update(start, dy_sec, old, want_err=False)
            elif self.measures:
                d = dy.reshape(W, B, -1)
                self.gain = _window_gain((y_win - hy).reshape(W, B, -1), d - hd.reshape(W, B, -1), d, ok,
                                         self.span)
        if self.keep_last:
            self.last = (y_win, dy, valid)
        if self.depth:
            hist = self.hist
            if hist is not None:          # no previous values anywhere in the first round: Picard's values
                new_rule = _anderson_values(new, old, hist[0][:, :W], hist[1][:, :W], hist[2][:, :W] & valid)
            entry = (old, new - old, valid)
            self.hist = (tuple(e[None] for e in entry) if hist is None else
                         tuple(torch.cat([e[None], h[:self.depth - 1, :W]]) for e, h in zip(entry, hist)))
        return new, err, new_rule

    def shift(self, k: torch.Tensor, stride: torch.Tensor) -> None:
        """Move each slot's history with its point when the window slides by ``stride`` ``(B,)``; ``k`` is the
        ``(W, 1)`` slot index. Slots whose point entered the window start without history."""
        if self.hist is None and self.last is None:
            return
        src = k + stride                                              # (W, B) slot the point came from
        keep = src < k.shape[0]
        src = src.clamp_max(k.shape[0] - 1)
        b = self._b_row
        if b is None or b.shape[1] != stride.shape[0]:
            b = self._b_row = torch.arange(stride.shape[0], device=stride.device)[None]   # (1, B), made once
        if self.hist is not None:
            self.hist = (self.hist[0][:, src, b], self.hist[1][:, src, b], self.hist[2][:, src, b] & keep)
        if self.last is not None:
            self.last = (self.last[0][src, b], self.last[1][src, b], self.last[2][src, b] & keep)


def _secant_increment(dy, new_pic, old, y_win, hist_y, hist_dy, hist_ok, span=GAIN_SPAN):
    """The secant update's increments ``dy_j + u_j c_j`` for one round.

    Args:
        dy: ``(W, B, *shape)`` Picard increments at the window points (0 at invalid slots).
        new_pic, old: ``(W, B, *shape)`` Picard's new and the old values of the points they update.
        y_win: ``(W, B, *shape)`` the states they were evaluated at.
        hist_y, hist_dy: ``(W, B, *shape)`` each point's previous evaluation state and increment.
        hist_ok: ``(W, B)`` whether that previous evaluation exists (and the slot is valid).
        span: the points the gain is taken over (:func:`_window_gain`), or None: no gain (nobody reads it).
    Returns:
        ``(increments, gain)``: ``(W, B, *shape)`` increments to accumulate from the window start, and the
        window's ``(B,)`` gain from the same pairs (:func:`_window_gain`; None with ``span`` None).
    """
    W, B = dy.shape[:2]
    d, yw, hy, hd = (t.reshape(W, B, -1) for t in (dy, y_win, hist_y, hist_dy))
    change = (new_pic - old).reshape(W, B, -1)                            # Picard's change of points p+1 .. p+W
    s, u = yw - hy, d - hd                                                # (W, B, D)
    ss, uu = (s * s).sum(-1), (u * u).sum(-1)                             # (W, B); x * x: pow(2)'s bits, faster
    gain = None if span is None else _window_gain(s, u, d, hist_ok, span, ss)
    use = (hist_ok & (ss > 0) & (uu <= SAFEGUARD**2 * ss))[..., None]     # (W, B, 1)
    zero = _zero(d)
    s_hat = torch.where(use, s / ss[..., None], zero)
    u = torch.where(use, u, zero)
    # (I - L) c = r per sample, L strictly lower triangular; r_j = s_hat_j . delta_j with delta_0 = 0 and
    # delta_j = change_{j-1} (the same change at points p .. p+W-1).
    r = F.pad((s_hat[1:] * change[:-1]).sum(-1, keepdim=True), (0, 0, 0, 0, 1, 0)).transpose(0, 1)  # (B, W, 1)
    # L[b, j, l] = s_hat_j . u_l; the unit lower-triangular solve reads only the strictly lower part of -L.
    neg_L = torch.bmm(s_hat.transpose(0, 1), u.permute(1, 2, 0)).neg_()  # (B, W, W)
    c = torch.linalg.solve_triangular(neg_L, r, upper=False, unitriangular=True).transpose(0, 1)   # (W, B, 1)
    corr = u * c                                                          # (W, B, D)
    # Per-sample fallback to Picard when the secant change of any point exceeds SAFEGUARD x the largest Picard one.
    return (d + torch.where(_sane(cumsum0(corr), change), corr, zero)).reshape(dy.shape), gain


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-d zero of ``like``'s dtype and device, made once per pair (``torch.where``'s 0 operand: a number would
    make one each call)."""
    return _zero_of(like.dtype, like.device)


@functools.lru_cache(maxsize=None)
def _zero_of(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device)


def _window_gain(s, u, d, hist_ok, span=GAIN_SPAN, ss=None):
    """``(B,)`` how much the window's steps stretch a change of the trajectory, measured on the points' own two last
    evaluations: per point the one-step map ``F(y) = y + dy(y)`` stretches ``s = y - y'`` (this round's state less
    the previous round's) into ``F(y) - F(y') = s + u`` (``u = dy - dy'``), a gain ``|s + u| / |s|`` (2-norm over
    the features); the window's gain is the largest product over ``span`` consecutive points (all of a shorter
    window; :func:`gain_span` of the grid), a point without both evaluations counting 1. The changes are the
    iterates' errors, so this is the growth of exactly the errors a frozen point carries, along the window's steps:
    about 1 on an ordinary trajectory, far above it where the trajectory crosses between modes (the samples whose
    frozen errors the end amplifies hundreds of times).

    Args:
        s, u: ``(W, B, D)`` each point's change of state ``y - y'`` and of increment ``dy - dy'`` (the secant pairs
            of :func:`_secant_increment`). d: ``(W, B, D)`` this round's increments. hist_ok: ``(W, B)`` whether
            the previous evaluation exists. span: consecutive points the product is taken over. ss: ``(W, B)``
            ``(s * s).sum(-1)`` where the caller has it (the secant's), else None.
    """
    W, B = s.shape[:2]
    t = s + u                                                             # F(y) - F(y')
    ss = (s * s).sum(-1) if ss is None else ss
    tt, dd = (t * t).sum(-1), (d * d).sum(-1)                             # (W, B)
    # A change below GAIN_FLOOR x the step itself is converged: its ratio would be the network's rounding. (ss >
    # GAIN_FLOOR^2 dd >= 0 implies ss > 0: dd, a sum of squares, is >= 0, or NaN and the test false.)
    use = hist_ok & (ss > GAIN_FLOOR**2 * dd) & (tt < torch.inf)          # tt >= 0: finite (NaN: false)
    tiny = torch.finfo(ss.dtype).tiny
    log_gain = torch.where(use, 0.5 * (tt.clamp_min(tiny).log() - ss.clamp_min(tiny).log()), _zero(ss))
    # The largest stretch over span consecutive points (the whole window when shorter): a long window's product
    # would grow with its length on any trajectory.
    span = min(span, W)
    total = F.pad(log_gain.cumsum(0), (0, 0, 1, 0))                       # (W + 1, B), a 0 row in front
    return (total[span:] - total[:W + 1 - span]).amax(0).exp()


def _sane(extra, change):
    """``(1, B, 1)`` whether a sample's accelerated change is usable this round: its largest correction ``extra`` (the
    accelerated values less Picard's, ``(W, B, D)``) is finite and <= SAFEGUARD x its largest Picard change
    ``change`` ``(W, B, D)``; where not, the sample takes Picard's values."""
    # The bound clamped to the largest float: an infinite extra is refused even against an infinite bound (one
    # comparison instead of a finiteness test; a NaN on either side compares false).
    bound = (SAFEGUARD * change.abs().amax((0, 2), keepdim=True)).clamp_max(torch.finfo(change.dtype).max)
    return extra.abs().amax((0, 2), keepdim=True) <= bound


def _anderson_values(new_pic, old, hist_x, hist_r, hist_ok):
    """ParaTAA's triangular Anderson step (Tang et al. 2024) on the window's points ``p+1 .. p+W``.

    The residual of point j is Picard's change ``R_j = new_j - old_j`` (the cumulative one-step defect from the
    window start: ParaTAA's residual of order W). With the point's m previous values and residuals,
    ``dX_j = [x_j - x_j^(1) ..]``, ``dR_j = [R_j - R_j^(1) ..]`` (``D x m``), Anderson (type II) sets
    ``x_j^new = x_j + R_j - (dX_j + dR_j) g_j``; triangular: ``g_j`` fits the residuals of the points up to j only
    (those point j depends on), ``g_j = argmin sum_{l<=j} |R_l - dR_l g|^2 + lam_j |g|^2`` with
    ``lam_j = ANDERSON_REG * mean diag(sum_{l<=j} dR_l^T dR_l)`` (relative, where ParaTAA's is absolute). Columns
    without history are 0; the per-sample fallback to Picard is the secant one.

    Args:
        new_pic, old: ``(W, B, *shape)`` Picard's new values and the old values of points p+1 .. p+W.
        hist_x, hist_r: ``(m, W, B, *shape)`` those points' values and residuals in earlier rounds, newest first.
        hist_ok: ``(m, W, B)`` whether each exists.
    Returns:
        ``(W, B, *shape)`` the accelerated values.
    """
    W, B = old.shape[:2]
    m = hist_ok.shape[0]
    x, R = old.reshape(W, B, -1), (new_pic - old).reshape(W, B, -1)
    ok, zero = hist_ok[..., None], x.new_zeros(())
    dX = torch.where(ok, x - hist_x.reshape(m, W, B, -1), zero)          # (m, W, B, D)
    dR = torch.where(ok, R - hist_r.reshape(m, W, B, -1), zero)
    # Normal equations summed over the points up to j: (W, B, m, m) and (W, B, m, 1).
    G = torch.einsum("iwbd,jwbd->wbij", dR, dR).cumsum(0)
    g = torch.einsum("iwbd,wbd->wbi", dR, R).cumsum(0)[..., None]
    lam = ANDERSON_REG * G.diagonal(dim1=-2, dim2=-1).mean(-1)           # (W, B); 1 where G = 0 (no history)
    G = G + torch.where(lam > 0, lam, 1.0)[..., None, None] * torch.eye(m, dtype=G.dtype, device=G.device)
    gamma = torch.linalg.solve_ex(G, g)[0][..., 0]                        # (W, B, m)
    corr = torch.einsum("wbi,iwbd->wbd", gamma, dX + dR)
    return (new_pic.reshape(W, B, -1) - torch.where(_sane(corr, R), corr, zero)).reshape(old.shape)
