import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from tests import servers

# Keep every test on the embedded defaults and off the user's stores.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("SSLVISION_PARENT_RUN_ID", None)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _own_mlflow_store(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; one test's store must not leak into the next
    test's stage subprocesses."""
    for name in ("MLFLOW_TRACKING_URI", "_SSLVISION_DEFAULT_TRACKING_URI", "SSLVISION_PARENT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch project directory as the working directory (MLflow's SQLite store lands here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def prefect_harness():
    """One real (temporary) Prefect API for the whole session; starting one costs ~10 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class MlflowServer(NamedTuple):
    url: str
    database: Path
    artifacts: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One ``mlflow server`` on loopback for the session: a SQLite database as the backend store,
    artifacts proxied by the server into a directory. Starting one (fresh database, uvicorn) takes
    20-100 s on a busy 2-core machine."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(f"http://127.0.0.1:{servers.free_port()}", root / "mlflow.db", root / "artifacts")
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
           "--port", server.url.rsplit(":", 1)[1], "--workers", "1",
           "--backend-store-uri", f"sqlite:///{server.database}", "--artifacts-destination", str(server.artifacts)]
    proc = servers.start(cmd, f"{server.url}/health", cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield server
    finally:
        servers.stop(proc)
