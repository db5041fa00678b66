"""The two layers import-linter cannot see (they live outside paratime/): kernels/ is the bottom layer and
benchmarks/ (paratime.bench) the top one. The rest of the layering is the import-linter contract in pyproject.toml,
which .ci/run checks with ``lint-imports`` before the tests."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """Every module a file imports, as absolute names (relative imports resolved in paratime's package layout)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[:2] == ["kernels", "paratime_kernels"]:       # kernels/paratime_kernels/ is installed as paratime.kernels
        parts = ["paratime", "kernels"] + parts[2:]
    elif parts[0] == "benchmarks":
        parts = ["paratime", "bench"] + parts[1:]
    package = parts[:-1]                                   # the package the file lives in
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            name = ".".join(p for p in (base, node.module or "") if p)
            out.append((node.lineno, name))
    return out


def _violations(files, allowed) -> list[str]:
    bad = []
    for f in files:
        for line, name in _imports(f):
            if (name == "paratime" or name.startswith("paratime.")) and not allowed(name):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {name}")
    return bad


def test_kernels_import_nothing_from_paratime_above_them():
    files = sorted((ROOT / "kernels" / "paratime_kernels").glob("*.py"))
    assert files
    assert _violations(files, lambda n: n.startswith("paratime.kernels")) == []


def test_only_the_cli_imports_the_benchmarks():
    files = [f for f in sorted((ROOT / "paratime").rglob("*.py")) if f.name != "cli.py"]
    assert files
    assert _violations(files, lambda n: not n.startswith("paratime.bench")) == []


@pytest.mark.parametrize("source, expected", [("from paratime.sampler import X", "paratime.sampler"),
                                              ("from ..sampler import X", "paratime.sampler"),
                                              ("from .reference import y", "paratime.kernels.reference")])
def test_the_scanner_resolves_imports(source, expected):
    # The checks above must be able to fail: the scanner sees an upward import from a kernel file.
    assert [n for _, n in _imports(ROOT / "kernels" / "paratime_kernels" / "probe.py", source)] == [expected]
    assert _violations([ROOT / "kernels" / "paratime_kernels" / "dispatch.py"], lambda n: False) != []
