"""Quality checks for digits samples that do not depend on paratime: a scikit-learn classifier trained on the real
digits, and k-NN precision/recall (Kynkäänniemi et al. 2019) against real images in PCA space.

The classifier is a logistic regression on raw pixels. Its confidence depends on the classifier as much as on the
samples (an SVC with Platt scaling is confident >= 0.9 on only ~84% of *real* held-out digits, logistic regression
on ~92%), so :meth:`DigitsJudge.real_baseline` reports the same figure for real held-out digits beside it."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DigitsJudge", "check_features", "knn_precision_recall", "run_eval"]


def _to_features(x: torch.Tensor) -> np.ndarray:
    """``(B, 1, 8, 8)`` in [-1, 1] to scikit-learn's digits scale: ``(B, 64)`` in [0, 16]."""
    return ((x.detach().double().cpu().reshape(x.shape[0], -1) + 1) * 8).clamp(0, 16).numpy()


def check_features(min_rows: int = 1, **arrays: np.ndarray) -> None:
    """Raise unless each of ``arrays`` (named by its keyword) is a finite ``(n, d)`` array with ``n >= min_rows``,
    all of one ``d`` (a NaN row read as outside every k-NN ball, scoring 0.0 / 0.0; one feature crashed the FD).

    Raises:
        ValueError: naming the array.
    """
    for name, x in arrays.items():
        if np.ndim(x) != 2 or len(x) < min_rows:
            raise ValueError(f"{name}: expected an (n >= {min_rows}, d) feature array, got shape {np.shape(x)}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: contains NaN or inf")
    dims = {name: x.shape[1] for name, x in arrays.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"{', '.join(dims)}: feature dimensions differ, {', '.join(map(str, dims.values()))}")


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0))


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision: share of ``fake`` inside the union of real k-NN balls; recall: share of ``real`` inside the
    union of fake k-NN balls. ``real`` and ``fake`` are ``(n, d)`` feature arrays.

    Raises:
        ValueError: ``real`` or ``fake`` not a finite ``(n, d)`` array, or their ``d`` differ; ``k`` not an integer in
            ``[1, n)`` for the smaller set (``k=-1`` read the largest distance and scored 1.0 / 1.0).
    """
    from .checks import check_int

    check_features(real=real, fake=fake)
    n = min(len(real), len(fake))
    if n < 2:
        raise ValueError(f"real, fake: need at least 2 samples each for a k-NN ball, got {len(real)} and "
                         f"{len(fake)}")
    check_int("k", k, 1, n - 1)

    def radii(x):
        d = _pairwise(x, x)
        return np.sort(d, axis=1)[:, k]        # column 0 is the point itself
    r_real, r_fake = radii(real), radii(fake)
    d = _pairwise(fake, real)                  # (n_fake, n_real)
    precision = float((d <= r_real[None]).any(1).mean())
    recall = float((d.T <= r_fake[None]).any(1).mean())
    return precision, recall


class DigitsJudge:
    """A classifier (logistic regression) and a PCA fitted on the real digits.

    Args:
        seed: for the classifier and the real reference subset.
    """

    def __init__(self, seed: int = 0, pca_dim: int = 20):
        from sklearn.datasets import load_digits
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        d = load_digits()
        self.real, self.labels = d.data.astype(np.float64), d.target
        self._make = lambda: LogisticRegression(max_iter=5000)
        self.clf = self._make().fit(self.real, self.labels)
        self.pca = PCA(pca_dim, random_state=seed).fit(self.real)
        self.seed = seed

    def real_baseline(self, seed: int = 0) -> float:
        """Confident share of the same classifier on real digits it was not trained on (70/30 split)."""
        from sklearn.model_selection import train_test_split

        xtr, xte, ytr, _ = train_test_split(self.real, self.labels, test_size=0.3, random_state=seed)
        return float((self._make().fit(xtr, ytr).predict_proba(xte).max(1) >= 0.9).mean())

    def score(self, samples: torch.Tensor, k: int = 3, labels: torch.Tensor | None = None) -> dict:
        """Confident share (max probability >= 0.9), class histogram, k-NN precision/recall (PCA space), and
        with ``labels`` the share classified as the requested label. The real reference of the k-NN scores is one
        subset per sample count (drawn from the judge's seed), so two batches of the same size are scored against
        the same digits: a fresh draw per call moved precision / recall by a few hundredths between identical
        batches.

        Raises:
            ValueError: ``samples`` not ``(B, 1, 8, 8)`` with more than ``k`` of them (a k-NN ball needs k others);
                ``labels`` not one per sample; ``k`` < 1.
        """
        from .checks import check_int

        check_int("k", k, 1)
        if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 8, 8) or samples.shape[0] <= k:
            raise ValueError(f"samples: expected (B, 1, 8, 8) with B > k = {k}, got {tuple(samples.shape)}")
        if labels is not None and tuple(labels.shape) != (samples.shape[0],):
            raise ValueError(f"labels: expected one per sample, shape ({samples.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        x = _to_features(samples)
        proba = self.clf.predict_proba(x)
        pred = proba.argmax(1)
        hist = np.bincount(pred, minlength=10) / len(pred)
        idx = np.random.default_rng(self.seed).choice(len(self.real), size=min(len(x), len(self.real)),
                                                      replace=False)
        p, r = knn_precision_recall(self.pca.transform(self.real[idx]), self.pca.transform(x), k)
        out = {"n": len(x), "confident_share": float((proba.max(1) >= 0.9).mean()),
               "class_hist": [round(float(h), 4) for h in hist], "knn_precision": p, "knn_recall": r}
        if labels is not None:
            out["label_accuracy"] = float((pred == labels.cpu().numpy()).mean())
        return out


def run_eval(args, emit=lambda line: None) -> dict:
    """``paratime eval-digits``: sample sequentially and with Picard, score both; ``emit`` receives table lines."""
    from .sampler import ParallelSampler

    from .methods.picard import DEFAULT_TOL

    judge = DigitsJudge(seed=args.seed)
    guidance, window = getattr(args, "guidance", None), getattr(args, "window", None)
    rec = {"samples": args.samples, "solver": args.solver, "steps": args.steps, "seed": args.seed,
           "label": args.label, "guidance": guidance, "real_heldout_confident_share": judge.real_baseline()}
    cond = {}
    if args.label is not None:
        cond["labels"] = torch.full((args.samples,), args.label, dtype=torch.long)
    tol = f"{args.tol:g}" if args.tol is not None else f"{DEFAULT_TOL['final']:g} (default)"
    emit(f"digits: {args.samples} samples, solver={args.solver}, steps={args.steps}, tol={tol}; the classifier "
          f"is confident on {rec['real_heldout_confident_share']:.3f} of real held-out digits")
    emit(f"{'method':>10}  {'rounds':>6}  {'confident':>9}  {'precision':>9}  {'recall':>6}  {'min cls':>7}  "
          f"{'max cls':>7}" + ("  label acc" if args.label is not None else ""))
    for method in ("sequential", "picard"):
        opts = {k: v for k, v in (("tol", args.tol), ("window", window), ("guidance", guidance)) if v is not None}
        if method == "sequential":          # the parallel method's options do not apply to the reference
            opts.pop("tol", None), opts.pop("window", None)
        s = ParallelSampler("digits", solver=args.solver, steps=args.steps, method=method,
                            progress=getattr(args, "progress", False), **opts)
        res = s.sample(args.samples, seed=args.seed, **cond)
        if method == "sequential":
            ref = res.samples
        sc = judge.score(res.samples, labels=cond.get("labels"))
        sc.update(rounds=res.stats.rounds, tol=res.stats.tol, window=res.stats.window)     # what ran
        rec[method] = sc
        line = (f"{method:>10}  {res.stats.rounds:>6}  {sc['confident_share']:>9.3f}  {sc['knn_precision']:>9.3f}  "
                f"{sc['knn_recall']:>6.3f}  {min(sc['class_hist']):>7.3f}  {max(sc['class_hist']):>7.3f}")
        if "label_accuracy" in sc:
            line += f"  {sc['label_accuracy']:>9.3f}"
        emit(line)
    rec["max_abs_diff"] = float((res.samples - ref).abs().max())
    emit(f"max |picard - sequential| = {rec['max_abs_diff']:.4g}")
    return rec
