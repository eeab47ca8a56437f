"""How ``sslvision run`` fails: a failed stage ends the run with its cause as the first line on stderr (the
stage's own error line, not DVC's "failed to reproduce" after hundreds of lines of logs and tracebacks),
and only failures that may pass on their own (DVC's lock busy) are retried."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from sslvision import pipeline
from tests.test_faults import ingest_project, migrated_mlflow_db  # noqa: F401 - the fixtures

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_retry_condition_retries_dvc_lock_busy_and_not_a_failed_stage():
    from dvc.lock import LockError
    from prefect.states import Failed

    from sslvision.flows.train import _transient

    assert _transient(None, None, Failed(data=LockError("Unable to acquire lock")))
    assert not _transient(None, None, Failed(data=pipeline.StageFailed("stage ingest failed: bad input")))


def test_stage_error_prefers_the_stage_scripts_line_and_else_names_the_crash():
    said = b"INFO loading\ningest: error: params.yaml: ingest.size: too big\n"
    assert pipeline.stage_error("ingest", said, "exited with 1") == "params.yaml: ingest.size: too big"
    crash = b"Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom\n"
    assert pipeline.stage_error("audit", crash, "failed to run: python stages/audit.py, exited with 1") == (
        "RuntimeError: boom (failed to run: python stages/audit.py, exited with 1)")


def test_sslvision_run_prints_a_failed_stages_cause_first(ingest_project, prefect_harness):  # noqa: F811
    """The real ingest stage under real DVC and Prefect, with a bad ``ingest.size``."""
    from prefect.settings import PREFECT_API_URL

    root = ingest_project
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["ingest"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": stage}}, sort_keys=False))
    for dep in stage["deps"]:
        if dep.endswith(".py"):
            (root / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / dep, root / dep)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["size"] = -3
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True)

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.run([str(BIN / "sslvision"), "run", "--root", str(root), "--no-summary"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=240)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[0] == "error: stage ingest failed: params.yaml: ingest.size: Input should be greater than 0 (got -3)"
    assert len(lines) < 5 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    log = Path(lines[1].removeprefix("the run's log: "))  # the whole story is kept for whoever needs it
    assert "ingest: error: params.yaml: ingest.size" in log.read_text()
    log.unlink()
