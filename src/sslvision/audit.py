"""Label audit: find wrong labels, near-duplicates and outliers with the SSL embeddings.

Inputs (the contract of ``sslvision.data``): ``manifest.parquet`` (the labels), ``embeddings.npy`` (row
``i`` is image ``index == i``; pretrain never saw a label, so the embedding space is not fitted to the
noise) and ``images.npy`` (for the gallery only). Audited rows are the labelled rows (``label >= 0``) of
the splits in ``audit.splits``; the clean ``test`` split is never audited.

Method, for the audited rows (``X`` = L2-normalised embeddings, ``s`` = given labels):

0. **Features**: with ``pixel_pca > 0`` (the default), ``X`` gets the first ``pixel_pca`` principal
   components of the raw pixels appended (images area-averaged to at most ``pixel_side`` pixels a side,
   scaled to mean row norm ``pixel_weight``); the kNN steps use that, L2-normalised. The two views make
   different mistakes: on the demo scenario (benchmarks/audit.py) the SSL embeddings alone reach F1
   0.880 (symmetric 20% noise) / 0.829 (asymmetric), pixels alone (cleanlab's recipe) 0.824 / 0.769,
   both together more than either.
1. **Out-of-sample predicted probabilities** ``P`` (cleanlab's contract: no row is scored by a model that
   saw its label). A linear probe (logistic regression on ``X``) by stratified K-fold cross-validation,
   and a kNN vote (cosine, each neighbour weighted ``exp(sim / temperature)``) in which a row is never
   its own neighbour, so it is leave-one-out. ``P = (1 - knn_weight) * probe + knn_weight * knn``.
   Class-balanced probe weights are an option (``class_balanced``) but off by default: on long-tailed
   data they inflate every rare class's probability on head-class images, and confident learning then
   flags hundreds of correct head-class labels (measured on the demo scenario, see ``params.yaml``).
2. **Cleaning rounds** (``rounds > 1``): rows flagged in one round neither train the probe nor vote in
   the kNN of the next, whose probabilities are then fitted to cleaner labels (their own probabilities
   stay out-of-sample). This matters most where a given class is mostly other classes' images (a rare
   class under symmetric noise).
3. **How many** (confident learning, cleanlab): ``cleanlab.count.num_label_issues`` counts the
   off-diagonal entries of the confident joint, whose per-class thresholds (each class's own mean
   self-confidence) adapt to rare classes; ``cleanlab.count.estimate_joint`` (the joint calibrated to the
   label counts) gives the noise matrix and the estimated noise rate of each given class and overall.
4. **Which** (ranking): a row's label quality is ``(1 - consensus_weight) * cleanlab's label quality score
   (quality: normalized_margin or self_confidence) + consensus_weight * consensus``, the consensus being
   SimiFeat's kNN agreement: the share of the ``consensus_k`` nearest neighbours whose given label is the
   row's. ``score = 1 - quality``.
5. **Flags**: ``selection: rank`` flags the step-3 number of lowest-quality rows, leaving every class at
   least ``min_examples_per_class`` unflagged rows; ``selection: cleanlab`` takes cleanlab's
   ``find_label_issues(filter_by=...)`` mask as it is. The suggested label is the most probable class
   other than the given one; its probability is the suggestion's confidence.
6. **Near-duplicates**: pairs with cosine similarity >= ``duplicate_similarity`` (groups by connected
   components). A group whose given labels disagree is a conflict: members whose label differs from the
   group's most probable class are label issues too.
7. **Outliers**: mean cosine distance to the ``outlier_k`` nearest neighbours beyond Tukey's fence
   (``Q3 + outlier_fence * IQR``), as cleanlab's Datalab flags feature-space outliers.

Policy (``audit.policy``) for label issues: ``keep`` (only report), ``drop`` (remove from the cleaned
manifest), ``relabel`` (take the suggested label when its confidence >= ``relabel_confidence``, drop
the others). Outliers are dropped only with ``drop_outliers``. Raw data is never modified.

Outputs (``run_audit``), each written atomically:

- ``data/audit/label_issues.parquet``: one row per flagged image (label issue, conflicting duplicate or
  outlier), highest score first: ``id, index, split, batch, source_path, label_given, label_given_name,
  label_suggested, label_suggested_name, score, suggested_confidence, self_confidence, consensus,
  is_label_issue, is_outlier, outlier_distance, duplicate_of, reason, action``.
- ``data/audit/manifest_clean.parquet``: ``manifest.parquet`` minus dropped rows, with ``label`` /
  ``label_name`` corrected where relabelled, plus ``label_given`` and ``audit_action`` (keep | relabel).
- ``reports/audit/metrics.json``, ``issues_by_class.csv`` and ``gallery.png`` (top flagged images, given
  -> suggested label).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from sslvision.io import atomic_path, write_csv, write_json, write_parquet
from sslvision.metrics import l2_normalise
from sslvision.params import Section, Seed, TrainingSplits, load_section

log = logging.getLogger(__name__)

OUT = Path("data/audit")
REPORTS = Path("reports/audit")


class AuditParams(Section):
    splits: TrainingSplits = ["train", "pool"]
    folds: int = Field(5, ge=2, le=100)
    seed: Seed = 0
    probe_c: float = Field(10.0, gt=0)
    probe_max_iter: int = Field(200, ge=10, le=1_000_000)
    class_balanced: bool = False
    knn_k: int = Field(20, ge=1, le=10_000)
    knn_temperature: float = Field(0.07, gt=0)
    knn_weight: float = Field(0.5, ge=0, le=1)
    consensus_k: int = Field(20, ge=1, le=10_000)
    consensus_weight: float = Field(0.3, ge=0, le=1)
    rounds: int = Field(2, ge=1, le=100)
    quality: Literal["self_confidence", "normalized_margin"] = "normalized_margin"
    selection: Literal["rank", "cleanlab"] = "rank"
    filter_by: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                       "predicted_neq_given", "low_self_confidence", "low_normalized_margin"] = "prune_by_noise_rate"
    min_examples_per_class: int = Field(5, ge=0, le=1_000_000)
    duplicate_similarity: float = Field(0.999, gt=0, le=1)
    outlier_k: int = Field(10, ge=1, le=10_000)
    outlier_fence: float = Field(3.0, gt=0)
    policy: Literal["drop", "relabel", "keep"] = "relabel"
    relabel_confidence: float = Field(0.8, ge=0, le=1)
    drop_outliers: bool = False
    gallery_size: int = Field(32, ge=0, le=10_000)
    threads: int = Field(1, ge=1, le=1024)
    pixel_pca: int = Field(64, ge=0, le=4096)
    pixel_weight: float = Field(1.0, gt=0)
    pixel_side: int = Field(32, ge=4, le=1024)
    truth: str | None = None


# --- detection -------------------------------------------------------------------------------------

def nearest_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine kNN of the rows of ``x`` (L2-normalised) among themselves, a row never its own
    neighbour: ``(indices, similarities)``, each ``(N, k)``, nearest first."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(x)
    dist, idx = nn.kneighbors()  # no query: sklearn leaves each point out of its own neighbours
    return idx, 1.0 - dist


def probe_probs(x: np.ndarray, labels: np.ndarray, n_classes: int, p: AuditParams,
                trusted: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold probabilities of a logistic-regression probe (stratified K-fold); only ``trusted``
    rows train it, every row is predicted by the fold model that did not see it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    counts = np.bincount(labels, minlength=n_classes)
    folds = int(min(p.folds, max(2, counts[counts > 0].min())))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=p.seed)
    out = np.zeros((len(labels), n_classes))
    with threadpool_limits(limits=p.threads):
        for fold, (train, test) in enumerate(cv.split(x, labels)):
            if trusted is not None:
                train = train[trusted[train]]
            model = LogisticRegression(C=p.probe_c, max_iter=p.probe_max_iter,
                                       class_weight="balanced" if p.class_balanced else None)
            model.fit(x[train], labels[train])
            out[np.ix_(test, model.classes_)] = model.predict_proba(x[test])
            log.info("probe fold %d/%d done", fold + 1, folds)
    return out


def knn_probs(idx: np.ndarray, sim: np.ndarray, labels: np.ndarray, n_classes: int, k: int,
              temperature: float, trusted: np.ndarray | None = None) -> np.ndarray:
    """Leave-one-out kNN vote: neighbour ``j`` adds ``exp(sim / temperature)`` to its given label's
    column (untrusted neighbours add nothing); rows normalised, a tiny floor keeps every class > 0."""
    idx, sim = idx[:, :k], sim[:, :k]
    w = np.exp((sim - 1.0) / temperature)  # shifted by the max similarity: same ratios, no overflow
    if trusted is not None:
        w = w * trusted[idx]
    votes = np.zeros((len(idx), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(idx)), idx.shape[1]), labels[idx].ravel()), w.ravel())
    votes += 1e-6
    return votes / votes.sum(axis=1, keepdims=True)


def knn_consensus(idx: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """SimiFeat-style consensus: share of the ``k`` nearest neighbours whose given label equals the row's."""
    return (labels[idx[:, :k]] == labels[:, None]).mean(axis=1)


@dataclass
class LabelAudit:
    """Per-row results of ``detect_label_issues`` (arrays aligned with the audited rows)."""

    pred_probs: np.ndarray
    self_confidence: np.ndarray
    consensus: np.ndarray
    score: np.ndarray
    is_label_issue: np.ndarray
    suggested: np.ndarray
    suggested_confidence: np.ndarray
    joint: np.ndarray
    neighbours: np.ndarray
    similarities: np.ndarray


def audit_features(embeddings: np.ndarray, pixels: np.ndarray | None, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """``(probe features, kNN features)``: the L2-normalised embeddings, with the pixel features (scaled to
    mean row norm ``weight``) appended when given; the kNN features are those, L2-normalised again."""
    x = l2_normalise(embeddings)
    if pixels is None:
        return x, x
    pixels = np.asarray(pixels, dtype=np.float32)
    if len(pixels) != len(x):
        raise ValueError(f"{len(x)} embeddings but {len(pixels)} pixel feature rows")
    scale = float(np.linalg.norm(pixels, axis=1).mean())
    x = np.hstack([x, pixels * (weight / max(scale, 1e-12))]).astype(np.float32)
    return x, l2_normalise(x)


def pixel_features(images: np.ndarray, index: np.ndarray, n_components: int, side: int = 32, seed: int = 0,
                   fit_rows: int = 20000, chunk: int = 4096) -> np.ndarray:
    """PCA features of the raw pixels of ``images[index]`` (uint8 ``(N, H, W, C)``, e.g. memory-mapped):
    images larger than ``side`` are area-averaged down to at most ``side`` x ``side`` first; the PCA is fit on
    at most ``fit_rows`` rows (a seeded sample) and applied chunk by chunk, so memory stays bounded."""
    from sklearn.decomposition import PCA

    index = np.asarray(index)
    _, h, w, _ = images.shape
    f = max(1, -(-max(h, w) // side))  # pooling factor (ceil)

    def flat(rows: np.ndarray) -> np.ndarray:
        x = np.asarray(images[np.sort(rows)], dtype=np.float32)[np.argsort(np.argsort(rows))] / 255.0
        if f > 1:
            hh, ww = (h // f) * f, (w // f) * f
            x = x[:, :hh, :ww].reshape(len(x), hh // f, f, ww // f, f, -1).mean(axis=(2, 4))
        return x.reshape(len(x), -1)

    rng = np.random.default_rng(seed)
    fit = index if len(index) <= fit_rows else rng.choice(index, fit_rows, replace=False)
    sample = flat(fit)
    k = min(n_components, sample.shape[0] - 1, sample.shape[1])
    pca = PCA(k, random_state=seed).fit(sample)
    return np.concatenate([pca.transform(flat(index[i:i + chunk])) for i in range(0, len(index), chunk)]
                          ).astype(np.float32)


def detect_label_issues(embeddings: np.ndarray, labels: np.ndarray, n_classes: int,
                        p: AuditParams, pixels: np.ndarray | None = None) -> LabelAudit:
    """Steps 1-5 of the module docstring on ``embeddings`` (N, D) with given ``labels`` (N,); ``pixels``
    (N, K): pixel features (``pixel_features``) appended to the embeddings (step 0)."""
    from cleanlab.count import estimate_joint, num_label_issues
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    if len(labels) < 2 * p.folds or len(np.unique(labels)) < 2:
        raise ValueError(f"too little to audit: {len(labels)} labelled rows in {len(np.unique(labels))} classes "
                         f"(need >= {2 * p.folds} rows and 2 classes)")
    x, xk = audit_features(embeddings, pixels, p.pixel_weight)
    t0 = time.perf_counter()
    idx, sim = nearest_neighbours(xk, max(p.knn_k, p.consensus_k, p.outlier_k))
    log.info("kNN graph of %d rows (k=%d) in %.1f s", len(x), idx.shape[1], time.perf_counter() - t0)
    consensus = knn_consensus(idx, labels, p.consensus_k)
    trusted = None
    for r in range(p.rounds):
        pred_probs = (1 - p.knn_weight) * probe_probs(x, labels, n_classes, p, trusted) \
            + p.knn_weight * knn_probs(idx, sim, labels, n_classes, p.knn_k, p.knn_temperature, trusted)
        quality = (1 - p.consensus_weight) * get_label_quality_scores(labels, pred_probs, method=p.quality) \
            + p.consensus_weight * consensus
        if p.selection == "cleanlab":
            flagged = find_label_issues(labels, pred_probs, filter_by=p.filter_by,
                                        min_examples_per_class=p.min_examples_per_class, n_jobs=1)
        else:
            flagged = select_lowest(labels, quality, num_label_issues(labels, pred_probs),
                                    p.min_examples_per_class)
        log.info("round %d/%d: %d label issues (%.1f%%)", r + 1, p.rounds, flagged.sum(), 100 * flagged.mean())
        trusted = ~flagged
    others = pred_probs.copy()
    others[np.arange(len(labels)), labels] = -1.0
    suggested = others.argmax(axis=1)
    return LabelAudit(
        pred_probs=pred_probs, self_confidence=pred_probs[np.arange(len(labels)), labels], consensus=consensus, score=1.0 - quality,
        is_label_issue=flagged, suggested=suggested,
        suggested_confidence=pred_probs[np.arange(len(labels)), suggested],
        joint=estimate_joint(labels, pred_probs), neighbours=idx, similarities=sim)


def select_lowest(labels: np.ndarray, quality: np.ndarray, n: int, min_examples_per_class: int) -> np.ndarray:
    """Flag the ``n`` lowest-quality rows over all classes, then unflag the best of any class that would
    keep fewer than ``min_examples_per_class`` unflagged rows (a rare class is never emptied)."""
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[np.argsort(quality, kind="stable")[:n]] = True
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        short = min(min_examples_per_class, len(members)) - int((~flagged[members]).sum())
        if short > 0:
            hit = members[flagged[members]]
            flagged[hit[np.argsort(-quality[hit], kind="stable")[:short]]] = False
    return flagged


def noise_rates(joint: np.ndarray) -> tuple[float, np.ndarray]:
    """Overall and per-given-class estimated noise rate from cleanlab's joint ``p(given, true)``:
    ``1 - p(true = c | given = c)``; NaN for a class with no rows."""
    row = joint.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(row > 0, 1.0 - np.diag(joint) / row, np.nan)
    return float(1.0 - np.trace(joint)), per_class


def near_duplicate_groups(idx: np.ndarray, sim: np.ndarray, threshold: float) -> np.ndarray:
    """Group id per row (connected components of pairs with cosine >= ``threshold``); -1 if no pair."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, cols = np.nonzero(sim >= threshold)
    group = np.full(len(idx), -1)
    if len(rows) == 0:
        return group
    graph = coo_matrix((np.ones(len(rows)), (rows, idx[rows, cols])), shape=(len(idx), len(idx)))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    group[sizes[comp] > 1] = comp[sizes[comp] > 1]
    return group


def conflicting_duplicates(group: np.ndarray, labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Rows of a near-duplicate group with disagreeing labels whose label is not the group's most
    probable class (summed predicted probabilities of its members)."""
    wrong = np.zeros(len(labels), dtype=bool)
    for g in np.unique(group[group >= 0]):
        members = np.flatnonzero(group == g)
        if len(np.unique(labels[members])) > 1:
            best = pred_probs[members].sum(axis=0).argmax()
            wrong[members[labels[members] != best]] = True
    return wrong


def outlier_distances(sim: np.ndarray, k: int, fence: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean cosine distance to the ``k`` nearest neighbours and the outlier flag (beyond Tukey's fence)."""
    dist = 1.0 - sim[:, :k].mean(axis=1)
    q1, q3 = np.percentile(dist, [25, 75])
    return dist, dist > q3 + fence * (q3 - q1)


# --- the stage -------------------------------------------------------------------------------------

def audited_rows(manifest: pd.DataFrame, splits: list[str]) -> np.ndarray:
    """Positions (in ``manifest``) of the rows the audit scores: labelled rows of ``splits``."""
    return np.flatnonzero(manifest["split"].isin(splits).to_numpy() & (manifest["label"].to_numpy() >= 0))


def run_audit(p: AuditParams, manifest: pd.DataFrame, embeddings: np.ndarray, classes: list[str],
              truth: pd.DataFrame | None = None, images: np.ndarray | None = None,
              ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Audit the labels of ``manifest``; return ``(label_issues, manifest_clean, metrics)``. ``images``
    (``images.npy``, row ``i`` = ``index == i``) is needed when ``p.pixel_pca > 0``."""
    if p.pixel_pca and images is None:
        raise ValueError(f"audit.pixel_pca={p.pixel_pca} needs the ingested images (images.npy); "
                         "set audit.pixel_pca: 0 to audit on the SSL embeddings alone")
    missing = {"index", "id", "split", "label"} - set(manifest.columns)
    if missing:
        raise ValueError(f"manifest lacks column(s) {sorted(missing)}")
    if int(manifest["index"].max()) >= len(embeddings):
        raise ValueError(f"manifest refers to row {int(manifest['index'].max())} but the embeddings have "
                         f"{len(embeddings)} rows; re-run pretrain")
    rows = audited_rows(manifest, p.splits)
    sub = manifest.iloc[rows].reset_index(drop=True)
    labels = sub["label"].to_numpy(np.int64)
    if labels.max() >= len(classes):
        raise ValueError(f"manifest: label {labels.max()} but classes.json has {len(classes)} classes")
    log.info("auditing %d labelled rows of splits %s", len(sub), p.splits)
    t0 = time.perf_counter()
    emb = np.asarray(embeddings[sub["index"].to_numpy()], dtype=np.float32)
    pixels = None
    if p.pixel_pca:
        if int(manifest["index"].max()) >= len(images):
            raise ValueError(f"manifest refers to row {int(manifest['index'].max())} but images.npy has "
                             f"{len(images)} rows; re-run ingest")
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=p.threads):
            pixels = pixel_features(images, sub["index"].to_numpy(), p.pixel_pca, p.pixel_side, p.seed)
    la = detect_label_issues(emb, labels, len(classes), p, pixels)
    group = near_duplicate_groups(la.neighbours, la.similarities, p.duplicate_similarity)
    conflict = conflicting_duplicates(group, labels, la.pred_probs)
    dist, outlier = outlier_distances(la.similarities, p.outlier_k, p.outlier_fence)
    seconds = time.perf_counter() - t0

    issue = la.is_label_issue | conflict
    first = pd.Series(np.arange(len(sub))).groupby(group).transform("min").to_numpy()
    dup_of = np.where((group >= 0) & (first != np.arange(len(sub))), sub["id"].to_numpy()[first], None)
    action = np.full(len(sub), "keep", dtype=object)
    if p.policy == "drop":
        action[issue] = "drop"
    elif p.policy == "relabel":
        action[issue] = np.where(la.suggested_confidence[issue] >= p.relabel_confidence, "relabel", "drop")
    if p.drop_outliers:
        action[outlier & ~issue] = "drop"
    issues = _issues_table(sub, classes, la, issue, conflict, outlier, dist, dup_of, action)
    clean = clean_manifest(manifest, rows, action, la.suggested, classes)
    metrics = audit_metrics(p, sub, classes, la, issue, conflict, outlier, group, action, seconds)
    if truth is not None:
        metrics["truth"] = truth_metrics(sub, truth, issue, la.score)
    return issues, clean, metrics


def _reason(i: int, la: LabelAudit, conflict: np.ndarray, outlier: np.ndarray, classes: list[str]) -> str:
    parts = []
    if la.is_label_issue[i]:
        parts.append(f"label: p(given)={la.self_confidence[i]:.2f}, kNN consensus {la.consensus[i]:.2f}, "
                     f"p({classes[la.suggested[i]]})={la.suggested_confidence[i]:.2f}")
    if conflict[i]:
        parts.append("conflicting near-duplicate")
    if outlier[i]:
        parts.append("outlier")
    return "; ".join(parts)


def _issues_table(sub: pd.DataFrame, classes: list[str], la: LabelAudit, issue: np.ndarray,
                  conflict: np.ndarray, outlier: np.ndarray, dist: np.ndarray, dup_of: np.ndarray,
                  action: np.ndarray) -> pd.DataFrame:
    pos = np.flatnonzero(issue | outlier)
    names = np.asarray(classes, dtype=object)
    given = sub["label"].to_numpy()[pos]
    suggested = np.where(issue[pos], la.suggested[pos], given)
    df = pd.DataFrame({
        "id": sub["id"].to_numpy()[pos],
        "index": sub["index"].to_numpy()[pos],
        "split": sub["split"].to_numpy()[pos],
        "batch": sub["batch"].to_numpy()[pos] if "batch" in sub else "",
        "source_path": sub["source_path"].to_numpy()[pos] if "source_path" in sub else None,
        "label_given": given,
        "label_given_name": names[given],
        "label_suggested": suggested,
        "label_suggested_name": names[suggested],
        "score": la.score[pos],
        "suggested_confidence": np.where(issue[pos], la.suggested_confidence[pos], np.nan),
        "self_confidence": la.self_confidence[pos],
        "consensus": la.consensus[pos],
        "is_label_issue": issue[pos],
        "is_outlier": outlier[pos],
        "outlier_distance": dist[pos],
        "duplicate_of": dup_of[pos],
        "reason": [_reason(i, la, conflict, outlier, classes) for i in pos],
        "action": action[pos],
    })
    return df.sort_values(["is_label_issue", "score"], ascending=False, kind="stable").reset_index(drop=True)


def clean_manifest(manifest: pd.DataFrame, rows: np.ndarray, action: np.ndarray, suggested: np.ndarray,
                   classes: list[str]) -> pd.DataFrame:
    """``manifest`` minus dropped rows; relabelled rows take the suggested label; adds ``label_given``
    and ``audit_action`` (rows that were not audited are ``keep``)."""
    out = manifest.copy()
    out["label_given"] = out["label"]
    act = np.full(len(out), "keep", dtype=object)
    act[rows] = action
    relabel = rows[action == "relabel"]
    label = out["label"].to_numpy().copy()
    label[relabel] = suggested[action == "relabel"]
    out["label"] = label
    if "label_name" in out:
        names = out["label_name"].to_numpy(dtype=object).copy()
        names[relabel] = np.asarray(classes, dtype=object)[label[relabel]]
        out["label_name"] = names
    out["audit_action"] = act
    return out[act != "drop"].reset_index(drop=True)


def _by_class(classes: list[str], values: Any) -> dict[str, Any]:
    return {c: (None if isinstance(v, float) and np.isnan(v) else v) for c, v in zip(classes, values, strict=True)}


def audit_metrics(p: AuditParams, sub: pd.DataFrame, classes: list[str], la: LabelAudit, issue: np.ndarray,
                  conflict: np.ndarray, outlier: np.ndarray, group: np.ndarray, action: np.ndarray,
                  seconds: float) -> dict[str, Any]:
    labels = sub["label"].to_numpy()
    k = len(classes)
    overall, per_class = noise_rates(la.joint)
    counts = np.bincount(labels, minlength=k)
    flagged = np.bincount(labels[issue], minlength=k)
    # one entry per split, and per batch of a split that has batches (a labelled production batch)
    batch = sub["batch"].fillna("").astype(str) if "batch" in sub else pd.Series("", index=sub.index)
    batches = {}
    for b, part in sub.groupby(batch.where(batch != "", sub["split"].astype(str))):
        batches[str(b)] = {"n": len(part), "issues": int(issue[part.index].sum()),
                           "issue_rate": float(issue[part.index].mean())}
    return {
        "n_audited": int(len(sub)),
        "n_label_issues": int(issue.sum()),
        "issue_rate": float(issue.mean()),
        "noise_rate_estimated": overall,
        "noise_rate_by_class": _by_class(classes, [float(v) for v in per_class]),
        "issues_by_class": _by_class(classes, flagged.tolist()),
        "labelled_by_class": _by_class(classes, counts.tolist()),
        "issue_rate_by_batch": batches,
        "n_near_duplicate_rows": int((group >= 0).sum()),
        "n_near_duplicate_groups": int(len(np.unique(group[group >= 0]))),
        "n_conflicting_duplicates": int(conflict.sum()),
        "n_outliers": int(outlier.sum()),
        "actions": {a: int((action == a).sum()) for a in ("keep", "relabel", "drop")},
        "seconds": seconds,
    }


# --- scoring against a truth file (benchmarks and tests only) ---------------------------------------

def match_truth(sub: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """``is_noisy`` of the truth row of each audited row, -1 where the truth file has none.

    Rows match on ``source_path`` (relative to the ingested source) == truth ``path`` (relative to the
    scenario root), or on the trailing part of ``path`` where the ingested source was a subdirectory
    of the scenario (``train/x/y.png`` matches ``images/train/x/y.png``); a suffix shared by several
    truth paths matches nothing.
    """
    missing = {"path", "is_noisy"} - set(truth.columns)
    if missing:
        raise ValueError(f"truth file lacks column(s) {sorted(missing)}")
    if "source_path" not in sub:
        raise ValueError("manifest has no source_path column to match the truth file on")
    exact: dict[str, int] = {}
    by_suffix: dict[str, int] = {}
    ambiguous: set[str] = set()
    for path, noisy in zip(truth["path"].astype(str), truth["is_noisy"].astype(int), strict=True):
        parts = path.replace("\\", "/").split("/")
        exact["/".join(parts)] = noisy
        for i in range(1, len(parts)):
            key = "/".join(parts[i:])
            if key in by_suffix:
                ambiguous.add(key)
            by_suffix[key] = noisy
    found = []
    for p in sub["source_path"].astype(str).str.replace("\\", "/", regex=False):
        found.append(exact[p] if p in exact else -1 if p in ambiguous else by_suffix.get(p, -1))
    return np.array(found, dtype=int)


def truth_metrics(sub: pd.DataFrame, truth: pd.DataFrame, flagged: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1 and AUROC of the label-issue flags against the truth's ``is_noisy``."""
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    noisy = match_truth(sub, truth)
    known = noisy >= 0
    if known.mean() < 0.5:
        raise ValueError(f"truth file matches only {known.sum()} of {len(sub)} audited rows on source_path")
    y, f, s = noisy[known].astype(bool), flagged[known], score[known]
    precision, recall, f1, _ = precision_recall_fscore_support(y, f, average="binary", zero_division=0)
    auroc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")
    return {"n_matched": int(known.sum()), "n_noisy": int(y.sum()), "n_flagged": int(f.sum()),
            "precision": float(precision), "recall": float(recall), "f1": float(f1), "auroc": auroc}


# --- gallery, files, CLI ----------------------------------------------------------------------------

def gallery(images: np.ndarray, issues: pd.DataFrame, path: str | os.PathLike, n: int, columns: int = 8) -> None:
    """PNG grid of ``n`` top-scored label issues (the best of each confusion in turn), each titled
    ``given -> suggested (confidence)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flagged = issues[issues["is_label_issue"]].sort_values("score", ascending=False, kind="stable")
    # round-robin over (given, suggested) pairs (best of each pair, then the second best, ...): the very
    # top of the ranking is often one easy confusion repeated
    turn = flagged.groupby(["label_given", "label_suggested"]).cumcount()
    top = flagged.assign(_turn=turn).sort_values(["_turn", "score"], ascending=[True, False], kind="stable").head(n)
    count = max(len(top), 1)
    cols = min(columns, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, r) in zip(axes.ravel(), top.iterrows(), strict=False):
        img = np.asarray(images[int(r["index"])])
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{r['label_given_name']}\n→ {r['label_suggested_name']} ({r['suggested_confidence']:.2f})",
                     fontsize=7)
    if top.empty:
        axes[0, 0].text(0.5, 0.5, "no label issues found", ha="center", va="center")
    fig.suptitle("Top label issues: given → suggested (confidence)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_outputs(issues: pd.DataFrame, clean: pd.DataFrame, metrics: dict[str, Any], images: np.ndarray,
                  p: AuditParams, out: str | os.PathLike = OUT, reports: str | os.PathLike = REPORTS) -> list[Path]:
    """Write the stage's outputs; return the report files (for MLflow)."""
    out, reports = Path(out), Path(reports)
    write_parquet(out / "label_issues.parquet", issues)
    write_parquet(out / "manifest_clean.parquet", clean)
    write_json(reports / "metrics.json", metrics)
    by_class = pd.DataFrame({"class": list(metrics["issues_by_class"]),
                             "issues": list(metrics["issues_by_class"].values()),
                             "noise_rate_estimated": list(metrics["noise_rate_by_class"].values())})
    write_csv(reports / "issues_by_class.csv", by_class)
    gallery(images, issues, reports / "gallery.png", p.gallery_size)
    return [reports / "metrics.json", reports / "issues_by_class.csv", reports / "gallery.png"]


def _metric_items(metrics: dict[str, Any]) -> dict[str, float]:
    from sslvision.tracking import flatten

    return {re.sub(r"[^\w\-./ :]", "_", k): float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def audit_cli(params: str | os.PathLike, ingested: str | os.PathLike = "data/ingested",
              embeddings: str | os.PathLike = "data/embeddings", out: str | os.PathLike = OUT,
              reports: str | os.PathLike = REPORTS, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage: params from ``params``, outputs in ``out`` and ``reports``, one MLflow run."""
    import mlflow

    from sslvision import tracking
    from sslvision.data import Ingested, load_embeddings

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    p = load_section("audit", AuditParams, params, overrides=overrides)
    ing = Ingested.load(ingested)
    emb = load_embeddings(embeddings)
    if len(emb) != len(ing.images):
        raise ValueError(f"{Path(embeddings) / 'embeddings.npy'}: {len(emb)} rows but "
                         f"{Path(ingested) / 'images.npy'} has {len(ing.images)}; re-run pretrain")
    truth = None
    if p.truth:
        if not Path(p.truth).exists():
            raise FileNotFoundError(f"{p.truth}: truth file (audit.truth) not found")
        truth = pd.read_parquet(p.truth)
    with tracking.stage_run("audit", p.model_dump()):
        issues, clean, metrics = run_audit(p, ing.manifest, emb, ing.classes, truth, ing.images)
        paths = write_outputs(issues, clean, metrics, ing.images, p, out, reports)
        mlflow.log_metrics(_metric_items(metrics))
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path="audit")
    log.info("audit: %d label issues of %d rows (estimated noise rate %.3f), %d outliers, %d conflicting "
             "duplicates; actions %s", metrics["n_label_issues"], metrics["n_audited"],
             metrics["noise_rate_estimated"], metrics["n_outliers"], metrics["n_conflicting_duplicates"],
             json.dumps(metrics["actions"]))
    return metrics
