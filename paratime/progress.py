"""Progress display: a tqdm bar over the time points, fed by the methods' per-round :class:`RoundInfo`.

Display only; reading ``info.begin`` costs one device-to-host copy per round, so the bar is off in benchmarks and
sync-count tests (``progress=False``).
"""

from __future__ import annotations

import math
from typing import Callable

from .methods import RoundInfo

__all__ = ["RoundProgress"]


class RoundProgress:
    """A context manager whose instances are ``on_round`` callbacks: they advance a bar (when ``show``) to the
    slowest sample's first unconverged point and then call ``callback``.

    Args:
        total: time points N. desc: the bar's label. show: draw a bar at all. callback: the user's callback.
    """

    def __init__(self, total: int, desc: str, show: bool, callback: Callable[[RoundInfo], None] | None = None):
        self.callback = callback
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="pt", leave=False)

    def __call__(self, info: RoundInfo) -> None:
        if self.bar is not None:
            pos = int(info.begin.min())
            self.bar.update(pos - self.bar.n)
            post = {"round": info.round}
            if math.isfinite(info.residual):       # sequential steps have no residual to show
                post["residual"] = f"{info.residual:.3g}"
            self.bar.set_postfix(post)
        if self.callback is not None:
            self.callback(info)

    def __enter__(self) -> "RoundProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
