import os

import pytest

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
