"""Noise that depends on (seed, sample, stream, step) only, never on the batch split, window, backend or device.

A counter-based generator: every number is a pure function of its coordinates, so any row of the noise can be drawn
on its own, on the device where it is used, in one vectorised pass (no generator state, no per-sample loop, no copy
from the host). Notation (all words 64-bit, arithmetic wrapping mod 2^64):

    mix64(z)        splitmix64's finaliser (Steele, Lea & Flood 2014), a bijection of 64-bit words
    key(s, q, i, n) = mix64(mix64(mix64(mix64(s) + q) + i) + n)   seed s, stream q, sample i (global index), step n
    z_p             = mix64(key + (p + 1) * GOLDEN)              output p + 1 of splitmix64 seeded with the key
    u1, u2          = (hi32(z_p) + 1/2) 2^-32, (lo32(z_p) + 1/2) 2^-32                    uniforms in (0, 1)
    element 2p, 2p + 1 of the row = r cos(2 pi u2), r sin(2 pi u2),  r = sqrt(-2 ln u1)   (Box-Muller, float64)

A row is one (sample, step) pair's ``prod(shape)`` elements, flattened; the values are rounded once to float32 and
then cast to the state dtype, so CPU and GPU runs see equal noise (float64 ``log``/``cos``/``sin`` differ by at
most an ulp between libms, which the rounding to float32 removes but for about one number in 2^29). The Triton
kernel (:mod:`paratime.kernels.noise`) computes the same numbers on CUDA (kernel mode ``auto``) and, under
``TRITON_INTERPRET=1`` with kernel mode ``triton``, on CPU; :func:`normals_reference` is the torch reference it must
equal, and what runs elsewhere (on CPU it is the fast path). Nothing is stored per sample: a row of any step can be
drawn alone (:func:`noise_rows`), so a method may draw ``z[step]`` where it uses it instead of a table.

A seeded run does not store its per-step noise: :func:`step_noise` gives a :class:`LazyNoise`, which reads like the
``(N, B, *shape)`` table (``noise[i, b]``) but draws the rows it is asked for, where they are asked for (tables of
at most :data:`SMALL_TABLE_ELEMENTS` numbers are drawn whole: :func:`tabulates`).

Streams: 0 is the initial noise ``x_T`` (step 0), 1 the per-step SDE noise ``z[step]``, 2 the Langevin corrector
noise (a row holds all corrector steps of a step), 3 Hutchinson's divergence probes and 4 the likelihood's
dequantisation noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from paratime.kernels import kernel_mode, launch_device, triton_missing, triton_usable

from .checks import is_integer

__all__ = ["check_seed", "draw_noise", "noise_rows", "LazyNoise", "normals_reference", "row_keys", "sample_keys",
           "mix64", "initial_noise", "step_noise", "INITIAL", "STEP", "CORRECTOR", "PROBE", "DEQUANT", "PipelineNoise",
           "check_generator", "generator_noise", "tabulates", "SMALL_TABLE_ELEMENTS", "draws_step_noise"]

INITIAL, STEP, CORRECTOR, PROBE, DEQUANT = 0, 1, 2, 3, 4

_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_LO32 = 0xFFFFFFFF
#: pairs of elements per chunk of the torch reference: bounds its temporaries (~40 bytes a pair) while keeping the
#: number of torch calls (each a parallel region on the CPU) small
_CHUNK_PAIRS = 1 << 20
#: elements per program of the Triton kernel
_KERNEL_BLOCK = 1024


def _i64(word: int) -> int:
    """A 64-bit word as the int64 with the same bits (torch has no uint64 shifts on the CPU)."""
    word &= (1 << 64) - 1
    return word - (1 << 64) if word >> 63 else word


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical shift right of int64 words (``>>`` on int64 is arithmetic: mask the sign bits it copies in)."""
    return (z >> k).bitwise_and_((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (bits as uint64, multiplication wrapping mod 2^64); ``z`` is not
    modified (in-place steps on a fresh copy: the reference's hot loop)."""
    z = z ^ _srl(z, 30)
    z.mul_(_i64(_M1))
    z.bitwise_xor_(_srl(z, 27))
    z.mul_(_i64(_M2))
    return z.bitwise_xor_(_srl(z, 31))


def _check_index(name: str, value, bound: int = 1 << 64) -> int:
    if not is_integer(value) or not 0 <= value < bound:
        raise ValueError(f"{name}: must be an integer in [0, {bound}), got {value!r}")
    return int(value)                   # a numpy integer as the Python one (_i64's masks overflow int64)


def check_seed(seed: int | None, first_sample: int = 0) -> None:
    """A call's ``seed`` (None: the default) and ``first_sample``, each an integer in ``[0, 2^64)``, checked before
    any work.

    Raises:
        ValueError: naming the argument.
    """
    if seed is not None:
        _check_index("seed", seed)
    _check_index("first_sample", first_sample)


def sample_keys(seed: int, stream: int, samples: torch.Tensor) -> torch.Tensor:
    """The samples' keys within a stream, ``mix64(mix64(mix64(s) + q) + i)`` (see the module notation): a row's
    key is then ``mix64(sample key + n)`` (:func:`row_keys`), so a caller drawing many steps of the same samples
    (:class:`LazyNoise`) makes these once.

    Args:
        seed: an integer in ``[0, 2^64)``. stream: one of the streams (:data:`INITIAL` ... :data:`DEQUANT`).
        samples: ``(M,)`` int64 global sample indices.
    Returns:
        ``(M,)`` int64 keys on ``samples``' device (made there from a device fill: no copy from the host, no read).
    Raises:
        ValueError: ``seed`` or ``stream`` out of range.
    """
    seed = _check_index("seed", seed)
    _check_index("stream", stream, 1 << 32)
    base = mix64(mix64(torch.full((), _i64(seed), dtype=torch.int64, device=samples.device)) + stream)   # 0-d
    return mix64(samples.to(torch.int64) + base)


def row_keys(seed: int, stream: int, samples: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
    """The rows' generator keys, ``key(seed, stream, sample, step)`` (see the module notation).

    Args:
        seed, stream, samples: as :func:`sample_keys`. steps: ``(M,)`` int64 step indices (or one int for all).
    Returns:
        ``(M,)`` int64 keys on ``samples``' device.
    Raises:
        ValueError: ``seed`` or ``stream`` out of range.
    """
    return mix64(sample_keys(seed, stream, samples) + steps)


def normals_reference(keys: torch.Tensor, D: int) -> torch.Tensor:
    """The torch reference of the counter-based normals: ``(M,)`` int64 keys -> ``(M, D)`` float32.

    Runs on any device; :mod:`paratime.kernels.noise` must give the same numbers.
    """
    M, P = keys.shape[0], (D + 1) // 2
    out = torch.empty((M, P, 2), dtype=torch.float32, device=keys.device)    # pair p -> elements 2p, 2p + 1
    p = torch.arange(1, P + 1, dtype=torch.int64, device=keys.device) * _i64(_GOLDEN)
    rows = max(1, _CHUNK_PAIRS // max(P, 1))
    for r0 in range(0, M, rows):                                   # chunks of rows: cache-sized temporaries
        z = mix64(keys[r0:r0 + rows, None] + p)                    # (m, P): splitmix64's outputs 1..P of each key
        # u1 = (hi32 + 1/2) 2^-32; r = sqrt(-2 ln u1); theta = 2 pi u2 (2 pi 2^-32 is 2 pi scaled exactly).
        r = _srl(z, 32).to(torch.float64).add_(0.5).mul_(2.0**-32).log_().mul_(-2.0).sqrt_()
        theta = z.bitwise_and_(_LO32).to(torch.float64).add_(0.5).mul_(2 * math.pi * 2.0**-32)
        out[r0:r0 + rows, :, 0] = r * torch.cos(theta)
        out[r0:r0 + rows, :, 1] = r.mul_(theta.sin_())
    return out.reshape(M, 2 * P)[:, :D]


def _use_kernel(device: torch.device) -> bool:
    """Kernel mode ``auto`` runs the kernel on CUDA (on the CPU the torch reference is the fast path: the
    interpreter would run one Python program per row); ``triton`` runs it wherever Triton can, the interpreter
    included, and raises elsewhere; ``torch`` runs the reference. The output is float32 whatever the state dtype.

    Raises:
        RuntimeError: kernel mode ``triton`` on a device without Triton.
    """
    mode = kernel_mode()
    if mode == "torch":
        return False
    ok = triton_usable(torch.empty(0, dtype=torch.float32, device=device))   # its output's dtype, not the default
    if mode == "triton" and not ok:
        raise RuntimeError("kernel mode 'triton': " + (triton_missing() or f"the noise kernel cannot run on {device} "
                           "(needs CUDA, or TRITON_INTERPRET=1 on CPU)"))
    return ok and (mode == "triton" or torch.device(device).type == "cuda")


def _normals(keys: torch.Tensor, D: int) -> torch.Tensor:
    """``(M, D)`` float32 normals for the rows' keys: the Triton kernel where it runs, else the torch reference."""
    if not _use_kernel(keys.device):
        return normals_reference(keys, D)
    from paratime.kernels import noise as kernel                   # defines the kernel (interpreted on CPU)

    out = torch.empty((keys.shape[0], D), dtype=torch.float32, device=keys.device)
    if out.numel():
        grid = (keys.shape[0], -(-D // _KERNEL_BLOCK))
        with launch_device(keys):
            kernel.counter_normal_kernel[grid](keys.contiguous(), out, D, BLOCK=_KERNEL_BLOCK)
    return out


def noise_rows(seed: int, stream: int, samples: torch.Tensor, steps: torch.Tensor | int, shape: tuple[int, ...],
               dtype=torch.float32) -> torch.Tensor:
    """Standard-normal noise for rows ``(samples[m], steps[m])``, drawn on their device: the lazy form of
    :func:`draw_noise` (row ``m`` equals ``draw_noise(seed, 1, shape, n + 1, stream, first_sample=i)[n, 0]``).

    Args:
        seed, stream: as :func:`row_keys`. samples, steps: ``(M,)`` integer tensors (steps may be one int).
        shape: the per-row shape. dtype: of the result (the numbers are float32 first).
    Returns:
        ``(M, *shape)`` on ``samples``' device.
    Raises:
        ValueError: ``seed`` or ``stream`` out of range.
    """
    return _rows_of(row_keys(seed, stream, samples, steps), shape, dtype)


def _rows_of(keys: torch.Tensor, shape: tuple[int, ...], dtype) -> torch.Tensor:
    """``(M, *shape)`` normals in ``dtype`` for ``(M,)`` row keys."""
    return _normals(keys, math.prod(shape)).reshape(keys.shape[0], *shape).to(dtype)


def draw_noise(seed: int, batch: int, shape: tuple[int, ...], count: int | None, stream: int,
               first_sample: int = 0, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Standard-normal noise for samples ``first_sample .. first_sample + batch - 1``, drawn on ``device``.

    Args:
        seed: the noise seed, an integer in ``[0, 2^64)``. batch: how many samples. shape: the per-draw shape.
        count: None for one draw per sample (step 0), else the number of steps ``0 .. count - 1``.
        stream: which stream (:data:`INITIAL`, :data:`STEP`, :data:`CORRECTOR`, :data:`PROBE`, :data:`DEQUANT`).
        first_sample: the global index of the first sample. dtype, device: of the result.
    Returns:
        ``(batch, *shape)`` when ``count`` is None, else ``(count, batch, *shape)``.
    Raises:
        ValueError: a ``seed``, ``first_sample`` or ``stream`` out of range.
    """
    seed = _check_index("seed", seed)
    first_sample = _check_index("first_sample", first_sample)
    n = 1 if count is None else count
    dev = torch.device(device)
    # Rows (step, sample) in the output's order: (n, batch) flattened.
    steps = torch.arange(n, dtype=torch.int64, device=dev).repeat_interleave(batch)
    samples = (torch.arange(batch, dtype=torch.int64, device=dev) + first_sample).repeat(n)
    out = noise_rows(seed, stream, samples, steps, tuple(shape), dtype).reshape(n, batch, *shape)
    return out[0] if count is None else out


def initial_noise(shape, noise, seed: int, generator, first_sample: int, sample_shape, dtype, device,
                  check=None) -> torch.Tensor:
    """The standard-normal initial noise ``(B, *sample_shape)`` of a ``sample()`` call, checked.

    Args:
        shape: ``(B, *sample_shape)``, ``B`` (with a known ``sample_shape``) or None (then ``noise`` is required).
        noise: the caller's own noise, or None to draw it per sample from ``seed`` (or from ``generator``).
        sample_shape: the model's sample shape, or None if it accepts any.
        check: called with the checked ``(B, *sample_shape)`` before any noise is drawn (the sampler's memory bound).
    Returns:
        ``(B, *sample_shape)`` in ``dtype`` on ``device`` (not yet scaled by the prior std).
    Raises:
        ValueError, TypeError: a bad ``shape``, ``noise`` or ``generator``, naming it.
    """
    if is_integer(shape):                    # a numpy integer as a Python one, as seed= and the config's counts
        shape = int(shape)
    if noise is None:
        if shape is None:
            raise ValueError("shape: give a shape or noise")
        if isinstance(shape, int) and not isinstance(shape, bool):
            if sample_shape is None:
                raise ValueError("shape: the model has no known sample shape; give (B, *sample_shape)")
            shape = (shape, *sample_shape)
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"shape: expected an int or a tuple (B, *sample_shape), got {type(shape).__name__}")
        shape = tuple(shape)
        if len(shape) < 2 or not all(is_integer(s) and s >= 1 for s in shape):
            raise ValueError(f"shape: expected (B, *sample_shape) of positive integers, got {shape}")
        shape = tuple(int(s) for s in shape)
    else:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError("noise: expected a floating-point tensor")
        if noise.ndim < 2:
            raise ValueError(f"noise: expected (B, *sample_shape), got shape {tuple(noise.shape)}")
        if shape is not None and not isinstance(shape, int) and tuple(shape) != tuple(noise.shape):
            raise ValueError(f"shape: {tuple(shape)} differs from noise.shape {tuple(noise.shape)}")
        if isinstance(shape, int) and not isinstance(shape, bool) and shape != noise.shape[0]:
            raise ValueError(f"shape: {shape} samples but noise has a batch of {noise.shape[0]}; give one of them")
        if noise.device.type != torch.device(device).type:
            raise ValueError(f"noise: on {noise.device} but the sampler runs on {device}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise: contains NaN or inf")
        shape = tuple(noise.shape)
    if sample_shape is not None and tuple(shape[1:]) != tuple(sample_shape):
        raise ValueError(f"{'shape' if noise is None else 'noise'}: the model expects samples of shape "
                         f"{tuple(sample_shape)}, got {tuple(shape[1:])}")
    if generator is not None:
        check_generator(generator, shape[0])
    if check is not None:
        check(shape)
    if noise is None:
        if generator is not None:
            noise = generator_noise(generator, shape)
        else:
            noise = draw_noise(seed, shape[0], shape[1:], None, INITIAL, first_sample, dtype=dtype, device=device)
    return noise.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class LazyNoise:
    """One stream's per-step noise of a seeded run, ``(N, B, *row_shape)``, never stored: ``noise[i, b]`` draws
    rows ``(i, b)`` with :func:`noise_rows` on the indices' device, the same numbers as that row of
    :func:`draw_noise`'s table (bitwise: both are :func:`noise_rows` of the same keys).

    Attributes:
        seed, stream: as :func:`row_keys`. first_sample: the global index of sample ``b = 0``.
        steps, batch: N and B, the table's first two dimensions (for :attr:`shape`; indices are not checked
            against them: that would read the device). row_shape: one row's shape (``(corrector_steps, *sample)``
            for the corrector's stream). dtype: of the rows. device: where rows of host-integer indices are drawn.
    """

    seed: int
    stream: int
    first_sample: int
    steps: int
    batch: int
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    #: per device, the ``(B,)`` :func:`sample_keys` of samples ``first_sample ..``, made on first use
    _keys: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, B, *row_shape)``: the shape of the table this stands for."""
        return (self.steps, self.batch, *self.row_shape)

    @property
    def ndim(self) -> int:
        return 2 + len(self.row_shape)

    def __getitem__(self, index) -> torch.Tensor:
        """Rows ``(i, b)`` as a table's ``noise[i, b]`` gives them: ``i`` (steps) and ``b`` (batch positions) are
        integer tensors or ints, broadcast together to ``S``; returns ``(*S, *row_shape)`` in :attr:`dtype`.

        Raises:
            TypeError: an index that is not a pair of integer tensors or ints.
        """
        if not (isinstance(index, tuple) and len(index) == 2):
            raise TypeError("LazyNoise: index with a pair noise[i, b] of integer tensors or ints")
        i, b = (torch.full((), v, dtype=torch.long, device=self.device) if isinstance(v, int) else v
                for v in index)
        if not all(isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex()
                   for v in (i, b)):
            raise TypeError("LazyNoise: index with a pair noise[i, b] of integer tensors or ints")
        i, b = torch.broadcast_tensors(i, b)                               # S
        if b.device not in self._keys:
            samples = torch.arange(self.batch, dtype=torch.int64, device=b.device) + self.first_sample
            self._keys[b.device] = sample_keys(self.seed, self.stream, samples)                  # (B,)
        keys = mix64(self._keys[b.device][b.reshape(-1)] + i.reshape(-1))                       # (prod(S),)
        return _rows_of(keys, self.row_shape, self.dtype).reshape(*i.shape, *self.row_shape)


#: the most elements (N x B x prod(sample shape)) of a seeded step-noise table that :func:`step_noise` draws whole: one
#: draw then costs less than N row draws (each a few dozen small torch calls), and the table holds at most 512 KiB
#: per stream in float64, less than one window buffer of the models lazy rows are for
SMALL_TABLE_ELEMENTS = 1 << 16


def tabulates(steps: int, shape: tuple[int, ...], generator) -> bool:
    """Whether :func:`step_noise` draws whole ``(N, B, *sample_shape)`` tables (else a :class:`LazyNoise`): for a
    caller's ``generator`` (a layout-dependent stream, also a pipeline's :class:`PipelineNoise`), and for a seeded
    table of at most :data:`SMALL_TABLE_ELEMENTS` elements. The memory bound counts the tables by the same rule.

    Args:
        steps: N. shape: ``(B, *sample_shape)``. generator: the caller's, or None.
    """
    return generator is not None or steps * math.prod(shape) <= SMALL_TABLE_ELEMENTS


def draws_step_noise(solver) -> bool:
    """Whether ``solver`` consumes per-step noise (a stochastic step or a Langevin corrector): the noise
    :func:`step_noise` draws from ``(seed, step, sample)``, or from a generator."""
    return bool(solver.stochastic) or getattr(solver, "corrector_steps", None) is not None


def step_noise(solver, steps: int, shape: tuple[int, ...], seed: int, generator, first_sample: int, dtype, device):
    """The per-step noise a solver consumes, a function of (seed, step, sample) fixed before sampling starts (so
    Picard's fixed point is the sequential sample). A seeded run's is a :class:`LazyNoise` (rows drawn where a method
    uses them, nothing stored) unless the table is small; a caller's ``generator`` is drawn here, in full, in its
    own order (:func:`tabulates`). Lazy rows and a seeded table hold the same bits.

    Returns:
        None for a deterministic solver; ``(N, B, *sample_shape)`` (a :class:`LazyNoise` or a tensor); or, for a
        Langevin-corrected solver, the tuple (predictor noise or None, ``(N, B, corrector_steps, *sample_shape)``).
    Raises:
        ValueError: ``seed`` or ``first_sample`` out of range.
    """
    B, sample = shape[0], tuple(shape[1:])
    if generator is None:
        seed, first_sample = _check_index("seed", seed), _check_index("first_sample", first_sample)
    whole = tabulates(steps, shape, generator)

    def draw(stream, per_step=()):
        if generator is not None:
            return generator_noise(generator, (B, *per_step, *sample), count=steps, dtype=dtype, device=device)
        if whole:
            return draw_noise(seed, B, (*per_step, *sample), steps, stream, first_sample, dtype=dtype, device=device)
        return LazyNoise(seed, stream, first_sample, steps, B, (*per_step, *sample), dtype, torch.device(device))

    if not draws_step_noise(solver):
        return None
    corrector_steps = getattr(solver, "corrector_steps", None)
    if corrector_steps is not None:          # LangevinCorrected: (predictor noise, corrector noise)
        return (draw(STEP) if solver.base.stochastic else None, draw(CORRECTOR, (corrector_steps,)))
    return draw(STEP)


# -- noise from a caller's torch.Generator(s), drawn the way diffusers draws it --------------------------------------


@dataclass(frozen=True)
class PipelineNoise:
    """A diffusers pipeline's ``generator`` and the dtype its scheduler draws step noise in (the network's: a float16
    pipeline draws float16 noise, which is not float32 noise rounded).

    Args:
        generator: one ``torch.Generator``, or a list of them, one per sample.
        dtype: the dtype of each draw.
    """

    generator: Any
    dtype: torch.dtype = torch.float32


def check_generator(generator, batch: int) -> None:
    """Raise unless ``generator`` is a ``torch.Generator``, a list of ``batch`` of them, or a :class:`PipelineNoise`.

    Raises:
        TypeError: another type. ValueError: a list whose length is not 1 or ``batch``.
    """
    gens = generator.generator if isinstance(generator, PipelineNoise) else generator
    if isinstance(gens, (list, tuple)) and gens and all(isinstance(g, torch.Generator) for g in gens):
        if len(gens) not in (1, batch):
            raise ValueError(f"generator: a list of {len(gens)} generators for {batch} samples; give one per sample")
    elif not isinstance(gens, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or a list of them, got {type(gens).__name__}")


def generator_noise(generator, shape: tuple[int, ...], count: int | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Standard-normal noise from a caller's generator(s), drawn as diffusers' ``randn_tensor`` draws it: one
    ``(B, *rest)`` draw per step, in step order (a single draw of ``(count, B, ...)`` is a different CPU stream
    unless ``B * prod(rest)`` is a multiple of 16); a list draws ``(1, *rest)`` from each sample's own generator.
    Drawn on the generator's device (a CPU generator draws on the CPU), in ``PipelineNoise.dtype`` (float32 for a
    plain generator).

    Args:
        generator: a ``torch.Generator``, a list of ``B`` (or 1) of them, or a :class:`PipelineNoise`.
        shape: ``(B, *rest)``, one draw.
        count: None for one draw, else the number of steps.
        dtype, device: of the returned ``(count, B, *rest)`` table (default: the draws'): each step's draw is
            copied into it as it is made, so no second table exists at any time.
    Returns:
        ``(B, *rest)``, or ``(count, B, *rest)``, on the generator's device (or ``device``).
    Raises:
        TypeError, ValueError: see :func:`check_generator`.
    """
    check_generator(generator, shape[0])
    drawn = generator.dtype if isinstance(generator, PipelineNoise) else torch.float32
    gens = generator.generator if isinstance(generator, PipelineNoise) else generator
    if isinstance(gens, (list, tuple)) and len(gens) == 1:
        gens = gens[0]                                    # diffusers treats a list of one as the generator itself

    def one() -> torch.Tensor:                            # (B, *rest)
        if isinstance(gens, torch.Generator):
            return torch.randn(shape, generator=gens, dtype=drawn, device=gens.device)
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=drawn, device=g.device) for g in gens])

    if count is None:
        return one()
    first = one()
    table = torch.empty((count, *shape), dtype=dtype or drawn, device=first.device if device is None else device)
    table[0] = first
    for i in range(1, count):                             # step order: the generator's stream
        table[i] = one()
    return table                                          # (count, B, *rest)
