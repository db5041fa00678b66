"""Code style: no line of a git-tracked ``.py`` file is longer than :data:`MAX_LINE` characters. A line that cannot be
wrapped (a URL, say) may carry ``# noqa: E501`` to be let through."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MAX_LINE = 120
ROOT = Path(__file__).resolve().parent.parent


def _tracked_py_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    run = subprocess.run(["git", "ls-files", "-z", "--", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"not a git checkout: {run.stderr.strip()}")
    return [ROOT / name for name in run.stdout.split("\0") if name]


def test_no_line_over_max_length():
    files = _tracked_py_files()
    assert files, "git ls-files found no .py files"
    long = []
    for path in files:
        if not path.is_file():           # tracked but deleted in the working tree
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if len(line) > MAX_LINE and "# noqa: E501" not in line:
                long.append(f"{path.relative_to(ROOT).as_posix()}:{number}:{len(line)}")
    assert not long, f"{len(long)} line(s) over {MAX_LINE} characters (file:line:length):\n" + "\n".join(long)
