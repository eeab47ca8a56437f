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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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
