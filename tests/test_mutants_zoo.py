"""Gaps a mutation run over the shipped models and their helpers found (paratime/zoo/gmm.py, digits.py, policy.py,
paratime/tasks/reach.py, paratime/digits_eval.py with benchmarks/quality_depth.py's Fréchet distance,
paratime/images.py, paratime/checks.py, paratime/models.py), and the ``eval-digits`` defaults: each test failed on a
hand-made mutant the rest of the suite let through or caught only statistically (the mixtures' exact scores, draws
and parameters, which test_accuracy.py and a Monte-Carlo check hold through sampling). Each is anchored on an exact
answer worked out here: a mixture's noisy log-density differentiated by autograd, the Fréchet distance of two
Gaussians in closed form, pixel values mapped by hand, a reach step on dyadic numbers, k-NN balls on a line, DDPM's
beta schedules written out."""

import math
import re
import zlib

import numpy as np
import pytest
import torch

from paratime.checks import check_int, check_number
from paratime.digits_eval import _to_features, check_features, knn_precision_recall
from paratime.images import image_grid, scatter_image, write_png
from paratime.tasks.reach import Episodes, ReachConfig, chunk_path, expert_actions, observe, step
from paratime.zoo.gmm import AnisotropicMixture, GaussianMixture, mixture_3d, ring_gmm


# -- zoo/gmm.py: the closed-form denoiser is Tweedie's formula on the exact noisy density ---------------------------
def _tweedie(log_density, x, sigma):
    """``x + sigma^2 grad log p_sigma(x)`` (Tweedie), the gradient by autograd."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_density(x).sum(), x)
    return (x + sigma[:, None] ** 2 * grad).detach()


def test_isotropic_mixture_denoiser_is_tweedie_on_the_noisy_density():
    """``p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I)`` written with torch.distributions; unequal stds and weights
    in 3 dimensions, so the normaliser's ``dim`` and every weight count."""
    means = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0], [0.0, -2.0, -1.0]], dtype=torch.float64)
    stds, w = torch.tensor([0.3, 0.8, 0.5], dtype=torch.float64), torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    gmm = GaussianMixture(means, stds, w * 7)            # normalised by the class
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    sigma = torch.tensor([0.05, 0.3, 1.0, 2.0, 5.0, 0.7], dtype=torch.float64)

    def log_p(y):
        var = stds[None] ** 2 + sigma[:, None] ** 2                                                     # (M, K)
        comp = torch.distributions.Normal(means[None], var.sqrt()[..., None]).log_prob(y[:, None]).sum(-1)
        return torch.logsumexp(w.log()[None] + comp, 1)

    torch.testing.assert_close(gmm.denoise(x, sigma), _tweedie(log_p, x, sigma), rtol=1e-10, atol=1e-10)
    var = stds[None] ** 2 + sigma[:, None] ** 2
    dens = w * torch.exp(-((x[:, None] - means) ** 2).sum(-1) / (2 * var)) / (2 * math.pi * var) ** 1.5
    torch.testing.assert_close(gmm.responsibilities(x, sigma), dens / dens.sum(1, keepdim=True), rtol=1e-10, atol=0)


def test_anisotropic_mixture_denoiser_is_tweedie_on_the_noisy_density():
    """``p_sigma = sum_k w_k N(mu_k, C_k + sigma^2 I)`` with torch's MultivariateNormal, on mixture_3d's rotated
    covariances (their eigenbases are not the axes)."""
    mix = mixture_3d().network.gmm
    covs = torch.einsum("kde,ke,kfe->kdf", mix.q, mix.lam, mix.q)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.1, 0.4, 1.0, 3.0], dtype=torch.float64)

    def log_p(y):
        c = covs[None] + sigma[:, None, None, None] ** 2 * torch.eye(3, dtype=torch.float64)         # (M, K, 3, 3)
        comp = torch.distributions.MultivariateNormal(mix.means[None], c).log_prob(y[:, None])        # (M, K)
        return torch.logsumexp(mix.weights.log()[None] + comp, 1)

    torch.testing.assert_close(mix.denoise(x, sigma), _tweedie(log_p, x, sigma), rtol=1e-9, atol=1e-10)


def test_named_mixtures_are_their_docstrings():
    """``gmm``: 8 modes on a ring of radius 4, std 0.3, equal weights; mixture_3d: weights 0.6 / 0.3 / 0.1."""
    gmm = ring_gmm().network.gmm
    a = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    torch.testing.assert_close(gmm.means, 4 * torch.stack([a.cos(), a.sin()], 1), rtol=0, atol=1e-15)
    assert gmm.stds.tolist() == [0.3] * 8 and gmm.weights.tolist() == [1 / 8] * 8
    torch.testing.assert_close(mixture_3d().network.gmm.weights, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))


def test_mixture_draws_have_the_modes_covariance():
    """One mode, 200k draws: the sample std / covariance is the mode's to a few parts in a thousand (5% allowed)."""
    g = torch.Generator().manual_seed(0)
    x, _ = GaussianMixture([[1.0, -1.0]], 0.5).sample(200_000, g)
    torch.testing.assert_close(x.std(0), torch.full((2,), 0.5, dtype=torch.float64), rtol=0.05, atol=0)
    cov = torch.tensor([[[0.25, 0.1, 0.0], [0.1, 0.09, 0.02], [0.0, 0.02, 0.04]]], dtype=torch.float64)
    y, _ = AnisotropicMixture(torch.zeros(1, 3), cov, [1.0]).sample(200_000, g)
    torch.testing.assert_close(torch.cov(y.T), cov[0], rtol=0, atol=0.05 * 0.04)


def test_mixture_refuses_weights_that_sum_to_zero():
    with pytest.raises(ValueError, match="^means, stds, weights:"):
        GaussianMixture([[0.0], [1.0]], 1.0, [0.0, 0.0])         # weights / 0: NaN responsibilities


def test_mixture_network_takes_no_conditioning():
    from paratime import ParallelSampler

    with pytest.raises(ValueError, match="^labels:"):
        ParallelSampler("gmm", steps=2, method="sequential", progress=False).sample(2, labels=torch.zeros(2))


# -- checks.py: the boundaries and the messages -----------------------------------------------------------------------
def test_check_int_boundaries_and_messages():
    for v in (3, 5, np.int64(4)):
        check_int("n", v, 3, 5)
    for v, msg in ((2, "n: must be an integer in [3, 5], got 2"), (6, "n: must be an integer in [3, 5], got 6"),
                   (-1, "n: must be an integer >= 0, got -1")):
        with pytest.raises(ValueError) as info:
            check_int("n", v, 0 if v == -1 else 3, None if v == -1 else 5)
        assert str(info.value) == msg
    for v, none, msg in ((True, False, "n: expected an integer, got True"), (2.0, False, "n: expected an integer, "
                         "got 2.0"), (None, False, "n: expected an integer, got None"),
                         ("3", True, "n: expected an integer or None, got '3'")):
        with pytest.raises(TypeError) as info:
            check_int("n", v, none=none)
        assert str(info.value) == msg
    check_int("n", None, 1, none=True)


def test_check_number_boundaries_and_messages():
    check_number("x", 0.0, 0.0)
    check_number("x", 1.0, 0.0, 1.0)
    check_number("x", 1e-300, 0.0, low_open=True)
    check_number("x", None, none=True)
    cases = [((0.0, 0.0), {"low_open": True}, ValueError, "x: must be > 0.0, got 0.0"),
             ((-1e-300, 0.0), {}, ValueError, "x: must be >= 0.0, got -1e-300"),
             ((1.5, 0.0, 1.0), {}, ValueError, "x: must be <= 1.0, got 1.5"),
             ((float("nan"), 0.0), {}, ValueError, "x: must be a finite number, got nan"),
             ((10**400,), {}, ValueError, f"x: must be a finite number, got {10**400!r}"),
             ((True,), {}, TypeError, "x: expected a number, got True"),
             ((None,), {}, TypeError, "x: expected a number, got None"),
             (("1",), {"none": True}, TypeError, "x: expected a number or None, got '1'")]
    for args, kw, error, msg in cases:
        with pytest.raises(error) as info:
            check_number("x", *args, **kw)
        assert str(info.value) == msg


# -- images.py: PNG bytes, the grid's layout and value mapping, the scatter's axes ------------------------------------
def test_png_decodes_to_the_pixels_written(tmp_path):
    """PIL reads back exactly what was written: a 2 x 3 grey and a 3 x 2 RGB picture (not square, so width and height
    cannot trade places), and every chunk's CRC is zlib's over its type and data."""
    Image = pytest.importorskip("PIL.Image")

    grey = np.array([[0, 10, 255], [7, 128, 1]], dtype=np.uint8)
    rgb = np.arange(18, dtype=np.uint8).reshape(3, 2, 3) * 13
    for name, px, mode in (("g.png", grey, "L"), ("c.png", rgb, "RGB")):
        write_png(tmp_path / name, px)
        with Image.open(tmp_path / name) as im:
            assert im.mode == mode
            np.testing.assert_array_equal(np.asarray(im), px)
        data, at = (tmp_path / name).read_bytes(), 8
        while at < len(data):
            n = int.from_bytes(data[at:at + 4], "big")
            body = data[at + 4:at + 8 + n]                  # type + data
            assert int.from_bytes(data[at + 8 + n:at + 12 + n], "big") == zlib.crc32(body)
            at += 12 + n


def test_image_grid_maps_values_and_lays_out_cells_by_hand():
    """value_range (-2, 2): -2, -1, 0, 1, 2 map to round(255 * (v + 2) / 4) = 0, 64, 128, 191, 255; -3 and 3 clamp.
    Three 1 x 2 images, upscale 2, pad 1: nrow = ceil(sqrt 3) = 2 columns, 2 rows of cells 2 x 4, background 128."""
    imgs = torch.tensor([[[[-2.0, -1.0]]], [[[0.0, 1.0]]], [[[2.0, -3.0]]]])            # (3, 1, 1, 2)
    g = image_grid(imgs, upscale=2, pad=1, value_range=(-2.0, 2.0))
    want = np.full((2 * (2 + 1) + 1, 2 * (4 + 1) + 1), 128, dtype=np.uint8)
    cells = {(0, 0): (0, 64), (0, 1): (128, 191), (1, 0): (255, 0)}
    for (r, c), (left, right) in cells.items():
        y, x = 1 + r * 3, 1 + c * 5
        want[y:y + 2, x:x + 2], want[y:y + 2, x + 2:x + 4] = left, right
    np.testing.assert_array_equal(g, want)
    assert image_grid(torch.tensor([[[[3.0]]]]), upscale=1, pad=0, value_range=(-2.0, 2.0)).item() == 255


def test_scatter_image_puts_up_at_the_top_and_the_auto_extent_at_1_1():
    """size 5, extent 2: the point (1, 1) maps to pixel column/row-from-bottom (1/2 + 1) / 2 * 4 = 3, drawn as a
    3 x 3 block clipped at the top edge: rows 0..2, columns 2..4. Without an extent the farthest coordinate sits at
    1 / 1.1 of the half-width: on 101 pixels (1/1.1 + 1) / 2 * 100 = 95.45 -> column 95."""
    img = scatter_image(torch.tensor([[1.0, 1.0]]), size=5, extent=2.0)
    ys, xs = np.nonzero((img != 255).any(-1))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 2, 2, 4)
    auto = scatter_image(torch.tensor([[1.0, 0.0], [-0.5, 0.0]]), size=101)
    cols = np.nonzero((auto != 255).any(-1).any(0))[0]
    assert cols.max() == 96 and cols.min() == 50 + round(-0.5 / 1.1 * 50) - 1


# -- digits_eval.py and the Fréchet distance ---------------------------------------------------------------------------
def test_features_are_sklearns_digit_scale():
    """[-1, 1] to [0, 16]: v -> 8 (v + 1), clamped."""
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5] + [0.0] * 57).reshape(1, 1, 8, 8)
    assert _to_features(x)[0, :7].tolist() == [0.0, 0.0, 4.0, 8.0, 12.0, 16.0, 16.0]


def test_knn_precision_recall_by_hand():
    """1-D, k = 1. real 0, 1, 2, 3: each ball has radius 1 (the nearest other point). fake 0.5, 4, 10: radii 3.5,
    3.5, 6. Precision: 0.5 (inside 0's ball) and 4 (on 3's ball's edge, counted) of 3 -> 2/3. Recall: every real
    point lies within 3.5 of 0.5 -> 1. With k = 2 the real radii are 1, 1, 1, 2 -> 4 still on the edge of 3's."""
    real, fake = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([[0.5], [4.0], [10.0]])
    assert knn_precision_recall(real, fake, k=1) == (2 / 3, 1.0)
    assert knn_precision_recall(fake, real, k=1) == (1.0, 2 / 3)
    # Recall counts real points inside the *fake* balls: real 0, 10, 30 (radii 10, 10, 20), fake 0, 1 (radii 1):
    # only 0 is within 1 of a fake point (10 is within its own radius 10 of 1, which must not count).
    assert knn_precision_recall(np.array([[0.0], [10.0], [30.0]]), np.array([[0.0], [1.0]]), k=1) == (1.0, 1 / 3)
    with pytest.raises(ValueError, match="^k:"):
        knn_precision_recall(real, fake, k=3)                      # k must be < min(4, 3)
    with pytest.raises(ValueError, match="^real, fake:"):
        knn_precision_recall(real, fake[:1], k=1)                  # one fake point has no neighbour


def test_check_features_takes_min_rows_and_refuses_fewer():
    check_features(2, a=np.zeros((2, 3)), b=np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"^b: expected an \(n >= 2, d\)"):
        check_features(2, a=np.zeros((2, 3)), b=np.ones((1, 3)))


class _Proba:
    """A classifier whose probabilities are given: rows with max 0.9 (counted confident), 0.89, 1.0 and a tie."""

    rows = np.zeros((4, 10))
    rows[0, :2], rows[1, :2], rows[2, 2], rows[3, 3:5] = (0.9, 0.1), (0.11, 0.89), 1.0, (0.5, 0.5)

    def predict_proba(self, x):
        return self.rows[:len(x)]


class _FirstTwo:
    def transform(self, a):
        return np.asarray(a)[:, :2]


def _judge(real):
    from paratime.digits_eval import DigitsJudge

    judge = DigitsJudge.__new__(DigitsJudge)            # no classifier to fit: the pieces score() reads
    judge.real, judge.labels, judge.clf, judge.pca, judge.seed = real, np.arange(len(real)) % 10, _Proba(), \
        _FirstTwo(), 0
    return judge


def test_judge_counts_max_probability_0_9_as_confident_and_refuses_k_samples():
    """Confident share: rows with max probability >= 0.9, here 0.9 and 1.0 of 4 -> 1/2; the class histogram from
    the argmax (the tie goes to the first class, 3); label accuracy against the argmax; B = k samples refused."""
    judge = _judge(np.random.default_rng(0).normal(size=(30, 64)))
    x = torch.zeros(4, 1, 8, 8)
    sc = judge.score(x, labels=torch.tensor([0, 1, 5, 3]))
    assert sc["confident_share"] == 0.5 and sc["class_hist"] == [0.25] * 4 + [0.0] * 6
    assert sc["label_accuracy"] == 0.75
    with pytest.raises(ValueError, match="^samples:"):
        judge.score(x[:3], k=3)


def test_real_baseline_fits_on_70_percent_and_scores_the_other_30():
    pytest.importorskip("sklearn")          # real_baseline's train_test_split
    judge, sizes = _judge(np.zeros((20, 64))), []

    class Fit:
        def fit(self, x, y):
            sizes.append(len(x))
            return self

        def predict_proba(self, x):
            sizes.append(len(x))
            return np.tile([0.95, 0.05], (len(x), 1))

    judge._make = Fit
    assert judge.real_baseline() == 1.0 and sizes == [14, 6]


def _frechet():
    pytest.importorskip("scipy")          # quality_depth's sqrtm (scipy comes with scikit-learn)
    from benchmarks.quality_depth import frechet_distance

    return frechet_distance


def _with_moments(z, mean, cov):
    """Rows whose sample mean is ``mean`` and sample covariance (ddof 1) is ``cov`` exactly (to rounding)."""
    z = z - z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T          # sample covariance I
    return mean + z @ np.linalg.cholesky(cov).T


def test_frechet_distance_of_two_gaussians_in_closed_form():
    """For 2 x 2 covariances tr((S_a S_b)^(1/2)) = sqrt(tr(S_a S_b) + 2 sqrt(det S_a det S_b)) (the root's two
    eigenvalues l1, l2: (sqrt l1 + sqrt l2)^2 = l1 + l2 + 2 sqrt(l1 l2)). S_a = diag(1, 4), S_b = [[2, 1], [1, 2]] do
    not commute: tr(S_a S_b) = 10, det S_a det S_b = 4 * 3 = 12; means differ by (1, 2): |.|^2 = 5. FD = 5 + 5 + 4 -
    2 sqrt(10 + 2 sqrt 12)."""
    rng = np.random.default_rng(0)
    a = _with_moments(rng.normal(size=(50, 2)), np.array([0.0, 0.0]), np.diag([1.0, 4.0]))
    b = _with_moments(rng.normal(size=(70, 2)), np.array([1.0, -2.0]), np.array([[2.0, 1.0], [1.0, 2.0]]))
    assert _frechet()(a, b) == pytest.approx(5 + 5 + 4 - 2 * math.sqrt(10 + 2 * math.sqrt(12)), rel=1e-9)


# -- tasks/reach.py: one step and the expert, worked by hand on dyadic numbers ---------------------------------------
def _episodes(pos, goal, centers, radii, steps=None, success=None):
    t = lambda v: torch.tensor(v, dtype=torch.float64)                 # noqa: E731
    n = len(pos)
    return Episodes(t(pos), t(goal), t(centers), t(radii), torch.ones(n, len(radii[0]), dtype=torch.float64),
                    t(pos), torch.tensor(steps or [0] * n), torch.tensor(success or [False] * n),
                    torch.zeros(n, dtype=torch.bool))


def test_reach_step_by_hand():
    """max_speed = goal_tol = 1/4, max_steps 2, one disc each. Episode 0: action (3, 4) clips to (0.6, 0.8), moves
    to (0.15, 0.2). 1: (1, 0) lands at distance 1/4 from the goal: success (the bound counts). 2: (1/2, 0) is not
    clipped, moves 1/8, ending on its disc's edge (clearance 0: no collision). 3: reaches the goal inside a disc:
    collided, not a success. 4: already done, 5: out of time: neither moves, counts a step or changes its action."""
    far = [[0.0, -5.0]]
    ep = _episodes([[0.0, 0.0]] * 6, [[0.5, 0.0], [0.5, 0.0], [0.5, 0.0], [0.25, 0.0], [0.5, 0.0], [0.5, 0.0]],
                   [far, far, [[0.125, 0.5]], [[0.25, 0.0]], far, far], [[0.5], [0.5], [0.5], [0.125], [0.5], [0.5]],
                   steps=[0, 0, 0, 0, 1, 2], success=[False, False, False, False, True, False])
    cfg = ReachConfig(obstacles=1, max_speed=0.25, goal_tol=0.25, max_steps=2)
    step(ep, torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]), cfg)
    pos = torch.tensor([[0.15, 0.2], [0.25, 0.0], [0.125, 0.0], [0.25, 0.0], [0.0, 0.0], [0.0, 0.0]],
                       dtype=torch.float64)
    torch.testing.assert_close(ep.pos, pos, rtol=0, atol=1e-15)
    torch.testing.assert_close(ep.last_action, torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.5, 0.0], [1.0, 0.0],
                                                             [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert ep.steps.tolist() == [1, 1, 1, 1, 1, 2]
    assert ep.success.tolist() == [False, True, False, False, True, False]
    assert ep.collided.tolist() == [False, False, False, True, False, False]
    obs = torch.tensor([0.15, 0.2, 0.35, -0.2, 0.6, 0.8, -0.15, -5.2, 0.5])
    torch.testing.assert_close(observe(ep)[0], obs)
    assert ReachConfig(horizon=4, n_exec=4).n_exec == 4                 # the whole chunk may be executed


def test_chunk_path_is_the_cumulative_clipped_steps():
    path = chunk_path(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]),
                      ReachConfig(max_speed=0.25))
    assert path.tolist() == [[[0.25, 0.0], [0.25, 0.25]]]


def test_expert_waypoints_by_hand():
    """Start (0, 0), goal (1, 0): u = (1, 0), n = u turned +90 degrees = (0, 1). Disc (1/2, 0), r 1/10, margin 0.15,
    side +1: w_in = c - r u + (r + margin) n = (0.4, 0.25), w_out = (0.6, 0.25). From the start the expert heads for
    w_in; on w_in's line across u it has passed it and heads for w_out, (1, 0); past both at (0.875, 0) it slows to
    land on the goal: distance 1/8 = half a step of 1/4."""
    ep = _episodes([[0.0, 0.0]], [[1.0, 0.0]], [[[0.5, 0.0]]], [[0.1]])
    cfg = ReachConfig(obstacles=1, max_speed=0.25, margin=0.15)
    pos = torch.tensor([[0.0, 0.0], [0.4, 0.25], [0.875, 0.0]], dtype=torch.float64)
    got = torch.cat([expert_actions(p[None], ep, cfg) for p in pos])
    want = torch.tensor([[0.4, 0.25], [1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    want[0] /= want[0].norm()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# -- the eval-digits defaults: the README's, the help's, and what a run with them samples ---------------------------
class _RecordingJudge:
    """Stands in for DigitsJudge (no classifier to fit): keeps the samples it is handed, scores them as nothing."""

    seen: list = []

    def __init__(self, seed=0):
        self.seed = seed

    def real_baseline(self, seed=0):
        return 0.5

    def score(self, samples, k=3, labels=None):
        _RecordingJudge.seen.append(samples.clone())
        return {"n": len(samples), "confident_share": 0.0, "class_hist": [0.1] * 10, "knn_precision": 0.0,
                "knn_recall": 0.0, "judge_seed": self.seed}


def test_eval_digits_defaults_are_the_readmes_and_run_as_the_explicit_flags(tmp_path, monkeypatch):
    """README and ``--help``: 200 samples from noise seed 0. ``eval-digits`` with the defaults samples what the
    explicit ``--samples 200 --seed 0`` does, which is ParallelSampler's 200 samples of seed 0, and records both
    values (one DDIM step keeps it fast; the judge is stubbed, its seed recorded through the stub)."""
    import json
    from pathlib import Path

    import paratime.digits_eval as de
    from paratime import ParallelSampler
    from paratime.cli import build_parser, main

    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    m = re.search(r"`eval-digits` scores (\d+) samples \(`--samples (\d+)`\) from noise seed (\d+) \(`--seed (\d+)`\)",
                  readme)
    assert m and m[1] == m[2] and m[3] == m[4]
    parser = build_parser()
    args = parser.parse_args(["eval-digits"])
    assert (args.samples, args.seed) == (int(m[1]), int(m[3])) == (200, 0)
    sub = next(a for a in parser._actions if a.dest == "command").choices["eval-digits"]
    helps = {a.dest: sub._get_formatter()._expand_help(a) for a in sub._actions if a.dest in ("samples", "seed")}
    assert helps["samples"].endswith("(default: 200)") and helps["seed"].endswith("(default: 0)")

    monkeypatch.setattr(de, "DigitsJudge", _RecordingJudge)
    _RecordingJudge.seen = []
    recs = []
    for extra in ([], ["--samples", "200", "--seed", "0"]):
        out = tmp_path / f"ed{len(extra)}.json"
        assert main(["eval-digits", "--steps", "1", "--no-progress", "--json", str(out), *extra]) == 0
        recs.append(json.loads(out.read_text()))
    assert recs[0] == recs[1]
    assert (recs[0]["samples"], recs[0]["seed"], recs[0]["picard"]["judge_seed"]) == (200, 0, 0)
    ref = ParallelSampler("digits", steps=1, method="sequential", progress=False).sample(200, seed=0).samples
    seq0, picard0, seq1, picard1 = _RecordingJudge.seen
    assert torch.equal(seq0, ref) and torch.equal(seq1, ref) and torch.equal(picard0, picard1)
    assert recs[0]["max_abs_diff"] == float((picard0 - seq0).abs().max())


# -- the shipped models' declared ranges, clips, schedules and loading --------------------------------------------
def _alphas_cumprod(betas):
    return torch.cumprod(1 - betas, 0)


def _linear_betas(n, lo=1e-4, hi=0.02):
    """DDPM's linear betas (diffusers' ``linear``)."""
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def _cosine_betas(n):
    """Improved DDPM's cosine (diffusers' ``squaredcos_cap_v2``): ``beta_i = min(1 - abar(t_{i+1}) / abar(t_i),
    0.999)``, ``abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)``, ``t_i = i / n``."""
    t = torch.arange(n + 1, dtype=torch.float64) / n
    abar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp_max(0.999)


def test_shipped_schedules_are_ddpms():
    """digits: DDPM linear betas 1e-4 .. 0.02 over 1000 steps; policy: the squared cosine over 100; the named
    schedules ddpm-linear / ddpm-cosine likewise over 1000."""
    from paratime.models import make_schedule
    from paratime.zoo.digits import digits_schedule
    from paratime.zoo.policy import policy_schedule

    linear, cosine = _alphas_cumprod(_linear_betas(1000)), _alphas_cumprod(_cosine_betas(1000))
    for got, want in ((digits_schedule(), linear), (make_schedule("ddpm-linear"), linear),
                      (make_schedule("ddpm-cosine"), cosine), (policy_schedule(), _alphas_cumprod(_cosine_betas(100)))):
        torch.testing.assert_close(got.alphas_cumprod.double(), want, rtol=1e-6, atol=1e-9)


def test_digits_declares_its_datas_range_and_embeds_time_by_the_formula():
    """data_range is the min and max of load_digits_data (0..16 scaled to [-1, 1]); the time embedding is
    ``[cos(t f_i), sin(t f_i)]`` with ``f_i = 10000^(-i / half)``; unconditional inputs use class 10, which labels=
    refuses (classes 0..9) and uncond labels take; a width that is no multiple of 8 (GroupNorm's groups) is refused."""
    from paratime.zoo import load_model
    from paratime.zoo.digits import DigitsUNet, _timestep_embedding, load_digits_data
    from paratime.zoo.digits import check_train_options as check_digits_training

    pytest.importorskip("sklearn")
    x, _ = load_digits_data()
    assert DigitsUNet.data_range == (float(x.min()), float(x.max())) == (-1.0, 1.0)
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    f = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    want = torch.cat([(t.double()[:, None] * f).cos(), (t.double()[:, None] * f).sin()], 1)
    torch.testing.assert_close(_timestep_embedding(t, 8).double(), want, rtol=0, atol=1e-4)
    den = load_model("digits")
    assert den.uncond_fn({"labels": torch.tensor([3, 7])})["labels"].tolist() == [10, 10]
    den.network.check_cond({"labels": torch.tensor([0, 9]), "uncond": {"labels": torch.tensor([10, 9])}}, 2)
    for cond, msg in (({"labels": torch.tensor([9, 10])}, "labels: classes must lie in 0..9, got 10"),
                      ({"labels": torch.tensor([0, 1]), "uncond": {"labels": torch.tensor([11, 0])}},
                       "uncond.labels: classes must lie in 0..10, got 11")):
        with pytest.raises(ValueError, match=f"^{re.escape(msg)}"):
            den.network.check_cond(cond, 2)
    with pytest.raises(ValueError, match="^channels: must be a multiple of 8"):
        check_digits_training(channels=12)


def test_policy_clips_x0_to_the_experts_action_range():
    """clip_x0 = 1: the expert's actions have norm <= 1, reaching 1 at full speed, so every coordinate lies in
    [-1, 1] (the clip bounds x0 coordinate by coordinate)."""
    from paratime.tasks.reach import make_dataset
    from paratime.zoo import load_model

    _, chunks = make_dataset(2, seed=0)
    assert load_model("policy").clip_x0 == 1.0 == pytest.approx(float(chunks.norm(dim=-1).max()), abs=1e-6)


def test_policy_baseline_default_steps_and_observation_width():
    """The baseline trains ``steps // 4`` steps by default; an observation one column too wide is refused."""
    from paratime.zoo import load_model
    from paratime.zoo.policy import train_policy

    r = train_policy(steps=4, batch=2, width=8, blocks=1, episodes=1, progress=False)
    assert r["meta"]["baseline_steps"] == 4 // 4 and len(r["baseline_losses"]) == 1
    with pytest.raises(ValueError, match=re.escape("obs: expected shape (2, 12), got (2, 13)")):
        load_model("policy").network.check_cond({"obs": torch.zeros(2, 13)}, 2)


def test_weights_record_empty_file_and_open_options(tmp_path):
    """The shipped file's paratime metadata holds the training record (digits.json's config); an empty file is named
    as empty; a loader taking ``**options`` gets every option."""
    import json

    from paratime.models import MODELS, load_model, read_weights, register_model
    from paratime.zoo.digits import WEIGHTS

    _, meta = read_weights(WEIGHTS)
    assert meta["config"] == json.loads(WEIGHTS.with_suffix(".json").read_text())["config"]
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="^weights: .* is empty"):
        read_weights(tmp_path / "e.safetensors", argument="weights")
    register_model("zoo-test-kw", lambda **kw: kw)
    try:
        assert load_model("zoo-test-kw", anything=1) == {"anything": 1}
    finally:
        MODELS.pop("zoo-test-kw")


def test_a_denoiser_refuses_a_schedule_or_a_prediction_alone():
    from paratime.models import as_denoiser
    from paratime.schedules import VESchedule

    for kw in ({"schedule": VESchedule()}, {"prediction": "eps"}):
        with pytest.raises(ValueError, match="^schedule, prediction: already set"):
            as_denoiser(ring_gmm(), **kw)


def test_eval_digits_records_the_largest_absolute_difference(monkeypatch):
    """Picard's samples moved by -0.5 at one pixel (and float rounding elsewhere): the record's max_abs_diff is
    0.5, the absolute value, not the largest signed difference."""
    import paratime.digits_eval as de
    import paratime.sampler as sampler_module
    from paratime.cli import build_parser

    class Moved(sampler_module.ParallelSampler):
        def sample(self, *args, **kw):
            res = super().sample(*args, **kw)
            if self.config.method == "picard":
                res.samples[0, 0, 0, 0] -= 0.5
            return res

    monkeypatch.setattr(de, "DigitsJudge", _RecordingJudge)
    monkeypatch.setattr(sampler_module, "ParallelSampler", Moved)
    rec = de.run_eval(build_parser().parse_args(["eval-digits", "--samples", "4", "--steps", "1", "--no-progress"]))
    assert rec["max_abs_diff"] == pytest.approx(0.5, abs=1e-9)
