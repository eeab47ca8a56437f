"""Process-level faults (bad input is in tests/test_faults_inputs.py):

- a real stage process killed with SIGKILL in the middle of writing leaves its previous outputs whole
  (every file under its final name is the old or the new version, never half of one), and running it
  again gives exactly what an uninterrupted run gives and cleans up the dead process's temporary files;
- a full disk, a file-size limit, a read-only file system or a file where a directory is needed stop the
  CLI and the stage scripts with one line naming the path and the problem, leaving no partial file;
- two ``sslvision run`` processes started together: one runs, the other is refused with PipelineBusy, and
  DVC and MLflow are left consistent. (The flow-level version, with a waiter, is in
  tests/test_pipeline_flow.py; tests/test_pretrain.py resumes after an in-process interruption.)
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from sslvision import ingest
from sslvision.cli import app
from tests.test_pipeline_flow import dvc_project  # noqa: F401 - the fixture
from tests.test_pretrain import params as pretrain_params
from tests.test_pretrain import write_ingested

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUTPUTS = ["images.npy", "images.parquet", "ssl_pool.parquet", "eval_labels.parquet", "manifest.parquet",
           "classes.json", "quarantine.parquet", "duplicates.parquet"]

# Runs a stage script, but SIGKILLs the process at a chosen instant: right after the temporary file of
# the n-th atomic write of a given output is complete and before it is renamed (the worst moment for
# atomicity), or, for "decoding", once ingest has decoded half of the images into its partial array.
KILLER = textwrap.dedent("""
    import contextlib, os, runpy, signal, sys
    from pathlib import Path
    from sslvision import io, ingest
    target, nth, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real_atomic, real_progress, seen = io.atomic_path, ingest._progress, []

    def die():
        sys.stdout.flush(); sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def atomic_path(path, suffix=None):
        with real_atomic(path, suffix) as tmp:
            yield tmp
            if Path(path).name == target:
                seen.append(path)
                if len(seen) == nth:
                    die()

    def progress(done, total, state):
        real_progress(done, total, state)
        if target == "decoding" and done >= total // 2:
            die()

    io.atomic_path, ingest._progress = atomic_path, progress
    sys.argv = [script]
    runpy.run_path(script, run_name="__main__")
""")


def _run(args: list[str], cwd: Path, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _kill_during(cwd: Path, stage: str, target: str, nth: int = 1) -> subprocess.CompletedProcess:
    (cwd / "killer.py").write_text(KILLER)
    proc = _run([sys.executable, "killer.py", target, str(nth), str(REPO / "stages" / f"{stage}.py")], cwd)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in OUTPUTS if (directory / name).exists()}


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its tables made: creating them costs seconds per project."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def ingest_project(workdir, migrated_mlflow_db):
    """A project with 240 tiny PNGs in an ImageFolder (train/test, 2 classes) and its params.yaml."""
    shutil.copy(migrated_mlflow_db, workdir / "mlflow.db")
    rng = np.random.default_rng(0)
    for i in range(240):
        split = "test" if i % 6 == 0 else "train"
        _png(workdir / f"data/raw/{split}/{'ab'[i % 2]}/{i:03d}.png", rng.integers(0, 256, (20, 20), np.uint8))
    (workdir / "data/pool").mkdir()
    section = {"source": "data/raw", "pool": "data/pool", "workers": 1, "chunk_size": 16, "size": 28,
               "cache_dir": "data/.ingest_cache"}
    (workdir / "params.yaml").write_text(yaml.safe_dump({"ingest": section}))
    return workdir


def test_ingest_killed_mid_write_keeps_whole_files_and_the_rerun_equals_a_clean_run(ingest_project):
    root, out = ingest_project, ingest_project / "data/ingested"
    p = ingest.IngestParams(**yaml.safe_load((root / "params.yaml").read_text())["ingest"])
    ingest.run_ingest(p, root / "data/raw", out, root / "data/pool")
    old = _snapshot(out)
    rng = np.random.default_rng(1)  # new data arrives: the next run rewrites every output
    for i in range(60):
        _png(root / f"data/raw/train/b/new{i:02d}.png", rng.integers(0, 256, (20, 20), np.uint8))
    ingest.run_ingest(p.model_copy(update={"cache_dir": ""}), root / "data/raw", root / "reference", root / "data/pool")
    new = _snapshot(root / "reference")
    assert all(old[n] != new[n] for n in ("images.npy", "manifest.parquet", "images.parquet"))

    # killed while decoding into its partial array: every output is still the previous one
    _kill_during(root, "ingest", "decoding")
    assert _snapshot(out) == old
    assert any(name.endswith(".partial.npy") for name in _hidden(out)), "the kill was not mid-write"

    # killed with manifest.parquet's new version complete on disk but not yet renamed
    _kill_during(root, "ingest", "manifest.parquet")
    now = _snapshot(out)
    assert now.keys() == old.keys()
    assert all(now[n] in (old[n], new[n]) for n in OUTPUTS), "a half-written file under its final name"
    assert now["images.npy"] == new["images.npy"] and now["manifest.parquet"] == old["manifest.parquet"]
    assert any(name.startswith(".manifest.parquet.") for name in _hidden(out))

    rerun = _run([sys.executable, str(REPO / "stages/ingest.py")], root)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _snapshot(out) == new
    assert _hidden(out) == [], "the killed processes' temporary files must be cleaned up by the rerun"


def test_pretrain_killed_while_checkpointing_resumes_to_the_uninterrupted_weights(workdir, caplog,
                                                                                  migrated_mlflow_db):
    import mlflow

    from sslvision.models import load_encoder
    from sslvision.pretrain import train
    from sslvision.stages.pretrain import pretrain_cli, read_inputs

    shutil.copy(migrated_mlflow_db, workdir / "mlflow.db")
    ingested = write_ingested(workdir / "data/ingested", n_train=32, n_test=40, n_pool=0)
    p = pretrain_params(epochs=2, checkpoint_every=1, checkpoint_dir="checkpoints/pretrain", knn_k=5)
    (workdir / "params.yaml").write_text(yaml.safe_dump({"pretrain": p.model_dump(by_alias=True)}))
    ckpt = workdir / "checkpoints/pretrain/last.pt"

    _kill_during(workdir, "pretrain", "last.pt", nth=3)  # 2 steps per epoch: dies writing step 3's checkpoint
    assert torch.load(ckpt, weights_only=True)["step"] == 2, "the last complete checkpoint must survive"
    assert any(n.startswith(".last.pt.") for n in _hidden(ckpt.parent)), "the kill was not mid-write"
    assert not (workdir / "models/encoder").exists()

    torch.set_num_threads(1)
    inputs = read_inputs(ingested)
    reference = train(p.model_copy(update={"checkpoint_dir": str(workdir / "ck_reference")}), inputs.images_path,
                      inputs.train_rows, progress=False)
    caplog.set_level(logging.INFO, logger="sslvision.pretrain")
    try:
        pretrain_cli(params=workdir / "params.yaml", ingested=ingested)  # the rerun, in this process
    finally:
        mlflow.disable_system_metrics_logging()  # pretrain_cli turns it on process-wide
    assert "resuming from checkpoints/pretrain/last.pt at step 2/4" in caplog.text
    resumed = load_encoder(workdir / "models/encoder").state_dict()
    for name, value in reference.encoder.state_dict().items():
        assert torch.allclose(value.float(), resumed[name].float(), atol=1e-5), name
    assert _hidden(ckpt.parent) == [], "the rerun must remove the killed process's temporary checkpoint"


# --- unwritable outputs ------------------------------------------------------------------------


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()})")


@pytest.fixture
def mounts():
    mounted: list[Path] = []
    yield lambda point, *args: (_mount(*args, str(point)), mounted.append(point))
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def _one_error_line(stderr: str, prefix: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("case", ["parent is a file", "read-only", "disk full"])
def test_cli_reports_an_unwritable_output_in_one_line_and_leaves_nothing(ingest_project, mounts, case):
    root = ingest_project
    if case == "parent is a file":
        (root / "blocker").write_text("a file, not a directory")
        out, problem = root / "blocker/ingested", "a parent of it is a file, not a directory"
    elif case == "read-only":
        (root / "ro").mkdir()
        mounts(root / "ro", "--bind", "-o", "ro", str(root / "ro"))
        out, problem = root / "ro/ingested", "read-only file system"
    else:
        (root / "full").mkdir()
        mounts(root / "full", "-t", "tmpfs", "-o", "size=64k", "tmpfs")
        out, problem = root / "full/ingested", "no space left on the device"
    command = ["ingest", "data/raw", "--out", str(out)]
    if case == "disk full":  # in a subprocess: writing a memory map to a full disk used to die of SIGBUS
        proc = _run([str(BIN / "sslvision"), *command], root)
        code, said = proc.returncode, proc.stderr
    else:
        result = CliRunner().invoke(app, command)
        code, said = result.exit_code, result.output
    assert code == 2, said[-3000:]
    line = _one_error_line(said, "error:")
    assert str(out) in line and problem in line, line
    assert not out.exists() or list(out.rglob("*")) == [], "a partial output was left behind"


def test_stage_reports_the_file_size_limit_in_one_line(ingest_project):
    """EFBIG (``ulimit -f``) while the stage script writes images.npy: one line, no partial file."""
    root = ingest_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"].update(size=64, channels=3)  # images.npy: 240 x 64 x 64 x 3 = 2.9 MB
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    limit = 2 * 1024 * 1024  # room for MLflow's database (~1 MB), not for the images

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _run([sys.executable, str(REPO / "stages/ingest.py")], root, preexec_fn=cap)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr, "ingest: error:")
    assert "cannot write data/ingested/images.npy: file too large" in line, line
    assert list((root / "data/ingested").rglob("*")) == []


# --- two pipeline runs at once -----------------------------------------------------------------

# Prepended to the fake stage script: the `first` stage holds the pipeline until the test says go.
HOLD = textwrap.dedent("""
    import sys as _sys, time as _time
    from pathlib import Path as _Path
    if _sys.argv[1] == "first":
        _until = _time.time() + 120
        while not _Path("first.go").exists() and _time.time() < _until:
            _time.sleep(0.05)
""")


def test_two_cli_runs_at_once_one_runs_one_is_refused_and_state_stays_consistent(
        dvc_project, prefect_harness, migrated_mlflow_db):  # noqa: F811 - the imported fixture
    import mlflow
    from dvc.repo import Repo
    from prefect.settings import PREFECT_API_URL

    root = dvc_project
    shutil.copy(migrated_mlflow_db, root / "mlflow.db")
    (root / "stage.py").write_text(HOLD + (root / "stage.py").read_text())
    dag = yaml.safe_load((root / "dvc.yaml").read_text())  # first -> second is enough here (each stage
    dag["stages"] = {k: v for k, v in dag["stages"].items() if k in ("first", "second")}  # costs seconds)
    (root / "dvc.yaml").write_text(yaml.safe_dump(dag))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's Prefect server
    command = [str(BIN / "sslvision"), "run", "--root", str(root), "--wait", "0"]
    procs = [subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        deadline = time.time() + 240
        while not any(p.poll() is not None for p in procs):  # the holder is stuck in `first` until "go"
            assert time.time() < deadline, "neither run was refused"
            time.sleep(0.1)
        refused = next(p for p in procs if p.poll() is not None)
        (root / "first.go").write_text("")
        holder = next(p for p in procs if p is not refused)
        out, err = holder.communicate(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    refused_err = refused.stderr.read()
    assert refused.returncode == 2, refused_err[-3000:]
    line = _one_error_line(refused_err, "error:")
    assert "another sslvision pipeline run holds" in line and ".sslvision-pipeline.lock" in line, line
    assert holder.returncode == 0, err[-3000:]
    assert all(f"{s:12s} ran" in out for s in ("first", "second")), out

    # DVC: up to date, each stage ran once, outputs as the stages define them
    with Repo(str(root)) as repo:
        assert repo.status() == {}
    assert (root / "runs.log").read_text().split() == ["first", "second"]
    assert (root / "second.out").read_text() == "raw\nfirst\nsecond\n"
    # MLflow: the store opens; one pipeline run (the refused process made none) with its 2 stage runs
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["sslvision"])
    pipelines = runs[runs["tags.sslvision.kind"] == "pipeline"]
    stages = runs[runs["tags.sslvision.stage"].notna()]
    assert len(pipelines) == 1 and len(runs) == 3 and set(runs["status"]) == {"FINISHED"}
    assert set(stages["tags.mlflow.parentRunId"]) == set(pipelines["run_id"])
    assert sorted(stages["tags.sslvision.stage"]) == ["first", "second"]
