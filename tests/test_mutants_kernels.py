"""Mutation-found gaps in the Triton kernel bodies (kernels/paratime_kernels/step.py, picard.py, noise.py, run by
the interpreter on CPU) and in the ahead-of-time specs (aot.py):

- the fused step equals its torch reference bit for bit (the same float32 operations in the same order) at sizes
  around the block (1, BLOCK - 1, BLOCK + 1 features), from non-contiguous inputs, for every dtype pair the
  samplers launch (bfloat16 storage: one of the two neighbours of the float32 result, as the interpreter's cast to
  bfloat16 truncates where torch rounds to nearest): the existing one-ulp tolerance let guidance computed in
  float16 pass (its bfloat16 case failed only because the interpreter's bfloat16 arithmetic is wrong);
- no kernel writes past its last row: outputs are views into NaN-padded buffers, whose padding must stay NaN
  (a mask ``offs <= D`` wrote one element past the end, silently or as a crash of the heap, depending on luck);
- the Picard scan on dyadic inputs, whose sums are exact in float32, equals the exact cumulative sum rounded once to
  the storage dtype, and its residuals the reference's, bit for bit, across several tiles of the window: a carry
  rounded to the storage dtype between tiles passed the existing tests (no fp16/bf16 case crossed a tile);
- the AOT build compiles exactly the variants the dispatcher launches: pointer dtypes, scalars and constexprs as
  recorded from real launches, one spec per entry of ``SAMPLER_LAUNCHES``, and spill counts read from the
  spill fields of ptxas's report.
"""

import inspect

import pytest
import torch

pytest.importorskip("triton")

from paratime.kernels import SAMPLER_LAUNCHES, fused_step, kernels, picard_update  # noqa: E402
from paratime.kernels.dispatch import BLOCK, picard_tile  # noqa: E402
from paratime.kernels.reference import fused_step_reference, picard_update_reference  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _strided(shape, dtype, g):
    """A non-contiguous ``(M, D)`` tensor of ``dtype`` (every other column of an ``(M, 2 D)`` one)."""
    M, D = shape
    return torch.randn(M, 2 * D, generator=g).to(dtype)[:, ::2]


def _same_or_bf16_neighbour(got, exact32):
    """``got`` (the storage dtype) equals ``exact32`` (the float32 result) rounded to it: bit for bit except for
    bfloat16, where the interpreter's float32 -> bfloat16 cast truncates (torch's and the GPU's round to nearest
    even), so ``got`` must be one of the two bfloat16 neighbours of ``exact32``: less than one ulp from it."""
    if got.dtype != BF16:
        return torch.equal(got, exact32.to(got.dtype))
    ulp = torch.ldexp(torch.ones_like(exact32), torch.frexp(exact32).exponent - 8)     # bf16: 8 significant bits
    return bool(((got.float() - exact32).abs() < ulp).all())


@pytest.mark.parametrize("D", [1, BLOCK - 1, BLOCK + 1])
@pytest.mark.parametrize("state, out", [(F32, F32), (F32, F16), (F32, BF16), (F16, F16), (BF16, BF16)])
def test_fused_step_equals_the_reference_bit_for_bit_at_block_boundaries(D, state, out):
    g = torch.Generator().manual_seed(D)
    M = 3
    x, z = _strided((M, D), state, g), _strided((M, D), state, g)
    o, u = _strided((M, D), out, g), _strided((M, D), out, g)
    c_x, c_o, k_d, k_z = (torch.randn(M, generator=g) for _ in range(4))
    assert not x.is_contiguous()
    for unc, noise in ((u, z), (None, None)):
        with kernels("triton"):
            got = fused_step(x, o, unc, 4.5, c_x, c_o, k_d, k_z, noise)
        # The float32 results, before the cast to the storage dtype (exact upcasts of every input).
        up = [None if t is None else t.float() for t in (x, o, unc, noise)]
        want = fused_step_reference(up[0], up[1], up[2], 4.5, c_x, c_o, k_d, k_z, up[3])
        for a, b in zip(got, want):
            assert a.dtype == state and _same_or_bf16_neighbour(a, b)


def _padded(M, D, pad, fill=float("nan")):
    """An ``(M, D)`` float32 view at the start of a buffer ``pad`` elements longer filled with ``fill``: the
    buffer and the view."""
    buf = torch.full((M * D + pad,), fill)
    return buf, buf[:M * D].view(M, D)


@pytest.mark.parametrize("D", [1, BLOCK - 1, BLOCK + 1])
def test_no_kernel_writes_past_its_last_row(D):
    """Each kernel launched directly (as the dispatcher does) on outputs that are views into longer NaN buffers:
    the outputs equal the references and the padding after them stays NaN. Inputs are views into longer buffers
    padded with a finite number, so that a mask off by one reads the padding (not foreign memory) and writes a
    finite number where it must not write at all."""
    from paratime.kernels import noise as noise_kernel
    from paratime.kernels import picard, step
    from paratime.noise import normals_reference, row_keys

    g = torch.Generator().manual_seed(D)
    M, pad = 3, 2 * BLOCK
    x, o, u, z = (_padded(M, D, pad, 0.5)[1].copy_(torch.randn(M, D, generator=g)) for _ in range(4))
    coef = [torch.randn(M, generator=g) for _ in range(4)]
    (b0, x0), (b1, dx) = _padded(M, D, pad), _padded(M, D, pad)
    step.fused_step_kernel[(M, -(-D // BLOCK))](x, o, u, z, x0, dx, *coef, 4.5, D, HAS_UNCOND=True, HAS_NOISE=True,
                                               WRITE_X0=True, WRITE_DX=True, BLOCK=BLOCK)
    want = fused_step_reference(x, o, u, 4.5, *coef, z)
    assert torch.equal(x0, want[0]) and torch.equal(dx, want[1])
    assert b0[M * D:].isnan().all() and b1[M * D:].isnan().all()

    W, B, blk = 3, M, 128
    nblk, wt = -(-D // blk), picard_tile(blk)
    pad = (wt + 1) * B * D + blk                        # room for a whole tile of rows past the window
    d, old = (_padded(W * B, D, pad, 0.5)[1].copy_(torch.randint(-8, 9, (W * B, D), generator=g) / 8)
              for _ in range(2))
    bn, new = _padded(W * B, D, pad)
    part_buf = torch.full(((W + wt) * B * nblk,), float("nan"))
    part = part_buf[:W * B * nblk].view(W, B, nblk)
    picard.picard_update_kernel[(B, nblk)](x, d, old, new, part, W, B, D, nblk, BLOCK=blk, WT=wt)
    rn, _ = picard_update_reference(x, d.view(W, B, D), old.view(W, B, D))
    assert torch.equal(new.view(W, B, D), rn) and not part.isnan().any()
    assert bn[W * B * D:].isnan().all() and part_buf[W * B * nblk:].isnan().all()

    keys = row_keys(7, 2, torch.arange(M), 5)
    bz, out = _padded(M, D, 2 * BLOCK)
    noise_kernel.counter_normal_kernel[(M, -(-D // BLOCK))](keys, out, D, BLOCK=BLOCK)
    assert torch.equal(out, normals_reference(keys, D)) and bz[M * D:].isnan().all()


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("block, D", [(128, 1), (128, 127), (128, 129), (1024, 1023), (1024, 1025)])
def test_picard_scan_is_the_exact_cumulative_sum_across_tiles(dtype, block, D):
    """Dyadic inputs (starts in [64, 128) on bfloat16's grid, increments in eighths): every partial sum is exact in
    float32 but needs more bits than bfloat16 holds, so the new points must equal the float64 cumulative sum rounded
    once to the storage dtype, bit for bit, whatever the order of the additions (bfloat16: one of its two neighbours,
    the interpreter truncates); the squared changes of the float32 points sum exactly too, so the residuals equal
    the reference's bit for bit in every dtype. W = 37 crosses tiles for both blocks (32 and 4 points a
    tile) and ends in a partial one."""
    W, B = 37, 3
    assert W > picard_tile(block) and W % picard_tile(block)
    g = torch.Generator().manual_seed(D)
    start = (64 + torch.randint(0, 128, (B, D), generator=g) / 2).to(dtype)
    dx = (torch.randint(-2, 3, (W, B, D), generator=g) / 8).to(dtype)
    old = start[None].expand(W, B, D).clone()
    with kernels("triton"):
        new, err = picard_update(start, dx, old, block=block)
    exact = start.double()[None] + dx.double().cumsum(0)
    assert exact.float().double().equal(exact)                      # the sums are exact in float32
    assert new.dtype == dtype and _same_or_bf16_neighbour(new, exact.float())
    assert torch.equal(err, picard_update_reference(start, dx, old)[1])


class _Recorder:
    """Stands in for a kernel: records each launch's arguments, then runs the real kernel."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getitem__(self, grid):
        def launch(*args, **consts):
            self.calls.append((args, consts))
            return self.real[grid](*args, **consts)
        return launch


def _kind(v) -> str:
    ptr = {F32: "*fp32", F16: "*fp16", BF16: "*bf16"}
    if isinstance(v, torch.Tensor):
        return ptr[v.dtype]
    return "fp32" if isinstance(v, float) else "i32"


def test_aot_compiles_exactly_the_variants_the_dispatcher_launches(monkeypatch):
    """Every entry of SAMPLER_LAUNCHES, launched through the dispatcher with inputs of its dtypes and flags: the
    arguments it passes have the pointer dtypes and scalar types of its AOT spec, in the kernel's parameter order,
    and its constexprs are the spec's; SPECS holds one spec per launch."""
    from paratime.kernels import aot, picard, step

    assert set(aot.SPECS) == {launch.name for launch in SAMPLER_LAUNCHES}
    rec = {"step": _Recorder(step.fused_step_kernel), "picard": _Recorder(picard.picard_update_kernel)}
    monkeypatch.setattr(step, "fused_step_kernel", rec["step"])
    monkeypatch.setattr(picard, "picard_update_kernel", rec["picard"])
    g = torch.Generator().manual_seed(0)
    for launch in SAMPLER_LAUNCHES:
        mod, fn_name, sig, consts = aot.spec(launch)
        st = launch.state
        with kernels("triton"):
            if launch.kernel == "picard_update":
                picard_update(torch.randn(2, 5, generator=g).to(st), torch.randn(3, 2, 5, generator=g).to(st),
                              torch.randn(3, 2, 5, generator=g).to(st), block=launch.block)
            else:
                x, z = (torch.randn(2, 5, generator=g).to(st) for _ in range(2))
                o, u = (torch.randn(2, 5, generator=g).to(launch.out) for _ in range(2))
                fused_step(x, o, u if launch.uncond else None, 2.0, 1.0, 0.5, 0.25, 0.125,
                           z if launch.noise else None, want_x0=launch.x0, want_dx=launch.dx)
        args, got_consts = rec[mod].calls.pop()
        params = list(inspect.signature(rec[mod].real.fn if hasattr(rec[mod].real, "fn") else rec[mod].real)
                      .parameters)
        assert params == [*sig, *consts], launch.name
        assert {k: _kind(v) for k, v in zip(sig, args)} == sig, launch.name
        assert got_consts == consts, launch.name


_STACK_PTX = """.version 7.0
.target sm_80
.address_size 64
.visible .entry k(.param .u64 p)
{
    .local .align 4 .b8 buf[256];
    .reg .b32 %r<6>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [p];
    cvta.to.global.u64 %rd2, %rd1;
    ld.global.u32 %r1, [%rd2];
    and.b32 %r2, %r1, 63;
    mul.wide.u32 %rd3, %r2, 4;
    mov.u64 %rd4, buf;
    add.u64 %rd5, %rd4, %rd3;
    st.local.u32 [%rd5], %r1;
    ld.global.u32 %r3, [%rd2+4];
    and.b32 %r4, %r3, 63;
    mul.wide.u32 %rd6, %r4, 4;
    add.u64 %rd7, %rd4, %rd6;
    ld.local.u32 %r5, [%rd7];
    st.global.u32 [%rd2+8], %r5;
    ret;
}
"""


def test_ptxas_stats_count_spills_not_the_stack_frame():
    """A hand-written kernel with a dynamically indexed 256-byte local array (ptxas: "256 bytes stack frame, 0 bytes
    spill stores, 0 bytes spill loads"): the AOT report's spill counts are 0, so they are read from the spill fields,
    not from the stack frame beside them (every Triton kernel here has neither, so the AOT test could not tell)."""
    from paratime.kernels.aot import _ptxas_stats

    stats = _ptxas_stats(_STACK_PTX, 80)
    assert stats["spill_stores"] == 0 and stats["spill_loads"] == 0 and stats["registers"] > 0
