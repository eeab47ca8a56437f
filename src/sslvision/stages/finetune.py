"""DVC stage ``finetune``: train the classifier on the SSL encoder (params: ``finetune``), write
``models/classifier/`` and ``reports/finetune/``, log to MLflow, register the model as ``challenger``
and run the gated promotion (``finetune.registry``).

Inputs (the contract in :mod:`sslvision.data`; paths from the ``finetune`` params): the encoder in
``models/encoder/``, the train rows of the audited manifest ``data/audit/manifest_clean.parquet`` (splits
``finetune.splits``), the images in ``data/ingested/``, and the kept synthetic images in ``data/synthetic/``
(optional: absent or empty means none; their loss weight is ``synthetic_weight``). Validation is a
stratified share of the *real* train rows (:func:`sslvision.finetune.train_val_rows`: synthetic images
never validate). The clean, balanced ``test`` split is the evaluation set.

Baselines: the stage also fits :func:`sslvision.baselines.pixel_logreg` (logistic regression on pixel PCA
features) on the same real training rows and labels, and reports it beside the classifier (``metrics.json``
``baselines.pixel_logreg``, MLflow ``baseline/pixel_logreg/...``); its balanced accuracy on the golden set is
recorded with the registered version, and promotion refuses a classifier that does not beat it
(``promotion.beat_pixel_baseline``, :mod:`sslvision.registry`). With synthetic images
(``synthetic_ablation``), the same classifier is also trained without them and the one with the higher
validation balanced accuracy is deployed (a tie leaves them out; ``synthetic_select: always`` keeps them);
``metrics.json`` ``synthetic_ablation`` records the decision and reports both on the test split.

Label efficiency (``finetune.label_efficiency``, :func:`label_efficiency_curve`): the same real training rows,
only 10, 25, 100 (the setting) labels per class of them, learnt by a linear probe on the SSL embeddings and by
the pixel baseline, scored on the test split; ``reports/finetune/label_efficiency.csv`` (every draw) and
``metrics.json`` ``label_efficiency`` (mean and std over the draws), shown in the report.

Slices (``finetune.slices``, :mod:`sslvision.slices`): on the SSL embeddings of the embed stage
(``data/embeddings``), groups of test images where the classifier's error is far above its class average, or
that predict a class in train but not in test (a confounder of the data collection), written to
``reports/finetune/slices.csv`` with a gallery ``slices.png`` (:func:`discover_slices`). ``slice_reweight``
trains a second classifier the Just Train Twice way (``jtt``: :func:`just_train_twice`) or with the shortcut
slices thinned in their class (``subsample``: :func:`shortcut_subsampling`) and keeps it only when the
worst-slice accuracy on validation rises at a bounded cost in balanced accuracy; ``metrics.json``
``slice_reweight`` records both models' scores and the decision.

Outputs: ``models/classifier/`` (:func:`sslvision.finetune.save_classifier`, with the conversion ingest
applied to the training images: :func:`training_conversion`), ``reports/finetune/`` (``metrics.json``,
``promotion.json``, the DVC plot data and figures: :func:`write_reports`; ``slices.csv``, ``slices.png``:
:func:`write_slices`; ``label_efficiency.csv``) and one MLflow run.

Run from the project root (``dvc repro finetune``), or a full fine-tune (``finetune.mode: finetune``)
on N processes of one machine (rendezvous on loopback, see the README):
``torchrun --nproc_per_node=N --master_addr=127.0.0.1 --master_port=29500 -m sslvision.stages.finetune``.
Every process trains (:func:`sslvision.finetune.train_classifier`); only rank 0 evaluates, writes
``models/classifier``/``reports/finetune`` and logs to MLflow. The training is in :mod:`sslvision.finetune`,
registration and promotion in :mod:`sslvision.registry`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sslvision import registry, tracking
from sslvision.baselines import (
    LABEL_EFFICIENCY_COLUMNS,
    label_efficiency,
    label_efficiency_summary,
    pixel_logreg,
)
from sslvision.data import Ingested, load_embeddings
from sslvision.finetune import (
    Classifier,
    FinetuneData,
    FinetuneParams,
    Split,
    TrainResult,
    init_classifier,
    resolve_device,
    save_classifier,
    train_classifier,
    train_val_rows,
)
from sslvision.ingest import Conversion, IngestParams
from sslvision.io import atomic_path, check_replaceable, write_csv, write_json
from sslvision.metrics import balanced_accuracy, classification_metrics, reliability_table
from sslvision.models import embed, load_encoder
from sslvision.params import ParamsError, load_section, params_path, require_sections
from sslvision.slices import (
    find_slices,
    jtt_weights,
    mitigation_decision,
    shifted_scores,
    shortcut_groups,
    slice_gallery,
    slice_groups,
    subsample_shortcuts,
    worst_slice_accuracy,
)
from sslvision.stages import check_code_version

log = logging.getLogger(__name__)

REPORTS = Path("reports/finetune")


def load_params(params: str | Path | None = None) -> FinetuneParams:
    """The ``finetune`` section of ``params`` (default: ``params.yaml`` or ``$SSLVISION_PARAMS``).
    Raises :class:`~sslvision.params.ParamsError` when it is invalid."""
    return load_section("finetune", FinetuneParams, params)


# --- inputs --------------------------------------------------------------------------------------

def load_synthetic(directory: str | Path, shape: tuple[int, ...], num_classes: int, weight: float) -> Split | None:
    """The kept synthetic images of ``directory`` (``images.npy`` + ``manifest.parquet``) with loss weight
    ``weight``, or None when the directory is absent or empty (no synthetic data). Raises
    ``FileNotFoundError`` when one of the two files is missing, ``ValueError`` when they do not fit ``shape``
    and ``num_classes``."""
    directory = Path(directory)
    npy, manifest = directory / "images.npy", directory / "manifest.parquet"
    if not npy.exists() and not manifest.exists():
        return None
    for path in (npy, manifest):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing while {directory} has the other half of the synthetic set")
    df = pd.read_parquet(manifest)
    if len(df) == 0:
        return None
    images = np.load(npy, mmap_mode="r")
    if images.shape[1:] != shape:
        raise ValueError(f"{npy}: images are {images.shape[1:]}, the ingested images are {shape}")
    if int(df["index"].max()) >= len(images):
        raise ValueError(f"{manifest}: refers to row {int(df['index'].max())} but {npy} has {len(images)}")
    labels = df["label"].to_numpy(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{manifest}: labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    return Split.of(images[df["index"].to_numpy()], labels, weight, synthetic=True)


def load_data(p: FinetuneParams) -> FinetuneData:
    """Train (real minus validation, plus synthetic), validation (real) and test splits, read from the paths
    of ``p``. Raises ``FileNotFoundError``/``ValueError`` when an input is missing or does not fit."""
    ing = Ingested.load(p.ingested)
    train_df, val_df = train_val_rows(p)
    num_classes = len(ing.classes)
    top = int(max(train_df["label"].max(), val_df["label"].max() if len(val_df) else 0))
    if top >= num_classes:
        raise ValueError(f"{p.manifest}: label {top} but {p.ingested}/classes.json has {num_classes} classes")
    train = Split.of(ing.images[train_df["index"].to_numpy()], train_df["label"].to_numpy())
    val = Split.of(ing.images[val_df["index"].to_numpy()], val_df["label"].to_numpy())
    synthetic = load_synthetic(p.synthetic, ing.images.shape[1:], num_classes, p.synthetic_weight)
    if synthetic is not None and p.synthetic_weight > 0:
        train = train.concat(synthetic)
    test_df = ing.split("test")
    test_df = test_df[test_df["label"] >= 0]
    if len(test_df) == 0:
        raise ValueError(f"{p.ingested}/manifest.parquet: no labelled test rows to evaluate on")
    test = Split.of(ing.images[test_df["index"].to_numpy()], test_df["label"].to_numpy())
    log.info("train %d images (%d synthetic), validation %d, test %d", len(train), int(train.synthetic.sum()),
             len(val), len(test))
    return FinetuneData(train=train, val=val, test=test, classes=list(ing.classes))


def build_classifier(p: FinetuneParams, classes: list[str]) -> Classifier:
    """:func:`sslvision.finetune.init_classifier` on the encoder saved in ``p.encoder``."""
    return init_classifier(load_encoder(p.encoder), classes, p)


# --- the stage -----------------------------------------------------------------------------------

def run_finetune(
        p: FinetuneParams, on_epoch: Any = None) -> tuple[Classifier, FinetuneData, TrainResult, dict, np.ndarray]:
    """Load (:func:`load_data`), train, calibrate and evaluate on the test split, with the pixel baseline and
    (``synthetic_ablation``) the run without synthetic images, which replaces the first when it scores at least
    as well on validation (:func:`synthetic_ablation`; ``data.train`` is then the real rows alone); writes
    nothing. ``on_epoch``: as for :func:`sslvision.finetune.train_classifier` (the first run's epochs). Returns
    (classifier, data, result, metrics, test probabilities): those of the classifier to deploy."""
    check_single_process(p)
    if p.threads:
        torch.set_num_threads(p.threads)
    data = load_data(p)
    classifier = build_classifier(p, data.classes)
    result = train_classifier(classifier, data, p, on_epoch=on_epoch)
    ablation, probs = None, None
    ablate = p.synthetic_ablation == "on" or (p.synthetic_ablation == "auto" and p.mode == "linear_probe")
    if ablate and data.train.synthetic.any():
        if result.world_size > 1:
            log.info("synthetic_ablation: skipped under torchrun (the other processes do not train it)")
        else:  # decide the training data first; slice_reweight then builds on the kept run
            classifier, result, ablation, probs = synthetic_ablation(p, data, classifier, result)
            if ablation["kept"] == "without":
                data = FinetuneData(train=data.train.take(np.flatnonzero(~data.train.synthetic)), val=data.val,
                                    test=data.test, classes=data.classes)
    reweight = None
    if p.slice_reweight != "off":
        mitigate = just_train_twice if p.slice_reweight == "jtt" else shortcut_subsampling
        second, second_result, reweight = mitigate(p, data, classifier, slice_views(p))
        if reweight["kept"]:
            classifier, result, probs = second, second_result, None
    if probs is None:
        probs = classifier.predict_proba(data.test.images, p.eval_batch_size)
    metrics = classification_metrics(data.test.labels, probs, data.classes)
    metrics.update(best_epoch=result.best_epoch, val_balanced_accuracy=result.best_val_balanced_accuracy,
                   temperature=result.temperature, train_images=len(data.train),
                   synthetic_images=int(data.train.synthetic.sum()), train_seconds=result.seconds,
                   world_size=result.world_size)
    if reweight is not None:
        metrics["slice_reweight"] = reweight
    if ablation is not None:
        metrics["synthetic_ablation"] = ablation
    metrics["baselines"] = {"pixel_logreg": pixel_baseline(p, data, metrics)}
    return classifier, data, result, metrics, probs


def check_single_process(p: FinetuneParams) -> None:
    """Refuse ``slice_reweight`` under torchrun: the other processes would not train the second classifier."""
    if p.slice_reweight != "off" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("finetune.slice_reweight trains a second classifier on rank 0 only: run it in one process "
                         "(without torchrun), or turn it off")


# --- slices --------------------------------------------------------------------------------------

@dataclass
class SliceViews:
    """SSL embeddings of the rows of :func:`load_data`'s splits: the real training rows (in ``data.train``'s
    order, before the synthetic ones, which have none) with their labels, validation and test; and each test
    row's source (its pool batch, else its split)."""

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_source: np.ndarray


def slice_views(p: FinetuneParams) -> SliceViews:
    """The embeddings of ``p.embeddings`` (the embed stage's, one row per ingested image) for the rows of
    :func:`load_data` (the slices and the label-efficiency curve use them); when they are absent or do not cover
    ``images.npy``, the rows are embedded with the encoder of ``p.encoder`` (what the embed stage does)."""
    ing = Ingested.load(p.ingested)
    train_df, val_df = train_val_rows(p)
    test_df = ing.split("test")
    test_df = test_df[test_df["label"] >= 0]
    rows = [df["index"].to_numpy() for df in (train_df, val_df, test_df)]
    path = Path(p.embeddings) / "embeddings.npy"
    emb = load_embeddings(p.embeddings) if path.exists() else None
    if emb is not None and len(emb) != len(ing.images):
        log.warning("%s: %d rows but images.npy has %d: re-run the embed stage; embedding the rows needed here",
                    path, len(emb), len(ing.images))
        emb = None
    if emb is None:
        needed = np.unique(np.concatenate(rows))
        log.info("slices, label efficiency: no embeddings in %s; embedding %d images with %s", p.embeddings,
                 len(needed), p.encoder)
        feats = embed(load_encoder(p.encoder), ing.images[needed], p.eval_batch_size, resolve_device(p.device))
        views = [feats[np.searchsorted(needed, r)] for r in rows]
    else:
        views = [np.asarray(emb[r], dtype=np.float32) for r in rows]
    source = test_df["batch"].fillna("").astype(str) if "batch" in test_df else pd.Series("", index=test_df.index)
    return SliceViews(train=views[0], train_labels=train_df["label"].to_numpy(np.int64), val=views[1],
                      test=views[2], test_source=np.where(source == "", test_df["split"], source).astype(str))


def judge_mitigation(p: FinetuneParams, data: FinetuneData, views: SliceViews, first: Classifier, second: Classifier,
                     val_scores: Any) -> dict[str, Any]:
    """The gate of ``slice_reweight``: both classifiers scored by ``val_scores`` (classifier -> ``balanced_accuracy``
    and ``worst_slice_accuracy`` on validation) and kept or not by :func:`sslvision.slices.mitigation_decision`;
    their test scores (balanced accuracy, worst-slice accuracy over the k-means slices of the test embeddings)
    reported beside, never used to decide. Returns the record's ``kept``, ``decision``, ``reason``,
    ``test_slices`` and ``val_``/``test_`` scores of each (``_first``, ``_second``)."""
    s = p.slices
    test_groups = slice_groups(views.test, data.test.labels, clusters=s.clusters, min_size=s.min_size, seed=p.seed)

    def test_scores(clf: Classifier) -> dict[str, float]:
        logits = clf.logits(data.test.images, p.eval_batch_size)
        return {"balanced_accuracy": balanced_accuracy(data.test.labels, logits),
                "worst_slice_accuracy": worst_slice_accuracy(test_groups, data.test.labels, logits.argmax(1))}

    before, after = val_scores(first), val_scores(second)
    keep, reason = mitigation_decision(before, after)
    scores = {("val", "first"): before, ("val", "second"): after, ("test", "first"): test_scores(first),
              ("test", "second"): test_scores(second)}
    return {"kept": keep, "decision": "kept" if keep else "rejected", "reason": reason,
            "test_slices": len(test_groups),
            **{f"{split}_{k}_{when}": _finite(v) for (split, when), d in scores.items() for k, v in d.items()}}


def just_train_twice(p: FinetuneParams, data: FinetuneData, first: Classifier,
                     views: SliceViews) -> tuple[Classifier, TrainResult, dict[str, Any]]:
    """Just Train Twice (Liu et al. 2021) with a validation gate: the training rows ``first`` gets wrong get
    ``p.jtt_upweight`` times their loss weight (:func:`sslvision.slices.jtt_weights`), a second classifier is
    trained on them with the same params and seed, and both are scored on validation: balanced accuracy and
    worst-slice accuracy over the k-means slices of the validation embeddings
    (:func:`sslvision.slices.slice_groups`). Returns (second classifier, its result, the record:
    ``kept`` by :func:`sslvision.slices.mitigation_decision`, its ``reason``, the error set, and both models'
    validation and test scores; the test ones are reported, never used to decide)."""
    errors = first.logits(data.train.images, p.eval_batch_size).argmax(1) != data.train.labels
    train = Split(data.train.images, data.train.labels, jtt_weights(data.train.weights, errors, p.jtt_upweight),
                  data.train.synthetic)
    second = build_classifier(p, data.classes)
    result = train_classifier(second, FinetuneData(train=train, val=data.val, test=data.test, classes=data.classes), p)
    s = p.slices
    val_groups = slice_groups(views.val, data.val.labels, clusters=s.clusters, min_size=s.min_size, seed=p.seed)

    def val_scores(clf: Classifier) -> dict[str, float]:
        logits = clf.logits(data.val.images, p.eval_batch_size)
        return {"balanced_accuracy": balanced_accuracy(data.val.labels, logits),
                "worst_slice_accuracy": worst_slice_accuracy(val_groups, data.val.labels, logits.argmax(1))}

    record = {"method": "just_train_twice", "upweight": p.jtt_upweight, "error_set": int(errors.sum()),
              "error_share": float(errors.mean()), "val_slices": len(val_groups),
              **judge_mitigation(p, data, views, first, second, val_scores)}
    log.info("slice_reweight (Just Train Twice, %d of %d training rows upweighted %gx): %s, %s", record["error_set"],
             len(errors), p.jtt_upweight, record["decision"], record["reason"])
    return second, result, record


def shortcut_subsampling(p: FinetuneParams, data: FinetuneData, first: Classifier,
                         views: SliceViews) -> tuple[Classifier, TrainResult | None, dict[str, Any]]:
    """Group subsampling of the shortcut slices with a validation gate: the shortcut slices of the test split
    (:func:`sslvision.slices.find_slices` with the real training rows; they do not depend on the model), each
    sharpened within its class by what tells the class's training images from its test images
    (:func:`sslvision.slices.shortcut_groups`: the test images of that class inform which rows are thinned, so
    judge a kept model on other data too), are thinned in their class until they
    hold the share of it they hold of the other classes (:func:`sslvision.slices.subsample_shortcuts`; synthetic
    rows stay), a second classifier is trained on the rest with the same params and seed, and both are scored on
    validation re-weighted to the test split's slice mix (:func:`sslvision.slices.shifted_scores`): kept by
    :func:`sslvision.slices.mitigation_decision`. Without a shortcut slice the first classifier stays and nothing is
    trained. Returns (second classifier or ``first``, its result or None, the record: the slices thinned,
    ``kept``, its ``reason``, both models' validation scores, and their test scores over the k-means slices of
    the test embeddings, reported, never used to decide)."""
    s = p.slices
    # the shortcut slices do not depend on the predictions: the labels stand in (no inference for error slices)
    found = find_slices(views.test, data.test.labels, data.test.labels, n_slices=s.n_slices, min_size=s.min_size,
                        seed=p.seed, clusters=s.clusters, train_embeddings=views.train,
                        train_labels=views.train_labels, classes=data.classes)
    groups = shortcut_groups(found, views.train, views.train_labels, views.test, data.test.labels, seed=p.seed)
    record: dict[str, Any] = {"method": "subsample", "shortcut_slices": len(groups)}
    if not groups:
        record.update(kept=False, decision="not_needed", reason="no shortcut slice: nothing to subsample")
        log.info("slice_reweight (subsample): no shortcut slice in the training rows; the first classifier stays")
        return first, None, record
    real_keep, thinned = subsample_shortcuts(groups, views.train_labels, seed=p.seed)
    if real_keep.all():
        record.update(slices=thinned, kept=False, decision="not_needed",
                      reason="the shortcut slices hold no training row to drop")
        log.info("slice_reweight (subsample): %s", record["reason"])
        return first, None, record
    keep = np.concatenate([real_keep, np.ones(len(data.train) - len(real_keep), dtype=bool)])  # synthetic rows stay
    train = data.train.take(np.flatnonzero(keep))
    second = build_classifier(p, data.classes)
    result = train_classifier(second, FinetuneData(train=train, val=data.val, test=data.test, classes=data.classes), p)

    def val_scores(clf: Classifier) -> dict[str, float]:
        pred = clf.logits(data.val.images, p.eval_batch_size).argmax(1)
        return shifted_scores(groups, views.val, data.val.labels, pred, min_size=s.min_size)

    record.update(slices=thinned, train_rows_dropped=int((~real_keep).sum()),
                  **judge_mitigation(p, data, views, first, second, val_scores))
    log.info("slice_reweight (subsample: %s): %d training rows dropped; %s, %s",
             "; ".join(f"{t['slice']} {t['train_in_slice']} -> {t['kept_in_slice']}" for t in thinned),
             record["train_rows_dropped"], record["decision"], record["reason"])
    return second, result, record


def discover_slices(p: FinetuneParams, data: FinetuneData, probs: np.ndarray,
                    views: SliceViews | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`sslvision.slices.find_slices` on the test split (embeddings, labels, ``probs``' predictions; the
    real training rows for shortcut slices); returns the slices and their summary for ``metrics.json``
    (``found``, the test split's ``worst_slice_accuracy`` over its k-means slices, and the worst slice)."""
    views = views if views is not None else slice_views(p)
    s = p.slices
    pred = probs.argmax(1)
    slices = find_slices(views.test, data.test.labels, pred, n_slices=s.n_slices, min_size=s.min_size, seed=p.seed,
                         clusters=s.clusters, train_embeddings=views.train, train_labels=views.train_labels,
                         images=data.test.images, source=views.test_source, classes=data.classes)
    groups = slice_groups(views.test, data.test.labels, clusters=s.clusters, min_size=s.min_size, seed=p.seed)
    summary: dict[str, Any] = {"found": len(slices), "worst_slice_accuracy": _finite(worst_slice_accuracy(
        groups, data.test.labels, pred)), "test_slices": len(groups)}
    if len(slices):
        top = slices.iloc[0]
        summary.update(top_label=top["label"], top_kind=top["kind"], top_size=int(top["size"]),
                       top_error=_finite(top["error"]), top_class_error=_finite(top["class_error"]),
                       top=top["description"])
        log.info("slices: %d found; the worst: %s", len(slices), top["description"])
    else:
        log.info("slices: no group of test images with an error far above its class average")
    return slices, summary


def _finite(x: float) -> float | None:
    """``x`` as a float, None when it is NaN (metrics.json stays strict JSON)."""
    return float(x) if math.isfinite(x) else None


def write_slices(slices: pd.DataFrame | None, images: np.ndarray, train_images: np.ndarray | None = None,
                 out: str | Path = REPORTS) -> Any:
    """``slices.csv`` (the slices without their member lists) and the gallery ``slices.png``
    (:func:`sslvision.slices.slice_gallery`: held-out ``images``, and ``train_images`` for shortcut slices);
    ``slices`` None (``slices.enabled`` false) writes an empty table and a note, so the stage's outputs always
    exist. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sslvision.slices import COLUMNS

    out = Path(out)
    table = slices if slices is not None else pd.DataFrame(columns=COLUMNS)
    write_csv(out / "slices.csv", table.drop(columns=["members", "train_members"]))
    if slices is None:
        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "slice discovery is off (finetune.slices.enabled: false)", ha="center", va="center")
    else:
        fig = slice_gallery(slices, images, train_images)
    with atomic_path(out / "slices.png", suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return fig


def pixel_baseline(p: FinetuneParams, data: FinetuneData, metrics: dict[str, Any]) -> dict[str, Any]:
    """:func:`sslvision.baselines.pixel_logreg` fitted on the real training rows the classifier trained on
    (same audited labels, same validation rows held out; no synthetic images) and scored on the same test
    split as ``metrics``, and on the promotion's golden set (:func:`sslvision.registry.golden_set`):
    ``golden_balanced_accuracy`` and ``golden_sha256`` are what the gate compares a challenger with
    (``promotion.beat_pixel_baseline``)."""
    real = data.train.take(np.flatnonzero(~data.train.synthetic))
    model = pixel_logreg(real.images, real.labels, num_classes=len(data.classes), seed=p.seed)
    test = classification_metrics(data.test.labels, model.predict_proba(data.test.images), data.classes)
    golden_images, golden_labels = registry.golden_set(p)
    golden = classification_metrics(golden_labels, model.predict_proba(golden_images), data.classes)
    out = {
        "model": "logistic regression (class_weight balanced) on 64 PCA components of the pixels",
        **{k: test[k] for k in ("balanced_accuracy", "worst_class_recall", "worst_class", "accuracy", "macro_f1",
                                "per_class_recall")},
        "golden_balanced_accuracy": golden["balanced_accuracy"],
        "golden_size": int(len(golden_labels)),
        "golden_sha256": registry.golden_digest(golden_images, golden_labels),
        "train_rows": model.train_rows,
        "seconds": model.seconds,
        "classifier_gain": metrics["balanced_accuracy"] - test["balanced_accuracy"],
    }
    behind = out["classifier_gain"] <= 0
    log.log(logging.WARNING if behind else logging.INFO,
            "pixel baseline (%s, %d rows, %.1f s): balanced accuracy %.1f %%, worst class %s %.1f %%; the classifier "
            "%.1f %% (%+.1f points)%s", out["model"], model.train_rows, model.seconds, 100 * test["balanced_accuracy"],
            test["worst_class"], 100 * test["worst_class_recall"], 100 * metrics["balanced_accuracy"],
            100 * out["classifier_gain"], "; promotion.beat_pixel_baseline refuses it" if behind else "")
    return out


def label_efficiency_curve(p: FinetuneParams, data: FinetuneData,
                           views: SliceViews | None = None) -> pd.DataFrame | None:
    """:func:`sslvision.baselines.label_efficiency` on this project: the real training rows the classifier trained
    on (``data.train`` without its synthetic rows; audited labels, validation rows held out) with their SSL
    embeddings (``views``, default :func:`slice_views`: the embed stage's, else embedded with ``p.encoder``), scored
    on the test split; counts ``p.label_efficiency``, ``p.label_efficiency_seeds`` draws from ``p.seed``. The
    linear probe on the frozen encoder, not the stage's classifier: benchmarks/README.md's label_efficiency
    section compares the fine-tuned encoder. Returns the per-draw table, or None (with a log line) when it is
    skipped: no counts, embeddings that do not match the rows, fewer than two classes."""
    import time

    if not p.label_efficiency:
        log.info("label efficiency: skipped (finetune.label_efficiency is empty)")
        return None
    views = views if views is not None else slice_views(p)
    real = data.train.take(np.flatnonzero(~data.train.synthetic))
    if len(views.train) != len(real) or not np.array_equal(views.train_labels, real.labels) \
            or len(views.test) != len(data.test):
        log.warning("label efficiency: skipped: the SSL embeddings (%d training, %d test rows) are not those of the "
                    "%d real training and %d test rows", len(views.train), len(views.test), len(real), len(data.test))
        return None
    if len(np.unique(real.labels)) < 2:
        log.info("label efficiency: skipped (the real training rows hold fewer than two classes)")
        return None
    t0 = time.perf_counter()
    table = label_efficiency(views.train, real.images, real.labels, views.test, data.test.images, data.test.labels,
                             per_class=p.label_efficiency, seeds=p.label_efficiency_seeds,
                             num_classes=len(data.classes), seed=p.seed)
    summary = label_efficiency_summary(table)
    counts = summary["labels_per_class"]

    def curve(system: str) -> str:
        return "/".join(f"{100 * summary['systems'][system][str(n)]['mean']:.1f}" for n in counts)

    short = {n: summary["short_classes"][str(n)] for n in counts if summary["short_classes"][str(n)]}
    log.info("label efficiency: %s labels per class: SSL probe %s %%, pixels %s %% (balanced accuracy on %d test "
             "rows, mean of %d draws, %.1f s)%s", "/".join(map(str, counts)), curve("ssl_linear_probe"),
             curve("pixel_logreg"), summary["test_rows"], summary["seeds"], time.perf_counter() - t0,
             "".join(f"; at {n}, {k} class{'es have' if k > 1 else ' has'} fewer real training rows (all of them "
                     "used)" for n, k in short.items()))
    return table


def synthetic_ablation(p: FinetuneParams, data: FinetuneData, with_clf: Classifier,
                       with_result: TrainResult) -> tuple[Classifier, TrainResult, dict[str, Any], np.ndarray]:
    """Whether the synthetic images help: the same classifier as ``with_clf`` (same params and seed, same
    validation rows) trained on the real training rows alone, and the two compared on validation (real rows
    only; each run's selected-epoch score, ``TrainResult.best_val_balanced_accuracy``).

    ``synthetic_select: validation`` keeps the run with the synthetic images only when its validation balanced
    accuracy is strictly higher (a tie keeps the cheaper, simpler run without them); ``always`` keeps it
    whatever validation says. Both are also scored on the test split, reported and never used to decide:
    ``tail`` is the (up to) 3 classes with the fewest real training images among those that received synthetic
    ones, the classes synthesis is for; the gains are with minus without, in points (0-1).

    Returns (the kept classifier, its result, the record for ``metrics.json`` (``kept``: ``"with"`` or
    ``"without"``, ``reason``), the kept classifier's test probabilities).
    """
    k = len(data.classes)
    real = data.train.take(np.flatnonzero(~data.train.synthetic))
    baseline = build_classifier(p, data.classes)
    base_result = train_classifier(baseline, FinetuneData(train=real, val=data.val, test=data.test,
                                                          classes=data.classes), p)
    val_with, val_without = with_result.best_val_balanced_accuracy, base_result.best_val_balanced_accuracy
    if p.synthetic_select == "always":
        kept, reason = "with", "synthetic_select: always keeps them"
    elif val_with > val_without:
        kept, reason = "with", "they raise validation balanced accuracy"
    else:
        kept, reason = "without", "they do not raise validation balanced accuracy"
    probs_with = with_clf.predict_proba(data.test.images, p.eval_batch_size)
    probs_without = baseline.predict_proba(data.test.images, p.eval_batch_size)
    with_m = classification_metrics(data.test.labels, probs_with, data.classes)
    without = classification_metrics(data.test.labels, probs_without, data.classes)
    real_counts = np.bincount(real.labels, minlength=k)
    synthesised = np.flatnonzero(np.bincount(data.train.labels[data.train.synthetic], minlength=k))
    tail = sorted(synthesised.tolist(), key=lambda c: (int(real_counts[c]), c))[:3]

    def mean_recall(m: dict[str, Any], cs: list[int]) -> float:
        vals = [m["per_class_recall"][data.classes[c]] for c in cs]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else math.nan

    out: dict[str, Any] = {
        "select": p.synthetic_select,
        "kept": kept,
        "reason": reason,
        "synthetic_images": int(data.train.synthetic.sum()),
        "val_balanced_accuracy_with": val_with,
        "val_balanced_accuracy_without": val_without,
        "val_balanced_accuracy_gain": val_with - val_without,
        "tail_classes": [data.classes[c] for c in tail],
        "tail_recall": mean_recall(with_m, tail),
        "tail_recall_without": mean_recall(without, tail),
        "synthesised_recall": mean_recall(with_m, synthesised.tolist()),
        "synthesised_recall_without": mean_recall(without, synthesised.tolist()),
        "balanced_accuracy_with": with_m["balanced_accuracy"],
        "balanced_accuracy_without": without["balanced_accuracy"],
        "worst_class_recall_with": with_m["worst_class_recall"],
        "worst_class_recall_without": without["worst_class_recall"],
        "ece_with": with_m["ece"],
        "ece_without": without["ece"],
        "per_class_recall_without": {data.classes[c]: without["per_class_recall"][data.classes[c]]
                                     for c in synthesised.tolist()},
    }
    out["tail_recall_gain"] = out["tail_recall"] - out["tail_recall_without"]
    out["synthesised_recall_gain"] = out["synthesised_recall"] - out["synthesised_recall_without"]
    out["balanced_accuracy_gain"] = with_m["balanced_accuracy"] - without["balanced_accuracy"]
    hurt = out["tail_recall_gain"] < 0 or out["balanced_accuracy_gain"] < 0
    log.log(logging.WARNING if hurt or kept == "without" else logging.INFO,
            "synthetic images (%d): deployed %s them, %s (validation balanced accuracy %.1f -> %.1f %%, without -> "
            "with); test split, reported only: mean recall of %s %.1f -> %.1f %%, balanced accuracy %.1f -> %.1f %%%s",
            out["synthetic_images"], kept, reason, 100 * val_without, 100 * val_with, ", ".join(out["tail_classes"]),
            100 * out["tail_recall_without"], 100 * out["tail_recall"], 100 * without["balanced_accuracy"],
            100 * with_m["balanced_accuracy"],
            "; they lower it: try another synthesize.generator or a lower finetune.synthetic_weight" if hurt else "")
    if kept == "with":
        return with_clf, with_result, out, probs_with
    return baseline, base_result, out, probs_without


def finetune_cli(params: str | Path | None = None) -> dict[str, Any] | None:
    """The stage: train, write ``models/classifier`` and ``reports/finetune``, log to MLflow, register
    the model as ``challenger`` and (``registry.auto_promote``) run the gated promotion. Under torchrun
    the other processes only train alongside rank 0 and return None."""
    import mlflow

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    p = load_section("finetune", FinetuneParams, params)
    check_replaceable(p.out, "classifier")  # a directory of someone's files: refuse before training, not after
    check_single_process(p)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun workers: train only; rank 0 evaluates, logs and writes
        if p.threads:
            torch.set_num_threads(p.threads)
        data = load_data(p)
        train_classifier(build_classifier(p, data.classes), data, p)
        return None
    with tracking.stage_run("finetune", p.model_dump()):
        classifier, data, result, metrics, probs = run_finetune(
            p, on_epoch=lambda epoch, row: mlflow.log_metrics({f"train/{k}": v for k, v in row.items()}, step=epoch))
        classifier.conversion = training_conversion(data.train.images.shape, params)
        save_classifier(p.out, classifier, extra={"metrics": {k: metrics[k] for k in (
            "accuracy", "balanced_accuracy", "worst_class_recall", "ece")}})
        slices = None
        views = slice_views(p) if p.slices.enabled or p.label_efficiency else None
        if p.slices.enabled:
            slices, metrics["slices"] = discover_slices(p, data, probs, views)
        curve = label_efficiency_curve(p, data, views)
        if curve is not None:
            metrics["label_efficiency"] = label_efficiency_summary(curve)
        write_csv(REPORTS / "label_efficiency.csv",  # written when skipped too: a DVC output must exist
                  curve if curve is not None else pd.DataFrame(columns=list(LABEL_EFFICIENCY_COLUMNS)))
        figures = write_reports(metrics, result.history, data.test.labels, probs, data.classes)
        real = data.train.images[:len(data.train) - int(data.train.synthetic.sum())]  # real rows come first
        figures["slices.png"] = write_slices(slices, data.test.images, real)
        mlflow.log_metrics(scalar_metrics(metrics))
        for name, fig in figures.items():
            mlflow.log_figure(fig, f"finetune/{name}")
        mlflow.log_artifact(str(REPORTS / "metrics.json"), artifact_path="finetune")
        mlflow.log_artifact(str(REPORTS / "slices.csv"), artifact_path="finetune")
        mlflow.log_artifact(str(REPORTS / "label_efficiency.csv"), artifact_path="finetune")
        version = None
        if p.registry.enabled:
            version = registry.log_and_register(p.out, p.registry.model_name, data.test.images[:4])
            registry.record_pixel_baseline(p.registry.model_name, version, metrics["baselines"]["pixel_logreg"])
            metrics["registered_version"] = int(version)
    if version is None or not p.registry.auto_promote:
        decision = {"decision": "not_run", "reason": "finetune.registry.enabled or auto_promote is false"}
    else:
        decision = registry.promote_cli(p)
    write_json(REPORTS / "promotion.json", decision)
    metrics["promotion"] = decision
    return metrics


def training_conversion(shape: tuple[int, ...], params: str | Path | None = None) -> Conversion:
    """The conversion ingest applied to the training images: their shape ``(N, H, W, C)`` as ingested,
    and the size limits of the ``ingest`` section of the params file (its defaults when it has none)."""
    limits = load_section("ingest", IngestParams, params)
    return Conversion(int(shape[3]), int(shape[1]), limits.max_file_bytes, limits.max_pixels)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a :func:`run_finetune` ``metrics`` dict as flat MLflow metric names (``recall/<class>``,
    ``synthetic_ablation/<key>`` (``kept_synthetic``: 1 when the deployed classifier trained with the synthetic
    images, else 0), ``slices/<key>``, ``slice_reweight/<key>`` (``kept`` as 0/1), ``baseline/<name>/<key>``,
    ``label_efficiency/<system>/<labels per class>`` (the mean over the draws; ``..._std`` the standard deviation)):
    booleans, None and strings left out, and the non-finite values of the ablation, the slices and the baselines."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({f"recall/{c}": float(r) for c, r in metrics["per_class_recall"].items() if r is not None})
    for part in ("synthetic_ablation", "slices", "slice_reweight"):
        out.update({f"{part}/{k}": float(v) for k, v in metrics.get(part, {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    if "slice_reweight" in metrics:
        out["slice_reweight/kept"] = float(metrics["slice_reweight"]["kept"])
    if "synthetic_ablation" in metrics:
        out["synthetic_ablation/kept_synthetic"] = float(metrics["synthetic_ablation"]["kept"] == "with")
    for name, b in metrics.get("baselines", {}).items():
        out.update({f"baseline/{name}/{k}": float(v) for k, v in b.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
        out.update({f"baseline/{name}/recall/{c}": float(r) for c, r in b["per_class_recall"].items() if r is not None})
    for system, by_count in metrics.get("label_efficiency", {}).get("systems", {}).items():
        for n, v in by_count.items():
            out[f"label_efficiency/{system}/{n}"] = float(v["mean"])
            out[f"label_efficiency/{system}/{n}_std"] = float(v["std"])
    return out


# --- reports -------------------------------------------------------------------------------------

def write_reports(metrics: dict[str, Any], history: list[dict[str, float]], labels: np.ndarray, probs: np.ndarray,
                  classes: list[str], out: str | Path = REPORTS) -> dict[str, Any]:
    """``metrics.json``, DVC plot data (predictions for the confusion matrix, per-class recall,
    training history, reliability) and the PNG figures. Returns the matplotlib figures by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    out = Path(out)
    write_json(out / "metrics.json", metrics)
    pred = probs.argmax(1)
    names = np.asarray(classes, dtype=object)
    write_csv(out / "predictions.csv", pd.DataFrame({"actual": names[labels], "predicted": names[pred]}))
    write_csv(out / "per_class_recall.csv", pd.DataFrame(
        {"class": classes, "recall": [metrics["per_class_recall"][c] for c in classes]}))
    write_csv(out / "history.csv", pd.DataFrame(history))
    reliability = reliability_table(probs.max(1), pred == labels)
    write_csv(out / "reliability.csv", reliability)

    figures: dict[str, Any] = {}
    fig, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay(np.asarray(metrics["confusion_matrix"]), display_labels=classes).plot(
        ax=ax, xticks_rotation=45, colorbar=False, values_format="d")
    ax.set_title(f"test: balanced accuracy {metrics['balanced_accuracy']:.3f}, "
                 f"worst class {metrics['worst_class']} {metrics['worst_class_recall']:.3f}")
    fig.tight_layout()
    figures["confusion_matrix.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.bar(reliability["confidence"], reliability["accuracy"], width=1 / len(reliability), alpha=0.7, edgecolor="k")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability (ECE {metrics['ece']:.3f})")
    fig.tight_layout()
    figures["reliability.png"] = fig
    for name, fig in figures.items():
        with atomic_path(out / name, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    return figures


def main() -> None:
    try:
        require_sections("finetune", path=params_path())
        check_code_version()
        m = finetune_cli(params_path())
    except (ParamsError, ValueError, OSError) as err:
        sys.exit(f"finetune: error: {err}")
    if m is None:  # a torchrun worker: rank 0 reports
        sys.exit(0)
    print(f"finetune: test balanced accuracy {m['balanced_accuracy']:.4f}, worst class {m['worst_class']} "
          f"{m['worst_class_recall']:.4f}, ECE {m['ece']:.4f}; promotion: {m['promotion']['decision']}")


if __name__ == "__main__":
    main()
