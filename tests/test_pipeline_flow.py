"""The train flow on a real DVC repo (temporary git repo) under Prefect's test harness, with MLflow."""

import subprocess
import sys
import textwrap

import pytest

from sslvision import pipeline

STAGE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import mlflow
    from sslvision import tracking
    name, deps = sys.argv[1], sys.argv[2:]
    text = "".join(Path(d).read_text() for d in deps)
    Path(f"{name}.out").write_text(text + name + "\\n")
    runs = Path("runs.log"); runs.write_text((runs.read_text() if runs.exists() else "") + name + "\\n")
    with tracking.stage_run(name, {"deps": deps}):
        mlflow.log_metric("length", len(text))
""")


@pytest.fixture
def dvc_project(workdir):
    (workdir / "stage.py").write_text(STAGE_SCRIPT)
    (workdir / "raw.txt").write_text("raw\n")
    (workdir / "dvc.yaml").write_text(textwrap.dedent(f"""
        stages:
          first:
            cmd: {sys.executable} stage.py first raw.txt
            deps: [stage.py, raw.txt]
            outs: [first.out]
          second:
            cmd: {sys.executable} stage.py second first.out
            deps: [first.out]
            outs: [second.out]
          side:
            cmd: {sys.executable} stage.py side raw.txt
            deps: [raw.txt]
            outs: [side.out]
          third:
            cmd: {sys.executable} stage.py third second.out
            deps: [second.out]
            outs: [third.out]
    """))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=workdir, check=True)
    return workdir


def runs(root):
    log = root / "runs.log"
    return log.read_text().split() if log.exists() else []


def test_stage_order_and_downstream(dvc_project):
    order = pipeline.stage_order(dvc_project)
    assert order.index("first") < order.index("second") < order.index("third")
    assert set(order) == {"first", "second", "side", "third"}
    assert pipeline.downstream_of("second", dvc_project) == ["second", "third"]
    with pytest.raises(ValueError, match="no stage 'nope'"):
        pipeline.downstream_of("nope", dvc_project)


def test_lock_refuses_a_second_run_cleanly(dvc_project):
    with pipeline.pipeline_lock(dvc_project):
        with pytest.raises(pipeline.PipelineBusy, match="another sslvision pipeline run"):
            with pipeline.pipeline_lock(dvc_project, wait_s=0.2):
                pass


def test_train_flow_runs_then_skips_then_forces_downstream(dvc_project, prefect_harness):
    import mlflow

    from pipelines.train import train

    ran = train(root=str(dvc_project))
    assert all(ran.values()) and sorted(runs(dvc_project)) == ["first", "second", "side", "third"]

    ran = train(root=str(dvc_project))
    assert not any(ran.values()), "an up-to-date pipeline must not re-run anything"

    ran = train(from_stage="second", root=str(dvc_project))
    assert {s for s, r in ran.items() if r} == {"second", "third"}
    assert runs(dvc_project)[4:] == ["second", "third"]

    # every stage run is nested under its pipeline's parent run
    stage_runs = mlflow.search_runs(experiment_names=["sslvision"], filter_string="tags.`sslvision.stage` = 'third'")
    parents = set(stage_runs["tags.mlflow.parentRunId"])
    pipelines_ = mlflow.search_runs(experiment_names=["sslvision"], filter_string="tags.`sslvision.kind` = 'pipeline'")
    assert len(stage_runs) == 2 and parents <= set(pipelines_["run_id"])
