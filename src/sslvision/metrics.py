"""Evaluation metrics shared by every stage: one implementation each.

Classification (balanced accuracy, per-class recall, ECE, the full report), embedding geometry
(L2-normalisation) and the weighted kNN classifier used to score SSL encoders. All take NumPy arrays and
return plain Python or NumPy values, so they work on any model's outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (float32; an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def per_class_recall(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall of each class (NaN where the class has no sample) and each class's sample count."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    counts = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[predicted == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    return recall, counts


def balanced_accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels``; ``scores`` are logits or probabilities ``(N, K)``."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    recall, _ = per_class_recall(labels, scores.argmax(1), max(scores.shape[1], int(labels.max(initial=-1)) + 1))
    return float(np.nanmean(recall))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE: the share-weighted gap between confidence and accuracy over equal-width confidence bins."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return 0.0
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    gap = np.abs(np.bincount(which, weights=correct - confidence, minlength=bins))
    return float(gap.sum() / len(confidence))


def reliability_table(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Per equal-width confidence bin: its centre, the accuracy and the count (the reliability diagram)."""
    confidence, correct = np.asarray(confidence), np.asarray(correct)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    acc = np.bincount(which, weights=correct.astype(float), minlength=bins) / np.maximum(count, 1)
    return pd.DataFrame({"bin": np.arange(bins), "confidence": (np.arange(bins) + 0.5) / bins,
                         "accuracy": acc, "count": count})


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class and worst-class recall, macro-F1, ECE, confusion matrix."""
    from sklearn.metrics import confusion_matrix, f1_score

    pred = probs.argmax(1)
    k = len(classes)
    cm = confusion_matrix(labels, pred, labels=list(range(k)))
    support = cm.sum(1)
    present = support > 0
    recall = np.where(present, cm.diagonal() / np.maximum(support, 1), np.nan)
    worst = int(np.nanargmin(recall))
    return {
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(np.nanmean(recall)),
        "worst_class_recall": float(recall[worst]),
        "worst_class": classes[worst],
        "macro_f1": float(f1_score(labels, pred, labels=np.flatnonzero(present), average="macro", zero_division=0)),
        "ece": expected_calibration_error(probs.max(1), pred == labels),
        "per_class_recall": {c: (None if np.isnan(r) else float(r)) for c, r in zip(classes, recall, strict=True)},
        "confusion_matrix": cm.tolist(),
        "n": int(len(labels)),
    }


def knn_predict(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, num_classes: int, k: int = 200,
                temperature: float = 0.1, chunk: int = 1024) -> np.ndarray:
    """Weighted kNN (InstDisc; as lightly's ``knn_predict``): vote of the k most cosine-similar bank
    samples, each weighted by ``exp(similarity / temperature)``."""
    import torch

    bank_t = torch.nn.functional.normalize(torch.from_numpy(np.asarray(bank, dtype=np.float32)), dim=1)
    labels = torch.from_numpy(np.asarray(bank_labels, dtype=np.int64))
    k = min(k, len(bank_t))
    preds = []
    for s in range(0, len(queries), chunk):
        q = torch.nn.functional.normalize(torch.from_numpy(np.asarray(queries[s:s + chunk], dtype=np.float32)), dim=1)
        sim, idx = (q @ bank_t.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, labels[idx], weights)
        preds.append(votes.argmax(dim=1).numpy())
    return np.concatenate(preds) if preds else np.empty(0, dtype=np.int64)


def linear_probe_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Logistic regression on standardised frozen features (a fixed 300-iteration L-BFGS budget, so a
    probe on poor features may stop before convergence; that is reported as its accuracy, not a warning)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(train_x, train_y).predict(test_x)
