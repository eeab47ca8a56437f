"""The closing summary of a pipeline run (``sslvision summary``, printed at the end of ``make demo``).

Reads only what the stages wrote (``reports/<stage>/metrics.json``, ``reports/finetune/promotion.json``,
``reports/drift/trigger.json``) and, when given, the stage wall times of the run; a stage that has not
run yet is shown as such. Then says where the report is and how to open the MLflow and Prefect UIs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STAGES = ("ingest", "pretrain", "embed", "audit", "synthesize", "finetune", "drift_eval")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pct(x: Any) -> str:
    return f"{100 * float(x):.1f}%" if isinstance(x, int | float) else "-"


def key_metrics(root: str | Path = ".") -> dict[str, str]:
    """One line per stage: what it found or made, from its metrics files."""
    reports = Path(root) / "reports"
    out: dict[str, str] = {}
    m = _load(reports / "ingest" / "metrics.json")
    if m:
        out["ingest"] = (f"{m.get('images', 0):,} images kept of {m.get('listed', 0):,} files, "
                         f"{m.get('quarantined', 0)} quarantined, imbalance ratio {m.get('imbalance_ratio', 0):.0f}")
    m = _load(reports / "pretrain" / "metrics.json")
    if m:
        out["pretrain"] = (f"{m.get('method')} {m.get('backbone')}, {m.get('steps')} steps: kNN accuracy "
                           f"{_pct(m.get('knn_accuracy'))}, linear probe {_pct(m.get('linear_probe_accuracy'))}, "
                           f"effective rank {m.get('effective_rank', 0):.0f}"
                           + (" (COLLAPSED)" if m.get("collapsed") else ""))
    m = _load(Path(root) / "data" / "embeddings" / "embeddings.json")
    if m:
        out["embed"] = f"{m.get('rows', 0):,} images embedded ({m.get('dim')}-d) at {m.get('embed_img_s', 0):.0f} img/s"
    m = _load(reports / "audit" / "metrics.json")
    if m:
        out["audit"] = (f"{m.get('n_label_issues', 0):,} label issues in {m.get('n_audited', 0):,} labels "
                        f"(estimated noise {_pct(m.get('noise_rate_estimated'))}), "
                        f"{m.get('n_conflicting_duplicates', 0)} conflicting duplicates; gallery: "
                        "reports/audit/gallery.png")
    m = _load(reports / "synthesize" / "metrics.json")
    if m:
        out["synthesize"] = (f"{m.get('generator')}: kept {m.get('kept', 0):,} of {m.get('made', 0):,} images for "
                             f"{m.get('classes_synthesised', 0)} rare classes; grid: reports/synthesize/grid.png")
    m = _load(reports / "finetune" / "metrics.json")
    if m:
        out["finetune"] = (f"balanced accuracy {_pct(m.get('balanced_accuracy'))}, worst class "
                           f"{m.get('worst_class')} {_pct(m.get('worst_class_recall'))}, ECE {m.get('ece', 0):.3f}")
        a = m.get("synthetic_ablation")
        if a:
            out["finetune"] += (f"; synthetic images: tail recall {_pct(a.get('tail_recall_without'))} -> "
                                f"{_pct(a.get('tail_recall'))}, balanced accuracy "
                                f"{_pct(a.get('balanced_accuracy_without'))} -> {_pct(m.get('balanced_accuracy'))}")
    p = _load(reports / "finetune" / "promotion.json")
    if p:
        decision = p.get("decision", "?")
        line = f"{p.get('model')} v{p.get('challenger')}: {decision}"
        if decision == "promoted":
            line += f" -> champion v{p.get('champion')}"
        elif p.get("failed"):
            line += ": " + "; ".join(map(str, p["failed"]))
        out["promotion"] = line
    t = _load(reports / "drift" / "trigger.json")
    if t:
        failed = t.get("failed") or []
        owners = [t.get("metrics", {}).get(f, {}).get("stage", "?") for f in failed]
        earliest = min(owners, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES), default=None)
        out["drift_eval"] = (f"{Path(str(t.get('batch', '?'))).name}: "
                             + ("healthy, nothing to re-run" if not failed else
                                f"degraded ({', '.join(map(str, failed))}) -> re-run from {earliest}"))
    return out


def render(root: str | Path = ".", seconds: dict[str, float] | None = None,
           report: str | None = None) -> str:
    """The summary as text (also what ``print_summary`` shows)."""
    metrics = key_metrics(root)
    lines = ["", "sslvision: pipeline summary", ""]
    for stage in (*STAGES, "promotion"):
        took = f" [{seconds[stage]:.0f} s]" if seconds and stage in seconds else ""
        lines.append(f"  {stage:<11}{took:>9}  {metrics.get(stage, 'not run yet')}")
    if seconds:
        lines.append(f"  {'total':<11}{sum(v for k, v in seconds.items() if k in STAGES):>7.0f} s"
                     "   (stage runs; process start-up not counted)")
    lines += [""]
    if report:
        lines.append(f"Report:     {report}   (one self-contained HTML page)")
    lines += [
        "Metrics:    dvc metrics show     Plots: dvc plots show (writes dvc_plots/index.html)",
        "MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   -> http://127.0.0.1:5000",
        "Prefect UI: .venv/bin/prefect server start   -> http://127.0.0.1:4200 (shows the flow runs above)",
        "Next:       .venv/bin/sslvision monitor data/demo/incoming/gaussian_noise_s3   (drift -> retrain)",
        "",
    ]
    return "\n".join(lines)


def latest_pipeline_seconds(root: str | Path = ".") -> dict[str, float]:
    """Wall time of each stage that ran in the latest pipeline run (the MLflow parent run the train
    flow opens; a stage's nested run, so its process start-up is not counted); {} when there is none."""
    import os

    import mlflow

    from sslvision import tracking

    cwd = os.getcwd()
    os.chdir(root)
    try:
        if tracking.tracking_uri().startswith("sqlite:") and not Path("mlflow.db").exists():
            return {}
        exp_id = tracking.setup()
        parents = mlflow.search_runs([exp_id], filter_string="tags.`sslvision.kind` = 'pipeline'",
                                     order_by=["start_time DESC"], max_results=1, output_format="list")
        if not parents:
            return {}
        children = mlflow.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'",
                                      output_format="list")
    finally:
        os.chdir(cwd)
    out: dict[str, float] = {}
    for run in children:
        stage = run.data.tags.get("sslvision.stage")
        if stage and run.info.end_time:
            out[stage] = out.get(stage, 0.0) + (run.info.end_time - run.info.start_time) / 1000
    return out
