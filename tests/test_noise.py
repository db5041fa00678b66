"""The counter-based noise: the Triton kernel equals its torch reference bit for bit (interpreter on CPU), the hash is
splitmix64, the numbers are standard normal and independent across their coordinates, and every draw depends on
(seed, stream, sample, step) only, never on how the rows are batched."""

import math
import os
import subprocess
import sys

import pytest
import torch

from test_picard_syncs import SyncCounter       # tests/ is on sys.path (rootdir-relative test modules)

from paratime.kernels import kernels
from paratime.noise import (CORRECTOR, DEQUANT, INITIAL, PROBE, STEP, draw_noise, mix64, noise_rows,
                            normals_reference, row_keys)

MASK = (1 << 64) - 1


def splitmix64_next(state: int) -> tuple[int, int]:
    """Steele, Lea & Flood's splitmix64 on Python integers: (next state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def as_unsigned(t: torch.Tensor) -> list[int]:
    return [int(v) & MASK for v in t.tolist()]


def test_mix64_is_splitmix64():
    # splitmix64's first output from state 0 is its published test vector; then arbitrary words, sign bit set or not.
    assert splitmix64_next(0)[1] == 0xE220A8397B1DCDAF
    words = [0, 1, 2**63 - 1, 2**63, MASK, 0x0123456789ABCDEF, 0xFEDCBA9876543210]
    signed = torch.tensor([w - (1 << 64) if w >> 63 else w for w in words])
    got = as_unsigned(mix64(signed + (0x9E3779B97F4A7C15 - (1 << 64))))
    assert got == [splitmix64_next(w)[1] for w in words]


def test_reference_is_box_muller_of_splitmix64():
    # Element 2p / 2p + 1 of a row: Box-Muller of splitmix64's output p + 1 from the row's key, in float64.
    key = int(row_keys(5, STEP, torch.tensor([3]), torch.tensor([7]))[0]) & MASK
    row = normals_reference(torch.tensor([key - (1 << 64) if key >> 63 else key]), 7)[0]
    state, expect = key, []
    for _ in range(4):
        state, z = splitmix64_next(state)
        u1, u2 = ((z >> 32) + 0.5) * 2.0**-32, ((z & 0xFFFFFFFF) + 0.5) * 2.0**-32
        r = math.sqrt(-2.0 * math.log(u1))
        expect += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
    assert torch.equal(row, torch.tensor(expect[:7], dtype=torch.float32))


@pytest.mark.parametrize("D", [1, 7, 1024, 3001])
def test_kernel_equals_reference(D):
    pytest.importorskip("triton")
    # Under TRITON_INTERPRET=1 (tests/conftest.py) the kernel runs on CPU: the same bits as the torch reference,
    # for odd sizes, one block and several blocks, and seeds, samples and steps with the top bit in play.
    samples = torch.tensor([0, 1, 2**31 + 5, 17, 3])
    steps = torch.tensor([0, 999, 4, 2**32 - 1, 0])
    for seed, stream in ((0, STEP), (2**64 - 1, INITIAL), (123456789, CORRECTOR)):
        with kernels("triton"):
            k = noise_rows(seed, stream, samples, steps, (D,))
        with kernels("torch"):
            r = noise_rows(seed, stream, samples, steps, (D,))
        assert torch.equal(k, r)


def test_kernel_mode_triton_without_triton_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels("triton"), pytest.raises(RuntimeError, match="noise kernel"):
        draw_noise(0, 1, (4,), None, INITIAL)


def test_independent_of_the_batch_split_and_row_order():
    # (count, batch) table == two splits by first_sample == rows drawn lazily in any order.
    table = draw_noise(3, 5, (2, 3), 6, STEP, first_sample=10)
    halves = torch.cat([draw_noise(3, 2, (2, 3), 6, STEP, first_sample=10),
                        draw_noise(3, 3, (2, 3), 6, STEP, first_sample=12)], 1)
    assert torch.equal(table, halves)
    i, b = torch.tensor([5, 0, 3, 3]), torch.tensor([1, 4, 0, 2])
    rows = noise_rows(3, STEP, b + 10, i, (2, 3), dtype=torch.float64)
    assert torch.equal(rows, table[i, b])
    # One draw per sample is step 0 of the table; float64 results are the float32 numbers.
    assert torch.equal(draw_noise(3, 5, (2, 3), None, STEP, first_sample=10), table[0])
    assert torch.equal(draw_noise(3, 5, (2, 3), 6, STEP, 10, dtype=torch.float32).double(), table)


def test_coordinates_give_different_noise():
    base = dict(samples=torch.tensor([0]), steps=torch.tensor([0]), shape=(64,))
    draws = [noise_rows(seed, stream, base["samples"] + di, base["steps"] + dn, base["shape"])
             for seed, stream, di, dn in ((0, STEP, 0, 0), (1, STEP, 0, 0), (0, CORRECTOR, 0, 0), (0, STEP, 1, 0),
                                          (0, STEP, 0, 1), (0, PROBE, 0, 0), (0, DEQUANT, 0, 0))]
    for a in range(len(draws)):
        for c in range(a + 1, len(draws)):
            assert not torch.equal(draws[a], draws[c]), (a, c)


def test_standard_normal_and_uncorrelated():
    # 2^18 numbers: moments within 6 standard errors, Kolmogorov-Smirnov distance below its 1e-6 critical value,
    # and neighbouring rows (samples, steps) and neighbouring elements (cos / sin of one pair) uncorrelated.
    z = draw_noise(11, 64, (1024,), 4, STEP, dtype=torch.float64)          # (4, 64, 1024)
    x, n = z.flatten(), z.numel()
    se = 1 / math.sqrt(n)
    assert abs(float(x.mean())) < 6 * se
    assert abs(float(x.var()) - 1) < 6 * math.sqrt(2) * se
    assert abs(float((x**3).mean())) < 6 * math.sqrt(15) * se
    assert abs(float((x**4).mean()) - 3) < 6 * math.sqrt(96) * se
    s = x.sort().values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    k = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum(k - cdf, cdf - (k - 1 / n)).max())
    assert ks < math.sqrt(-0.5 * math.log(1e-6 / 2)) / math.sqrt(n)
    for a, b in ((z[:, :-1], z[:, 1:]), (z[:-1], z[1:]), (z[..., 0::2], z[..., 1::2])):
        corr = float((a * b).mean())
        assert abs(corr) < 6 / math.sqrt(a.numel()), corr


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True])
def test_bad_seed_and_first_sample(bad):
    with pytest.raises(ValueError, match="seed"):
        draw_noise(bad, 1, (2,), None, INITIAL)
    with pytest.raises(ValueError, match="first_sample"):
        draw_noise(0, 1, (2,), None, INITIAL, first_sample=bad)


def test_bad_stream():
    with pytest.raises(ValueError, match="stream"):
        draw_noise(0, 1, (2,), None, -1)


def test_kernel_compiles_for_ampere_and_hopper(tmp_path):
    pytest.importorskip("triton")
    # The real @triton.jit (no interpreter) compiled to cubin for sm_80 and sm_90 on this CPU-only machine.
    code = ("import importlib, triton\n"
            "from triton.backends.compiler import GPUTarget\n"
            "from triton.compiler import ASTSource\n"
            "fn = importlib.import_module('paratime.kernels.noise').counter_normal_kernel\n"
            "sig = {'key_ptr': '*i64', 'out_ptr': '*fp32', 'D': 'i32', 'BLOCK': 'constexpr'}\n"
            "for arch in (80, 90):\n"
            "    k = triton.compile(ASTSource(fn, sig, {'BLOCK': 1024}), target=GPUTarget('cuda', arch, 32))\n"
            "    assert len(k.asm['cubin']) > 0\n"
            "    print(arch)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["80", "90"]


def test_drawn_without_host_reads_or_copies(monkeypatch):
    # Keys, hashes and normals are made where the noise lives: no device read, no torch.tensor / as_tensor copy.
    copies = []
    for ctor in ("tensor", "as_tensor"):
        real = getattr(torch, ctor)
        monkeypatch.setattr(torch, ctor, lambda *a, _real=real, **k: copies.append(k.get("device")) or _real(*a, **k))
    samples, steps = torch.tensor([1, 2]), torch.tensor([0, 3])
    # The suite's counter (tests/test_picard_syncs.py): item, bool, tolist, nonzero, and also boolean-mask indexing,
    # .cpu(), bincount, unique, ... (a list of the first few names let a mask gather in noise_rows pass unseen).
    with SyncCounter() as mode:
        draw_noise(9, 3, (5, 7), 4, STEP, first_sample=2, dtype=torch.float32)
        noise_rows(9, CORRECTOR, samples, steps, (11,))
    assert mode.names == [] and copies == [None, None]      # the two row-index tensors of this test only


def test_a_generator_table_is_filled_in_place_with_the_same_bits():
    """A caller's generator: one (B, *rest) draw per step in step order (diffusers' randn_tensor), written into a
    table of the state's dtype as drawn (no stacked second table), bit for bit the draws converted; a list of
    generators draws one row from each."""
    from paratime.noise import generator_noise

    shape, count = (3, 2, 5), 7
    got = generator_noise(torch.Generator().manual_seed(5), shape, count, dtype=torch.float64)
    ref = torch.Generator().manual_seed(5)
    want = torch.stack([torch.randn(shape, generator=ref) for _ in range(count)]).double()
    assert got.dtype == torch.float64 and got.shape == (count, *shape) and torch.equal(got, want)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    refs = [torch.Generator().manual_seed(s) for s in range(3)]
    got = generator_noise(gens, shape, count)
    want = torch.stack([torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in refs]) for _ in range(count)])
    assert got.dtype == torch.float32 and torch.equal(got, want)
