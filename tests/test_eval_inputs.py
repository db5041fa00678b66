"""Inputs of the evaluators, the image writers and the policy's comparison: every bad value raises a ValueError naming
the argument, where it was cast, dropped or drawn without a word (review, stop 47)."""
import numpy as np
import pytest
import torch

import paratime.policy_eval as pe
from paratime.digits_eval import knn_precision_recall
from paratime.images import image_grid, scatter_image, write_png


def _frechet():
    pytest.importorskip("scipy")          # quality_depth's sqrtm (scipy comes with scikit-learn)
    from benchmarks.quality_depth import frechet_distance

    return frechet_distance


def test_frechet_distance_of_one_feature_is_the_closed_form():
    fd = _frechet()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 1)), 2.0 + 3.0 * rng.normal(size=(300, 1))
    sa, sb = a[:, 0].std(ddof=1), b[:, 0].std(ddof=1)
    assert fd(a, b) == pytest.approx((a.mean() - b.mean()) ** 2 + (sa - sb) ** 2, rel=1e-9)


@pytest.mark.parametrize("a, name", [(np.full((50, 4), np.nan), "a"), (np.zeros((1, 4)), "a"),
                                     (np.zeros(50), "a"), (np.zeros((50, 3)), "a, b")])
def test_frechet_distance_refuses_bad_features(a, name):
    b = np.random.default_rng(1).normal(size=(50, 4))
    with pytest.raises(ValueError, match=f"^{name}:"):
        _frechet()(a, b)


def test_knn_refuses_nan_and_mismatched_features():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 5))
    fake = rng.normal(size=(40, 5))
    fake[3] = np.nan
    with pytest.raises(ValueError, match="^fake:"):
        knn_precision_recall(real, fake)            # scored a NaN row as outside every ball (0.0 / 0.0 when all NaN)
    with pytest.raises(ValueError, match="^real, fake:"):
        knn_precision_recall(real, rng.normal(size=(40, 4)))


@pytest.mark.parametrize("pixels", [np.full((2, 2), 0.9), np.array([[300, 5]]), np.zeros((0, 4), dtype=np.uint8)])
def test_write_png_refuses_pixels_it_would_cast_or_cannot_write(tmp_path, pixels):
    with pytest.raises(ValueError, match="^pixels:"):
        write_png(tmp_path / "a.png", pixels)


def test_image_grid_refuses_nan_and_a_bad_value_range():
    with pytest.raises(ValueError, match="^images:"):
        image_grid(torch.full((1, 1, 2, 2), float("nan")))            # was drawn black
    for rng in ((1.0, 1.0), (1.0, -1.0), (0.0, float("inf"))):          # black, inverted, black
        with pytest.raises(ValueError, match="^value_range:"):
            image_grid(torch.zeros(1, 1, 2, 2), value_range=rng)


def test_image_grid_keeps_odd_counts_and_ranges():
    g = image_grid(torch.tensor([[[[-1.0, 1.0]]]] * 3), upscale=1, pad=1)
    assert g.dtype == np.uint8 and g.shape == (5, 7)                   # 2 x 2 cells, the 4th left grey
    assert g[1, 1] == 0 and g[1, 2] == 255 and g[3, 4] == 128


def test_scatter_image_refuses_extent_zero_negative_and_size_zero():
    pts = torch.tensor([[0.5, 0.5]])
    for extent in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="^extent:"):
            scatter_image(pts, size=32, extent=extent)               # 0 was read as None, -1 mirrored the plot
    with pytest.raises(ValueError, match="^size:"):
        scatter_image(pts, size=0)                                    # a 0 x 0 PNG


def _script():
    from benchmarks import policy_latency

    return policy_latency


def test_window_zero_is_refused_before_any_work(monkeypatch):
    pytest.importorskip("diffusers")          # policy_latency compares with diffusers' scheduler
    def no_work(*args, **kwargs):
        raise RuntimeError("the benchmark started: --window 0 was taken as the default window")

    monkeypatch.setattr(pe, "latency_observations", no_work)
    with pytest.raises(ValueError, match="^window:"):
        _script().main(["--window", "0", "--chunks", "1", "--reps", "1"])


def test_overrides_for_a_method_not_run_are_refused(monkeypatch):
    monkeypatch.setattr(pe, "rollout", lambda *a, **k: pytest.fail("ran with the overrides dropped"))
    for options in ({"picard": {"window": 8}}, {"picardd": {"tol": 0.2}}):
        with pytest.raises(ValueError, match="^options:"):
            pe.compare_methods(("sequential",), episodes=1, latency_chunks=1, baseline=False, options=options)


def test_empty_overrides_for_other_methods_pass_as_eval_policy_makes_them(monkeypatch):
    monkeypatch.setattr(pe, "rollout", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):           # reached the rollouts: check_eval_args's empty dicts are fine
        pe.compare_methods(("sequential",), episodes=1, latency_chunks=1, baseline=False,
                           options={"picard": {}, "parareal": {}})
