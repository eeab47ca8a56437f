"""The train and monitor flows on real DVC repos (temporary git repos) under Prefect's test harness, with real
MLflow: stage order, forced re-runs, gated promotion after a retrain, concurrent runs, deployment limits."""

import json
import subprocess
import sys
import textwrap

import pytest

from sslvision import pipeline

# A fake stage: concatenates its deps into NAME.out, appends its name to runs.log and its
# "name start end" interval to timeline.log, and logs an MLflow stage run. With HOLD_STAGE=name it
# waits for the file "release" before finishing (to hold the pipeline lock while a test acts).
STAGE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import mlflow
    from sslvision import tracking
    name, deps = sys.argv[1], sys.argv[2:]
    start = time.time()
    Path("started").write_text(name)
    if os.environ.get("HOLD_STAGE") == name:
        while not Path("release").exists() and time.time() < start + 120:
            time.sleep(0.05)
    text = "".join(Path(d).read_text() for d in deps)
    Path(f"{name}.out").write_text(text + name + "\\n")
    runs = Path("runs.log"); runs.write_text((runs.read_text() if runs.exists() else "") + name + "\\n")
    with tracking.stage_run(name, {"deps": deps}):
        mlflow.log_metric("length", len(text))
    with open("timeline.log", "a") as f:
        f.write(f"{name} {start} {time.time()}\\n")
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

    from sslvision.flows.train import train

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


def _intervals(root):
    rows = [line.split() for line in (root / "timeline.log").read_text().splitlines()]
    return sorted((float(start), float(end), name) for name, start, end in rows)


def test_concurrent_trains_one_runs_one_refused_one_waits(dvc_project, prefect_harness, monkeypatch):
    """While one train flow holds the project, a second with a short wait is refused with PipelineBusy
    (a failed flow run, nothing run) and a third waits for the lock, then finds everything up to date."""
    import threading
    import time

    from dvc.repo import Repo

    from sslvision.flows.train import train

    monkeypatch.setenv("HOLD_STAGE", "first")
    states = {}

    def start(name, **kwargs):
        thread = threading.Thread(target=lambda: states.__setitem__(
            name, train(root=str(dvc_project), return_state=True, **kwargs)))
        thread.start()
        return thread

    holder = start("holder", wait_s=0)
    deadline = time.time() + 120
    while not (dvc_project / "started").exists():  # the holder has the lock and runs its first stage
        assert time.time() < deadline and holder.is_alive(), states
        time.sleep(0.05)
    refused = train(root=str(dvc_project), wait_s=0.2, return_state=True)
    waiter = start("waiter", wait_s=300)
    time.sleep(2)  # let the waiter reach the lock before the holder finishes
    (dvc_project / "release").write_text("")
    holder.join(300)
    waiter.join(300)

    assert refused.is_failed()
    err = refused.result(raise_on_failure=False)
    assert isinstance(err, pipeline.PipelineBusy) and "another sslvision pipeline run" in str(err)
    assert states["holder"].is_completed() and all(states["holder"].result().values())
    assert states["waiter"].is_completed() and not any(states["waiter"].result().values())
    assert sorted(runs(dvc_project)) == ["first", "second", "side", "third"]  # each stage ran once
    spans = _intervals(dvc_project)
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(spans, spans[1:], strict=False))
    with Repo(str(dvc_project)) as repo:
        assert repo.status() == {}  # DVC's records match the workspace: nothing half-run


# The fake finetune stage: registers the classifier named in candidate.txt (a directory under
# candidates/) as the challenger, as the real stage registers the one it trained.
FINETUNE_STAGE = textwrap.dedent("""
    from pathlib import Path
    import numpy as np
    from sslvision import registry, tracking
    from sslvision.stages.finetune import load_params
    p = load_params("params.yaml")
    candidate = Path("candidate.txt").read_text().strip()
    example = np.load("data/ingested/images.npy", mmap_mode="r")[:3]
    with tracking.stage_run("finetune", {"candidate": candidate}):
        registry.log_and_register(Path("candidates") / candidate, p.registry.model_name, np.asarray(example))
    Path("finetune.out").write_text(candidate)
    with open("runs.log", "a") as f:
        f.write("finetune\\n")
""")
MODEL = "flow-classifier"


@pytest.fixture
def model_project(workdir):
    """A project whose drift_eval is real (tests/test_drift.py's tiny project: Fashion-MNIST images,
    a tiny encoder, its embeddings, a linear classifier) and whose dvc.yaml has instant stand-ins up
    to finetune; finetune registers candidates/<candidate.txt> (weak, strong or broken) as challenger."""
    import torch
    import yaml

    from sslvision.finetune import FinetuneParams, save_classifier, train_val_rows
    from sslvision.models import load_encoder
    from tests.test_drift import linear_classifier, tiny_project, unseen_images, with_noise, write_batch

    features = tiny_project(workdir)
    encoder = load_encoder(workdir / "models/encoder")
    train, _ = train_val_rows(FinetuneParams())
    few = train.groupby("label").head(2)  # 2 images per class: balanced accuracy ~0.25 against ~0.5
    candidates = {"weak": linear_classifier(encoder, features[few["index"]], few["label"]),
                  "strong": linear_classifier(encoder, features[train["index"]], train["label"])}
    broken = linear_classifier(encoder, features[train["index"]], train["label"])
    torch.manual_seed(1)
    torch.nn.init.normal_(broken.head.weight, std=1.0)
    candidates["broken"] = broken
    for name, classifier in candidates.items():
        save_classifier(workdir / "candidates" / name, classifier)

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params |= {"ingest": {"pool": "data/pool"},
               "monitor": {"inbox": "incoming", "reports": "reports/monitor"},
               "finetune": {"registry": {"model_name": MODEL, "auto_promote": False},
                            "promotion": {"min_balanced_accuracy": 0.2, "max_ece": 0.3, "min_improvement": 0.05,
                                          "worst_class_tolerance": 0.05}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))

    (workdir / "finetune_stage.py").write_text(FINETUNE_STAGE)
    (workdir / "raw.txt").write_text("raw\n")
    chain = [("ingest", "raw.txt"), ("pretrain", "ingest.out"), ("audit", "pretrain.out"),
             ("synthesize", "audit.out")]
    stages = {name: {"cmd": f"cat {dep} > {name}.out && echo {name} >> runs.log", "deps": [dep],
                     "outs": [f"{name}.out"]} for name, dep in chain}
    stages["finetune"] = {"cmd": f"{sys.executable} finetune_stage.py",
                          "deps": ["finetune_stage.py", "candidate.txt", "synthesize.out"], "outs": ["finetune.out"]}
    (workdir / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=workdir, check=True)

    for i, offset in enumerate((30000, 40000), start=1):
        write_batch(workdir / "incoming" / f"noisy_{i}", with_noise(unseen_images(offset), seed=i))
    return workdir


def _aliases():
    import mlflow

    return {a: str(v) for a, v in mlflow.MlflowClient().get_registered_model(MODEL).aliases.items()}


def test_monitor_refuses_a_worse_retrain_and_promotes_a_better_one(model_project, prefect_harness):
    """Drifted batch -> re-run from pretrain -> gated promotion: a worse challenger is refused (the
    champion stays, the refusal names the failed thresholds, the flow completes); a better one is promoted."""
    import json

    import mlflow

    from sslvision.flows.monitor import monitor
    from sslvision.flows.train import train

    root = str(model_project)
    (model_project / "candidate.txt").write_text("weak")
    ran = train(root=root, promote=True)
    assert all(ran.values()) and _aliases() == {"champion": "1"}  # the first model passes the absolute gates

    (model_project / "candidate.txt").write_text("broken")
    state = monitor(batch=str(model_project / "incoming/noisy_1"), root=root, return_state=True)
    assert state.is_completed(), state  # a refusal is an outcome, not a crash
    (outcome,) = state.result()
    assert outcome["decision"]["stage"] == "pretrain" and outcome["joined_pool"].endswith("noisy_1")
    assert outcome["ran"] == {"ingest": False, "pretrain": True, "audit": True, "synthesize": True,
                              "finetune": True}
    refusal = outcome["promotion"]
    assert refusal["decision"] == "refused" and refusal["challenger"] == "2" and refusal["champion"] == "1"
    assert {"balanced_accuracy", "ece"} <= set(refusal["failed"])
    assert "threshold check failed" in refusal["failed"]["balanced_accuracy"]
    assert _aliases() == {"champion": "1", "challenger": "2"}
    saved = json.loads((model_project / "reports/monitor/noisy_1/decision.json").read_text())
    assert saved["promotion"]["decision"] == "refused" and saved["decision"]["stage"] == "pretrain"
    tags = mlflow.MlflowClient().get_model_version(MODEL, "2").tags
    assert tags["sslvision.promotion"].startswith("refused: ") and "balanced_accuracy" in tags["sslvision.promotion"]

    (model_project / "candidate.txt").write_text("strong")
    (outcome,) = monitor(batch=str(model_project / "incoming/noisy_2"), root=root)
    assert outcome["decision"]["stage"] == "pretrain" and outcome["ran"]["finetune"]
    promoted = outcome["promotion"]
    assert promoted["decision"] == "promoted" and promoted["challenger"] == "3", promoted
    challenger, champion = promoted["challenger_metrics"], promoted["champion_metrics"]
    assert challenger["balanced_accuracy"] >= champion["balanced_accuracy"] + 0.05
    assert _aliases() == {"champion": "3", "previous": "1"}
    assert runs(model_project).count("pretrain") == 3 and runs(model_project).count("ingest") == 1


def test_two_monitors_at_once_act_on_a_batch_once(model_project, prefect_harness):
    """Two monitor runs started together on the same inbox: one evaluates the batch, re-runs the stages
    and promotes; the other waits for the project lock, then finds the batch processed. Both complete."""
    import shutil
    import threading

    import mlflow
    from dvc.repo import Repo

    from sslvision.flows.monitor import monitor

    shutil.rmtree(model_project / "incoming/noisy_2")
    (model_project / "candidate.txt").write_text("strong")
    states = {}
    threads = [threading.Thread(target=lambda i=i: states.__setitem__(
        i, monitor(root=str(model_project), return_state=True))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)

    assert all(s.is_completed() for s in states.values()), states
    acted, idle = sorted((s.result() for s in states.values()), key=len, reverse=True)
    assert idle == [] and len(acted) == 1
    assert acted[0]["decision"]["stage"] == "pretrain" and all(acted[0]["ran"].values())
    assert acted[0]["promotion"]["decision"] == "promoted"
    assert sorted(runs(model_project)) == ["audit", "finetune", "ingest", "pretrain", "synthesize"]
    drift_runs = mlflow.search_runs(experiment_names=["sslvision"],
                                    filter_string="tags.`sslvision.stage` = 'drift_eval'")
    assert len(drift_runs) == 1
    assert json.loads((model_project / "reports/monitor/processed.json").read_text()) == ["noisy_1"]
    with Repo(str(model_project)) as repo:
        assert repo.status() == {}


def test_promotion_after_a_stage_that_auto_promotes_is_its_decision(workdir):
    """With finetune.registry.auto_promote the finetune stage ran the gate: the flows report its
    decision rather than gating the same challenger twice (MLflow is not touched)."""
    import yaml

    from sslvision.flows.train import promote_challenger

    (workdir / "params.yaml").write_text(yaml.safe_dump({"finetune": {"registry": {"auto_promote": True}}}))
    decision = {"decision": "refused", "challenger": "4", "champion": "3", "failed": {"ece": "too high"}}
    (workdir / "reports/finetune").mkdir(parents=True)
    (workdir / "reports/finetune/promotion.json").write_text(json.dumps(decision))
    assert promote_challenger.fn(str(workdir)) == decision
    assert not (workdir / "mlflow.db").exists()


def test_deployments_allow_one_run_at_a_time(prefect_harness):
    """The served deployments and prefect.yaml's both carry a concurrency limit of 1, and the Prefect
    API stores it as the deployment's concurrency limit."""
    from pathlib import Path

    import yaml
    from prefect.client.orchestration import get_client

    from sslvision.flows.deployments import build_deployments

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    assert {d["name"]: d["concurrency_limit"] for d in spec["deployments"]} == {"monitor": 1, "train": 1}
    deployments = build_deployments("0 * * * *")
    assert {d.name: d.concurrency_limit for d in deployments} == {"monitor": 1, "train": 1}
    with get_client(sync_client=True) as client:
        for d in deployments:
            deployment_id = d.apply()
            try:
                stored = client.read_deployment(deployment_id)
            finally:  # the train deployment's trigger must not react to later tests' events
                client.delete_deployment(deployment_id)
            assert stored.global_concurrency_limit is not None and stored.global_concurrency_limit.limit == 1, d.name
