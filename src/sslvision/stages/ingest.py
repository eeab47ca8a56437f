"""DVC stage ``ingest``: decode the source named in params.yaml (``ingest.source``, plus the batches
under ``ingest.pool``) into ``data/ingested/``; metrics and plots in ``reports/ingest/``; one MLflow run.

Run from the project root (``dvc repro ingest``). The decoding is :func:`sslvision.ingest.run_ingest`;
this module holds the stage's paths, reports (metrics, class-count plot, dataset card) and MLflow run, and
``sslvision ingest``'s :func:`ingest_cli`. Before any work the stage says which paths the pipeline's later
stages read that do not exist, naming the params key (under ``dvc repro`` this is the first stage: better
told now than after pretraining).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from sslvision import io
from sslvision.data import INGESTED
from sslvision.ingest import IngestParams, check_source, run_ingest
from sslvision.params import load_section, params_path, require_sections
from sslvision.stages import check_code_version

log = logging.getLogger("sslvision.stages.ingest")

OUT = INGESTED  # the stage's output (dvc.yaml); ingesting anywhere else is ad hoc (see ingest_cli)
REPORTS = Path("reports/ingest")


def write_reports(metrics: dict, out: Path, reports: Path = REPORTS) -> list[Path]:
    """metrics.json, class_counts.csv (the DVC plot), class_counts.png and dataset_card.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = metrics["class_counts"]
    classes = list(counts["train"])
    io.write_json(reports / "metrics.json", metrics)
    io.write_csv(reports / "class_counts.csv",
                 pd.DataFrame({"class": classes, "count": [counts["train"][c] for c in classes]}))

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(classes) + 1.5))
    y = np.arange(len(classes))
    ax.barh(y - 0.2, [counts["train"][c] for c in classes], height=0.4, label="train")
    ax.barh(y + 0.2, [counts["test"][c] for c in classes], height=0.4, label="test")
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title(f"images per class (train imbalance ratio {metrics['imbalance_ratio']})")
    ax.legend()
    fig.tight_layout()
    with io.atomic_path(reports / "class_counts.png", suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

    io.write_text(reports / "dataset_card.md", dataset_card(metrics, out))
    return [reports / n for n in ("metrics.json", "class_counts.csv", "class_counts.png", "dataset_card.md")]


def dataset_card(metrics: dict, out: Path) -> str:
    """A human-readable summary of what was ingested and what was not."""
    q = pd.read_parquet(out / "quarantine.parquet")
    counts = metrics["class_counts"]
    lines = [
        "# Dataset card",
        "",
        (f"Source `{metrics['source']}` ({metrics['layout']} layout): {metrics['listed']} files listed = "
         f"{metrics['images']} images kept + {metrics['quarantined']} quarantined (every listed file is a row "
         "of `manifest.parquet` or of `quarantine.parquet`)."),
        "",
        *(["## Warnings", "", *(f"- {w}" for w in metrics["warnings"]), ""] if metrics["warnings"] else []),
        "Original image modes (each converted to the configured channels): "
        + ", ".join(f"{m} {n}" for m, n in metrics["orig_modes"].items()) + ".",
        "",
        "| split | images |", "|---|---|",
        *(f"| {s} | {n} |" for s, n in metrics["by_split"].items()),
        "",
        f"## Classes ({metrics['classes']}; train imbalance ratio {metrics['imbalance_ratio']})",
        "", "| class | train | test |", "|---|---|---|",
        *(f"| {c} | {counts['train'][c]} | {counts['test'][c]} |" for c in counts["train"]),
        "",
        "## Quarantine", "", "| reason | files |", "|---|---|",
        *(f"| {r} | {n} |" for r, n in metrics["quarantine"].items() if n),
        "",
    ]
    if len(q):
        lines += ["Examples:", ""]
        lines += [f"- `{r.source_path}` ({r.split}): {r.reason}: {r.detail}"
                  for r in q.groupby("reason").head(3).itertuples()]
        lines.append("")
    d = metrics["duplicates"]
    lines += [
        "## Duplicates", "",
        f"- exact duplicates (same decoded pixels): {d['exact']} images in {d['exact_groups']} groups",
        f"- near duplicates (perceptual hash): {d['near']} images in {d['near_groups']} groups",
        f"- groups with conflicting labels: {d['conflicting_label_groups']}",
        (f"- groups spanning train and test (leakage): {d['leakage_groups']} "
         f"({d['leaked_test_images']} test images)"),
        "",
        ("Duplicates are kept and flagged in `manifest.parquet` (`exact_duplicate_of`, `near_duplicate_of`); "
         "each group is listed in `duplicates.parquet`."),
        "",
    ]
    return "\n".join(lines)


def _metric_items(metrics: dict) -> dict[str, float]:
    from sslvision.tracking import flatten

    flat = flatten({k: v for k, v in metrics.items() if k not in ("source", "layout")})
    return {re.sub(r"[^\w\-./ ]", "_", k): float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def ingest_cli(source: str | os.PathLike | None, out: str | os.PathLike, params: str | os.PathLike,
               pool: str | os.PathLike | None = None) -> dict:
    """Ingest with the params from ``params``; one MLflow run with the params, the metrics, the dataset
    card and the plots.

    With no ``source`` and ``out`` the project's ``data/ingested`` this is the stage: it reads
    ``ingest.source`` and the batches under ``ingest.pool``, writes the reports to ``reports/ingest`` and
    shares the decode cache ``ingest.cache_dir``. Anything else is an ad-hoc ingest, which writes only
    under ``out`` (reports in ``out/reports``, decode cache in ``out/.ingest_cache``) and reads no pool
    but ``pool``: the project's reports and pool are DVC outputs and dependencies of the stage, and
    touching them would make ``dvc status`` report the stage changed and its dataset card describe
    another source.
    """
    import mlflow

    from sslvision import tracking

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    p = load_section("ingest", IngestParams, params)
    src = check_source(source if source is not None else p.source)  # before opening an MLflow run
    out = Path(out)
    ad_hoc = source is not None or out.resolve() != OUT.resolve()
    reports = out / "reports" if ad_hoc else REPORTS
    if ad_hoc:
        p = p.model_copy(update={"cache_dir": str(out / ".ingest_cache") if p.cache_dir else ""})
    elif pool is None and p.pool:
        pool = p.pool
    pool = Path(pool) if pool is not None else None
    run_params = {**p.model_dump(), "source": str(src), "out": str(out), "pool": str(pool or "")}
    with tracking.stage_run("ingest", run_params):
        mlflow.set_tag("sslvision.ingest.ad_hoc", str(ad_hoc).lower())
        metrics = run_ingest(p, src, out, pool)
        paths = write_reports(metrics, out, reports)
        mlflow.log_metrics(_metric_items(metrics))
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path="ingest")
        mlflow.log_artifact(str(out / "classes.json"), artifact_path="ingest")
    return metrics


def _warn_missing_inputs() -> None:
    from sslvision.stages.preflight import missing_inputs

    if Path("dvc.yaml").exists():
        for problem in missing_inputs("."):
            log.warning("%s", problem)


def main() -> None:
    try:
        require_sections("ingest", path=params_path())
        check_code_version()
        p = load_section("ingest", IngestParams, params_path())
        for key, value in (("source", p.source), ("pool", p.pool), ("manifest_root", p.manifest_root)):
            if value and not Path(value).exists():
                raise FileNotFoundError(f"{params_path()}: ingest.{key}: {value} does not exist")
        _warn_missing_inputs()
        ingest_cli(source=None, out=OUT, params=params_path())
    except (ValueError, OSError) as err:
        sys.exit(f"ingest: error: {err}")


if __name__ == "__main__":
    main()
