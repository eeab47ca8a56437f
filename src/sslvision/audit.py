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

On arrays: :func:`find_label_issues` (embeddings, labels and optionally the images; keyword settings;
one row per example). On a manifest: :func:`run_audit` returns ``(label_issues, manifest_clean,
metrics)``:

- ``label_issues``: one row per flagged image (label issue, conflicting duplicate or outlier), highest
  score first: ``id, index, split, batch, source_path, label_given, label_given_name, label_suggested,
  label_suggested_name, score, suggested_confidence, self_confidence, consensus, is_label_issue,
  is_outlier, outlier_distance, duplicate_of, reason, action``.
- ``manifest_clean``: the manifest minus dropped rows, with ``label`` / ``label_name`` corrected where
  relabelled, plus ``label_given`` and ``audit_action`` (keep | relabel).

The DVC stage that reads the ingested files and writes these (with the reports, the gallery and the
MLflow run) is :mod:`sslvision.stages.audit`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from sslvision.metrics import l2_normalise
from sslvision.params import Section, Seed, TrainingSplits, validate_section

log = logging.getLogger(__name__)


class AuditParams(Section):
    """The ``audit`` stage: find wrong labels, duplicates and outliers with the SSL embeddings."""

    splits: TrainingSplits = Field(["train", "pool"], description=(
        "labelled rows of these splits are audited (the clean test split never is)"))
    folds: int = Field(5, ge=2, le=100, description=(
        "K of the cross-validated linear probe (every row scored out-of-sample)"))
    seed: Seed = Field(0, description="fold assignment")
    probe_c: float = Field(10.0, gt=0, description=(
        "inverse L2 strength of the probe; embeddings are L2-normalised, so ~1-100 fits"))
    probe_max_iter: int = Field(200, ge=10, le=1_000_000, description=(
        "lbfgs iterations per fold (raise if sklearn warns it did not converge)"))
    class_balanced: bool = Field(False, description=(
        "class-balanced probe weights. Off: on long-tailed data they inflate rare-class probabilities on "
        "head-class images, so correct head labels get flagged (benchmarks/audit.py); the per-class thresholds "
        "of confident learning already protect the rare classes"))
    knn_k: int = Field(20, ge=1, le=10_000, description=(
        "neighbours in the kNN vote (leave-one-out: a row never votes for itself)"))
    knn_temperature: float = Field(0.07, gt=0, description=(
        "neighbour weight exp(cosine / T): lower = the nearest dominate"))
    knn_weight: float = Field(0.5, ge=0, le=1, description=(
        "share of the kNN vote in the predicted probabilities (rest: the linear probe)"))
    consensus_k: int = Field(20, ge=1, le=10_000, description=(
        "neighbours in the SimiFeat-style consensus (share agreeing with the given label)"))
    consensus_weight: float = Field(0.3, ge=0, le=1, description=(
        "quality = (1-w) * cleanlab quality score + w * consensus"))
    quality: Literal["self_confidence", "normalized_margin"] = Field("normalized_margin", description=(
        "cleanlab score to rank by: normalized_margin (better on asymmetric noise, where the wrong label is a "
        "look-alike class) | self_confidence"))
    rounds: int = Field(2, ge=1, le=100, description=(
        "cleaning rounds: flagged rows stop training the probe / voting in the next"))
    selection: Literal["rank", "cleanlab"] = Field("rank", description=(
        "rank: flag cleanlab's estimated number of issues, lowest quality first | cleanlab: cleanlab's "
        "find_label_issues(filter_by) mask as it is"))
    filter_by: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                       "predicted_neq_given", "low_self_confidence", "low_normalized_margin"] = Field(
        "prune_by_noise_rate", description="cleanlab's filter when selection is cleanlab")
    min_examples_per_class: int = Field(5, ge=0, le=1_000_000, description=(
        "never flag a class below this many unflagged rows (rare classes survive)"))
    duplicate_similarity: float = Field(0.999, gt=0, le=1, description=(
        "cosine similarity at or above which two images are near-duplicates (exact copies: 1.0; lower values "
        "pair distinct images when the embeddings are short-trained)"))
    outlier_k: int = Field(10, ge=1, le=10_000, description=(
        "neighbours whose mean cosine distance is the outlier score"))
    outlier_fence: float = Field(3.0, gt=0, description=(
        "outlier if the score exceeds Q3 + fence * IQR (Tukey's far-out fence)"))
    policy: Literal["drop", "relabel", "keep"] = Field("relabel", description=(
        "for label issues: drop | relabel | keep (report only)"))
    relabel_confidence: float = Field(0.8, ge=0, le=1, description=(
        "relabel only when the suggested label has at least this probability; the other flagged rows are dropped "
        "(policy relabel only)"))
    max_change_share: float = Field(0.3, ge=0, le=1, description=(
        "act on label issues only when relabelling and dropping change at most this share of the audited labels; "
        "above it the encoder more likely cannot yet separate the classes than the labels are that wrong, so every "
        "label is kept and the issues are only listed (1 = always act)"))
    drop_outliers: bool = Field(False, description="also drop outliers from the cleaned manifest")
    gallery_size: int = Field(32, ge=0, le=10_000, description="top flagged images shown in reports/audit/gallery.png")
    threads: int = Field(1, ge=1, le=1024, description=(
        "BLAS threads of the probe; 1 avoids oversubscription on shared machines"))
    pixel_pca: int = Field(64, ge=0, le=4096, description=(
        "append this many principal components of the raw pixels to the SSL embeddings (0 = embeddings alone): "
        "the two make different mistakes, so together they find more label errors (README: benchmarks)"))
    pixel_weight: float = Field(1.0, gt=0, description=(
        "mean norm of the pixel features next to the unit-norm embeddings"))
    pixel_side: int = Field(32, ge=4, le=1024, description=(
        "images larger than this are area-averaged down to it before the PCA"))
    truth: str | None = Field(None, description=(
        "benchmarks/tests only: a scenario truth.parquet; adds precision/recall/F1/AUROC"))


# --- detection -------------------------------------------------------------------------------------

def nearest_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine kNN of the rows of ``x`` (L2-normalised) among themselves, a row never its own
    neighbour: ``(indices, similarities)``, each ``(N, k)``, nearest first."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(x)
    dist, idx = nn.kneighbors()  # no query: sklearn leaves each point out of its own neighbours
    return idx, 1.0 - dist


def probe_probs(x: np.ndarray, labels: np.ndarray, n_classes: int, *, folds: int = 5, seed: int = 0,
                c: float = 10.0, max_iter: int = 200, class_balanced: bool = False, threads: int = 1,
                trusted: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold probabilities ``(N, n_classes)`` of a logistic-regression probe (inverse regularisation
    ``c``) by stratified ``folds``-fold cross-validation (fewer when a class has fewer rows); only
    ``trusted`` rows train it, every row is predicted by the fold model that did not see it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    counts = np.bincount(labels, minlength=n_classes)
    folds = int(min(folds, max(2, counts[counts > 0].min())))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = np.zeros((len(labels), n_classes))
    with threadpool_limits(limits=threads):
        for fold, (train, test) in enumerate(cv.split(x, labels)):
            if trusted is not None:
                train = train[trusted[train]]
            model = LogisticRegression(C=c, max_iter=max_iter, class_weight="balanced" if class_balanced else None)
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
    quality: np.ndarray
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
                        p: AuditParams | None = None, pixels: np.ndarray | None = None) -> LabelAudit:
    """Steps 1-5 of the module docstring on ``embeddings`` (N, D) with given ``labels`` (N,) in
    ``0..n_classes-1``; ``p``: the settings (default ``AuditParams()``); ``pixels`` (N, K): pixel features
    (``pixel_features``) appended to the embeddings (step 0). Raises ValueError when the lengths differ or
    there is too little to audit."""
    p = p if p is not None else AuditParams()
    from cleanlab.count import estimate_joint, num_label_issues
    from cleanlab.filter import find_label_issues as cleanlab_label_issues
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
        probe = probe_probs(x, labels, n_classes, folds=p.folds, seed=p.seed, c=p.probe_c,
                            max_iter=p.probe_max_iter, class_balanced=p.class_balanced, threads=p.threads,
                            trusted=trusted)
        pred_probs = (1 - p.knn_weight) * probe \
            + p.knn_weight * knn_probs(idx, sim, labels, n_classes, p.knn_k, p.knn_temperature, trusted)
        quality = (1 - p.consensus_weight) * get_label_quality_scores(labels, pred_probs, method=p.quality) \
            + p.consensus_weight * consensus
        if p.selection == "cleanlab":
            flagged = cleanlab_label_issues(labels, pred_probs, filter_by=p.filter_by,
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
        pred_probs=pred_probs, self_confidence=pred_probs[np.arange(len(labels)), labels], consensus=consensus,
        quality=quality, score=1.0 - quality,
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


# --- every row: labels, duplicates, outliers (what the stage and find_label_issues share) -------------

@dataclass
class RowAudit:
    """Per-row results of :func:`audit_rows` (arrays aligned with the audited rows)."""

    label: LabelAudit
    group: np.ndarray  # near-duplicate group id, -1 for a row in no group
    conflict: np.ndarray  # member of a group with disagreeing labels whose label is not the group's class
    outlier_distance: np.ndarray
    is_outlier: np.ndarray

    @property
    def is_issue(self) -> np.ndarray:
        """A label issue: flagged by the label audit or a conflicting near-duplicate."""
        return self.label.is_label_issue | self.conflict


def pixel_view(images: np.ndarray, index: np.ndarray, p: AuditParams) -> np.ndarray | None:
    """The pixel features of ``images[index]`` that step 0 appends (``p.pixel_pca`` components, at most
    ``p.threads`` BLAS threads); None when ``p.pixel_pca`` is 0."""
    if not p.pixel_pca:
        return None
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=p.threads):
        return pixel_features(images, index, p.pixel_pca, p.pixel_side, p.seed)


def audit_rows(embeddings: np.ndarray, labels: np.ndarray, n_classes: int, p: AuditParams,
               pixels: np.ndarray | None = None) -> RowAudit:
    """Steps 1-7 of the module docstring: :func:`detect_label_issues`, then near-duplicates (with
    conflicting labels) and outliers in the same kNN graph. ``pixels``: as for detect_label_issues."""
    labels = np.asarray(labels, dtype=np.int64)
    la = detect_label_issues(embeddings, labels, n_classes, p, pixels)
    group = near_duplicate_groups(la.neighbours, la.similarities, p.duplicate_similarity)
    conflict = conflicting_duplicates(group, labels, la.pred_probs)
    dist, outlier = outlier_distances(la.similarities, p.outlier_k, p.outlier_fence)
    return RowAudit(label=la, group=group, conflict=conflict, outlier_distance=dist, is_outlier=outlier)


def first_of_group(group: np.ndarray) -> np.ndarray:
    """Per row, the position of the first row of its near-duplicate group; -1 for the first row itself
    and for a row in no group."""
    first = pd.Series(np.arange(len(group))).groupby(group).transform("min").to_numpy()
    return np.where((group >= 0) & (first != np.arange(len(group))), first, -1)


# cleanlab.filter.find_label_issues's ways of choosing the issues (AuditParams.filter_by)
FilterBy = Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                   "predicted_neq_given", "low_self_confidence", "low_normalized_margin"]


def find_label_issues(
    embeddings: np.ndarray, labels: np.ndarray, *, pixels: np.ndarray | None = None, n_classes: int | None = None,
    folds: int = 5, seed: int = 0, probe_c: float = 10.0, probe_max_iter: int = 200, class_balanced: bool = False,
    knn_k: int = 20, knn_temperature: float = 0.07, knn_weight: float = 0.5, consensus_k: int = 20,
    consensus_weight: float = 0.3, rounds: int = 2,
    quality: Literal["self_confidence", "normalized_margin"] = "normalized_margin",
    selection: Literal["rank", "cleanlab"] = "rank", filter_by: FilterBy = "prune_by_noise_rate",
    min_examples_per_class: int = 5, duplicate_similarity: float = 0.999, outlier_k: int = 10,
    outlier_fence: float = 3.0, threads: int = 1, pixel_pca: int = 64, pixel_weight: float = 1.0,
    pixel_side: int = 32,
) -> pd.DataFrame:
    """Find wrong labels, conflicting near-duplicates and outliers with the embeddings of an encoder that
    never saw the labels (the method of the module docstring; the audit stage runs the same code).

    Args:
        embeddings: ``(N, D)`` float array, one row per example (e.g. ``sslvision.embed(encoder, images)``).
        labels: ``(N,)`` given labels, integers ``0..n_classes-1``.
        pixels: the images, uint8 ``(N, H, W)`` or ``(N, H, W, C)`` aligned with ``embeddings``: with
            ``pixel_pca > 0`` their first ``pixel_pca`` principal components are appended to the embeddings
            (the two views make different mistakes). None: the embeddings alone.
        n_classes: number of classes (default ``labels.max() + 1``).
        folds, seed, ...: the settings of the ``audit`` section of params.yaml (:class:`AuditParams`), same
            names and defaults; ``knn_k`` neighbours vote, ``consensus_k`` give the kNN agreement,
            ``rounds`` of cleaning, ``selection`` ``rank`` or ``cleanlab``.

    Returns:
        A DataFrame with one row per example, in input order: ``given_label`` (int64), ``suggested_label``
        (int64: the most probable other class for a label issue, else the given label), ``label_quality``
        (float64 in [0, 1], low = likely wrong), ``is_label_issue`` (bool, including conflicting
        near-duplicates), ``suggested_confidence`` (float64, NaN where not an issue), ``self_confidence``
        (out-of-sample probability of the given label), ``consensus`` (share of the nearest neighbours with
        the same label), ``duplicate_of`` (int64 position of the first row of its near-duplicate group, -1
        for none), ``is_outlier`` (bool), ``outlier_distance`` (float64) and ``reason`` (str, "" when not
        flagged).

    Raises:
        ParamsError (a ValueError) naming the setting, e.g. ``audit.knn_k``, for an invalid value;
        ValueError for mismatched lengths, non-integer or negative labels, or too few rows (< 2 * folds)
        or classes (< 2).

    Example:
        >>> issues = find_label_issues(embeddings, labels, pixels=images)
        >>> issues[issues["is_label_issue"]].sort_values("label_quality").head()
    """
    arguments = dict(locals())  # the settings are the keyword arguments named like AuditParams fields
    p = validate_section("audit", AuditParams, {k: v for k, v in arguments.items() if k in AuditParams.model_fields},
                         source="find_label_issues")
    x = np.asarray(embeddings)
    y = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N, D), got shape {x.shape}")
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or len(y) == 0):
        raise ValueError(f"labels must be a 1-D array of integers 0..n_classes-1, got {y.dtype} of shape {y.shape}")
    if len(y) and y.min() < 0:
        raise ValueError(f"labels must be >= 0, got {y.min()}")
    k = int(y.max()) + 1 if n_classes is None and len(y) else int(n_classes or 0)
    if len(y) and y.max() >= k:
        raise ValueError(f"label {y.max()} but n_classes is {k}")
    features = None
    if pixels is not None and p.pixel_pca:
        images = np.asarray(pixels)
        images = images[..., None] if images.ndim == 3 else images
        if images.ndim != 4 or len(images) != len(x):
            raise ValueError(f"pixels must be the {len(x)} images (N, H, W) or (N, H, W, C), got shape "
                             f"{np.shape(pixels)}")
        features = pixel_view(images, np.arange(len(images)), p)
    rows = audit_rows(np.asarray(x, dtype=np.float32), y, k, p, features)
    la, issue = rows.label, rows.is_issue
    classes = [str(c) for c in range(k)]
    y = y.astype(np.int64)
    return pd.DataFrame({
        "given_label": y,
        "suggested_label": np.where(issue, la.suggested, y).astype(np.int64),
        "label_quality": la.quality.astype(np.float64),
        "is_label_issue": issue,
        "suggested_confidence": np.where(issue, la.suggested_confidence, np.nan),
        "self_confidence": la.self_confidence,
        "consensus": la.consensus.astype(np.float64),
        "duplicate_of": first_of_group(rows.group).astype(np.int64),
        "is_outlier": rows.is_outlier,
        "outlier_distance": rows.outlier_distance.astype(np.float64),
        "reason": [_reason(i, la, rows.conflict, rows.is_outlier, classes) for i in range(len(y))],
    })


# --- the audit of a manifest -------------------------------------------------------------------------

def audited_rows(manifest: pd.DataFrame, splits: list[str]) -> np.ndarray:
    """Positions (in ``manifest``) of the rows the audit scores: labelled rows of ``splits``."""
    return np.flatnonzero(manifest["split"].isin(splits).to_numpy() & (manifest["label"].to_numpy() >= 0))


def label_actions(issue: np.ndarray, suggested_confidence: np.ndarray, outlier: np.ndarray,
                  p: AuditParams) -> tuple[np.ndarray, str | None]:
    """What the audit does to each audited row: ``keep``, ``relabel`` or ``drop`` (object array), under
    ``p.policy`` (relabel when the suggested label's confidence >= ``relabel_confidence``, else drop), keeping
    every label when that would change more than ``max_change_share`` of the rows, and dropping the outliers
    that are not label issues with ``drop_outliers``. Returns the actions and the warning when the share
    withheld them (logged), else None."""
    n = len(issue)
    action = np.full(n, "keep", dtype=object)
    if p.policy == "drop":
        action[issue] = "drop"
    elif p.policy == "relabel":
        action[issue] = np.where(suggested_confidence[issue] >= p.relabel_confidence, "relabel", "drop")
    changed = float((action[issue] != "keep").sum()) / max(n, 1)
    withheld = None
    if changed > p.max_change_share:
        withheld = (f"the audit would change {changed:.0%} of the {n} audited labels, above "
                    f"audit.max_change_share {p.max_change_share:g}: more likely the encoder cannot yet separate "
                    "the classes (pretrain longer or on more images) than that so many labels are wrong; every "
                    "label kept and the issues only listed")
        log.warning("audit: %s", withheld)
        action[issue] = "keep"
    if p.drop_outliers:
        action[outlier & ~issue] = "drop"
    return action, withheld


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
    if p.pixel_pca and int(manifest["index"].max()) >= len(images):
        raise ValueError(f"manifest refers to row {int(manifest['index'].max())} but images.npy has "
                         f"{len(images)} rows; re-run ingest")
    pixels = pixel_view(images, sub["index"].to_numpy(), p)
    ra = audit_rows(emb, labels, len(classes), p, pixels)
    seconds = time.perf_counter() - t0

    la, group, conflict, dist, outlier = ra.label, ra.group, ra.conflict, ra.outlier_distance, ra.is_outlier
    issue = ra.is_issue
    first = first_of_group(group)
    dup_of = np.where(first >= 0, sub["id"].to_numpy()[first], None)
    action, withheld = label_actions(issue, la.suggested_confidence, outlier, p)
    issues = _issues_table(sub, classes, la, issue, conflict, outlier, dist, dup_of, action)
    clean = clean_manifest(manifest, rows, action, la.suggested, classes)
    metrics = audit_metrics(p, sub, classes, la, issue, conflict, outlier, group, action, seconds)
    if withheld:
        metrics["actions_withheld"] = withheld
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

def truth_rows(sub: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """The position in ``truth`` of each row of ``sub``, -1 where the truth file has none.

    Rows match on ``source_path`` (relative to the ingested source) == truth ``path`` (relative to the
    scenario root), or on the trailing part of ``path`` where the ingested source was a subdirectory
    of the scenario (``train/x/y.png`` matches ``images/train/x/y.png``); a suffix shared by several
    truth paths matches nothing.
    """
    if "path" not in truth:
        raise ValueError("truth file lacks column(s) ['path']")
    if "source_path" not in sub:
        raise ValueError("manifest has no source_path column to match the truth file on")
    exact: dict[str, int] = {}
    by_suffix: dict[str, int] = {}
    ambiguous: set[str] = set()
    for row, path in enumerate(truth["path"].astype(str)):
        parts = path.replace("\\", "/").split("/")
        exact["/".join(parts)] = row
        for i in range(1, len(parts)):
            key = "/".join(parts[i:])
            if key in by_suffix:
                ambiguous.add(key)
            by_suffix[key] = row
    found = []
    for p in sub["source_path"].astype(str).str.replace("\\", "/", regex=False):
        found.append(exact[p] if p in exact else -1 if p in ambiguous else by_suffix.get(p, -1))
    return np.array(found, dtype=np.int64)


def match_truth(sub: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """``is_noisy`` of the truth row of each audited row (:func:`truth_rows`), -1 where the truth file has none."""
    missing = {"path", "is_noisy"} - set(truth.columns)
    if missing:
        raise ValueError(f"truth file lacks column(s) {sorted(missing)}")
    rows = truth_rows(sub, truth)
    noisy = truth["is_noisy"].astype(int).to_numpy()
    return np.where(rows >= 0, noisy[np.maximum(rows, 0)], -1)


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
