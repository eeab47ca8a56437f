"""DVC stage ``pretrain``: self-supervised pretraining on the ingested images (never their labels).

Reads ``data/ingested/images.npy``, ``images.parquet`` and ``eval_labels.parquet``: it trains on the
``train`` and ``pool`` rows that ``ssl_pool.parquet`` selects (never ``test``) and evaluates on the clean
``test`` split only (:func:`sslvision.pretrain.evaluate`), so a label fixed or broken in
``manifest.parquet`` cannot change (or re-run) this stage, and neither the training nor the evaluation
uses the (possibly noisy) train labels. Writes ``models/encoder/``, ``reports/pretrain/`` (metrics,
per-epoch history, dvclive plots) and one MLflow run. Resumes from ``pretrain.checkpoint_dir`` when a
checkpoint of the same params is there.

Run from the project root: ``dvc repro pretrain``, or on N processes of one machine (rendezvous on
loopback, see the README)
``torchrun --nproc_per_node=N --master_addr=127.0.0.1 --master_port=29500 -m sslvision.stages.pretrain``.
The training itself is :func:`sslvision.pretrain.train`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sslvision.data import INGESTED
from sslvision.io import atomic_path, write_csv, write_json
from sslvision.models import embed, save_encoder
from sslvision.params import params_path, require_sections
from sslvision.pretrain import (
    NonFiniteLossError,
    PretrainParams,
    collapse_stats,
    evaluate,
    init_lineage,
    rank_and_world,
    resolve_device,
    train,
)
from sslvision.stages import check_code_version
from sslvision.stages.embed import ENCODER, embed_ingested

if TYPE_CHECKING:  # pandas is imported where manifests are read: train() and its workers never need it (~60 MiB)
    import pandas as pd

log = logging.getLogger("sslvision.pretrain")

REPORTS = Path("reports/pretrain")
LINEAGE_TAG = "sslvision.init_from"  # MLflow tags .path, .sha256, .method: the encoder pretrain.init_from named


@dataclass
class StageInputs:
    images_path: Path
    images: pd.DataFrame
    train_rows: np.ndarray
    test_rows: np.ndarray
    test_labels: np.ndarray
    num_classes: int


def read_inputs(ingested: str | Path) -> StageInputs:
    """The images pretraining reads, never labels that can change.

    ``ssl_pool.parquet`` (ingest's fingerprint of train, test and unlabeled pool images, the stage's DVC
    dependency) selects the rows; ``images.parquet`` maps its ids to rows of ``images.npy``, and each
    selected row's pixels are checked against the fingerprint's content hash, so the dependency really
    covers what is trained on. Without ``ssl_pool.parquet`` every row of ``images.parquet`` is used.
    ``eval_labels.parquet`` gives the clean test labels for the evaluation.
    """
    import pandas as pd

    root = Path(ingested)
    for name in ("images.npy", "images.parquet", "eval_labels.parquet"):
        if not (root / name).exists():
            raise FileNotFoundError(f"{root / name}: missing; run the ingest stage first (dvc repro ingest)")
    images = pd.read_parquet(root / "images.parquet")
    labels = pd.read_parquet(root / "eval_labels.parquet")
    for col in ("index", "id", "split"):
        if col not in images.columns:
            raise ValueError(f"{root / 'images.parquet'}: missing column {col!r}")
    for col in ("id", "label"):
        if col not in labels.columns:
            raise ValueError(f"{root / 'eval_labels.parquet'}: missing column {col!r}")
    if (root / "ssl_pool.parquet").exists():
        pool = pd.read_parquet(root / "ssl_pool.parquet")
        selected = images.merge(pool[["id", "content_hash"]], on="id", how="inner", suffixes=("", "_pool"))
        if len(selected) != len(pool):
            raise ValueError(f"{root / 'ssl_pool.parquet'}: {len(pool) - len(selected)} ids are not in images.parquet "
                             "(re-run ingest)")
        _check_hashes(np.load(root / "images.npy", mmap_mode="r"), selected, root)
        images = selected
    train_rows = np.sort(images.loc[images["split"].isin(["train", "pool"]), "index"].to_numpy())
    test = images[images["split"] == "test"].merge(labels[["id", "label"]], on="id", how="inner")
    test = test.sort_values("index")
    if len(train_rows) == 0:
        raise ValueError(f"{root / 'images.parquet'}: no train or pool images to pretrain on")
    classes_path = root / "classes.json"
    num_classes = (len(json.loads(classes_path.read_text())["classes"]) if classes_path.exists()
                   else int(labels["label"].max()) + 1)
    return StageInputs(root / "images.npy", images, train_rows, test["index"].to_numpy(),
                       test["label"].to_numpy().astype(np.int64), num_classes)


def _check_hashes(array: np.ndarray, selected: pd.DataFrame, root: Path) -> None:
    if "content_hash_pool" not in selected.columns:
        return
    for row, expected in zip(selected["index"].to_numpy(), selected["content_hash_pool"], strict=True):
        if hashlib.sha256(np.ascontiguousarray(array[row]).tobytes()).hexdigest() != expected:
            raise ValueError(f"{root / 'images.npy'}: row {row} does not match ssl_pool.parquet's content hash "
                             "(the ingested files are out of sync; re-run ingest)")


def embedding_report(train_features: np.ndarray, test_features: np.ndarray, inputs: StageInputs,
                     p: PretrainParams) -> dict[str, float]:
    """Collapse statistics on (a sample of) the training rows and 2-fold kNN / linear-probe accuracy on ``test``."""
    stats = collapse_stats(train_features)
    stats["collapsed"] = bool(stats["effective_rank"] < p.collapse_min_effective_rank
                              or stats["std_ratio"] < p.collapse_min_std_ratio)
    if len(inputs.test_rows):
        stats.update(evaluate(test_features, inputs.test_labels, inputs.num_classes, p.knn_k,
                              p.knn_temperature, p.seed))
    return stats


COLLAPSE_SAMPLE = 5000  # training rows the collapse statistics are computed on


def run_stage(p: PretrainParams, ingested: str | Path = INGESTED, encoder_dir: str | Path = ENCODER,
              embeddings_dir: str | Path | None = None, reports: str | Path = REPORTS,
              on_epoch: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train, save the encoder, evaluate; returns the metrics (rank 0). With ``embeddings_dir`` also embed
    every ingested image there (what the ``embed`` stage does; the DVC pipeline keeps the two apart)."""
    inputs = read_inputs(ingested)
    start = time.perf_counter()
    result = train(p, inputs.images_path, inputs.train_rows, on_epoch=on_epoch)
    train_s = time.perf_counter() - start
    rank, _ = rank_and_world()
    if rank != 0:
        return {}
    images = np.load(inputs.images_path, mmap_mode="r")
    lineage = {"init_from": result.lineage} if result.lineage else {}  # the chain an init_from encoder came from
    save_encoder(encoder_dir, result.encoder, result.decoder,
                 extra={"method": p.method, "params": p.model_dump(by_alias=True), **lineage})
    device = resolve_device(p.device)
    sample = np.random.default_rng(p.seed).permutation(inputs.train_rows)[:COLLAPSE_SAMPLE]
    train_features = embed(result.encoder, images[np.sort(sample)], p.embed_batch_size, device)
    test_features = embed(result.encoder, images[inputs.test_rows], p.embed_batch_size, device)
    extra = {}
    if embeddings_dir is not None:
        extra["embed_img_s"] = embed_ingested(encoder_dir, ingested, embeddings_dir, p.embed_batch_size,
                                              p.device)["embed_img_s"]
    metrics = {"method": p.method, "backbone": p.backbone, "precision": result.precision,
               **embedding_report(train_features, test_features, inputs, p),
               "final_loss": result.history[-1]["loss"], "epochs": p.epochs, "steps": result.steps,
               "train_images": int(len(inputs.train_rows)), "eval_images": int(len(inputs.test_rows)),
               **result.throughput, "train_s": train_s, **extra}
    if metrics["collapsed"]:
        log.warning("pretrain: the representation collapsed (effective rank %.2f, std ratio %.3f); "
                    "try a higher temperature/teacher_temp, a lower lr, or another method",
                    metrics["effective_rank"], metrics["std_ratio"])
    reports = Path(reports)
    write_json(reports / "metrics.json", metrics)
    import pandas as pd

    write_csv(reports / "history.csv", pd.DataFrame(result.history))
    return metrics


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, bool, np.generic))}


def pretrain_cli(params: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
                 ingested: str | Path = INGESTED, encoder_dir: str | Path = ENCODER,
                 embeddings_dir: str | Path | None = None, reports: str | Path = REPORTS) -> dict:
    """The stage as ``dvc repro``/``sslvision pretrain`` run it: per-epoch metrics to dvclive
    (``reports/pretrain/live``, DVC plots) and MLflow, then the encoder as an MLflow artifact."""
    from sslvision.params import load_section

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    p = load_section("pretrain", PretrainParams, params, overrides)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun workers: train only; rank 0 logs and writes
        return run_stage(p, ingested, encoder_dir, embeddings_dir, reports)
    import mlflow
    from dvclive import Live

    from sslvision import tracking

    read_inputs(ingested)  # fail on missing inputs before opening a run
    lineage = init_lineage(p.init_from) if p.init_from else None  # ... and on a missing init_from encoder
    mlflow.enable_system_metrics_logging()
    with tracking.stage_run("pretrain", p.model_dump(by_alias=True)), \
            Live(str(Path(reports) / "live"), save_dvc_exp=False, dvcyaml=None) as live:
        if lineage is not None:  # the run's lineage: which encoder (by content) it started from
            mlflow.set_tags({f"{LINEAGE_TAG}.{k}": v for k, v in lineage.items() if isinstance(v, str)})

        def on_epoch(record: dict[str, float]) -> None:
            for key in ("loss", "lr", "temperature", "effective_rank", "std_ratio", "train_img_s", "model_img_s",
                        "data_img_s"):
                if key in record:
                    live.log_metric(key, record[key])
            live.next_step()
            mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))

        metrics = run_stage(p, ingested, encoder_dir, embeddings_dir, reports, on_epoch=on_epoch)
        mlflow.log_param("precision_used", metrics["precision"])  # what pretrain.precision (auto) resolved to
        mlflow.log_metrics(_numeric(metrics))
        mlflow.log_artifacts(str(encoder_dir), artifact_path="encoder")
        mlflow.log_artifact(str(Path(reports) / "metrics.json"), artifact_path="pretrain")
    return metrics


def sweep_temperature(values: list[float], params: str | Path = "params.yaml", epochs: int | None = None,
                      ingested: str | Path = INGESTED, reports: str | Path = REPORTS,
                      checkpoints: str | Path = "checkpoints/sweep") -> pd.DataFrame:
    """Short pretrains at each (constant) temperature; kNN/linear accuracy on ``test`` (2-fold, as the stage).

    Writes ``temperature_sweep.csv`` and ``temperature_sweep.png`` (kNN accuracy vs temperature) to
    ``reports``. Each run checkpoints under ``checkpoints/T=<value>`` so an interrupted sweep resumes.
    """
    import pandas as pd

    from sslvision.params import load_section

    if not values or any(v <= 0 for v in values):
        raise ValueError(f"temperatures must be positive numbers, got {values}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    overrides: dict[str, Any] = {"epochs": epochs} if epochs else {}
    base = load_section("pretrain", PretrainParams, params, overrides)
    inputs = read_inputs(ingested)
    if not len(inputs.test_rows):
        raise ValueError(f"{ingested}: no labelled test images to evaluate the sweep on")
    images = np.load(inputs.images_path, mmap_mode="r")
    rows = []
    for t in values:
        p = base.model_copy(update={"temperature": float(t), "temperature_schedule": "constant",
                                    "checkpoint_dir": str(Path(checkpoints) / f"T={t}")})
        log.info("sweep: temperature %s (%d epochs)", t, p.epochs)
        result = train(p, inputs.images_path, inputs.train_rows)
        feats = embed(result.encoder, images[inputs.test_rows], p.embed_batch_size, resolve_device(p.device))
        scores = evaluate(feats, inputs.test_labels, inputs.num_classes, p.knn_k, p.knn_temperature, p.seed)
        rows.append({"temperature": float(t), **scores, **collapse_stats(feats),
                     "final_loss": result.history[-1]["loss"], "epochs": p.epochs})
    df = pd.DataFrame(rows)
    reports = Path(reports)
    write_csv(reports / "temperature_sweep.csv", df)
    plot_sweep(df, reports / "temperature_sweep.png", f"{base.method}, {base.backbone}, {base.epochs} epochs")
    return df


def plot_sweep(df: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(df["temperature"], df["knn_accuracy"] * 100, "o-", label="kNN (k=200, T=0.1)")
    if "linear_probe_accuracy" in df:
        ax.plot(df["temperature"], df["linear_probe_accuracy"] * 100, "s--", label="linear probe")
    ax.set_xscale("log")
    ax.set_xticks(df["temperature"], [f"{t:g}" for t in df["temperature"]])
    ax.minorticks_off()
    ax.set_xlabel("InfoNCE temperature")
    ax.set_ylabel("test accuracy (%), 2-fold")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def main() -> None:
    try:
        require_sections("pretrain", path=params_path())
        check_code_version()
        pretrain_cli(params=params_path())
    except (ValueError, OSError, NonFiniteLossError) as err:
        sys.exit(f"pretrain: error: {err}")


if __name__ == "__main__":
    main()
