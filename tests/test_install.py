"""The repository does not shadow installed packages: run from its root (as ``python -m pytest`` and any ``python``
there are), a diffusers pipeline imports even with the PyPI package called ``kernels`` installed (transformers 5
requires it), and paratime's own kernels are still ``paratime.kernels``."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_folder_of_the_repository_shadows_an_installed_package():
    # A folder with __init__.py in the working directory wins over any installed package of the same name.
    from importlib.metadata import packages_distributions
    installed = {name for name, dists in packages_distributions().items() if set(dists) != {"paratime"}}
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert "kernels" not in packages
    assert sorted(packages & installed) == [], "top-level folders that shadow installed packages from the root"


def test_paratime_kernels_is_the_repositorys_kernel_package():
    import paratime.kernels
    assert Path(paratime.kernels.__file__).resolve().parent == ROOT / "kernels" / "paratime_kernels"


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
def test_a_diffusers_pipeline_imports_from_the_repository_root():
    code = ("import kernels, sys; from diffusers import StableDiffusionPipeline; "
            "print(getattr(kernels, '__file__', None) or 'namespace')")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    origin = run.stdout.strip().splitlines()[-1]
    assert not origin.startswith(str(ROOT)), f"`kernels` resolved to the repository: {origin}"


def test_the_license_is_an_spdx_string_and_the_build_backend_reads_one():
    # setuptools deprecates `license = {text = ...}` and refuses it from 2027-02-18 (a fresh machine's pip builds
    # with the newest setuptools): the SPDX string needs setuptools >= 77 in the build requirements.
    import re
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str), "project.license: an SPDX expression, not a table"
    (req,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    floor = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", req)
    assert floor and int(floor.group(1)) >= 77, req
