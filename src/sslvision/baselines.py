"""Baselines a user could build without sslvision, fitted on the same labels and split as the classifier.

A promoted model is only worth its pipeline if it beats what two minutes of scikit-learn give on the
same data, so the finetune stage fits :func:`pixel_logreg` on the audited training rows it trains on,
reports it beside the classifier, and promotion refuses a challenger that does not beat it
(``finetune.promotion.beat_pixel_baseline``).

:func:`pixel_logreg`: a logistic regression (``class_weight="balanced"``, so the long tail weighs as
much as the head) on the first ``components`` principal components of the pixels scaled to [0, 1]. The
time is bounded: images wider than ``side`` pixels are area-averaged down first, both fits see at most
``max_rows`` rows (the largest classes are trimmed first, the rare ones are kept whole) and the regression
runs at most ``max_iter`` L-BFGS iterations. The components are standardised before the regression:
L-BFGS then converges in ~70 iterations on the demo (unscaled: ~170, for the same balanced accuracy).
Fit and prediction run with one BLAS thread: the problem is small (rows x 64), and a thread pool
spinning on a busy machine made the same fit 40x slower in CPU time (2 cores, load 13: 28 s wall
instead of 0.7 s).

:func:`label_efficiency`: the same pixel baseline and a linear probe on the SSL embeddings, both trained on only
a few labels per class (the finetune stage's label-efficiency curve; :func:`label_efficiency_summary` is its
``metrics.json`` record).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


def pixel_vectors(images: np.ndarray, side: int = 32) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` images as float32 rows scaled to [0, 1]; images larger than ``side`` are
    area-averaged by the smallest integer factor that brings both sides to at most ``side``."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"expected uint8 images (N, H, W, C), got shape {x.shape}")
    _, h, w, _ = x.shape
    f = max(1, -(-max(h, w) // side))
    x = x.astype(np.float32) / 255.0
    if f > 1:
        hh, ww = (h // f) * f, (w // f) * f
        x = x[:, :hh, :ww].reshape(len(x), hh // f, f, ww // f, f, -1).mean(axis=(2, 4))
    return x.reshape(len(x), -1)


def cap_per_class(labels: np.ndarray, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices, at most ``max_rows``: every class keeps ``min(n_c, cap)`` rows (a seeded
    sample) with the largest ``cap`` that fits, so the head classes are trimmed and the tail kept whole."""
    labels = np.asarray(labels)
    if len(labels) <= max_rows:
        return np.arange(len(labels))
    counts = np.bincount(labels)
    cap = max(1, max_rows // max(1, int((counts > 0).sum())))
    while np.minimum(counts, cap + 1).sum() <= max_rows:
        cap += 1
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(labels == c), size=min(int(n), cap), replace=False)
            for c, n in enumerate(counts) if n]
    return np.sort(np.concatenate(keep))


@dataclass
class PixelLogReg:
    """A fitted :func:`pixel_logreg`: ``predict_proba(images)`` is ``(N, num_classes)``, with probability 0
    for a class absent from the training labels."""

    model: Any  # sklearn Pipeline: PCA -> StandardScaler -> LogisticRegression
    num_classes: int
    side: int
    train_rows: int
    seconds: float

    def predict_proba(self, images: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        out = np.zeros((len(images), self.num_classes))
        cols = self.model.classes_
        with threadpool_limits(1):
            for s in range(0, len(images), batch_size):
                out[s:s + batch_size, cols] = self.model.predict_proba(pixel_vectors(images[s:s + batch_size],
                                                                                     self.side))
        return out

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.predict_proba(images).argmax(1)


def pixel_logreg(train_images: np.ndarray, train_labels: np.ndarray, *, num_classes: int | None = None,
                 components: int = 64, max_rows: int = 20_000, max_iter: int = 200, side: int = 32,
                 seed: int = 0) -> PixelLogReg:
    """Fit the pixel baseline (module docstring) on uint8 ``(N, H, W, C)`` images and integer labels.

    ``num_classes`` (default: the largest label + 1) sets the width of ``predict_proba``. Deterministic
    for a seed. Raises ``ValueError`` when the labels hold fewer than two classes.
    """
    import time
    import warnings

    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    labels = np.asarray(train_labels, dtype=np.int64)
    if len(labels) != len(train_images):
        raise ValueError(f"{len(train_images)} images but {len(labels)} labels")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"the pixel baseline needs at least two classes, the labels hold {np.unique(labels).tolist()}")
    rows = cap_per_class(labels, max_rows, seed)
    x = pixel_vectors(np.asarray(train_images[rows]), side)
    y = labels[rows]
    model = make_pipeline(PCA(min(components, len(x) - 1, x.shape[1]), random_state=seed), StandardScaler(),
                          LogisticRegression(class_weight="balanced", max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # the iteration cap is the time bound, not a mistake
        model.fit(x, y)
    return PixelLogReg(model=model, num_classes=int(num_classes or labels.max() + 1), side=side,
                       train_rows=len(rows), seconds=time.perf_counter() - t0)


# --- label efficiency ------------------------------------------------------------------------------

LABEL_EFFICIENCY_SYSTEMS = ("ssl_linear_probe", "pixel_logreg")
LABEL_EFFICIENCY_COLUMNS = ("labels_per_class", "seed", "system", "balanced_accuracy", "train_rows", "short_classes",
                            "test_rows")


def per_class_draw(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` rows of every class present in ``labels``, a seeded sample (a class with
    fewer rows gives all of them). Nested in ``per_class`` for a seed: each class's rows are a prefix of one
    seeded permutation (``benchmarks/label_efficiency.py`` draws its labelled rows with it)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def label_efficiency(train_features: np.ndarray, train_images: np.ndarray, train_labels: np.ndarray,
                     test_features: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray, *,
                     per_class: Sequence[int] = (10, 25, 100), seeds: int = 3, num_classes: int | None = None,
                     max_test: int = 2000, seed: int = 0) -> pd.DataFrame:
    """How the SSL embeddings compare with pixels when only a few labels per class exist.

    For each of ``seeds`` draws (seed ``seed + r``) and each count ``n`` of ``per_class``, ``n`` training rows of
    every class are drawn (:func:`per_class_draw`: nested across the counts of a draw, so a draw's 10 rows of a class
    are among its 25) and two systems learn from exactly those rows and labels:

    - ``ssl_linear_probe``: :func:`sslvision.metrics.linear_probe_predict` (logistic regression on the
      standardised features) on ``train_features``, the frozen SSL encoder's embeddings of the rows;
    - ``pixel_logreg``: :func:`pixel_logreg` on ``train_images`` (PCA of the pixels + logistic regression), the
      promotion gate's baseline.

    Both are scored by balanced accuracy (:func:`sslvision.metrics.balanced_accuracy`) on one fixed,
    class-balanced subset of at most ``max_test`` test rows (:func:`cap_per_class` with ``seed``: the large classes
    trimmed to a common cap, the small ones whole), the same for every draw and count.

    A class with fewer than ``n`` training rows contributes all it has: the count is still run and flagged, its
    ``short_classes`` column is the number of such classes (0 = every class had ``n`` labelled rows); a count at
    or above the largest class trains on every row. ``train_rows`` is the number of rows drawn.

    What it measures: how much of the labelled data each representation needs, on the caller's own images and
    labels (in the finetune stage: the audited labels, which may still hold noise). What it does not: the
    fine-tuned encoder (the probe keeps it frozen, and a fine-tune usually gains most where labels are few), the
    stage's classifier and its recipe (loss, sampler, synthetic images), nor a network trained from scratch;
    ``benchmarks/label_efficiency.py`` (benchmarks/README.md, label_efficiency) compares those on Fashion-MNIST.

    Args:
        train_features, test_features: ``(N, D)`` embeddings of the training and test rows.
        train_images, test_images: uint8 ``(N, H, W, C)`` images of the same rows.
        train_labels, test_labels: integer labels, ``0 .. num_classes - 1``.
        per_class: labels per class, each >= 1 (duplicates are run once, in increasing order).
        seeds: number of draws (>= 1).
        num_classes: width of the scores (default: the largest label + 1).
        max_test: at most this many test rows are scored.
        seed: the first draw's seed, also the seed of the test subset.

    Returns one row per (count, draw, system), :data:`LABEL_EFFICIENCY_COLUMNS`; deterministic for a seed.
    Raises ``ValueError`` when the arrays do not fit each other, the training labels hold fewer than two classes,
    or a setting is out of range.
    """
    from threadpoolctl import threadpool_limits

    from sslvision.metrics import balanced_accuracy, linear_probe_predict

    train_y = np.asarray(train_labels, dtype=np.int64)
    test_y = np.asarray(test_labels, dtype=np.int64)
    for name, n, arrays in (("train", len(train_y), (train_features, train_images)),
                            ("test", len(test_y), (test_features, test_images))):
        if any(len(a) != n for a in arrays):
            raise ValueError(f"label_efficiency: the {name} features, images and labels have "
                             f"{[len(a) for a in arrays] + [n]} rows; they must be the same rows")
    counts = sorted({int(n) for n in per_class})
    if not counts or counts[0] < 1:
        raise ValueError(f"label_efficiency: per_class must be counts >= 1, got {list(per_class)}")
    if seeds < 1 or max_test < 1:
        raise ValueError(f"label_efficiency: seeds and max_test must be >= 1, got {seeds} and {max_test}")
    if len(test_y) == 0:
        raise ValueError("label_efficiency: no test rows to score on")
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"label_efficiency needs at least two classes, the training labels hold "
                         f"{np.unique(train_y).tolist()}")
    k = int(num_classes or max(train_y.max(), test_y.max()) + 1)
    keep = cap_per_class(test_y, max_test, seed)
    test_x = np.asarray(test_features[keep], dtype=np.float32)
    test_img, test_y = np.asarray(test_images[keep]), test_y[keep]
    class_rows = np.bincount(train_y)
    class_rows = class_rows[class_rows > 0]
    rows = []
    for r in range(seeds):
        s = seed + r
        for n in counts:
            idx = per_class_draw(train_y, n, s)
            y = train_y[idx]
            with threadpool_limits(1):  # small fits: a BLAS pool on a busy machine only slows them (module doc)
                probe = linear_probe_predict(np.asarray(train_features[idx], dtype=np.float32), y, test_x)
            scores = {"ssl_linear_probe": np.eye(k)[probe],
                      "pixel_logreg": pixel_logreg(np.asarray(train_images[idx]), y, num_classes=k,
                                                   seed=s).predict_proba(test_img)}
            for system in LABEL_EFFICIENCY_SYSTEMS:
                rows.append({"labels_per_class": n, "seed": s, "system": system,
                             "balanced_accuracy": balanced_accuracy(test_y, scores[system]), "train_rows": len(idx),
                             "short_classes": int((class_rows < n).sum()), "test_rows": len(test_y)})
    return pd.DataFrame(rows, columns=list(LABEL_EFFICIENCY_COLUMNS))


def label_efficiency_summary(table: pd.DataFrame) -> dict[str, Any]:
    """The compact record of a :func:`label_efficiency` table: ``labels_per_class`` (the counts), ``seeds`` (the
    draws), ``test_rows``, per count (string keys) its ``train_rows`` and ``short_classes``, and per system and
    count the ``mean`` and ``std`` (ddof 1; 0 for one draw) of the balanced accuracy over the draws."""
    counts = sorted(int(n) for n in table["labels_per_class"].unique())
    first = table.drop_duplicates("labels_per_class").set_index("labels_per_class")
    systems: dict[str, dict[str, dict[str, float]]] = {}
    for (system, n), values in table.groupby(["system", "labels_per_class"], sort=True)["balanced_accuracy"]:
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        systems.setdefault(str(system), {})[str(int(n))] = {"mean": float(values.mean()), "std": std}
    return {
        "labels_per_class": counts,
        "seeds": int(table["seed"].nunique()),
        "test_rows": int(table["test_rows"].iloc[0]) if len(table) else 0,
        "train_rows": {str(n): int(first.loc[n, "train_rows"]) for n in counts},
        "short_classes": {str(n): int(first.loc[n, "short_classes"]) for n in counts},
        "systems": {s: systems[s] for s in LABEL_EFFICIENCY_SYSTEMS if s in systems},
    }
