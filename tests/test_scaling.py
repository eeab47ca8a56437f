"""Scaling out by configuration alone, as the README's "Scaling out" section runs it: stages logging to
an MLflow tracking server, the train deployment run by a Prefect server and a process work pool, DVC
outputs round-tripping through a remote, and the full fine-tune under torchrun. (Pretraining under
torchrun: tests/test_pretrain.py::test_two_process_ddp_on_cpu.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import servers
from tests.finetune_project import make_project
from tests.test_pipeline_flow import dvc_project, runs  # noqa: F401  (dvc_project is a fixture)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def _tiny_finetune_project(root: Path, **finetune) -> Path:
    make_project(root, head=100, test_per_class=10, finetune={"epochs": 3, **finetune})
    return root


# --- MLflow: a tracking server with a database backend ----------------------------------------------

@pytest.mark.slow  # the session's mlflow server takes 20-100 s to start on a busy 2-core machine
def test_finetune_stage_logs_and_registers_on_a_tracking_server(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    # thresholds that any model passes: the test is about the path, not the quality
    project = _tiny_finetune_project(tmp_path, registry={"enabled": True, "model_name": "scaling-classifier"},
                                     promotion={"min_balanced_accuracy": 0.0, "max_ece": 1.0,
                                                "beat_pixel_baseline": False})
    out = _run([sys.executable, str(REPO / "stages/finetune.py")], project,
               {"MLFLOW_TRACKING_URI": mlflow_server.url, "SSLVISION_EXPERIMENT": "scaling-mlflow"})
    assert "promotion: promoted" in out, out[-2000:]
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()

    client = MlflowClient(mlflow_server.url)
    found = client.search_runs([client.get_experiment_by_name("scaling-mlflow").experiment_id])
    assert {r.data.tags.get("sslvision.stage") for r in found} >= {"finetune", "promote"}
    (run,) = [r for r in found if r.data.tags.get("sslvision.stage") == "finetune"]
    local = json.loads((project / "reports/finetune/metrics.json").read_text())
    assert run.data.tags["sslvision.stage"] == "finetune"
    assert run.data.metrics["balanced_accuracy"] == pytest.approx(local["balanced_accuracy"])
    champion = client.get_model_version_by_alias("scaling-classifier", "champion")
    assert champion.run_id == run.info.run_id
    # the server stored the run in its database and the artifacts in its own directory
    assert mlflow_server.database.stat().st_size > 0
    assert list(mlflow_server.artifacts.rglob("classifier.safetensors"))
    assert list(mlflow_server.artifacts.rglob("confusion_matrix.png"))


# --- Prefect: a server, a process work pool and a worker --------------------------------------------

def _flow_run_id(output: str) -> str:
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow  # a Prefect server (12-30 s to start), a deploy, and a worker running the flow
def test_train_deployment_runs_on_a_work_pool_worker(dvc_project, mlflow_server, tmp_path_factory):  # noqa: F811
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("prefect-home")
    api = f"http://127.0.0.1:{servers.free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "SSLVISION_ROOT": str(REPO),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           # no scheduled monitor runs for the worker to pick up: this test runs train only
           "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    port = api.rsplit(":", 1)[1].split("/")[0]
    server = servers.start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                           f"{api}/health", env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        prefect = [str(BIN / "prefect"), "--no-prompt"]
        _run([*prefect, "work-pool", "create", "sslvision", "--type", "process"], REPO, env)
        _run([*prefect, "deploy", "--all"], REPO, env)
        monitor = _get(f"{api}/deployments/name/monitor/monitor")
        cron = yaml.safe_load((REPO / "params.yaml").read_text())["monitor"]["cron"]
        assert monitor["work_pool_name"] == "sslvision" and monitor["schedules"][0]["schedule"]["cron"] == cron

        flow_run = _flow_run_id(_run([*prefect, "deployment", "run", "train/train", "--param",
                                      f"root={dvc_project}"], REPO, env))
        # the flow's stages log to the MLflow server: configuration only, through the worker's environment
        _run([*prefect, "worker", "start", "--pool", "sslvision", "--run-once"], home,
             {**env, "MLFLOW_TRACKING_URI": mlflow_server.url, "SSLVISION_EXPERIMENT": "scaling-prefect"})
        state = _get(f"{api}/flow_runs/{flow_run}")
        assert state["state_type"] == "COMPLETED", state["state"]
        assert sorted(runs(dvc_project)) == ["first", "second", "side", "third"]
    finally:
        servers.stop(server)
    client = MlflowClient(mlflow_server.url)
    found = client.search_runs([client.get_experiment_by_name("scaling-prefect").experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("sslvision.kind") == "pipeline"]
    stages = {r.data.tags["sslvision.stage"]: r for r in found if "sslvision.stage" in r.data.tags}
    assert set(stages) == {"first", "second", "side", "third"}
    assert {r.data.tags["mlflow.parentRunId"] for r in stages.values()} == {parent.info.run_id}
    assert not (dvc_project / "mlflow.db").exists()


# --- DVC: a remote ---------------------------------------------------------------------------------

def _digests(root: Path, paths: list[str]) -> dict[str, str]:
    files = [f for p in paths for f in sorted((root / p).rglob("*") if (root / p).is_dir() else [root / p])]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def test_dvc_push_and_pull_through_a_remote(workdir, tmp_path_factory):
    dvc = str(BIN / "dvc")
    remote = tmp_path_factory.mktemp("dvc-remote")
    (workdir / "raw").mkdir()
    (workdir / "raw/images.bin").write_bytes(os.urandom(50_000))
    (workdir / "raw/labels.csv").write_text("id,label\n1,cat\n2,dog\n")
    (workdir / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"count": {
        "cmd": f"{sys.executable} -c \"import pathlib; pathlib.Path('counts.txt').write_text("
               f"str(len(pathlib.Path('raw/images.bin').read_bytes())))\"",
        "deps": ["raw/images.bin"], "outs": ["counts.txt"]}}}))
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "add", "-q", "raw"], [dvc, "repro", "-q"],
                [dvc, "remote", "add", "-d", "store", str(remote)], [dvc, "push"]):
        _run(cmd, workdir)
    before = _digests(workdir, ["raw", "counts.txt"])
    assert "in sync" in _run([dvc, "status", "--cloud"], workdir).lower()

    shutil.rmtree(workdir / ".dvc/cache")
    shutil.rmtree(workdir / "raw")
    (workdir / "counts.txt").unlink()
    _run([dvc, "pull"], workdir)
    assert _digests(workdir, ["raw", "counts.txt"]) == before
    assert "up to date" in _run([dvc, "status"], workdir).lower()


# --- torchrun: the full fine-tune on two processes -------------------------------------------------

@pytest.mark.slow  # two processes each import torch, timm and mlflow: 30-40 s on 2 cores
def test_full_finetune_stage_under_torchrun(workdir):
    from mlflow import MlflowClient

    project = _tiny_finetune_project(workdir, mode="finetune", batch_size=32, threads=1)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(REPO / "stages/finetune.py")], project, {"OMP_NUM_THREADS": "1"})
    assert out.count("finetune: test balanced accuracy") == 1  # rank 0 reports, rank 1 only trains
    metrics = json.loads((project / "reports/finetune/metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["balanced_accuracy"] > 0.3  # chance is 0.1
    assert (project / "models/classifier/classifier.safetensors").exists()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sslvision").experiment_id])  # rank 0's only
    assert run.data.metrics["world_size"] == 2


def test_linear_probe_refuses_torchrun(monkeypatch):
    import torch

    from sslvision.finetune import FinetuneParams, join_process_group

    assert join_process_group(FinetuneParams(mode="linear_probe"), torch.device("cpu"))[1:] == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="linear_probe .* without torchrun"):
        join_process_group(FinetuneParams(mode="linear_probe"), torch.device("cpu"))
