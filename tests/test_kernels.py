"""Triton kernels equal their torch references (interpreter on CPU), build for sm_80/sm_90, and the samplers give
the same samples with the kernels on as with the torch path."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from paratime import ParallelSampler  # noqa: E402
from paratime import noise  # noqa: E402
from paratime.kernels import fused_step, kernels, picard_update, set_kernel_mode, triton_usable  # noqa: E402
from paratime.kernels.reference import fused_step_reference, picard_update_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}   # one unit in the last place of the storage dtype


def test_kernel_tests_run_the_triton_kernels_not_the_fallback(monkeypatch):
    """With the torch references disabled, fp32 CPU calls still work (the interpreted kernels ran) and equal the
    references; float64 storage goes to the (disabled) reference."""
    import paratime.kernels.dispatch as dispatch

    def refuse(*a, **k):
        raise AssertionError("torch reference called")

    monkeypatch.setattr(dispatch, "fused_step_reference", refuse)
    monkeypatch.setattr(dispatch, "picard_update_reference", refuse)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 3, 5, generator=g)
    c = torch.randn(4, 3, generator=g)
    x0, dx = fused_step(x, out, c_x=c[0], c_o=c[1], k_d=c[2], k_z=c[3])
    torch.testing.assert_close((x0, dx), fused_step_reference(x, out, None, 1.0, *c, None, True, True))
    start, d, old = torch.randn(3, 5, generator=g), torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    torch.testing.assert_close(picard_update(start, d, old), picard_update_reference(start, d, old))
    with pytest.raises(AssertionError, match="torch reference"):
        fused_step(x.double(), out.double(), c_x=c[0], c_o=c[1], k_d=c[2], k_z=c[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("shape", [(7, 1030), (5, 3, 7, 11)])
def test_fused_step_matches_reference(dtype, guided, noisy, shape):
    g = torch.Generator().manual_seed(0)
    x, out, unc, z = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    M = shape[0]
    c_x, c_o, k_d, k_z = (torch.randn(M, generator=g) for _ in range(4))
    args = dict(out_uncond=unc if guided else None, guidance=4.5, c_x=c_x, c_o=c_o, k_d=k_d, k_z=k_z,
                noise=z if noisy else None)
    x0, dx = fused_step(x, out, **args)
    r0, rdx = fused_step_reference(x.reshape(M, -1), out.reshape(M, -1),
                                   None if not guided else unc.reshape(M, -1), 4.5, c_x, c_o, k_d, k_z,
                                   z.reshape(M, -1) if noisy else None)
    torch.testing.assert_close(x0.reshape(M, -1).float(), r0.float(), **TOL[dtype])
    torch.testing.assert_close(dx.reshape(M, -1).float(), rdx.float(), **TOL[dtype])
    x0_only, none = fused_step(x, out, **args, want_dx=False)
    assert none is None
    torch.testing.assert_close(x0_only, x0, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("W, B, feat", [(1, 1, 1), (9, 5, 1030), (13, 3, (2, 5, 7))])
def test_picard_update_matches_reference(dtype, W, B, feat):
    feat = (feat,) if isinstance(feat, int) else feat
    g = torch.Generator().manual_seed(1)
    start = torch.randn((B, *feat), generator=g).to(dtype)
    dx = (0.3 * torch.randn((W, B, *feat), generator=g)).to(dtype)
    old = torch.randn((W, B, *feat), generator=g).to(dtype)
    new, err = picard_update(start, dx, old)
    rn, re_ = picard_update_reference(start.reshape(B, -1), dx.reshape(W, B, -1), old.reshape(W, B, -1))
    assert new.shape == dx.shape and err.shape == (W, B) and err.dtype == torch.float32
    torch.testing.assert_close(new.reshape(W, B, -1).float(), rn.float(), **TOL[dtype])
    torch.testing.assert_close(err, re_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_both_paths_take_and_refuse_the_same_inputs(mode):
    """Inputs whose shapes disagree with x's (start's) are refused naming them on both paths: the kernel indexed
    them by x's rows and features and read past their end (uninitialised memory: an error of 7e16); numbers and None
    as coefficients work on both (the reference raised AttributeError); picard_update with dtypes other than
    start's returns start's dtype on both (the kernel returned dx's)."""
    from paratime.kernels import kernels

    g = torch.Generator().manual_seed(0)
    x, o, z = (torch.randn(4, 8, generator=g) for _ in range(3))
    c = torch.randn(4, generator=g)
    start, d = torch.randn(2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    with kernels(mode):
        for kw, name in ((dict(out=o[:, :4]), "out"), (dict(out_uncond=o[:, :2], guidance=2.0), "out_uncond"),
                         (dict(noise=z[:2]), "noise"), (dict(c_x=c[:3]), "c_x")):
            with pytest.raises(ValueError, match=f"^{name}: "):
                fused_step(x, **{"out": o, "c_x": c, "c_o": c, "k_d": c, **kw})
        for args, name in (((start, d, d[:2]), "old"), ((start[:, :4], d, d), "dx")):
            with pytest.raises(ValueError, match=f"^{name}: expected shape"):
                picard_update(*args)
        x0, dx = fused_step(x, o, c_x=1.0, c_o=0.5, k_d=0.25, noise=z)        # k_z None: no noise term
        torch.testing.assert_close(x0, x + 0.5 * o)
        torch.testing.assert_close(dx, 0.25 * (x - x0))
        for dtype in (torch.float16, torch.float64):
            new, _ = picard_update(start, d.to(dtype), d.to(dtype))
            assert new.dtype == torch.float32


@pytest.mark.parametrize("block", [128, 1024])
@pytest.mark.parametrize("W", [1, 5, 37])
def test_picard_scan_across_tiles_matches_reference(block, W):
    """The tiled scan: windows shorter than one tile, a tile boundary inside the window (128: 32 points a tile;
    1024: 4), a partial last tile; features that end inside a block. The carry keeps the start and every earlier
    tile's sum: the new points equal the float64 cumulative sum to float32 rounding, the residuals the reference's."""
    from paratime.kernels.dispatch import picard_tile

    assert W <= picard_tile(block) or W % picard_tile(block)        # some cases cross a partial last tile
    g = torch.Generator().manual_seed(2)
    B, D = 2, block + 37
    start, dx, old = (torch.randn(B, D, generator=g), torch.randn(W, B, D, generator=g),
                      torch.randn(W, B, D, generator=g))
    new, err = picard_update(start, dx, old, block=block)
    exact = start.double()[None] + dx.double().cumsum(0)
    torch.testing.assert_close(new.double(), exact, rtol=0, atol=1e-5 * W ** 0.5)
    rn, re_ = picard_update_reference(start, dx, old)
    torch.testing.assert_close(err, re_, rtol=1e-5, atol=1e-6)
    assert torch.equal(picard_update(start, dx, old, block=block)[1], err)     # deterministic: the same bits


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_samplers_give_the_same_samples_with_kernels_on(solver):
    def run():
        return ParallelSampler("gmm", solver=solver, steps=20, state_dtype=torch.float32, window=20, tol=0.0,
                               progress=False).sample(16, seed=0).samples
    try:
        set_kernel_mode("torch")
        ref = run()
        set_kernel_mode("triton")          # raises if any dispatch could not use the interpreter
        got = run()
    finally:
        set_kernel_mode("auto")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _without_interpreter(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_no_kernel_runs_where_it_cannot():
    """CPU tensors without the interpreter take the torch path; forcing Triton there is a clear error."""
    r = _without_interpreter(
        "import torch\n"
        "from paratime import ParallelSampler\n"
        "from paratime.kernels import triton_usable, set_kernel_mode, fused_step\n"
        "x = torch.ones(3, 4)\n"
        "assert not triton_usable(x)\n"
        "s = ParallelSampler('gmm', steps=5, state_dtype=torch.float32, progress=False).sample(4, seed=0)\n"
        "assert torch.isfinite(s.samples).all()\n"
        "set_kernel_mode('triton')\n"
        "try:\n"
        "    fused_step(x, x, c_x=torch.ones(3), c_o=torch.ones(3), want_dx=False)\n"
        "except RuntimeError as e:\n"
        "    assert 'cannot run' in str(e); print('OK')\n")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_every_kernel_compiles_for_sm80_and_sm90():
    r = _without_interpreter("from paratime.kernels.aot import main; main(['--json'])")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = json.loads(r.stdout.strip().splitlines()[-1])
    from paratime.kernels.aot import SPECS

    assert {(x["kernel"], x["arch"]) for x in recs} == {(k, a) for k in SPECS for a in ("sm_80", "sm_90")}
    for x in recs:
        assert x["cubin_bytes"] > 0 and x["registers"] and x["registers"] <= 255
        assert x["spill_stores"] == 0, x


@pytest.mark.parametrize("shape", [(100, 64, 64), (7, 3), (1, 4096), (33, 2048)])
def test_cumsum0_is_torch_cumsum(shape):
    """The CPU scan that replaces torch.cumsum(0) on large rows: the same bits in float64, the float32 sum of the
    same order (torch's CPU cumsum accumulates float32 in float64), and its input untouched."""
    from paratime.kernels import cumsum0

    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    assert torch.equal(cumsum0(x), x.cumsum(0)) and torch.equal(x, before)
    torch.testing.assert_close(cumsum0(x.float()), x.float().cumsum(0), rtol=1e-5, atol=1e-4)


def test_every_launch_makes_its_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': each launch (fused step, Picard update, noise)
    runs inside ``launch_device`` of its input, so a state on cuda:1 while cuda:0 is current launches on cuda:1.
    On the CPU (the interpreter) the guard is a no-op; here it is recorded."""
    import paratime.kernels.dispatch as dispatch
    import paratime.noise as noise
    from paratime import ParallelSampler

    seen = []
    real = dispatch.launch_device

    def recording(t):
        seen.append(t.device)
        return real(t)

    monkeypatch.setattr(dispatch, "launch_device", recording)
    s = ParallelSampler("gmm", solver="ddpm", steps=6, window=3, dtype=torch.float32, state_dtype=torch.float32,
                        progress=False, kernels="triton")
    launches = []                                    # every launch, in order (record_launches keeps a set)
    monkeypatch.setattr(dispatch, "_RECORD", type("Every", (), {"add": lambda self, x: launches.append(x)})())
    s.sample(2, seed=0)
    kinds = {x.kernel for x in launches}
    assert {"fused_step", "picard_update"} <= kinds, kinds
    assert len(seen) == len(launches) and all(d.type == "cpu" for d in seen)      # one guard per launch
    seen.clear()
    monkeypatch.setattr(noise, "launch_device", recording)
    with dispatch.kernels("triton"):
        noise.noise_rows(0, noise.STEP, torch.arange(3), 2, (4,))
    assert len(seen) == 1


# -- coefficients of any shape, gradients through every input, the noise kernel under a float64 default (review,
# stop 47) --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 1), (1, 1), (4, 1, 1, 1)])
def test_coefficients_of_any_shape_take_the_kernel_as_the_reference(shape):
    g = torch.Generator().manual_seed(0)
    x, o, z = (torch.randn(4, 3, 5, generator=g) for _ in range(3))
    c = torch.rand(shape, generator=g)
    results = []
    for mode in ("torch", "triton"):
        with kernels(mode):
            results.append(fused_step(x, o, c_x=c, c_o=c, k_d=c, k_z=c, noise=z))
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-6)


def _grads(mode, fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    with kernels(mode):
        outs = fn(*inputs)
    loss = sum((o * o).sum() for o in outs if o is not None)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("wrt", ["c_x", "c_o", "k_d", "k_z", "noise"])
def test_fused_step_keeps_the_graph_of_coefficients_and_noise(wrt):
    g = torch.Generator().manual_seed(0)
    x, o, z = (torch.randn(4, 6, generator=g) for _ in range(3))
    c = {k: torch.rand(4, generator=g) for k in ("c_x", "c_o", "k_d", "k_z")}
    args = {**c, "noise": z}

    def fn(t):
        return fused_step(x, o, **{**args, wrt: t})

    want = _grads("torch", fn, [args[wrt]])
    torch.testing.assert_close(_grads("triton", fn, [args[wrt]]), want)


def test_picard_update_keeps_the_graph():
    g = torch.Generator().manual_seed(0)
    start, dx, old = (torch.randn(shape, generator=g) for shape in ((2, 5), (3, 2, 5), (3, 2, 5)))
    want = _grads("torch", picard_update, [start, dx, old])
    torch.testing.assert_close(_grads("triton", picard_update, [start, dx, old]), want)


def test_noise_kernel_runs_under_a_float64_default_dtype():
    want = noise.noise_rows(0, noise.STEP, torch.arange(3), 2, (5,))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with kernels("triton"):
            got = noise.noise_rows(0, noise.STEP, torch.arange(3), 2, (5,))
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(got, want)
