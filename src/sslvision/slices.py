"""Slice discovery on the SSL embeddings: coherent groups of held-out images where the classifier fails.

A model that learnt a confounder of the data collection (a mark, a studio's lighting) instead of the object
passes every aggregate metric and fails on the images where the confounder and the class disagree. Those
images are rarely a class; they are a group that looks alike to the self-supervised encoder. So the
embeddings are clustered, and a cluster is reported when it is a *slice*:

- **error** slice: on the held-out split, its error is far above the error of its classes. Candidates are
  k-means clusters within each class (``clusters`` per class) and across the classes (``clusters`` times the
  number of classes). Its score counts the errors it holds beyond what its members' classes explain: its size
  times the Wilson lower bound of its error minus its classes' average error. A hard class is no slice, and a
  slice ranks by the failures it accounts for, not by its error rate alone (a handful of odd images at 100 %
  error ranks below a hundred at 80 % where the class averages 20 %).
- **shortcut** slice (needs the training rows): a group of k-means clusters of the training embeddings
  (``SHORTCUT_CLUSTERS`` per class; the held-out rows go to the nearest centre) that holds a far larger share of
  one class's train images than of its held-out images. ``P(group | class)`` does not change with the class
  prior, so a long-tailed train split is no shortcut by itself. The clusters that qualify alone for a class are
  merged into one slice (one look often spans several clusters). Its score counts the class's train images it
  holds beyond its held-out share: the class's train images times the share difference minus its standard
  error (Agresti-Caffo) times the same ``z``. A confounder planted on most of one class's train images and absent
  from it when held out makes exactly this, whether or not held-out images of other classes carry it (the
  slice's held-out members may be few or none: its gallery shows its train images).

The bounds are one-sided at a family-wise ``ALPHA`` over all candidates (Bonferroni: ``z`` grows with their
number), so errors that fall at random make no slice. Candidates are ranked by score (both kinds count
images); a candidate that shares half its images with a better one of its kind is dropped,
and only positive scores are reported. Each slice comes with its size, error, class-average error, dominant
classes, what it is mistaken for, mean brightness and contrast against the whole split, its source batch when
known, and a one-line description; :func:`slice_gallery` draws its images. Clustering reads the embeddings
L2-normalised and reduced to ``PCA_DIMS`` principal components; everything is deterministic for a seed.

:func:`slice_groups` and :func:`worst_slice_accuracy` score a model on the clusters alone (no predictions
involved in forming them), so two models can be compared on the same groups: the finetune stage's
``slice_reweight: jtt`` (Just Train Twice) is kept only when it raises the worst-slice accuracy on validation
(:func:`mitigation_decision`).

``slice_reweight: subsample`` re-samples the shortcut slices instead (group subsampling, Idrissi et al. 2022):
:func:`shortcut_groups` sharpens each shortcut slice within its class (a logistic regression on the SSL
embeddings telling the class's train images from its held-out ones: k-means cuts a look into clusters by
everything else too and finds a varying share of it), :func:`subsample_shortcuts` drops the class's images in
the slice until the slice holds the same share of the class as of the other classes' training images, so the
slice no longer predicts the class, and the second classifier is judged on validation re-weighted to the
held-out split's slice mix (:func:`shifted_scores`): the training split carries the shortcut by definition, so
plain validation would score a model on the shortcut it is meant to unlearn. Re-weighting the slices' loss
instead leaves a network that fits its training rows where it was (Byrd & Lipton 2019; measured in
``benchmarks/confounders.py``'s oracle re-weighting).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from sslvision.metrics import l2_normalise
from sslvision.params import Section

SHORTCUT_CLUSTERS = 2  # k-means clusters per class of the training embeddings, for shortcut slices
PCA_DIMS = 32  # principal components of the L2-normalised embeddings the clustering reads
ALPHA = 0.05  # family-wise: the chance that any reported slice is one by chance (Bonferroni over the candidates)
MAX_OVERLAP = 0.5  # a candidate sharing this share of its (smaller) membership with a better slice is dropped
MAX_BALANCED_ACCURACY_DROP = 0.01  # slice_reweight: the most validation balanced accuracy it may cost
SHARPEN_C = 1.0  # subsample: inverse regularisation of the regression that tells a class's train from held out
COLUMNS = ["rank", "kind", "label", "size", "error", "class_error", "gap", "score", "classes", "predicted_as",
           "brightness", "brightness_all", "contrast", "contrast_all", "source", "train_size", "train_share",
           "heldout_share", "shortcut_class", "description", "members", "train_members"]


class SliceParams(Section):
    enabled: bool = Field(True, description=(
        "find slices of the test split where the classifier's error is far above its class average, or that "
        "predict a class in train but not in test (reports/finetune/slices.csv, slices.png); seconds"))
    n_slices: int = Field(8, ge=1, le=1000, description="report at most this many slices, the worst first")
    min_size: int = Field(20, ge=2, le=1_000_000, description=(
        "smallest slice reported (held-out images; also the train images a shortcut cluster needs)"))
    clusters: int = Field(8, ge=2, le=1000, description=(
        "k-means clusters per class (fewer for a class with fewer than 2 x min_size x clusters images); across "
        "classes, this times the number of classes"))


# --- clustering ----------------------------------------------------------------------------------

def _reduce(blocks: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Each block L2-normalised and projected on the first ``PCA_DIMS`` principal components of all of them."""
    from sklearn.decomposition import PCA

    normed = [l2_normalise(np.asarray(b, dtype=np.float32)) for b in blocks]
    stacked = np.concatenate(normed)
    dims = min(PCA_DIMS, stacked.shape[1], max(len(stacked) - 1, 1))
    pca = PCA(n_components=dims, random_state=seed).fit(stacked)
    return [pca.transform(b).astype(np.float32) for b in normed]


def _kmeans(x: np.ndarray, k: int, seed: int) -> Any:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)


def _partitions(x: np.ndarray, labels: np.ndarray, clusters: int, min_size: int,
                seed: int) -> list[tuple[str, np.ndarray]]:
    """(partition, member rows) of the within-class and the across-class k-means clusters of ``x``."""
    out: list[tuple[str, np.ndarray]] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(clusters, len(members) // (2 * min_size))
        if k >= 2:
            assign = _kmeans(x[members], k, seed).labels_
            out += [("class", members[assign == j]) for j in range(k)]
    k = min(clusters * len(np.unique(labels)), len(x) // (2 * min_size))
    if k >= 2:
        assign = _kmeans(x, k, seed).labels_
        out += [("across", np.flatnonzero(assign == j)) for j in range(k)]
    return out


def slice_groups(embeddings: np.ndarray, labels: np.ndarray, *, clusters: int = 8, min_size: int = 20,
                 seed: int = 0) -> list[np.ndarray]:
    """The candidate slices of ``embeddings`` without predictions: k-means clusters within each class and across
    the classes (as :func:`find_slices` forms them), those of at least ``min_size`` rows.

    Args:
        embeddings: float ``(N, D)``, one row per image.
        labels: int ``(N,)`` class indices.
        clusters, min_size, seed: as :class:`SliceParams` (``seed`` fixes PCA and k-means).

    Returns the row indices of each group (groups of the two partitions overlap); none when ``N`` is below
    ``4 * min_size``.
    """
    labels = np.asarray(labels)
    if len(labels) < 4 * min_size:
        return []
    (x,) = _reduce([embeddings], seed)
    return [m for _, m in _partitions(x, labels, clusters, min_size, seed) if len(m) >= min_size]


def worst_slice_accuracy(groups: list[np.ndarray], labels: np.ndarray, predictions: np.ndarray) -> float:
    """The lowest accuracy of ``predictions`` (class indices) over ``groups`` (:func:`slice_groups`); NaN
    when there is no group."""
    correct = np.asarray(predictions) == np.asarray(labels)
    return float(min(correct[g].mean() for g in groups)) if groups else math.nan


def mitigation_decision(before: dict[str, float], after: dict[str, float],
                        max_drop: float = MAX_BALANCED_ACCURACY_DROP) -> tuple[bool, str]:
    """Keep a mitigated model? ``before``/``after``: ``balanced_accuracy`` and ``worst_slice_accuracy`` on
    validation. Kept only when the worst-slice accuracy rises and balanced accuracy falls by at most
    ``max_drop``. Returns (keep, the reason in words)."""
    worst0, worst1 = before["worst_slice_accuracy"], after["worst_slice_accuracy"]
    drop = before["balanced_accuracy"] - after["balanced_accuracy"]
    if not (math.isfinite(worst0) and math.isfinite(worst1)):
        return False, "no validation slice to measure (too few validation images for finetune.slices.min_size)"
    if worst1 <= worst0:
        return False, f"validation worst-slice accuracy did not rise ({worst0:.3f} -> {worst1:.3f})"
    if drop > max_drop:
        return False, (f"validation worst-slice accuracy rose ({worst0:.3f} -> {worst1:.3f}) but balanced accuracy "
                       f"fell by {drop:.3f} (more than {max_drop})")
    return True, (f"validation worst-slice accuracy {worst0:.3f} -> {worst1:.3f}, balanced accuracy "
                  f"{before['balanced_accuracy']:.3f} -> {after['balanced_accuracy']:.3f}")


def jtt_weights(weights: np.ndarray, errors: np.ndarray, upweight: float) -> np.ndarray:
    """Just Train Twice (Liu et al. 2021): the loss weights of the second training, ``weights`` with the rows the
    first model got wrong (``errors``, bool) multiplied by ``upweight``."""
    return np.where(np.asarray(errors, dtype=bool), upweight, 1.0).astype(np.float32) * np.asarray(weights)


# --- shortcut subsampling -------------------------------------------------------------------------

@dataclass
class ShortcutGroup:
    """A shortcut slice sharpened within its class (:func:`shortcut_groups`): ``inside`` marks the class's training
    rows in it (bool over all training rows; False elsewhere), ``other_share`` is the share of the other classes'
    training rows in the slice (its k-means members), ``heldout_share`` the share of the class's ``heldout_n``
    held-out images in it; ``model`` tells whether new rows of the class are in it (None: the k-means members
    only, too few rows to sharpen)."""

    cls: int
    label: str
    inside: np.ndarray
    other_share: float
    heldout_share: float
    heldout_n: int = 0
    model: Any = None

    def member(self, embeddings: np.ndarray) -> np.ndarray:
        """Whether each row of ``embeddings`` (of this class) is in the slice."""
        x = l2_normalise(np.asarray(embeddings, dtype=np.float32))
        if not len(x):
            return np.zeros(0, dtype=bool)
        if self.model is None:
            return np.zeros(len(x), dtype=bool)
        return self.model.predict(x).astype(bool)


def shortcut_groups(slices: pd.DataFrame, train_embeddings: np.ndarray, train_labels: np.ndarray,
                    heldout_embeddings: np.ndarray, heldout_labels: np.ndarray,
                    seed: int = 0) -> list[ShortcutGroup]:
    """The shortcut slices of ``slices`` (:func:`find_slices` with the training rows), each sharpened within its
    class. A shortcut is what tells the class's train images from its held-out ones, so a logistic regression
    (``SHARPEN_C``, both sides weighted equally) learns exactly that on the L2-normalised embeddings of the class's
    training rows against its held-out rows (``heldout_embeddings``/``heldout_labels``, the split
    :func:`find_slices` compared with; their images and classes, no prediction); a training row is in the slice
    when its 5-fold out-of-fold probability says it is likelier a train image than a held-out one (the density
    ratio above 1), which k-means, cutting the look by everything else too, gets only in part. ``heldout_share``
    is the held-out rows' share in it, out of fold the same way. A class with fewer than 5 rows on either side
    keeps the slice's k-means members and share."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.asarray(train_labels).astype(np.int64)
    x = l2_normalise(np.asarray(train_embeddings, dtype=np.float32))
    hy = np.asarray(heldout_labels).astype(np.int64)
    hx = l2_normalise(np.asarray(heldout_embeddings, dtype=np.float32))
    out = []
    for row in slices[slices["kind"] == "shortcut"].itertuples(index=False):
        cls = int(row.shortcut_class)
        members = np.zeros(len(y), dtype=bool)
        members[np.asarray(row.train_members, dtype=np.int64)] = True
        rows, held = np.flatnonzero(y == cls), np.flatnonzero(hy == cls)
        inside, share, model = members[rows], float(row.heldout_share), None
        if min(len(rows), len(held)) >= 5:
            both = np.concatenate([x[rows], hx[held]])
            is_train = np.r_[np.ones(len(rows), dtype=int), np.zeros(len(held), dtype=int)]
            fit = LogisticRegression(C=SHARPEN_C, max_iter=3000, class_weight="balanced")
            folds = StratifiedKFold(5, shuffle=True, random_state=seed)
            trainlike = cross_val_predict(fit, both, is_train, cv=folds, method="predict_proba")[:, 1] > 0.5
            inside, share = trainlike[:len(rows)], float(trainlike[len(rows):].mean())
            model = LogisticRegression(C=SHARPEN_C, max_iter=3000, class_weight="balanced").fit(both, is_train)
        mask = np.zeros(len(y), dtype=bool)
        mask[rows[inside]] = True
        others = y != cls
        out.append(ShortcutGroup(cls=cls, label=str(row.label), inside=mask,
                                 other_share=float(members[others].mean()) if others.any() else 0.0,
                                 heldout_share=share, heldout_n=len(held), model=model))
    return out


def subsample_shortcuts(groups: list[ShortcutGroup], train_labels: np.ndarray,
                        seed: int = 0) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Group subsampling of the shortcut slices: of each slice's class, keep as many of its training rows in the
    slice (drawn with ``seed``) as make the slice hold the same share of the class as of the other classes
    (``other_share``), all the class's rows outside it, and every row of the other classes. A class with no row
    outside its slice is left whole (nothing to learn the class from once the slice stops predicting it).

    Returns (keep: bool over the training rows, one record per slice: class, rows in and out, kept, dropped)."""
    y = np.asarray(train_labels).astype(np.int64)
    keep = np.ones(len(y), dtype=bool)
    rng = np.random.default_rng(seed)
    records = []
    for g in groups:
        inside = np.flatnonzero(g.inside)
        outside = int(((y == g.cls) & ~g.inside).sum())
        if outside == 0:
            n_keep = len(inside)
        else:
            share = min(g.other_share, 0.5)
            n_keep = min(len(inside), int(round(share / (1 - share) * outside)))
        kept = rng.choice(inside, size=n_keep, replace=False) if n_keep < len(inside) else inside
        keep[inside] = False
        keep[kept] = True
        records.append({"slice": g.label, "class": g.cls, "train_in_slice": int(len(inside)),
                        "train_outside": outside, "kept_in_slice": int(n_keep),
                        "dropped": int(len(inside) - n_keep), "other_share": g.other_share,
                        "heldout_share": g.heldout_share})
    return keep, records


def shifted_scores(groups: list[ShortcutGroup], embeddings: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                   min_size: int = 20) -> dict[str, float]:
    """A model's scores on a split that carries the training mix (validation), re-weighted to the held-out mix of
    the shortcut slices: within each slice's class, its rows in the slice (:meth:`ShortcutGroup.member` on
    ``embeddings``) weigh ``heldout_share`` of the class and the rest the remainder (plain weights where either
    side is empty). ``balanced_accuracy``: the mean over the classes of the weighted recall;
    ``worst_slice_accuracy``: the lowest accuracy over the groups class x in-slice of ``min_size`` rows or more
    here that the held-out mix holds too (``min_size`` of the class's held-out images at its share: a look the
    held-out split lacks is not a group the model will meet there); NaN when none."""
    from sklearn.metrics import balanced_accuracy_score

    y = np.asarray(labels).astype(np.int64)
    correct = np.asarray(predictions) == y
    weights = np.ones(len(y))
    group = np.zeros(len(y), dtype=np.int64)
    absent: set[tuple[int, int]] = set()  # (class, group) the held-out mix holds fewer than min_size images of
    for j, g in enumerate(groups, 1):
        rows = np.flatnonzero(y == g.cls)
        inside = g.member(np.asarray(embeddings)[rows])
        group[rows[inside]] = j
        n_in, n_out = int(inside.sum()), int((~inside).sum())
        if n_in and n_out:
            weights[rows[inside]] = g.heldout_share * len(rows) / n_in
            weights[rows[~inside]] = (1 - g.heldout_share) * len(rows) / n_out
        if g.heldout_n:
            absent |= {(g.cls, j)} if g.heldout_share * g.heldout_n < min_size else set()
            absent |= {(g.cls, 0)} if (1 - g.heldout_share) * g.heldout_n < min_size else set()
    cells = [correct[(y == c) & (group == j)] for c in np.unique(y) for j in np.unique(group[y == c])
             if (int(c), int(j)) not in absent]
    cells = [c for c in cells if len(c) >= min_size]
    with warnings.catch_warnings():  # a predicted class absent from labels: its recall is undefined, left out
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        balanced = balanced_accuracy_score(y, predictions, sample_weight=weights) if len(y) else math.nan
    return {"balanced_accuracy": float(balanced),
            "worst_slice_accuracy": float(min(c.mean() for c in cells)) if cells else math.nan}


# --- scores --------------------------------------------------------------------------------------

def wilson_lower(p: float, n: int, z: float = 1.96) -> float:
    """Wilson score lower bound of a proportion ``p`` observed on ``n`` trials."""
    if n == 0 or p <= 0:
        return 0.0  # exactly: rounding would leave an error-free group a score of 1e-16 above its class's 0
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def _family_z(n: int) -> float:
    """The one-sided ``z`` of ``n`` simultaneous bounds at family-wise level ``ALPHA`` (Bonferroni)."""
    from scipy.stats import norm

    return float(norm.ppf(1 - ALPHA / max(n, 1)))


def _error_candidates(parts: list[tuple[str, np.ndarray]], labels: np.ndarray, wrong: np.ndarray,
                      class_error: np.ndarray, min_size: int) -> list[dict[str, Any]]:
    out = []
    for partition, m in parts:
        if len(m) < min_size:
            continue
        err, expected = float(wrong[m].mean()), float(class_error[labels[m]].mean())
        out.append({"kind": "error", "partition": partition, "members": m, "error": err, "class_error": expected,
                    "gap": err - expected})
    return out


def _shortcut(t: np.ndarray, m: np.ndarray, c: int, train_labels: np.ndarray, labels: np.ndarray,
              clusters: int = 1) -> dict[str, Any]:
    """A shortcut candidate for class ``c``: train rows ``t`` and held-out rows ``m``; ``P(group | c)`` in train and
    held out, and their difference with its standard error as Agresti & Caffo (2000) (one success and one
    failure added to each side), which stays honest when a share is 0."""
    n_a, n_b = int((train_labels == c).sum()), int((labels == c).sum())
    x_a, x_b = int((train_labels[t] == c).sum()), int((labels[m] == c).sum())
    a_adj, b_adj = (x_a + 1) / (n_a + 2), (x_b + 1) / (n_b + 2)
    return {"kind": "shortcut", "members": m, "train_members": t, "shortcut_class": c, "clusters": clusters,
            "train_share": x_a / n_a, "heldout_share": x_b / n_b, "diff": a_adj - b_adj, "class_train": n_a,
            "se": math.sqrt(a_adj * (1 - a_adj) / (n_a + 2) + b_adj * (1 - b_adj) / (n_b + 2))}


def _shortcut_candidates(train_x: np.ndarray, train_labels: np.ndarray, x: np.ndarray, labels: np.ndarray,
                         min_size: int, seed: int) -> list[dict[str, Any]]:
    """One candidate per k-means cluster of the training rows (``min_size`` of them or more), for the class whose
    share differs most between train and held out."""
    k = min(SHORTCUT_CLUSTERS * len(np.unique(train_labels)), len(train_x) // (2 * min_size))
    if k < 2:
        return []
    km = _kmeans(train_x, k, seed)
    held = km.predict(x)
    both = sorted(set(np.unique(train_labels).tolist()) & set(np.unique(labels).tolist()))
    out = []
    for j in range(k):
        t, m = np.flatnonzero(km.labels_ == j), np.flatnonzero(held == j)
        if len(t) >= min_size and both:
            # the class whose share differs most at z = 3 (the score uses the family-wise z)
            per_class = [_shortcut(t, m, c, train_labels, labels) for c in both]
            out.append(max(per_class, key=lambda d: d["diff"] - 3 * d["se"]))
    return out


def _merge_shortcuts(candidates: list[dict[str, Any]], train_labels: np.ndarray, labels: np.ndarray,
                     z: float) -> list[dict[str, Any]]:
    """One shortcut per class: the union of its clusters that score above 0 alone (a look k-means split over
    several clusters is one finding), scored again as one group."""
    by_class: dict[int, list[dict[str, Any]]] = {}
    for cand in candidates:
        if cand["diff"] - z * cand["se"] > 0:
            by_class.setdefault(cand["shortcut_class"], []).append(cand)
    return [_shortcut(np.sort(np.concatenate([p["train_members"] for p in parts])),
                      np.sort(np.concatenate([p["members"] for p in parts])), c, train_labels, labels, len(parts))
            for c, parts in sorted(by_class.items())]


def _select(candidates: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The best ``n`` positive-score candidates, none sharing ``MAX_OVERLAP`` of its rows with a better one of
    its kind (an error slice and a shortcut over the same images are two findings)."""
    def rows(c: dict[str, Any]) -> np.ndarray:  # what two candidates of a kind are compared on
        return c["train_members"] if c["kind"] == "shortcut" else c["members"]

    chosen: list[dict[str, Any]] = []
    for cand in sorted(candidates, key=lambda c: (-c["score"], c["kind"], int(rows(c)[0]))):
        if cand["score"] <= 0 or len(chosen) == n:
            break
        m = set(rows(cand).tolist())
        better = (set(rows(c).tolist()) for c in chosen if c["kind"] == cand["kind"])
        if all(len(m & s) < MAX_OVERLAP * min(len(m), len(s)) for s in better):
            chosen.append(cand)
    return chosen


# --- discovery -----------------------------------------------------------------------------------

def _shares(values: np.ndarray, names: list[str], top: int = 2) -> str:
    counts = pd.Series([names[v] for v in values]).value_counts()
    return ", ".join(f"{name} {n / len(values):.0%}" for name, n in counts.head(top).items())


def find_slices(embeddings: np.ndarray, labels: np.ndarray, predictions: np.ndarray, *, n_slices: int = 8,
                min_size: int = 20, seed: int = 0, clusters: int = 8, train_embeddings: np.ndarray | None = None,
                train_labels: np.ndarray | None = None, images: np.ndarray | None = None,
                source: np.ndarray | list[str] | None = None, classes: list[str] | None = None) -> pd.DataFrame:
    """Slices of a held-out split where the classifier fails (module docstring), the worst first.

    Args:
        embeddings: float ``(N, D)`` SSL embeddings of the held-out images.
        labels: int ``(N,)`` their classes.
        predictions: the classifier's class indices ``(N,)``, or scores ``(N, K)`` (argmax taken).
        n_slices, min_size, clusters, seed: as :class:`SliceParams`.
        train_embeddings, train_labels: the training rows (optional): with them, shortcut slices are looked
            for too.
        images: uint8 ``(N, H, W[, C])`` (optional): mean brightness and contrast (pixel std) of each slice, 0-1.
        source: the batch or split each image came from (optional): the most common one of each slice.
        classes: class names (default ``"0"``, ``"1"``, ...).

    Returns:
        One row per slice (:data:`COLUMNS`): ``rank`` (1 = worst), ``kind`` (error | shortcut), ``label`` (short
        name), ``size``, ``error``, ``class_error`` (its classes' average error), ``gap``, ``score`` (images: the
        module docstring), ``classes`` and ``predicted_as`` (the commonest, with shares), ``brightness``/``contrast``
        and the split's
        ``brightness_all``/``contrast_all`` (NaN without images), ``source``; for shortcut slices (0 and NaN
        otherwise) ``train_size``, ``train_share``/``heldout_share`` (the share of their class's train /
        held-out images that falls in the slice), ``shortcut_class`` (the class index it predicts; -1 for error
        slices) and ``train_members`` (row indices into the training rows); ``description``, ``members`` (row
        indices into the held-out inputs; a shortcut slice may have few or none, and then NaN errors). Empty
        (with these columns) when nothing scores above 0.

    Raises:
        ValueError: inputs of different lengths or shapes.
    """
    x_in = np.asarray(embeddings)
    y = np.asarray(labels).astype(np.int64)
    pred = np.asarray(predictions)
    pred = pred.argmax(1) if pred.ndim == 2 else pred.astype(np.int64)
    if x_in.ndim != 2 or not len(x_in) == len(y) == len(pred):
        raise ValueError(f"embeddings (N, D), labels and predictions (N,) must agree: got {x_in.shape}, {y.shape}, "
                         f"{pred.shape}")
    with_train = train_embeddings is not None and train_labels is not None
    if with_train and (np.ndim(train_embeddings) != 2 or np.shape(train_embeddings)[1] != x_in.shape[1]
                       or len(train_embeddings) != len(train_labels)):
        raise ValueError(f"train_embeddings must be (M, {x_in.shape[1]}) with one label each")
    k = max(int(y.max()), int(pred.max()), int(np.max(train_labels)) if with_train else 0) + 1 if len(y) else 1
    names = list(classes) if classes is not None else [str(c) for c in range(k)]
    if len(y) < 4 * min_size:
        return pd.DataFrame(columns=COLUMNS)
    blocks = [x_in, np.asarray(train_embeddings)] if with_train else [x_in]
    reduced = _reduce(blocks, seed)
    x = reduced[0]
    wrong = pred != y
    class_error = np.array([wrong[y == c].mean() if (y == c).any() else 0.0 for c in range(k)])
    candidates = _error_candidates(_partitions(x, y, clusters, min_size, seed), y, wrong, class_error, min_size)
    if with_train:
        ty = np.asarray(train_labels).astype(np.int64)
        found = _shortcut_candidates(reduced[1], ty, x, y, min_size, seed)
        z = _family_z(len(candidates) + len(found))
        found = _merge_shortcuts(found, ty, y, z)
        for cand in found:
            m = cand["members"]
            err = float(wrong[m].mean()) if len(m) else math.nan
            expected = float(class_error[y[m]].mean()) if len(m) else math.nan
            cand.update(error=err, class_error=expected, gap=err - expected)
        candidates += found
    else:
        z = _family_z(len(candidates))
    for cand in candidates:
        if cand["kind"] == "shortcut":
            cand["score"] = cand["class_train"] * (cand["diff"] - z * cand["se"])
        else:
            n = len(cand["members"])
            cand["score"] = n * (wilson_lower(cand["error"], n, z) - cand["class_error"])
    chosen = _select(candidates, n_slices)

    pixels = None
    if images is not None:
        flat = np.asarray(images).reshape(len(y), -1).astype(np.float32) / 255.0
        pixels = (flat.mean(1), flat.std(1))
    src = np.asarray(source, dtype=object) if source is not None else None
    rows = []
    for rank, cand in enumerate(chosen, 1):
        m = cand["members"]
        t = cand.get("train_members", np.zeros(0, dtype=np.int64))
        row: dict[str, Any] = {"rank": rank, "kind": cand["kind"], "size": len(m), "error": cand["error"],
                               "class_error": cand["class_error"], "gap": cand["gap"], "score": cand["score"],
                               "classes": _shares(y[m], names), "predicted_as": _shares(pred[m][wrong[m]], names)
                               if wrong[m].any() else "", "train_size": len(t),
                               "train_share": cand.get("train_share", math.nan),
                               "heldout_share": cand.get("heldout_share", math.nan),
                               "shortcut_class": int(cand.get("shortcut_class", -1)), "members": m, "train_members": t}
        if pixels is not None and len(m):
            row.update(brightness=float(pixels[0][m].mean()), brightness_all=float(pixels[0].mean()),
                       contrast=float(pixels[1][m].mean()), contrast_all=float(pixels[1].mean()))
        else:
            row.update(brightness=math.nan, brightness_all=math.nan, contrast=math.nan, contrast_all=math.nan)
        if src is not None and len(m):
            top = pd.Series(src[m]).value_counts()
            row["source"] = f"{top.index[0]} ({top.iloc[0] / len(m):.0%})"
        else:
            row["source"] = ""
        if cand["kind"] == "shortcut":
            row["label"] = f"{rank}: {names[cand['shortcut_class']]} shortcut"
        else:
            row["label"] = f"{rank}: {names[int(np.bincount(y[m]).argmax())]}"
        row["description"] = _describe(row, cand, names, several_sources=src is not None and len(set(src)) > 1)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _describe(row: dict[str, Any], cand: dict[str, Any], names: list[str], several_sources: bool) -> str:
    """The slice in one line: who, how wrong, mistaken for what, what stands out."""
    if cand["kind"] == "shortcut":
        c = names[cand["shortcut_class"]]
        groups = f" ({cand['clusters']} clusters)" if cand["clusters"] > 1 else ""
        text = (f"shortcut to {c}: a group of {row['train_size']} train images{groups} holding "
                f"{row['train_share']:.0%} of the {c} train images but {row['heldout_share']:.0%} of the held-out "
                f"ones; {row['size']} held-out images in it" + (f" ({row['classes']})" if row["size"] else ""))
        if row["size"]:
            text += f": error {row['error']:.0%} vs {row['class_error']:.0%} for their classes"
    else:
        text = (f"{row['size']} images, {row['classes']}: error {row['error']:.0%} vs {row['class_error']:.0%} for "
                "their classes")
    if row["predicted_as"]:
        text += f", mistaken for {row['predicted_as'].split(',')[0].rsplit(' ', 1)[0]}"
    if math.isfinite(row["brightness"]):
        text += (f"; brightness {row['brightness']:.2f} (all {row['brightness_all']:.2f}), contrast "
                 f"{row['contrast']:.2f} (all {row['contrast_all']:.2f})")
    if several_sources and row["source"]:
        text += f"; from {row['source']}"
    return text


def slice_gallery(slices: pd.DataFrame, images: np.ndarray, train_images: np.ndarray | None = None,
                  per_slice: int = 8, seed: int = 0) -> Any:
    """A matplotlib figure: one row per slice of ``slices`` (:func:`find_slices`), ``per_slice`` of its images
    (drawn at random, ``seed``), titled with its label and error. Error slices show held-out ``images`` (uint8
    ``(N, H, W[, C])``, the rows :func:`find_slices` was given); shortcut slices show their train images when
    ``train_images`` (the training rows) is given, else their held-out ones. A figure with a note when there is
    no slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(slices) == 0:
        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no slice with an error far above its class average", ha="center", va="center")
        return fig
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(slices), per_slice, figsize=(1.2 * per_slice, 1.45 * len(slices)), squeeze=False)
    for r, row in enumerate(slices.itertuples(index=False)):
        from_train = row.kind == "shortcut" and train_images is not None
        members, source = (row.train_members, train_images) if from_train else (row.members, images)
        members = np.asarray(members, dtype=np.int64)
        pick = np.sort(rng.choice(members, size=min(per_slice, len(members)), replace=False))
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(pick):
                img = np.asarray(source[pick[c]])
                img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            else:
                ax.axis("off")
        if row.kind == "shortcut":
            title = (f"{row.label}: {row.train_share:.0%} of its train images, {row.heldout_share:.0%} held out"
                     + (" (train images)" if from_train else ""))
        else:
            title = f"{row.label}: {row.size} images, error {row.error:.0%} vs {row.class_error:.0%}"
        axes[r][0].set_title(title, loc="left", fontsize=8)
    with warnings.catch_warnings():  # a title wider than its row's first image: the layout is fine without it
        warnings.filterwarnings("ignore", "Tight layout not applied", UserWarning)
        fig.tight_layout()
    return fig
