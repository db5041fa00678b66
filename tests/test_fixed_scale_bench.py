"""``benchmarks/fixed_scale_worst.py`` (the README's fixed-data-scale figure for a stochastic sliding window) on a tiny
configuration: each row's worst error over tol equals the same quotient recomputed from the public API, and every
seed x update x scale x tol row is there."""

import itertools
import json

import pytest
import torch

from paratime import ParallelSampler
from paratime.bench import fixed_scale_worst as fsw

pytestmark = pytest.mark.usefixtures("one_thread")


def _gmm_ddpm(**options):
    return ParallelSampler("gmm", solver="ddpm", steps=100, progress=False, **options)


def test_each_row_is_the_worst_samples_error_over_tol_times_the_fixed_scale():
    seed, samples, tol, update = 1, 24, 0.03, "picard"
    rows = fsw.sweep(seeds=(seed,), updates=(update,), tols=(tol,), samples=samples)
    ref = _gmm_ddpm(method="sequential").sample(samples, seed=seed).samples
    own = sorted(float(ref[b].abs().max()) for b in range(samples))
    expected_scales = {"median": own[(samples - 1) // 2], "max": own[-1], "1": 1.0}   # torch's median: the lower
    assert [r["scale"] for r in rows] == ["median", "max", "1"]
    for r in rows:
        scale = expected_scales[r["scale"]]
        assert r["scale_value"] == pytest.approx(scale, rel=1e-6)
        res = _gmm_ddpm(window=8, tol=tol, update=update, data_scale=scale).sample(samples, seed=seed)
        ratios = [float((res.samples[b] - ref[b]).abs().max()) / (tol * scale) for b in range(samples)]
        assert r["worst"] == pytest.approx(max(ratios), rel=1e-5)
        assert r["sample"] == ratios.index(max(ratios))
        assert r["over"] == sum(v > 1 for v in ratios) and r["rounds"] == res.stats.rounds
        assert r["rolled_back"] == sum(res.stats.extra.get("rolled_back", []))
    assert rows[0]["worst"] != pytest.approx(rows[1]["worst"])      # the scales make different runs


def test_over_counts_the_samples_beyond_tol():
    """Against a reference moved by 0, 0.25, 0.5, ... of tol: the samples beyond tol are counted, the worst found."""
    seed, samples, tol, scale = 0, 24, 0.1, 2.0
    ref = _gmm_ddpm(method="sequential").sample(samples, seed=seed).samples
    moved = ref + (torch.arange(samples) * 0.25 * tol * scale).view(-1, *[1] * (ref.ndim - 1))
    row = fsw.worst(moved, seed, tol, "secant", scale, accept=10)       # tol / 10: the guard rolls samples back
    res = _gmm_ddpm(window=8, tol=tol, update="secant", data_scale=scale, accept_tol=tol / 10).sample(samples,
                                                                                                   seed=seed)
    ratios = [float((res.samples[b] - moved[b]).abs().max()) / (tol * scale) for b in range(samples)]
    assert row["over"] == sum(v > 1 for v in ratios) >= samples // 2
    assert row["sample"] == ratios.index(max(ratios)) and row["worst"] == pytest.approx(max(ratios), rel=1e-5)
    assert row["rolled_back"] == sum(res.stats.extra["rolled_back"]) > 0


def test_main_prints_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = fsw.main(["--seeds", "0", "--updates", "secant,anderson", "--tols", "0.1,0.01", "--samples", "24",
                     "--accept", "10", "--json", str(out)])
    rows = json.loads(out.read_text())
    want = set(itertools.product([0], ["secant", "anderson"], fsw.SCALES, [0.1, 0.01]))
    assert len(rows) == len(want) and {(r["seed"], r["update"], r["scale"], r["tol"]) for r in rows} == want
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("| 0 |")]
    assert len(table) == len(want)
    assert code == (1 if any(r["over"] for r in rows) else 0)
    assert f"{len(want)} runs; worst {max(r['worst'] for r in rows):.3f} of tol" in text and "tol / 10" in text
    ref = _gmm_ddpm(method="sequential").sample(24, seed=0).samples     # the --accept run: the scale-1 secant row
    res = _gmm_ddpm(window=8, tol=0.1, data_scale=1.0, accept_tol=0.01).sample(24, seed=0)
    (row,) = [r for r in rows if (r["update"], r["scale"], r["tol"]) == ("secant", "1", 0.1)]
    assert row["rolled_back"] == sum(res.stats.extra["rolled_back"])
    assert row["worst"] == pytest.approx(float((res.samples - ref).abs().max()) / 0.1, rel=1e-5)


@pytest.mark.parametrize("argv", [["--updates", "newton"], ["--tols", "0"], ["--seeds", "a"], ["--samples", "0"],
                                  ["--accept", "0"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit):
        fsw.main(argv)


def test_scales_are_the_median_and_largest_max_abs_and_one():
    ref = torch.tensor([[1.0, -3.0], [0.5, 0.25], [2.0, -0.5]])      # per-sample max-abs 3, 0.5, 2
    assert fsw.scales(ref) == {"median": 2.0, "max": 3.0, "1": 1.0}
