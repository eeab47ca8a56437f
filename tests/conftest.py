import os

import pytest

# Keep every test on the embedded defaults and off the user's stores.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("SSLVISION_PARENT_RUN_ID", None)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch project directory as the working directory (MLflow's SQLite store lands here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
