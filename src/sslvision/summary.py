"""The closing summary of a pipeline run (``sslvision summary``, printed at the end of ``make demo``).

Reads only what the stages wrote (``reports/<stage>/metrics.json``, ``reports/finetune/promotion.json``,
``reports/drift/trigger.json``) and, when given, the stage wall times of the run; a stage that has not
run yet is shown as such. Then says where the report is and how to open the MLflow and Prefect UIs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sslvision.stages import STAGES


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
                        "reports/audit/gallery.png"
                        + ("; LABELS KEPT: " + m["actions_withheld"] if m.get("actions_withheld") else ""))
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
                                f"{_pct(a.get('balanced_accuracy_without'))} -> "
                                f"{_pct(a.get('balanced_accuracy_with', m.get('balanced_accuracy')))}"
                                + (f" (test); deployed {a['kept']} them (validation)" if a.get("kept") else ""))
        b = (m.get("baselines") or {}).get("pixel_logreg")
        if b:
            gain = 100 * (m.get("balanced_accuracy", 0) - b.get("balanced_accuracy", 0))
            out["baseline"] = (f"classifier {_pct(m.get('balanced_accuracy'))} (worst {m.get('worst_class')} "
                               f"{_pct(m.get('worst_class_recall'))}) vs pixel logistic regression "
                               f"{_pct(b.get('balanced_accuracy'))} (worst {b.get('worst_class')} "
                               f"{_pct(b.get('worst_class_recall'))}): {gain:+.1f} points"
                               + ("" if gain > 0 else ", NOT BETTER than the pixel baseline"))
        le = m.get("label_efficiency")
        if isinstance(le, dict) and isinstance(le.get("systems"), dict) and le.get("labels_per_class"):
            ns, by = le["labels_per_class"], le["systems"]

            def curve(system: str) -> str:
                return "/".join(_pct((by.get(system, {}).get(str(n)) or {}).get("mean")) for n in ns)

            out["few labels"] = (f"{'/'.join(map(str, ns))} labels per class: SSL probe {curve('ssl_linear_probe')}, "
                                 f"pixels {curve('pixel_logreg')}")
        sl, rw = m.get("slices"), m.get("slice_reweight")
        if sl or rw:
            top = (f" (worst {sl['top_label']}, {sl.get('top_size')} images, error {_pct(sl.get('top_error'))} vs "
                   f"{_pct(sl.get('top_class_error'))} for their classes)" if sl and sl.get("top_label") else "")
            out["slices"] = (f"{sl.get('found', 0)} found{top}, worst-slice accuracy "
                             f"{_pct(sl.get('worst_slice_accuracy'))}; reports/finetune/slices.png"
                             if sl else "slice discovery off")
            if rw:
                out["slices"] += f"; slice_reweight {rw.get('decision')}: {rw.get('reason')}"
    p = _load(reports / "finetune" / "promotion.json")
    if p:
        decision = p.get("decision", "?")
        line = f"{p.get('model')} v{p.get('challenger')}: {decision}"
        if decision == "promoted":
            line += f" -> champion v{p.get('champion')}"
        elif p.get("failed"):
            line += ": " + "; ".join(map(str, p["failed"]))
            pixel = (p.get("pixel_baseline") or {}).get("balanced_accuracy")
            if "pixel_baseline" in p["failed"] and isinstance(pixel, int | float):
                line += (f" (balanced accuracy {_pct((p.get('challenger_metrics') or {}).get('balanced_accuracy'))} "
                         f"on the golden set, pixel baseline {_pct(pixel)}): champion "
                         + (f"stays v{p['champion']}" if p.get("champion") else "none: nothing is deployed"))
        out["promotion"] = line
    t = _load(reports / "drift" / "trigger.json")
    if t and t.get("skipped"):
        out["drift_eval"] = "no production batch yet (drift_eval.batch is empty): nothing evaluated"
    elif t:
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
        for extra in ("baseline", "few labels", "slices"):
            if stage == "finetune" and extra in metrics:
                lines.append(f"  {extra:<11}{'':>9}  {metrics[extra]}")
    if seconds:
        lines.append(f"  {'total':<11}{sum(v for k, v in seconds.items() if k in STAGES):>7.0f} s"
                     "   (stage runs; process start-up not counted)")
    lines += [""]
    if report:
        lines.append(f"Report:     {report}   (one self-contained HTML page)")
    bin_ = ".venv/bin/" if (Path(root) / ".venv" / "bin").is_dir() else ""  # the demo's venv, else on PATH
    lines += [
        "Metrics:    dvc metrics show     Plots: dvc plots show (writes dvc_plots/index.html)",
        f"MLflow UI:  {bin_}mlflow ui --backend-store-uri sqlite:///mlflow.db   -> http://127.0.0.1:5000",
        f"Prefect UI: {bin_}prefect server start   -> http://127.0.0.1:4200 (shows the flow runs above)",
        f"Next:       {next_step(root, bin_)}",
        "",
    ]
    return "\n".join(lines)


# The demo scenario's showcase batch: drifted enough that the monitor retrains from pretrain.
DEMO_BATCH = "gaussian_noise_s3"


def next_step(root: str | Path = ".", bin_: str = "") -> str:
    """What to run next: ``sslvision monitor`` on a batch that is in the project's inbox (``monitor.inbox``;
    the demo's drifted showcase batch when it is there, else the first batch by name), or, with no batch
    yet, how to make one."""
    from sslvision.params import ParamsError, read_params

    try:
        inbox = (read_params(Path(root) / "params.yaml").get("monitor") or {}).get("inbox")
    except ParamsError:
        inbox = None
    if not isinstance(inbox, str) or not inbox:
        return f"put a production batch in the monitor inbox (params.yaml monitor.inbox), then: {bin_}sslvision monitor"
    inbox = Path(inbox)
    where = Path(root) / inbox
    batches = sorted(b.name for b in where.iterdir() if b.is_dir() and not b.name.startswith(".")) \
        if where.is_dir() else []
    if batches:
        batch = DEMO_BATCH if DEMO_BATCH in batches else batches[0]
        why = "(drift -> retrain)" if batch == DEMO_BATCH else "(evaluates it; on degradation re-runs what failed)"
        return f"{bin_}sslvision monitor {(inbox / batch).as_posix()}   {why}"
    return (f"put a production batch in {inbox.as_posix()}/ (a directory of images; class subdirectories if "
            f"labelled), then: {bin_}sslvision monitor")


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
