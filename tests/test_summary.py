"""The closing summary of `make demo` / `sslvision run`: key metrics from the stage files, stage times
from the latest pipeline run in a real MLflow (SQLite) store."""

import json
import os

from typer.testing import CliRunner

from sslvision import summary, tracking
from sslvision.cli import app


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_nothing_run_yet(workdir):
    text = summary.render(workdir)
    for stage in summary.STAGES:
        assert f"{stage}" in text
    assert text.count("not run yet") == len(summary.STAGES) + 1  # + promotion
    assert "mlflow ui" in text and "prefect server start" in text
    assert summary.latest_pipeline_seconds(workdir) == {}
    assert not (workdir / "mlflow.db").exists()


def test_metrics_promotion_and_drift_decision(workdir):
    r = workdir / "reports"
    write(r / "finetune" / "metrics.json", {"balanced_accuracy": 0.6123, "worst_class": "6_shirt",
                                           "worst_class_recall": 0.25, "ece": 0.04,
                                           "synthetic_ablation": {"tail_recall": 0.794, "tail_recall_without": 0.811,
                                                                  "balanced_accuracy_without": 0.626}})
    write(r / "finetune" / "promotion.json", {"model": "m", "challenger": "3", "decision": "refused",
                                             "failed": ["balanced_accuracy 0.61 < 0.70"]})
    write(r / "drift" / "trigger.json", {"batch": "data/x/jpeg_s3", "failed": ["accuracy", "embedding_mmd_pvalue"],
                                        "metrics": {"accuracy": {"stage": "finetune"},
                                                    "embedding_mmd_pvalue": {"stage": "pretrain"}}})
    text = summary.render(workdir)
    assert "balanced accuracy 61.2%, worst class 6_shirt 25.0%, ECE 0.040" in text
    assert "synthetic images: tail recall 81.1% -> 79.4%, balanced accuracy 62.6% -> 61.2%" in " ".join(text.split())
    assert "m v3: refused: balanced_accuracy 0.61 < 0.70" in text
    assert "jpeg_s3: degraded (accuracy, embedding_mmd_pvalue) -> re-run from pretrain" in text
    assert "ingest" in text and "not run yet" in text
    # the ablation deployed the run without them: its "with" numbers are its own, not the deployed model's
    write(r / "finetune" / "metrics.json", {"balanced_accuracy": 0.626, "synthetic_ablation": {
        "kept": "without", "balanced_accuracy_with": 0.612, "balanced_accuracy_without": 0.626}})
    assert "balanced accuracy 62.6% -> 61.2% (test); deployed without them (validation)" in " ".join(
        summary.render(workdir).split())


def test_stage_times_of_the_latest_pipeline_run(workdir):
    import mlflow

    exp = tracking.setup()
    client = mlflow.MlflowClient()
    for name, stages in (("old", ["ingest"]), ("new", ["audit", "finetune"])):
        # as the train flow: a parent run, each stage's run (a separate process there) nested under it
        parent = client.create_run(exp, run_name=name, tags={"sslvision.kind": "pipeline"})
        os.environ[tracking.PARENT_ENV] = parent.info.run_id
        try:
            for stage in stages:
                with tracking.stage_run(stage):
                    pass
        finally:
            os.environ.pop(tracking.PARENT_ENV)
            client.set_terminated(parent.info.run_id)
    seconds = summary.latest_pipeline_seconds(workdir)
    assert set(seconds) == {"audit", "finetune"} and all(v >= 0 for v in seconds.values())
    out = CliRunner().invoke(app, ["summary", "--root", str(workdir)])
    assert out.exit_code == 0, out.output
    assert "[" in out.output.split("audit", 1)[1].splitlines()[0]  # the audit line shows its time
    assert "total" in out.output
