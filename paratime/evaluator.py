"""Instrumentation around a backend: the ``evaluate(x, i, b)`` that methods call, with counting and the NaN check.

Nothing here forces a device-to-host copy per network call or per round, and a call adds almost no work: it keeps
its rows' steps and sample indices and the largest ``|D|`` of each row (NaN and inf propagate through the max).
:meth:`Evaluator.check` (once per round, from the methods' ``on_round``) reduces those maxima to one "any non-finite"
flag on the device and copies it to host memory without waiting (pinned memory on CUDA, with an event); the flag is
read from host memory once the copy has landed (on CUDA at the latest after the method's own read of the next
round; on the CPU at once), so a non-finite output stops the run one round late at most and costs no sync.
``check(wait=True)`` (once, at the end) waits. Under torch.distributed with more than one rank every rank must stop
at the same round (a rank that stops early leaves the others waiting in the next round's collective until
``timeout_s``), so there a check waits for the flag of the round before (recorded one round earlier, so it has
normally landed: the host is never more than a round ahead) instead of reading it only when it happens to have
landed, which differs from rank to rank. Only on a non-finite flag are the first offending step and sample
looked up (reads on the error path). Rows per sample are counted with one accumulating ``index_put_`` when
:attr:`Evaluator.rows` is read or a round is checked. Timing is the sampler's wall clock; communication figures come
from the backend.
"""

from __future__ import annotations

import numpy as np
import torch

from .backends import Backend
from .denoiser import NetworkOutputs
from .schedules import TimeGrid

__all__ = ["Evaluator", "NonFiniteOutputError"]


def _peaks(out: torch.Tensor) -> torch.Tensor:
    """``(M,)`` the max-abs of each row of ``out`` ``(M, ...)``: over its features in place (no flattened view; a
    max is exact in any order, NaN included)."""
    return out.abs().amax(tuple(range(1, out.ndim)))


class NonFiniteOutputError(FloatingPointError):
    """The network returned NaN or inf; the message names the step, its time and the sample."""


class Evaluator:
    """``evaluate(x, i, b) -> D`` for rows at steps ``i`` of samples ``b``, through ``backend``.

    Args:
        backend: a bound, prepared backend. grid: the sampler's time grid. batch: B. device: the state device.
        first_sample: global index of sample 0 (for error messages).

    Attributes:
        calls: network calls made (host integer; the sequential depth). rows: ``(B,)`` evaluations per sample
            (device tensor).
    """

    def __init__(self, backend: Backend, grid: TimeGrid, batch: int, device: torch.device, first_sample: int = 0):
        self.backend, self.grid, self.first_sample = backend, grid, first_sample
        self.sigmas = grid.sigmas.to(device)
        self.times = grid.model_times.to(device)
        self._tables: dict = {}                          # (denoiser, its _grid table) per state dtype
        self.calls = 0
        self.call_rows: list[int] = []                  # rows of each network call (host ints, from shapes)
        self._rows = torch.zeros(batch, dtype=torch.long, device=device)
        self._one = torch.ones((), dtype=torch.long, device=device)    # a row's count, made once
        self._counted: list[torch.Tensor] = []          # sample indices of the calls not yet counted
        self._pending: list[tuple] = []                 # (max |D| per row, i, b) of the calls not yet checked
        self._inflight: list[tuple] = []                # the calls whose flag is on its way to the host
        self._event = None                              # CUDA event after the flag's copy (None: landed)
        # Every rank runs the method (SPMD, several ranks): stop at the same round on every rank (module docstring).
        self.lockstep = backend.name == "torch" and backend.workers > 1
        # The flag's host copy, read through numpy (a host-memory read, never a device sync): pinned on CUDA.
        if torch.device(device).type == "cuda":
            self._flag = torch.zeros(1, dtype=torch.bool, pin_memory=True)
            self._flag_np = self._flag.numpy()
        else:
            self._flag_np = np.zeros(1, dtype=bool)
            self._flag = torch.from_numpy(self._flag_np)

    def _grid(self, dtype: torch.dtype, sigma_only: bool = False) -> torch.Tensor:
        """``(3, N + 1)`` sigma, c_x, c_o per grid point in ``dtype`` (made once per dtype and bound denoiser);
        ``sigma_only``: its sigma row ``(N + 1,)`` (a view made once)."""
        den = self.backend.denoiser
        table = self._tables.get(dtype)
        if table is None or table[0] is not den:
            sigmas = self.sigmas.to(dtype)
            c_x, c_o = den.x0_coefficients(sigmas)
            grid = torch.stack([sigmas, c_x.to(dtype), c_o.to(dtype)])
            table = self._tables[dtype] = (den, grid, grid[0])
        return table[2] if sigma_only else table[1]

    def _record(self, peak: torch.Tensor, i: torch.Tensor, b: torch.Tensor) -> None:
        self.calls += 1
        self.call_rows.append(b.shape[0])
        self._counted.append(b)
        self._pending.append((peak, i, b))                  # (M,): not finite iff the row's output is not

    def __call__(self, x: torch.Tensor, i: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        den = self.backend.evaluate(x, self._grid(x.dtype, sigma_only=True)[i], self.times[i], samples=b)
        self._record(_peaks(den), i, b)
        return den

    @property
    def fusable(self) -> bool:
        """Whether :meth:`outputs` may be used: the bound denoiser's ``D`` is a linear map of its raw outputs."""
        return self.backend.denoiser is not None and self.backend.denoiser.fusable

    def outputs(self, x: torch.Tensor, i: torch.Tensor, b: torch.Tensor) -> NetworkOutputs:
        """The raw network outputs of rows ``(i, b)`` and their x0 coefficients, counted and checked like
        :meth:`__call__` (the NaN check reads the outputs' peaks: a non-finite output gives a non-finite ``D``)."""
        sigma, c_x, c_o = self._grid(x.dtype)[:, i]
        out, unc = self.backend.evaluate(x, sigma, self.times[i], samples=b, raw=True)
        peak = _peaks(out)
        if unc is not None:
            peak = torch.maximum(peak, _peaks(unc))
        self._record(peak, i, b)
        den = self.backend.denoiser
        return NetworkOutputs(out, unc, den.guidance if den.guided else 1.0, c_x, c_o)

    @property
    def rows(self) -> torch.Tensor:
        """``(B,)`` evaluations per sample so far (device tensor)."""
        self._count()
        return self._rows

    def _count(self) -> None:
        """Add the rows of the calls not yet counted (one accumulating ``index_put_``, no host read)."""
        if self._counted:
            b = self._counted[0] if len(self._counted) == 1 else torch.cat(self._counted)
            self._rows.index_put_((b,), self._one, accumulate=True)
            self._counted = []

    def check(self, wait: bool = False) -> None:
        """Raise :class:`NonFiniteOutputError` if an output checked so far was not finite. Without ``wait`` no host
        sync: the flag of the calls since the last check goes to the host asynchronously and is read once landed
        (see the module docstring); ``wait=True`` (the end of a run) checks every call, with one read.

        Raises:
            NonFiniteOutputError: naming the first offending step, its sigma and model time, and the sample.
        """
        self._count()
        if wait:
            self._settle(block=True)
            calls, self._pending = self._pending, []
            if calls and not bool(torch.isfinite(self._cat(calls)[0]).all()):   # the one read, at the end
                self._raise(calls)
            return
        if not self._settle(block=self.lockstep) or not self._pending:
            return                                      # the last flag is still on its way: check these next time
        self._inflight, self._pending = self._pending, []
        peaks = self._cat(self._inflight)[0]
        # peaks < inf: isfinite's answer in one call (it takes four): a peak is a max-abs (>= 0, inf or NaN), and
        # NaN compares false
        self._flag.copy_(~(peaks < torch.inf).all().view(1), non_blocking=True)
        if peaks.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._settle(block=False)                   # on the CPU the copy has landed: read it now

    @staticmethod
    def _cat(calls: list[tuple]) -> tuple:
        return calls[0] if len(calls) == 1 else tuple(torch.cat(t) for t in zip(*calls))

    def _settle(self, block: bool) -> bool:
        """Read the landed flag of the in-flight calls (raise if set); False while it has not landed."""
        if self._event is not None:
            if not block and not self._event.query():
                return False
            self._event.synchronize()
            self._event = None
        if self._inflight:
            calls, self._inflight = self._inflight, []
            if self._flag_np[0]:
                self._raise(calls)
        return True

    def _raise(self, calls: list[tuple]) -> None:
        peaks, i, b = self._cat(calls)
        finite = torch.isfinite(peaks)
        r = int((~finite).to(torch.uint8).argmax())     # the first offending row, in call order
        step, sample = int(i[r]), int(b[r])
        raise NonFiniteOutputError(
            f"network output is not finite at step {step} (sigma={float(self.grid.sigmas[step]):.6g}, "
            f"model time={float(self.grid.model_times[step]):.6g}), sample {sample + self.first_sample}")
