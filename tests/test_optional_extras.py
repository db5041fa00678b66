"""A base install (no extras) that reaches for an optional module fails with one line naming the extra to install
(``pip install 'paratime[EXTRA]'``), never a bare "No module named" or a message that blames something else. The
extras' modules are blocked here, so the checks run whether or not the extras are installed."""

import builtins
import importlib.util
import json
import sys

import pytest
import torch

import paratime.kernels.dispatch as dispatch
from paratime import ParallelSampler
from paratime.cli import main
from paratime.kernels import fused_step, kernels


def _block_imports(monkeypatch, *tops: str) -> None:
    """``import X`` of each top-level module in ``tops`` (or a submodule) raises ModuleNotFoundError, as when the
    extra is not installed; find_spec finds none of them."""
    real = builtins.__import__

    def fake(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.partition(".")[0] in tops:
            raise ModuleNotFoundError(f"No module named {name.partition('.')[0]!r}", name=name.partition(".")[0])
        return real(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", fake)
    for top in tops:
        monkeypatch.setitem(sys.modules, top, None)


@pytest.mark.parametrize("argv", [["eval-digits", "--samples", "4", "--steps", "2", "--no-progress"],
                                  ["train-digits", "--steps", "1", "--batch", "4", "--channels", "8", "--no-progress"],
                                  ["likelihood", "--model", "digits", "--samples", "4", "--steps", "2",
                                   "--no-progress"]])
def test_commands_that_need_scikit_learn_name_the_digits_extra(argv, monkeypatch, tmp_path, capsys):
    _block_imports(monkeypatch, "sklearn")
    out = ["--out", str(tmp_path / "w.safetensors")] if argv[0] == "train-digits" else []
    assert main([*argv, *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("paratime: error: No module named 'sklearn'") and "pip install 'paratime[digits]'" in err


def test_a_saved_pipeline_without_diffusers_names_the_diffusers_extra(monkeypatch, tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    _block_imports(monkeypatch, "diffusers", "transformers")
    assert main(["sample", "--pipeline", str(tmp_path), "--prompt", "a cat", "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'paratime[diffusers]'" in err, err


def test_an_error_that_already_names_its_extra_is_kept():
    from paratime.cli import _missing_extra

    e = ImportError("backend 'ray' needs ray: pip install 'paratime[ray]'", name="ray")
    assert _missing_extra(e) == str(e)
    assert _missing_extra(ImportError("cannot import name 'x' from 'y'")) == "cannot import name 'x' from 'y'"


@pytest.fixture
def no_triton(monkeypatch):
    """Triton absent: not found, and the kernels' modules do not import (they may be loaded already)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(dispatch, "_triton", lambda: None)
    assert importlib.util.find_spec("triton") is None


def test_a_sampler_with_triton_kernels_names_the_triton_extra(no_triton):
    """A float32 CPU state under TRITON_INTERPRET=1 would run the kernels if Triton were there: its absence is the
    reason, and the error says so (it said "needs CUDA, or TRITON_INTERPRET=1 on CPU", both already true)."""
    with pytest.raises(ValueError, match=r"^kernels: 'triton' needs Triton.*pip install 'paratime\[triton\]'$"):
        ParallelSampler("gmm", steps=5, state_dtype=torch.float32, kernels="triton")


def test_the_triton_kernel_mode_names_the_triton_extra(no_triton):
    x = torch.ones(2, 8)
    with kernels("triton"), pytest.raises(RuntimeError, match=r"pip install 'paratime\[triton\]'$"):
        fused_step(x, x, c_x=1.0, c_o=1.0, want_dx=False)


def test_the_noise_kernel_in_triton_mode_names_the_triton_extra(no_triton):
    from paratime.noise import INITIAL, draw_noise

    with kernels("triton"), pytest.raises(RuntimeError, match=r"pip install 'paratime\[triton\]'$"):
        draw_noise(0, 2, (3,), None, INITIAL, dtype=torch.float32)


def test_the_devices_benchmark_without_matplotlib_stops_before_measuring(monkeypatch, tmp_path, capsys):
    """devices.png is an output: without matplotlib (the bench extra) the run measured for minutes, then failed in
    its plot with a bare ModuleNotFoundError, before writing devices.json. Now refused with the outputs' checks."""
    from benchmarks import devices

    monkeypatch.setattr(devices, "measure", lambda *a, **k: pytest.fail("measured before the outputs were checked"))
    _block_imports(monkeypatch, "matplotlib")
    with pytest.raises(SystemExit) as info:
        devices.main(["--quick", "--models", "digits", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "--out: devices.png needs matplotlib, an optional extra: pip install 'paratime[bench]'" in \
        capsys.readouterr().err
