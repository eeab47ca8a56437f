"""DVC stage ``drift_eval``: compare the production batch named in params.yaml (``drift_eval.batch``) with
the training reference; ``reports/drift/trigger.json`` (every monitored metric with its threshold, failed
flag and owning stage) and the drift plots; one MLflow run. An empty ``drift_eval.batch`` (a new project,
no production batch yet) writes a ``trigger.json`` that says so and evaluates nothing.

Run from the project root (``dvc repro drift_eval``). This module reads the files (the ingested data, the
embeddings, the encoder, the classifier to score, the batch), writes the report and the MLflow run; the
statistics themselves are computed on arrays by :mod:`sslvision.drift`. ``sslvision drift-eval`` and the
monitor flow call :func:`drift_eval_cli`.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sslvision import registry, tracking
from sslvision.batches import held_out_files, read_batch_files
from sslvision.data import Ingested, load_embeddings
from sslvision.drift import DriftParams, Reference, evaluate_batch, to_json
from sslvision.finetune import FinetuneParams, load_classifier, train_val_rows
from sslvision.io import atomic_path, write_csv, write_json
from sslvision.models import embed, load_encoder
from sslvision.params import load_section, params_path, require_sections
from sslvision.registry import RegistryError
from sslvision.stages import check_code_version
from sslvision.trigger import decide

log = logging.getLogger("sslvision.drift")

REPORTS = Path("reports/drift")


def classifier_reference_rows(finetune: Any, ingested_manifest: Any) -> tuple[np.ndarray, np.ndarray]:
    """Train-distribution rows of ``images.npy`` the classifier never trained on, and the per-class counts
    of every labeled row finetune used (to tell the rare classes).

    The rows: finetune's validation rows (``finetune.train_val_rows``, a ``val_fraction`` share of each
    class of the audited manifest) plus the same share of the rows the audit dropped. Validation rows
    alone would be biased towards easy images (the audit drops the ambiguous ones), which would make the
    reference accuracy too high; with the dropped share added, the rows are an unbiased sample of the
    ingested training images. ``ingested_manifest``: ``data/ingested/manifest.parquet`` as a DataFrame.
    """
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
    train = data.split("train")
    test = data.split("test")
    if len(train) < 2 or len(test) < 2:
        raise ValueError(f"{p.ingested}: the reference needs train and test images (found {len(train)} train, "
                         f"{len(test)} test)")
    val_rows, train_counts = classifier_reference_rows(finetune, data.manifest)
    calib = test.sample(n=min(p.calibration_size, len(test)), random_state=p.seed).sort_values("index")
    test_rows, test_labels = test["index"].to_numpy(), test["label"].to_numpy(np.int64)
    log.info("reference: %d test images (embeddings, re-sampled to each batch's class prior), %d train images the "
             "classifier never saw, calibration: %d test images", len(test_rows), len(val_rows), len(calib))
    correction = classifier.prior_correction
    reference = Reference(
        embeddings=np.asarray(all_embeddings[test_rows], dtype=np.float32),
        embedding_labels=test_labels,
        probs=classifier.predict_proba(np.asarray(data.images[val_rows]), p.batch_size),
        calib_probs=classifier.predict_proba(np.asarray(data.images[calib["index"].to_numpy()]), p.batch_size),
        calib_labels=calib["label"].to_numpy(np.int64),
        train_counts=np.pad(train_counts, (0, len(classes) - len(train_counts))),
        classes=classes,
        model=model,
        deployed_prior=np.asarray(correction["prior"]) if correction else None,
        prior_method=p.prior_method,
        prior_fallback_tv=p.prior_fallback_tv,
        seed=p.seed,
    )
    return reference, encoder, classifier, tuple(data.images.shape[1:])


def run_drift_eval(p: DriftParams, batch: str | Path | None = None, reports: str | Path = REPORTS,
                   params: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the batch (default ``p.batch``): write ``trigger.json`` and the plots to ``reports``; return
    the JSON result and ``evaluated_files`` (see :func:`read_batch_files`). ``params``: the params file (for
    finetune's held-out rows)."""
    batch = Path(batch or p.batch)
    reference, encoder, classifier, (size, _, channels) = build_reference(p, params)
    images, labels, files = read_batch_files(batch, reference.classes, channels, size)
    log.info("%s: %d images (%d labeled)", batch, len(images), int(np.sum(labels >= 0)))
    embeddings = embed(encoder, images, p.batch_size)
    result = evaluate_batch(reference, embeddings, classifier.predict_proba(images, p.batch_size), labels, p)
    for warning in result["threshold_warnings"]:
        log.warning("%s", warning)
    data = Ingested.load(p.ingested)
    test_hashes = {hashlib.sha256(np.ascontiguousarray(data.images[i]).tobytes()).hexdigest()
                   for i in data.split("test")["index"]}  # ingest's content_hash: sha256 of the converted pixels
    held_out = held_out_files(batch, files, test_hashes, channels, size)
    if held_out:
        log.warning("%s: %d image(s) identical to held-out test images (%s%s): they are evaluated but never join the "
                    "pool", batch, len(held_out), ", ".join(list(held_out)[:3]), ", ..." if len(held_out) > 3 else "")
    reports = Path(reports)
    write_plots(result, reference, reports, embeddings)
    out = {"batch": str(batch), "model": reference.model, **to_json(result),
           "decision": decide(result["metrics"], batch=batch.name).to_dict(), "held_out_files": held_out}
    write_json(reports / "trigger.json", out)
    return {**out, "evaluated_files": files}  # for trigger.admit_batch; not a metric, so not in trigger.json




# --- the report -----------------------------------------------------------------------------------


def write_plots(result: dict[str, Any], reference: Reference, reports: str | Path, batch_embeddings: np.ndarray
                | None = None) -> list[Path]:
    """``mmd.png`` (the permutation null, the observed MMD² and the critical value), ``prediction_shift.png``
    and ``.csv`` (predicted-class shares, reference vs batch, and their difference ``shift``),
    ``embeddings_pca.png`` (2-D PCA fitted on the reference, when ``batch_embeddings`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

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
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    p = load_section("drift_eval", DriftParams, params)
    if not (batch or p.batch):  # a new project (sslvision init) has no production batch yet: say so, evaluate nothing
        skipped = {"batch": None, "metrics": {}, "failed": [],
                   "skipped": "no production batch to evaluate (drift_eval.batch is empty): put a batch directory "
                              "in the monitor inbox and run `sslvision monitor`, or set drift_eval.batch"}
        write_json(Path(reports) / "trigger.json", skipped)
        return {**skipped, "evaluated_files": {}}
    with tracking.stage_run("drift_eval", {**p.model_dump(), "batch": str(batch or p.batch)}):
        result = run_drift_eval(p, batch, reports, params)
        log_to_mlflow(result, reports)
    return result


def main() -> None:
    try:
        require_sections("drift_eval", path=params_path())
        check_code_version()
        result = drift_eval_cli(batch=None, params=params_path())
    except (ValueError, OSError, RegistryError) as err:
        sys.exit(f"drift_eval: error: {err}")
    if result.get("skipped"):
        print(f"drift_eval: {result['skipped']}")
    else:
        print("failed metrics:", ", ".join(result["failed"]) or "none")


if __name__ == "__main__":
    main()
