"""Which implementation runs: Triton on CUDA tensors when triton is installed, the Triton interpreter on CPU
tensors when ``TRITON_INTERPRET=1``, the torch reference otherwise (and always for float64 storage).

``set_kernel_mode("torch" | "triton" | "auto")`` overrides the choice ("triton" still never launches where a kernel
cannot run: a CPU tensor without the interpreter raises instead of failing with "0 active drivers").

Every variant the samplers launch is listed in :data:`SAMPLER_LAUNCHES` (a :class:`Launch` each: kernel, pointer
dtypes, constexprs); :mod:`.aot` compiles exactly these and ``benchmarks/kernels_bench.py`` times exactly these.
:func:`record_launches` collects the variants actually launched, so a test can hold the samplers to the list.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass

import torch

from .reference import fused_step_reference, picard_update_reference

__all__ = ["fused_step", "picard_update", "kernels", "set_kernel_mode", "kernel_mode", "triton_usable",
           "triton_missing", "Launch", "SAMPLER_LAUNCHES", "record_launches", "picard_block", "picard_tile",
           "launch_device"]

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("paratime_kernel_mode", default="auto")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024
#: Picard blocks: large when there are enough (sample, block) programs to fill a GPU, small otherwise
PICARD_BLOCKS = (128, 1024)
PICARD_MIN_PROGRAMS = 512
#: elements of one Picard tile, (window points WT) x (features BLOCK): WT = PICARD_TILE // BLOCK points in flight
PICARD_TILE = 4096
_RECORD: set | None = None


@dataclass(frozen=True)
class Launch:
    """One compiled variant: the kernel, the dtypes of its pointers and its constexprs.

    ``state`` is the trajectory's dtype (x, x0, dx, start/dx/old/new); ``out`` the network outputs' dtype.
    """

    kernel: str
    state: torch.dtype = torch.float32
    out: torch.dtype | None = None
    uncond: bool = False
    noise: bool = False
    x0: bool = False
    dx: bool = False
    block: int = BLOCK

    @property
    def name(self) -> str:
        dt = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        if self.kernel == "picard_update":
            return f"picard_update[{dt(self.state)},block={self.block}]"
        flags = [f for f, on in (("guided", self.uncond), ("noise", self.noise), ("x0", self.x0), ("dx", self.dx))
                 if on]
        return f"fused_step[{dt(self.state)}<-{dt(self.out)},{','.join(flags)}]"


_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
#: Every variant the samplers launch with a float32 state (the CUDA default; float64 runs the torch reference):
#: Denoiser.to_x0 (x0 from outputs already in the state dtype, guided or not: solvers with history, Heun, Parareal's
#: coarse jumps), the next state ``x' = D + a (x - D) + k_z z`` in one pass from the raw outputs in the network's
#: dtype (linear steps: DDIM, DDPM, Euler, Euler ancestral, Euler-Maruyama; guided or not, with or without pre-drawn
#: noise; the kernel's x0 and dx both written, their sum is the next state) or from x0, and the Picard update in both
#: block sizes.
SAMPLER_LAUNCHES: tuple[Launch, ...] = (
    *(Launch("fused_step", _F32, _F32, uncond=g, x0=True) for g in (False, True)),
    *(Launch("fused_step", _F32, o, uncond=g, noise=z, x0=True, dx=True) for o in (_F32, _F16, _BF16)
      for g in (False, True) for z in (False, True)),
    *(Launch("picard_update", _F32, block=k) for k in PICARD_BLOCKS),
)


@contextlib.contextmanager
def record_launches():
    """Collect the :class:`Launch` of every Triton launch inside the block (yields the set)."""
    global _RECORD
    prev, _RECORD = _RECORD, set()
    try:
        yield _RECORD
    finally:
        _RECORD = prev


def _check_mode(mode: str) -> str:
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"mode: unknown {mode!r}; allowed: auto, torch, triton")
    return mode


@contextlib.contextmanager
def kernels(mode: str):
    """Run the block with kernel mode ``mode`` (``auto``, ``torch`` or ``triton``), restoring the previous mode on
    exit, also on error. The mode is a context variable: threads and asyncio tasks each see their own.

    Raises:
        ValueError: an unknown ``mode``.
    """
    token = _MODE.set(_check_mode(mode))
    try:
        yield
    finally:
        _MODE.reset(token)


def set_kernel_mode(mode: str) -> None:
    """Set the kernel mode (``auto``, the default, ``torch`` or ``triton``) for the current context until changed;
    prefer the :func:`kernels` context manager, which restores the previous mode.

    Raises:
        ValueError: an unknown ``mode``.
    """
    _MODE.set(_check_mode(mode))


def kernel_mode() -> str:
    """The kernel mode in force in the current context."""
    return _MODE.get()


def _triton():
    try:
        from . import picard, step  # noqa: F401 - defines the kernels (interpreted if TRITON_INTERPRET=1)
    except ImportError:
        return None
    return step, picard


def launch_device(t: torch.Tensor):
    """The context a Triton launch on ``t`` runs in: ``t``'s CUDA device made current (Triton launches on the
    current device, not the tensors': a state on ``cuda:1`` while ``cuda:0`` is current fails there), nothing on
    the CPU (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def triton_usable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``t``: CUDA tensor, or CPU tensor under the interpreter."""
    if t.dtype not in _TRITON_DTYPES or _triton() is None:
        return False
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def triton_missing() -> str | None:
    """Why Triton cannot run anywhere, where the reason is that it is not installed (an optional extra): the words
    every refusal of kernel mode ``triton`` then gives; else None. Asked on the refusal's path only (a file-system
    lookup)."""
    if importlib.util.find_spec("triton") is None:
        return "needs Triton, which is not installed: pip install 'paratime[triton]'"
    return None


def _use_triton(t: torch.Tensor) -> bool:
    mode = _MODE.get()
    if mode == "torch":
        return False
    ok = triton_usable(t)
    if mode == "triton" and not ok:
        raise RuntimeError("kernel mode 'triton': " + (triton_missing() or f"cannot run on a {t.dtype} tensor on "
                           f"{t.device} (needs CUDA, or TRITON_INTERPRET=1 on CPU, and fp32/fp16/bf16)"))
    return ok


def _rows(v, M, like: torch.Tensor) -> torch.Tensor:
    """Per-row float32 coefficients ``(M,)`` on ``like``'s device from a tensor, a number or None (0): device
    fills for numbers and None (``torch.as_tensor(0.0, device="cuda")`` would be a blocking host-to-device copy)."""
    if v is None:
        return like.new_zeros(M, dtype=torch.float32)
    if isinstance(v, torch.Tensor):
        return v.to(device=like.device, dtype=torch.float32).reshape(-1).expand(M).contiguous()   # (M, 1) too
    return like.new_full((M,), float(v), dtype=torch.float32)


def _flat(t: torch.Tensor, *lead: int) -> torch.Tensor:
    """``t`` as a contiguous ``(*lead, D)`` tensor (itself when it already is one: the dispatch runs per call)."""
    return t if t.ndim == len(lead) + 1 and t.is_contiguous() else t.reshape(*lead, -1).contiguous()


def _needs_grad(*ts) -> bool:
    """Whether autograd records an op on any of the tensors among ``ts`` (numbers and None never)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _unflat(t: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    return t if t is None or t.shape == shape else t.view(shape)


def fused_step(x, out, out_uncond=None, guidance=1.0, c_x=None, c_o=None, k_d=None, k_z=None, noise=None,
               want_x0=True, want_dx=True):
    """Guidance + conversion to x0 + step increment for rows ``(M, D)`` (any trailing shape is flattened).

    Args:
        x, out: states and network outputs. out_uncond: unconditional outputs (guidance on) or None.
        guidance: scale g. c_x, c_o: per-row x0 coefficients. k_d, k_z: per-row increment coefficients.
        noise: pre-drawn z or None. want_x0, want_dx: which outputs to compute.
    Returns:
        ``(x0, dx)`` shaped like ``x`` (None where not wanted).
    """
    shape, M = x.shape, x.shape[0]
    for name, t in (("out", out), ("out_uncond", out_uncond), ("noise", noise)):
        if t is not None and t.shape != shape:       # the kernel indexes every input by x's rows and features
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from x's {tuple(shape)}")
    for name, c in (("c_x", c_x), ("c_o", c_o), ("k_d", k_d), ("k_z", k_z)):
        if isinstance(c, torch.Tensor) and c.numel() not in (1, M):
            raise ValueError(f"{name}: expected one coefficient or one per row ({M}), got shape {tuple(c.shape)}")
    flat = lambda t: None if t is None else _flat(t, M)  # noqa: E731
    xs, os_, us, zs = flat(x), flat(out), flat(out_uncond), flat(noise)
    # The kernel has no backward: rows that autograd differentiates (the likelihood's divergence) take the reference,
    # as do coefficients or noise that require grad (the kernel's outputs would silently drop their graph).
    grad = _needs_grad(xs, os_, us, zs, c_x, c_o, k_d, k_z)
    # Outputs of a float64 network (rare: analytic models) take the reference too: no kernel variant reads them.
    if grad or not _use_triton(xs) or os_.dtype not in _TRITON_DTYPES:
        x0, dx = fused_step_reference(xs, os_, us, guidance, c_x, c_o, k_d, k_z, zs, want_x0, want_dx)
    else:
        step, _ = _triton()
        D = xs.shape[1]
        x0 = torch.empty_like(xs) if want_x0 else xs.new_empty(1)
        dx = torch.empty_like(xs) if want_dx else xs.new_empty(1)
        coef = [_rows(c, M, xs) for c in (c_x, c_o, k_d, k_z)]
        if _RECORD is not None:
            _RECORD.add(Launch("fused_step", xs.dtype, os_.dtype, us is not None, zs is not None, want_x0, want_dx))
        grid = (M, triton_cdiv(D, BLOCK))
        with launch_device(xs):
            step.fused_step_kernel[grid](xs, os_, us if us is not None else xs, zs if zs is not None else xs, x0,
                                         dx, *coef, float(guidance), D, HAS_UNCOND=us is not None,
                                         HAS_NOISE=zs is not None, WRITE_X0=want_x0, WRITE_DX=want_dx, BLOCK=BLOCK)
        x0, dx = (x0 if want_x0 else None), (dx if want_dx else None)
    return _unflat(x0, shape), _unflat(dx, shape)


def picard_block(B: int, D: int) -> int:
    """The Picard kernel's feature block: the large one when ``B * ceil(D / 1024)`` programs fill a GPU
    (:data:`PICARD_MIN_PROGRAMS`), else the small one (one SD latent: 128 programs instead of 16)."""
    small, large = PICARD_BLOCKS
    return large if B * triton_cdiv(D, large) >= PICARD_MIN_PROGRAMS else small


def picard_tile(block: int) -> int:
    """Window points per tile of the Picard scan for a feature block of ``block`` (a power of two)."""
    return max(1, PICARD_TILE // block)


def picard_update(start, dx, old, block: int | None = None, want_err: bool = True):
    """``start`` ``(B, *shape)``, ``dx`` and ``old`` ``(W, B, *shape)`` -> ``new`` ``(W, B, *shape)``, ``err``
    ``(W, B)`` (RMS over features of ``new - old``), deterministic (no atomics: the same bits on every run).

    ``block`` overrides :func:`picard_block` (tests). ``want_err=False``: ``err`` may be None (the torch reference
    skips it; the kernel computes it in the same pass anyway).
    """
    W, B = dx.shape[:2]
    for name, t in (("dx", dx), ("old", old)):
        want = (W, *start.shape)
        if tuple(t.shape) != want:          # the kernel indexes every input by start's rows and features
            raise ValueError(f"{name}: expected shape {tuple(want)} (W, *start.shape), got {tuple(t.shape)}")
    s, d, o = _flat(start, B), _flat(dx, W, B), _flat(old, W, B)
    # Mixed dtypes take the reference, which returns start's dtype (the kernel writes new in dx's); so do inputs
    # that autograd differentiates (the kernel has no backward).
    if _needs_grad(s, d, o) or not _use_triton(s) or d.dtype != s.dtype or o.dtype != s.dtype:
        new, err = picard_update_reference(s, d, o if want_err else None)
    else:
        _, picard = _triton()
        D = s.shape[1]
        blk = block or picard_block(B, D)
        nblk = triton_cdiv(D, blk)
        new = torch.empty_like(d)
        part = torch.empty((W, B, nblk), dtype=torch.float32, device=s.device)   # one slot per (point, block)
        if _RECORD is not None:
            _RECORD.add(Launch("picard_update", s.dtype, block=blk))
        with launch_device(s):
            picard.picard_update_kernel[(B, nblk)](s, d, o, new, part, W, B, D, nblk, BLOCK=blk,
                                                   WT=picard_tile(blk))
        err = (part.sum(-1) / D).sqrt()        # fixed-order reduction over the blocks
    return _unflat(new, dx.shape), err


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
