"""Drift and degradation checks for one production batch (the ``drift_eval`` stage).

A production batch (a directory of images: flat files are unlabeled, class subdirectories labeled, as
the demo's ``incoming/`` batches; or an already ingested directory with ``images.npy``) is compared
with the training reference, and every monitored metric is reported with its threshold and the
pipeline stage that owns it. The trigger (``sslvision.trigger.decide``) re-runs from the EARLIEST
stage that owns a failed metric, so each rule below only has to say what it measures:

================================  ==========  ====================================================
metric (``trigger.json``)         stage       fails when
================================  ==========  ====================================================
``embedding_mmd_pvalue``          pretrain    MMD permutation p-value on SSL embeddings < ``alpha``
``label_noise_rate``              audit       (labeled batch) estimated share of wrong labels > max
``tail_class_recall_drop``        synthesize  (labeled batch) worst rare-class recall fall > max
``accuracy``                      finetune    accuracy (true if labeled, else ATC estimate) below
                                              the reference's by more than ``accuracy_drop_max``
``prediction_shift_pvalue``       finetune    chi-square test of the predicted-class counts of
                                              batch vs reference: p-value < ``prediction_shift_alpha``
================================  ==========  ====================================================

``direction`` says which way is good, as the trigger reads it: ``"max"`` (higher is better: fails below
the threshold) or ``"min"`` (lower is better: fails above it). A metric that cannot be computed for
this batch (the labeled-only ones on an unlabeled batch) has ``value: null`` and ``failed: false``.

The methods:

- **Input drift**: the unbiased squared maximum mean discrepancy (MMD², Gretton et al. 2012) between
  the batch's SSL embeddings and a fixed random sample of the reference's (the ``train`` split
  embeddings that pretrain wrote, from the same encoder), with a Gaussian kernel whose bandwidth is the
  median pairwise distance of the pooled sample (the median heuristic; ``bandwidths`` multiplies it
  and sums kernels for a multi-scale test). The p-value comes from a permutation test: the kernel matrix
  is computed once, and a chunk of permutations costs one matrix product with their 0/1 membership rows.
- **Prediction shift**: the classifier's predicted classes on the batch against the same on the
  reference images, per class: a chi-square test of homogeneity on the 2 x classes table of counts
  (its p-value, which accounts for the sampling noise of both samples, is monitored), and the total
  variation (half the L1 distance between the two distributions) as the effect size.
- **Accuracy without labels**: average thresholded confidence (ATC, Garg et al. 2022): on the clean,
  labeled ``test`` split the threshold ``t`` is chosen so that the share of images whose max softmax
  confidence exceeds ``t`` equals the classifier's accuracy there; on the batch the estimate is the
  share above ``t``. The reference accuracy is the ATC estimate on train images the classifier never
  trained on (finetune's validation rows plus as large a share of the rows the audit dropped: same
  images and class prior as production, no labels needed). The
  average (temperature-calibrated) confidence is reported too. With labels, the accuracy against the
  given labels and the per-class recall are used.
- **Label noise** (labeled batch): cleanlab's confident-learning count of label issues
  (``cleanlab.count.num_label_issues``) on the classifier's probabilities, which are out-of-sample
  for a batch the classifier never trained on. The same estimator on the clean test labels gives the
  estimator's floor, reported as ``label_noise_floor``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from sslvision.params import Section, Seed

log = logging.getLogger("sslvision.drift")

REPORTS = Path("reports/drift")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DriftParams(Section):
    """The ``drift_eval`` section of params.yaml (each key is commented there)."""

    batch: str = "data/demo/incoming/clean_01"
    ingested: str = "data/ingested"
    embeddings: str = "data/embeddings"
    encoder: str = "models/encoder"
    classifier: str = "models/classifier"
    reference_size: int = Field(2000, ge=10, le=10_000_000)
    calibration_size: int = Field(2000, ge=10, le=10_000_000)
    alpha: float = Field(0.01, gt=0, lt=1)
    permutations: int = Field(500, ge=20, le=1_000_000)
    bandwidths: list[float] = Field(default_factory=lambda: [1.0], min_length=1, max_length=100)
    prediction_shift_alpha: float = Field(0.01, gt=0, lt=1)
    accuracy_drop_max: float = Field(0.05, gt=0, le=1)
    rare_class_share: float = Field(0.1, gt=0, le=1)
    rare_min_count: int = Field(5, ge=1, le=1_000_000)
    tail_recall_drop_max: float = Field(0.2, gt=0, le=1)
    label_noise_max: float = Field(0.15, gt=0, lt=1)
    batch_size: int = Field(256, gt=0, le=65536)
    seed: Seed = 0


# --- input drift: MMD with a permutation test ------------------------------------------------------


@dataclass
class MMDResult:
    """The observed unbiased MMD², its permutation null, the p-value and the critical value at alpha."""

    statistic: float
    p_value: float
    critical_value: float
    null: np.ndarray
    bandwidth: float


def gaussian_kernel_matrix(z: torch.Tensor, bandwidths: list[float]) -> tuple[torch.Tensor, float]:
    """Sum of Gaussian kernels ``exp(-d² / (2 (s·h)²))`` over the scales ``s``, ``h`` = median pairwise
    distance of ``z`` (the median heuristic); returns the matrix and ``h``."""
    d2 = torch.cdist(z, z).pow_(2)
    off_diagonal = d2[~torch.eye(len(z), dtype=torch.bool)]
    h2 = float(off_diagonal.median())
    if not h2 > 0:
        raise ValueError("MMD: every embedding is identical (median pairwise distance 0); is the encoder collapsed?")
    k = torch.zeros_like(d2)
    for s in bandwidths:
        k += torch.exp(-d2 / (2 * s * s * h2))
    return k, h2**0.5


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int = 500, alpha: float = 0.01,
                         bandwidths: list[float] | None = None, seed: int = 0, chunk: int = 64) -> MMDResult:
    """Two-sample test of ``x`` (reference, ``(m, D)``) against ``y`` (batch, ``(n, D)``) with unbiased MMD².

    For a split of the pooled sample into groups a (size m) and b (size n), with the kernel matrix K whose
    diagonal is zeroed: ``MMD² = Σ_aa K/(m(m-1)) + Σ_bb K/(n(n-1)) - 2 Σ_ab K/(mn)``. Each permutation
    is a 0/1 membership row ``a``; ``a K`` for a chunk of permutations is one matrix product, from which
    ``Σ_aa = a·(aK)`` and ``Σ_ab = (1-a)·(aK)``, and ``Σ_bb`` follows from the total.
    The p-value counts the observed split as one of the permutations, so it is never 0.
    """
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 samples on each side, got {m} reference and {n} batch")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"MMD: reference embeddings {x.shape} and batch embeddings {y.shape} differ in dimension")
    z = torch.from_numpy(np.concatenate([x, y]).astype(np.float64))
    k, bandwidth = gaussian_kernel_matrix(z, bandwidths or [1.0])
    k.fill_diagonal_(0.0)
    total = float(k.sum())
    gen = torch.Generator().manual_seed(seed)

    def mmd2(members: torch.Tensor) -> torch.Tensor:
        ak = members @ k
        s_aa = (ak * members).sum(1)
        s_ab = (ak * (1 - members)).sum(1)
        s_bb = total - s_aa - 2 * s_ab
        return s_aa / (m * (m - 1)) + s_bb / (n * (n - 1)) - 2 * s_ab / (m * n)

    observed = torch.zeros(1, m + n, dtype=k.dtype)
    observed[0, :m] = 1
    stat = float(mmd2(observed)[0])
    null = []
    for start in range(0, permutations, chunk):
        rows = min(chunk, permutations - start)
        order = torch.argsort(torch.rand(rows, m + n, generator=gen), dim=1)
        members = torch.zeros(rows, m + n, dtype=k.dtype)
        members.scatter_(1, order[:, :m], 1.0)
        null.append(mmd2(members))
    null_t = torch.cat(null).numpy()
    p_value = float((1 + np.sum(null_t >= stat)) / (1 + permutations))
    return MMDResult(statistic=stat, p_value=p_value, critical_value=float(np.quantile(null_t, 1 - alpha)),
                     null=null_t, bandwidth=bandwidth)


# --- prediction shift, accuracy estimation, label noise --------------------------------------------


def prediction_shift(reference_counts: np.ndarray, batch: np.ndarray) -> dict[str, Any]:
    """Predicted-class distributions of the reference (its per-class counts) and of the batch (its
    predicted class indices): total variation, per-class shares, and the p-value of a chi-square test of
    homogeneity on the 2 x classes count table (classes neither sample predicts are left out)."""
    from scipy.stats import chi2_contingency

    reference_counts = np.asarray(reference_counts, dtype=np.int64)
    counts = np.bincount(batch, minlength=len(reference_counts))
    table = np.stack([reference_counts, counts])
    table = table[:, table.sum(0) > 0]
    chi2, pvalue = (chi2_contingency(table)[:2] if table.shape[1] > 1 else (0.0, 1.0))
    ref, q = reference_counts / max(reference_counts.sum(), 1), counts / max(counts.sum(), 1)
    return {"tv": float(0.5 * np.abs(q - ref).sum()), "batch": q, "reference": ref, "chi2": float(chi2),
            "pvalue": float(pvalue)}


def atc_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """ATC's threshold: the confidence ``t`` such that the share of samples above ``t`` equals the
    accuracy on this labeled (source) sample."""
    accuracy = float(np.mean(correct))
    return float(np.quantile(confidence, 1.0 - accuracy))


def atc_estimate(confidence: np.ndarray, threshold: float) -> float:
    """ATC's accuracy estimate on an unlabeled sample: the share of confidences above the threshold."""
    return float(np.mean(confidence > threshold))


def estimate_label_noise(labels: np.ndarray, probs: np.ndarray) -> float:
    """Share of ``labels`` that cleanlab's confident learning counts as wrong, given out-of-sample
    ``probs`` (the classifier never trained on these images)."""
    from cleanlab.count import num_label_issues

    if len(labels) == 0:
        raise ValueError("label noise: no labeled images")
    return float(num_label_issues(labels, probs)) / len(labels)


def per_class_recall(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall of each class (NaN where the class has no sample) and each class's sample count."""
    counts = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[predicted == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    return recall, counts


# --- the reference and the evaluation of a batch ---------------------------------------------------


@dataclass
class Reference:
    """What a batch is compared with, computed once per (encoder, classifier).

    ``embeddings``: SSL embeddings of a fixed random sample of the train split (the input-drift
    reference). ``probs``: the classifier's probabilities on train-distribution images it never trained
    on (:func:`classifier_reference_rows`: on its own training images a classifier is over-confident,
    which would bias the reference accuracy and predicted-class distribution). ``calib_probs``/``calib_labels``:
    a sample of the clean test split (ATC calibration, reference recall). ``train_counts``: images per
    class in the classifier's training labels, to tell the rare classes. ``model``: which classifier
    (:func:`scored_classifier`).
    """

    embeddings: np.ndarray
    probs: np.ndarray
    calib_probs: np.ndarray
    calib_labels: np.ndarray
    train_counts: np.ndarray
    classes: list[str]
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = len(self.classes)
        if self.probs.shape[1:] != (c,) or self.calib_probs.shape[1:] != (c,) or len(self.train_counts) != c:
            raise ValueError(f"reference: probabilities {self.probs.shape}/{self.calib_probs.shape} or class counts "
                             f"{self.train_counts.shape} do not match {c} classes")
        calib_pred = self.calib_probs.argmax(1)
        self.calib_accuracy = float(np.mean(calib_pred == self.calib_labels))
        self.atc_threshold = atc_threshold(self.calib_probs.max(1), calib_pred == self.calib_labels)
        self.accuracy = atc_estimate(self.probs.max(1), self.atc_threshold)
        self.predicted_counts = np.bincount(self.probs.argmax(1), minlength=c)
        self.recall, _ = per_class_recall(self.calib_labels, calib_pred, c)
        self.noise_floor = estimate_label_noise(self.calib_labels, self.calib_probs)

    def rare_classes(self, share: float) -> list[int]:
        """Classes with fewer train images than ``share`` times the largest class."""
        return [c for c, n in enumerate(self.train_counts) if n < share * self.train_counts.max()]

    def summary(self) -> dict[str, Any]:
        return {"size": len(self.embeddings), "classifier_reference_size": len(self.probs),
                "calibration_size": len(self.calib_labels),
                "test_accuracy": self.calib_accuracy, "atc_threshold": self.atc_threshold,
                "estimated_accuracy": self.accuracy, "label_noise_floor": self.noise_floor,
                "test_recall": _by_class(self.classes, _floats(self.recall)),
                "predicted": _by_class(self.classes, _floats(self.predicted_counts / max(self.predicted_counts.sum(), 1)))}


def _floats(a: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else round(float(v), 6) for v in a]


def _by_class(classes: list[str], values: list) -> dict[str, Any]:
    return dict(zip(classes, values, strict=True))


def _metric(value: float | None, threshold: float, direction: str, stage: str) -> dict[str, Any]:
    failed = value is not None and (value < threshold if direction == "max" else value > threshold)
    return {"value": value, "threshold": threshold, "direction": direction, "stage": stage, "failed": bool(failed)}


def evaluate_batch(reference: Reference, embeddings: np.ndarray, probs: np.ndarray,
                   labels: np.ndarray | None = None, params: DriftParams | None = None) -> dict[str, Any]:
    """Every monitored metric of one batch against ``reference``.

    ``embeddings``: the batch's SSL embeddings ``(n, D)`` from the reference's encoder; ``probs``: the
    classifier's probabilities ``(n, C)``; ``labels``: given labels (``-1`` = unlabeled), or None.
    Returns ``{"metrics": {name: {value, threshold, direction, stage, failed}}, "failed": [names],
    "input_drift", "prediction_shift", "accuracy", "recall", "label_noise", "reference"}`` (plain JSON types
    except the arrays ``input_drift["null"]`` and ``prediction_shift["batch"|"reference"]`` kept for plots).
    """
    p = params or DriftParams()
    c = len(reference.classes)
    if probs.shape != (len(embeddings), c):
        raise ValueError(f"batch: probabilities {probs.shape} do not match {len(embeddings)} images and {c} classes")
    mmd = mmd_permutation_test(reference.embeddings, embeddings, p.permutations, p.alpha, p.bandwidths, p.seed)
    predicted = probs.argmax(1)
    shift = prediction_shift(reference.predicted_counts, predicted)
    confidence = probs.max(1)
    atc = atc_estimate(confidence, reference.atc_threshold)

    labeled = labels is not None and bool(np.any(labels >= 0))
    accuracy, recall, noise, tail_drop = atc, None, None, None
    worst_tail = None
    if labeled:
        keep = labels >= 0
        y, yhat = labels[keep], predicted[keep]
        accuracy = float(np.mean(y == yhat))
        rec, counts = per_class_recall(y, yhat, c)
        noise = estimate_label_noise(y, probs[keep])
        drops = {cls: float(reference.recall[cls] - rec[cls]) for cls in reference.rare_classes(p.rare_class_share)
                 if counts[cls] >= p.rare_min_count and not np.isnan(reference.recall[cls])}
        if drops:
            worst_tail = max(drops, key=drops.get)
            tail_drop = drops[worst_tail]
        recall = {"per_class": _by_class(reference.classes, _floats(rec)),
                  "counts": _by_class(reference.classes, counts.tolist()),
                  "rare_classes": [reference.classes[i] for i in reference.rare_classes(p.rare_class_share)],
                  "rare_recall_drop": {reference.classes[k]: v for k, v in drops.items()},
                  "worst_rare_class": reference.classes[worst_tail] if worst_tail is not None else None}

    metrics = {
        "embedding_mmd_pvalue": _metric(mmd.p_value, p.alpha, "max", "pretrain"),
        "label_noise_rate": _metric(noise, p.label_noise_max, "min", "audit"),
        "tail_class_recall_drop": _metric(tail_drop, p.tail_recall_drop_max, "min", "synthesize"),
        "accuracy": _metric(accuracy, round(reference.accuracy - p.accuracy_drop_max, 6), "max", "finetune"),
        "prediction_shift_pvalue": _metric(shift["pvalue"], p.prediction_shift_alpha, "max", "finetune"),
    }
    return {
        "metrics": metrics,
        "failed": [name for name, m in metrics.items() if m["failed"]],
        "n_images": len(embeddings),
        "labeled": labeled,
        "input_drift": {"test": "mmd2_permutation", "statistic": mmd.statistic, "p_value": mmd.p_value,
                        "alpha": p.alpha, "critical_value": mmd.critical_value, "permutations": p.permutations,
                        "bandwidth": mmd.bandwidth, "bandwidth_scales": list(p.bandwidths),
                        "reference_size": len(reference.embeddings), "null": mmd.null},
        "prediction_shift": {**shift, "per_class_shift": _by_class(
            reference.classes, _floats(shift["batch"] - shift["reference"]))},
        "accuracy": {"source": "labels" if labeled else "atc", "value": accuracy, "atc_estimate": atc,
                     "average_confidence": float(confidence.mean()), "reference_estimate": reference.accuracy,
                     "reference_test_accuracy": reference.calib_accuracy},
        "recall": recall,
        "label_noise": {"estimate": noise, "floor_on_clean_test": reference.noise_floor} if labeled else None,
        "reference": reference.summary(),
    }


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """``evaluate_batch``'s result without the arrays kept for plotting."""
    out = dict(result)
    out["input_drift"] = {k: v for k, v in result["input_drift"].items() if k != "null"}
    out["prediction_shift"] = {k: v for k, v in result["prediction_shift"].items() if k not in ("batch", "reference")}
    return out


# --- reading a production batch --------------------------------------------------------------------


def read_batch(path: str | os.PathLike, classes: list[str], channels: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of :func:`read_batch_files`, without the record of the files."""
    images, labels, _ = read_batch_files(path, classes, channels, size)
    return images, labels


def read_batch_files(path: str | os.PathLike, classes: list[str], channels: int,
                     size: int) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """The images of a production batch as uint8 ``(N, size, size, channels)``, their labels (``-1`` =
    unlabeled), converted exactly as ingest converts training images, and the files they came from.

    ``path`` is a batch directory (flat image files are unlabeled; files in a subdirectory named after
    a class carry that class; other subdirectories are an error naming them) or an ingested directory
    (``images.npy`` + ``manifest.parquet``). Files ingest would quarantine are skipped with a warning,
    and so are symbolic links (never followed: a link can point anywhere outside the batch).

    The files: ``{path relative to the batch: sha256}`` of every file decoded, its bytes the same
    before and after decoding; what admitting the batch to the pool may copy (``trigger.admit_batch``),
    so a file written to the batch during or after its evaluation never joins unevaluated. Empty for
    an ingested directory.
    """
    from sslvision.ingest import Conversion, IngestParams, decode_one
    from sslvision.io import file_sha256

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: production batch directory not found")
    if (path / "images.npy").exists():
        return (*_read_ingested_batch(path, channels, size), {})
    index = {name: i for i, name in enumerate(classes)}
    files: list[tuple[Path, int]] = []
    links = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            links.append(entry.name)
        elif entry.is_dir():
            if entry.name not in index:
                raise ValueError(f"{entry}: subdirectory is not a class of the training data {classes}")
            for f in sorted(entry.rglob("*")):  # rglob does not descend into linked directories
                if f.is_symlink():
                    links.append(str(f.relative_to(path)))
                elif f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append((f, index[entry.name]))
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            files.append((entry, -1))
    if links:
        log.warning("%s: %d symbolic link(s) skipped, never followed (%s%s)", path, len(links), ", ".join(links[:3]),
                    ", ..." if len(links) > 3 else "")
    if not files:
        raise ValueError(f"{path}: no image files in the batch")
    limits = IngestParams()  # the same size guards as ingest's defaults
    conv = Conversion(channels, size, limits.max_file_bytes, limits.max_pixels)
    images, labels, bad, evaluated = [], [], [], {}
    for f, label in files:
        before = file_sha256(f)
        r = decode_one(str(f), None, None, conv)
        if r[0] == "ok":
            images.append(r[2])
            labels.append(label)
            if before is not None and file_sha256(f) == before:
                evaluated[f.relative_to(path).as_posix()] = before
        else:
            bad.append(f"{f.name}: {r[1]}")
    if bad:
        log.warning("%s: %d file(s) skipped (%s%s)", path, len(bad), "; ".join(bad[:3]), ", ..." if len(bad) > 3 else "")
    if not images:
        raise ValueError(f"{path}: none of the {len(files)} image files could be decoded")
    return np.stack(images), np.asarray(labels, dtype=np.int64), evaluated


def _read_ingested_batch(path: Path, channels: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    images = np.load(path / "images.npy", mmap_mode="r")
    if images.shape[1:] != (size, size, channels):
        raise ValueError(f"{path / 'images.npy'}: images of shape {images.shape[1:]}, the training data's are "
                         f"{(size, size, channels)}")
    manifest = path / "manifest.parquet"
    if manifest.exists():
        df = pd.read_parquet(manifest, columns=["index", "label"]).sort_values("index")
        labels = df["label"].to_numpy(np.int64)
        images = images[df["index"].to_numpy()]
    else:
        labels = np.full(len(images), -1, dtype=np.int64)
    return np.asarray(images), labels


# --- the stage ------------------------------------------------------------------------------------


def classifier_reference_rows(finetune: Any, ingested_manifest: Any) -> tuple[np.ndarray, np.ndarray]:
    """Train-distribution rows of ``images.npy`` the classifier never trained on, and the per-class counts
    of every labeled row finetune used (to tell the rare classes).

    The rows: finetune's validation rows (``finetune.train_val_rows``, a ``val_fraction`` share of each
    class of the audited manifest) plus the same share of the rows the audit dropped. Validation rows
    alone would be biased towards easy images (the audit drops the ambiguous ones), which would make the
    reference accuracy too high; with the dropped share added, the rows are an unbiased sample of the
    ingested training images. ``ingested_manifest``: ``data/ingested/manifest.parquet`` as a DataFrame.
    """
    from sslvision.finetune import train_val_rows

    train, val = train_val_rows(finetune)
    kept = set(train["index"]) | set(val["index"])
    ingested = ingested_manifest[ingested_manifest["split"].isin(finetune.splits) & (ingested_manifest["label"] >= 0)]
    dropped = ingested.loc[~ingested["index"].isin(kept), "index"].to_numpy()
    rng = np.random.default_rng(finetune.seed)
    dropped = rng.choice(dropped, int(round(finetune.val_fraction * len(dropped))), replace=False)
    labels = np.concatenate([train["label"].to_numpy(np.int64), val["label"].to_numpy(np.int64)])
    return np.sort(np.concatenate([val["index"].to_numpy(), dropped])), np.bincount(labels)


def scored_classifier(p: DriftParams, finetune: Any) -> tuple[Any, dict[str, Any]]:
    """The classifier monitoring scores, and the record of which one it is (``trigger.json``'s ``model``).

    The registry's ``champion`` (``models:/NAME@champion``, NAME: ``finetune.registry.model_name``), its
    files checked against the digests recorded at registration
    (:func:`sslvision.registry.load_champion_classifier`): the model in production, never whatever
    ``models/classifier`` the last run left (after a refused challenger, that is the refused model).
    ``p.classifier`` is scored instead, with the reason recorded and a warning, only where no model is
    in production: the registry is off (``finetune.registry.enabled: false``: the file is the only
    model there is), or no version was ever promoted (the newest classifier is then the one a first
    promotion would serve; refusing would fail a new project's first ``dvc repro`` at its last stage).
    """
    from sslvision import registry, tracking
    from sslvision.finetune import load_classifier

    if finetune.registry.enabled:
        name = finetune.registry.model_name
        tracking.setup()
        champion = registry.load_champion_classifier(name)
        if champion is not None:
            return champion[0], {"source": "registry", "uri": f"models:/{name}@{registry.CHAMPION}",
                                 "name": name, "version": champion[1]}
        reason = f"model {name!r} has no {registry.CHAMPION!r} version (none promoted yet)"
        log.warning("%s: scoring %s instead, which is not a model in production", reason, p.classifier)
    else:
        reason = "finetune.registry.enabled is false"
    return load_classifier(p.classifier), {"source": "file", "path": p.classifier, "reason": reason}


def build_reference(p: DriftParams, params: str | Path | None = None) -> tuple[Reference, Any, Any, tuple[int, ...]]:
    """Load the ingested data, reference embeddings, encoder and the classifier to score
    (:func:`scored_classifier`); compute the reference. ``params`` is the params file whose ``finetune``
    section says which rows finetune held out and which registered model is the champion.

    Returns ``(reference, encoder, classifier, image shape (H, W, C))``.
    """
    from sslvision.data import Ingested, load_embeddings
    from sslvision.finetune import FinetuneParams
    from sslvision.models import load_encoder
    from sslvision.params import load_section

    data = Ingested.load(p.ingested)
    all_embeddings = load_embeddings(p.embeddings)
    if len(all_embeddings) != len(data.images):
        raise ValueError(f"{p.embeddings}/embeddings.npy has {len(all_embeddings)} rows but {p.ingested}/images.npy "
                         f"has {len(data.images)}; re-run pretrain (dvc repro pretrain)")
    encoder = load_encoder(p.encoder)
    finetune = load_section("finetune", FinetuneParams, params)
    classifier, model = scored_classifier(p, finetune)
    classes = data.classes
    if list(classifier.classes) != list(classes):
        raise ValueError(f"{model.get('uri', p.classifier)}: classes {classifier.classes} differ from "
                         f"{p.ingested}/classes.json {classes}")
    rng = np.random.default_rng(p.seed)
    train = data.split("train")
    test = data.split("test")
    if len(train) < 2 or len(test) < 2:
        raise ValueError(f"{p.ingested}: the reference needs train and test images (found {len(train)} train, "
                         f"{len(test)} test)")
    ref_rows = np.sort(rng.choice(train["index"].to_numpy(), min(p.reference_size, len(train)), replace=False))
    val_rows, train_counts = classifier_reference_rows(finetune, data.manifest)
    calib = test.sample(n=min(p.calibration_size, len(test)), random_state=p.seed).sort_values("index")
    log.info("reference: %d train images (embeddings), %d train images the classifier never saw, calibration: "
             "%d test images", len(ref_rows), len(val_rows), len(calib))
    reference = Reference(
        embeddings=np.asarray(all_embeddings[ref_rows], dtype=np.float32),
        probs=classifier.predict_proba(np.asarray(data.images[val_rows]), p.batch_size),
        calib_probs=classifier.predict_proba(np.asarray(data.images[calib["index"].to_numpy()]), p.batch_size),
        calib_labels=calib["label"].to_numpy(np.int64),
        train_counts=np.pad(train_counts, (0, len(classes) - len(train_counts))),
        classes=classes,
        model=model,
    )
    return reference, encoder, classifier, tuple(data.images.shape[1:])


def run_drift_eval(p: DriftParams, batch: str | Path | None = None, reports: str | Path = REPORTS,
                   params: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the batch (default ``p.batch``): write ``trigger.json`` and the plots to ``reports``; return
    the JSON result and ``evaluated_files`` (see :func:`read_batch_files`). ``params``: the params file (for
    finetune's held-out rows)."""
    from sslvision.io import write_json
    from sslvision.models import embed

    batch = Path(batch or p.batch)
    reference, encoder, classifier, (size, _, channels) = build_reference(p, params)
    images, labels, files = read_batch_files(batch, reference.classes, channels, size)
    log.info("%s: %d images (%d labeled)", batch, len(images), int(np.sum(labels >= 0)))
    embeddings = embed(encoder, images, p.batch_size)
    result = evaluate_batch(reference, embeddings, classifier.predict_proba(images, p.batch_size), labels, p)
    reports = Path(reports)
    write_plots(result, reference, reports, embeddings)
    out = {"batch": str(batch), "model": reference.model, **to_json(result)}
    write_json(reports / "trigger.json", out)
    return {**out, "evaluated_files": files}  # for trigger.admit_batch; not a metric, so not in trigger.json


# --- the report -----------------------------------------------------------------------------------


def write_plots(result: dict[str, Any], reference: Reference, reports: str | Path, batch_embeddings: np.ndarray
                | None = None) -> list[Path]:
    """``mmd.png`` (the permutation null, the observed MMD² and the critical value), ``prediction_shift.png``
    and ``.csv`` (predicted-class shares, reference vs batch, and their difference ``shift``), ``embeddings_pca.png`` (2-D PCA fitted
    on the reference, when ``batch_embeddings`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from sslvision.io import atomic_path, write_csv

    reports = Path(reports)
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        with atomic_path(reports / name, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(reports / name)

    drift = result["input_drift"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(drift["null"], bins=40, color="0.7", label=f"permutation null ({drift['permutations']})")
    ax.axvline(drift["critical_value"], color="tab:orange", ls="--", label=f"threshold (alpha {drift['alpha']})")
    ax.axvline(drift["statistic"], color="tab:red", lw=2, label=f"batch MMD² (p = {drift['p_value']:.3g})")
    ax.set_xlabel("unbiased MMD² on SSL embeddings")
    ax.set_ylabel("permutations")
    ax.set_title("input drift: batch vs reference")
    ax.legend(fontsize=8)
    save(fig, "mmd.png")

    shift = result["prediction_shift"]
    table = pd.DataFrame({"class": reference.classes, "reference": shift["reference"], "batch": shift["batch"],
                          "shift": shift["batch"] - shift["reference"]})
    write_csv(reports / "prediction_shift.csv", table)
    written.append(reports / "prediction_shift.csv")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(reference.classes))
    ax.bar(x - 0.2, table["reference"], 0.4, label="reference")
    ax.bar(x + 0.2, table["batch"], 0.4, label="batch")
    ax.set_xticks(x, reference.classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("share of predictions")
    ax.set_title(f"predicted classes: total variation {shift['tv']:.3f}, chi-square p = {shift['pvalue']:.3g}")
    ax.legend()
    save(fig, "prediction_shift.png")

    if batch_embeddings is not None:
        from sklearn.decomposition import PCA

        pca = PCA(2, random_state=0).fit(reference.embeddings)
        a, b = pca.transform(reference.embeddings), pca.transform(batch_embeddings)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(a[:, 0], a[:, 1], s=4, alpha=0.4, label="reference")
        ax.scatter(b[:, 0], b[:, 1], s=4, alpha=0.6, label="batch")
        ax.set_title("SSL embeddings, PCA fitted on the reference")
        ax.legend(markerscale=3)
        save(fig, "embeddings_pca.png")
    return written


def scored_model_name(model: dict[str, Any]) -> str:
    """One line for the record of :func:`scored_classifier`: ``NAME version V (champion)`` or the file and why."""
    if model.get("source") == "registry":
        return f"{model['name']} version {model['version']} (champion)"
    return f"{model.get('path')} ({model.get('reason')})"


def log_to_mlflow(result: dict[str, Any], reports: str | Path) -> None:
    """Each metric's value and failed flag, the failed metrics and the scored model (``sslvision.scored_model``)
    as tags, the report files as artifacts."""
    import mlflow

    values = {}
    for name, m in result["metrics"].items():
        if m["value"] is not None:
            values[name] = float(m["value"])
        values[f"{name}.failed"] = float(m["failed"])
    values["mmd2"] = float(result["input_drift"]["statistic"])
    mlflow.log_metrics(values)
    mlflow.set_tag("sslvision.drift.failed", ",".join(result["failed"]) or "none")
    mlflow.set_tag("sslvision.scored_model", scored_model_name(result.get("model", {})))
    for f in sorted(Path(reports).iterdir()):
        if f.is_file():
            mlflow.log_artifact(str(f), artifact_path="drift")


def drift_eval_cli(batch: str | Path | None, params: str | Path, reports: str | Path = REPORTS) -> dict[str, Any]:
    """``sslvision drift-eval`` and the stage: params from the file, one MLflow run, the report written."""
    from sslvision import tracking
    from sslvision.params import load_section

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = load_section("drift_eval", DriftParams, params)
    with tracking.stage_run("drift_eval", {**p.model_dump(), "batch": str(batch or p.batch)}):
        result = run_drift_eval(p, batch, reports, params)
        log_to_mlflow(result, reports)
    return result

