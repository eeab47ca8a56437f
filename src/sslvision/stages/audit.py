"""DVC stage ``audit``: find wrong labels, near-duplicates and outliers with the SSL embeddings.

Reads ``data/ingested/manifest.parquet`` (the labels), ``images.npy`` (for the pixel features and the
gallery), ``classes.json`` and ``data/embeddings/embeddings.npy``; depends on the labels but pretrain does
not, so changing a label re-runs this stage and what follows, never pretrain. Run from the project root:
``dvc repro audit``. The audit itself is :func:`sslvision.audit.run_audit`; this module holds the stage's
paths, files, gallery and MLflow run, and ``sslvision audit``'s :func:`audit_cli`.

Outputs, each written atomically:

- ``data/audit/label_issues.parquet``: one row per flagged image (label issue, conflicting duplicate or
  outlier), highest score first (columns: :mod:`sslvision.audit`).
- ``data/audit/manifest_clean.parquet`` (what the next stages train on): ``manifest.parquet`` minus
  dropped rows, with ``label`` / ``label_name`` corrected where relabelled, plus ``label_given`` and
  ``audit_action`` (keep | relabel).
- ``reports/audit/metrics.json``, ``issues_by_class.csv`` and ``gallery.png`` (top flagged images, given
  -> suggested label); one MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sslvision.audit import AuditParams, run_audit
from sslvision.data import EMBEDDINGS, INGESTED, Ingested, load_embeddings
from sslvision.io import atomic_path, write_csv, write_json, write_parquet
from sslvision.params import load_section, params_path, require_sections
from sslvision.stages import check_code_version

log = logging.getLogger("sslvision.stages.audit")

OUT = Path("data/audit")
REPORTS = Path("reports/audit")


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


def audit_cli(params: str | os.PathLike, ingested: str | os.PathLike = INGESTED,
              embeddings: str | os.PathLike = EMBEDDINGS, out: str | os.PathLike = OUT,
              reports: str | os.PathLike = REPORTS, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage: params from ``params``, outputs in ``out`` and ``reports``, one MLflow run."""
    import mlflow

    from sslvision import tracking

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


def main() -> None:
    try:
        require_sections("audit", path=params_path())
        check_code_version()
        audit_cli(params=params_path())
    except (ValueError, OSError) as err:
        sys.exit(f"audit: error: {err}")


if __name__ == "__main__":
    main()
