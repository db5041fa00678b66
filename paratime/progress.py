"""Progress display: a tqdm bar over the time points, fed by the methods' per-round :class:`RoundInfo`.

Display only; reading ``info.begin`` costs one device-to-host copy per round, so the bar is off in benchmarks and
sync-count tests (``progress=False``).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, TextIO

from .methods import RoundInfo

__all__ = ["RoundProgress", "check_callback", "LineProgress", "progress_bar", "training_step", "LINE_INTERVAL_S"]

LINE_INTERVAL_S = 5.0     # off a terminal (a log, a pipe): one progress line this often, not a frame per step


def progress_bar(total: int, desc: str, unit: str = "it", stream: TextIO | None = None, leave: bool = False):
    """A progress display with tqdm's ``update`` / ``set_postfix`` / ``close`` / ``n``: a tqdm bar when ``stream``
    (default stderr) is a terminal, else a :class:`LineProgress` that writes a line every few seconds.

    Args:
        total: units of work. desc: the label. unit: the units' name. stream: where it writes. leave: keep the
            terminal bar after ``close``.
    """
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=stream)
    return LineProgress(total, desc, unit, stream)


def training_step(bar, losses: list[float], step: int, every: int) -> None:
    """Advance a training run's ``bar`` (or None: no display) by one step, showing the mean of the last ``every``
    losses every ``every`` steps and at the last step (the closing line showed the figure of the last multiple of
    ``every``: on a run of 20 steps, step 0's loss at 20/20)."""
    if bar is None:
        return
    if step % every == 0 or step + 1 == getattr(bar, "total", None):
        bar.set_postfix(loss=f"{sum(losses[-every:]) / len(losses[-every:]):.4f}")
    bar.update(1)


class LineProgress:
    """A progress display for logs: ``desc: n/total unit (p%), key=value..., elapsed Ns, ETA Ns`` written as one
    line at most every ``interval`` seconds, and once more at :meth:`close`.

    Args:
        total: units of work. desc: the label. unit: the units' name. stream: where lines go (default stderr).
        interval: seconds between lines. clock: the time source (seconds).
    """

    def __init__(self, total: int, desc: str, unit: str = "it", stream: TextIO | None = None,
                 interval: float = LINE_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.interval, self.clock = total, desc, unit, interval, clock
        self.stream = sys.stderr if stream is None else stream
        self.n, self.postfix, self.closed = 0, {}, False
        self._t0 = self._last = clock()
        self._written = None                  # n at the last line (close does not repeat it)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.interval:
            self._write(now)

    def set_postfix(self, ordered_dict: dict | None = None, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self, write: bool = True) -> None:
        """The closing line (unless the last one already said it, or ``write`` is False: the work failed)."""
        if not self.closed:
            self.closed = True
            if write and self._written != self.n:
                self._write(self.clock(), final=True)

    def _write(self, now: float, final: bool = False) -> None:
        self._last, self._written = now, self.n
        elapsed = now - self._t0
        # ETA from the mean rate so far: (total - n) / (n / elapsed); none on the closing line (work that ends short
        # of its total, a rollout whose episodes all finished early, is done).
        eta = f", ETA {(self.total - self.n) * elapsed / self.n:.0f}s" if 0 < self.n < self.total and not final \
            else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = "".join(f", {k}={v}" for k, v in self.postfix.items())
        self.stream.write(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}{post}, elapsed {elapsed:.0f}s{eta}\n")
        self.stream.flush()


def check_callback(callback) -> None:
    """A ``callback``: a callable ``callback(info)`` or None.

    Raises:
        TypeError: naming ``callback``.
    """
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable callback(info) or None, got {type(callback).__name__}")


class RoundProgress:
    """A context manager whose instances are ``on_round`` callbacks: they advance a bar (when ``show``) to the
    slowest sample's first unconverged point and then call ``callback``.

    Args:
        total: time points N. desc: the bar's label. show: draw a bar at all. callback: the user's callback.
    """

    def __init__(self, total: int, desc: str, show: bool, callback: Callable[[RoundInfo], None] | None = None):
        check_callback(callback)
        self.callback = callback
        self.bar = None
        if show:
            self.bar = progress_bar(total, desc, unit="pt")

    def __call__(self, info: RoundInfo) -> None:
        if self.bar is not None:
            pos = int(info.begin.min())
            post = {"round": info.round}
            if math.isfinite(info.residual):       # sequential steps have no residual to show
                post["residual"] = f"{info.residual:.3g}"
            self.bar.set_postfix(post)             # before update: a log line shows this round's figures
            self.bar.update(pos - self.bar.n)
        if self.callback is not None:
            self.callback(info)

    def __enter__(self) -> "RoundProgress":
        return self

    def __exit__(self, *exc) -> None:
        if isinstance(self.bar, LineProgress):
            self.bar.close(write=exc[0] is None)    # no progress line after an error or Ctrl-C
        elif self.bar is not None:
            self.bar.close()
