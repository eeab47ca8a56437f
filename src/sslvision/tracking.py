"""MLflow tracking with embedded defaults.

Default store: a SQLite file ``mlflow.db`` in the project (the working directory), artifacts under
``mlartifacts/``; ``MLFLOW_TRACKING_URI`` points everything at a tracking server instead. MLflow stores
artifact locations as absolute ``file:`` URIs, so a moved or copied project's store still points at the
old directory: :func:`setup` notices and moves those locations to the project's new place. A pipeline
run (Prefect flow) opens a parent run and exports its id as ``SSLVISION_PARENT_RUN_ID``; every stage
run started here then becomes its nested child, even from a separate ``dvc repro`` process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

log = logging.getLogger(__name__)

EXPERIMENT = os.environ.get("SSLVISION_EXPERIMENT", "sslvision")
PARENT_ENV = "SSLVISION_PARENT_RUN_ID"
# MLflow draws a progress bar per artifact download (a registered model is ~60 files): noise in stage logs
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


_DEFAULT_MARK = "_SSLVISION_DEFAULT_TRACKING_URI"


def _user_uri() -> str | None:
    """The user's ``MLFLOW_TRACKING_URI``; ``mlflow.set_tracking_uri`` exports that variable too, so a
    value equal to the default this module set is not the user's."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env and env != os.environ.get(_DEFAULT_MARK) else None


def tracking_uri() -> str:
    return _user_uri() or f"sqlite:///{Path('mlflow.db').resolve()}"


ARTIFACTS = "mlartifacts"
# Every column of MLflow's schema that holds an artifact location (tables of older schemas may lack some).
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "source"),
                     ("model_versions", "storage_location"))


def relocate_artifacts(database: str | os.PathLike = "mlflow.db") -> Path | None:
    """Point the default store's artifact locations at this project when the project was moved or copied.

    MLflow resolves every artifact location to an absolute path when it records it (experiments, runs,
    logged and registered models): after ``mv proj proj2`` new runs would write under ``proj/mlartifacts``
    again, recreating the old directory, and registered models would load from there (or not at all).
    The experiments' ``.../mlartifacts`` location tells where the store was made; when that is another
    directory, every location under it (as a ``file:`` URI or a plain path) is rewritten to the same
    place under the project, in one transaction. MLflow has no API to change a recorded location, so
    this edits the SQLite file; it is idempotent, and concurrent stages at most repeat a no-op.
    Returns the old project root when it relocated, else None.
    """
    import sqlite3

    database = Path(database)
    if not database.is_file():
        return None
    here = database.resolve().parent
    with contextlib.closing(sqlite3.connect(database, timeout=60)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return None
        old = old_uri = None
        for (location,) in db.execute("SELECT artifact_location FROM experiments WHERE artifact_location LIKE ?",
                                      (f"file:%/{ARTIFACTS}",)):
            root = Path(url2pathname(urlparse(location).path)).parent
            if root != here:
                old, old_uri = root, location.removesuffix(ARTIFACTS)
                break
        if old is None:
            return None
        with db:
            for table, column in _LOCATION_COLUMNS:
                if table not in tables:
                    continue
                for prefix, new in ((old_uri, here.as_uri() + "/"), (f"{old}/", f"{here}/")):
                    # table and column names from _LOCATION_COLUMNS
                    db.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                               f"WHERE substr({column}, 1, ?) = ?", (new, len(prefix) + 1, len(prefix), prefix))
    log.warning("this project was moved or copied from %s to %s: MLflow artifact locations in %s now point here",
                old, here, database)
    return old


def setup(experiment: str | None = None) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; return its id."""
    import mlflow

    uri = tracking_uri()
    user = _user_uri()
    if not user:
        os.environ[_DEFAULT_MARK] = uri
        relocate_artifacts()
    mlflow.set_tracking_uri(uri)
    name = experiment or EXPERIMENT
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = None
        if not user:
            location = Path(ARTIFACTS).resolve().as_uri()
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent stage
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
    mlflow.set_experiment(name)
    return exp.experiment_id if exp else mlflow.get_experiment_by_name(name).experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


PID_TAG, HOST_TAG = "sslvision.pid", "sslvision.host"


def owner_tags() -> dict[str, str]:
    """Tags naming the process that opens a run, for :func:`close_orphaned_runs`."""
    import socket

    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def close_orphaned_runs(experiment: str | None = None) -> list[str]:
    """End as ``FAILED`` every ``RUNNING`` run of the project's experiment whose process is gone (a killed
    stage or flow never ends its run); return their ids. Only runs opened on this host with
    :func:`owner_tags` are judged: a run of another machine, or one without the tags, may be alive."""
    import socket
    import time

    import mlflow

    from sslvision.io import process_alive

    exp_id = setup(experiment)
    client = mlflow.MlflowClient()
    host, closed = socket.gethostname(), []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "sslvision.orphaned",
                       f"process {pid} on {host} ended without closing the run; closed as FAILED "
                       f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
        client.set_terminated(run.info.run_id, status="FAILED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("closed %d MLflow run(s) left RUNNING by killed processes: %s", len(closed), ", ".join(closed))
    return closed


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None, experiment: str | None = None) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the pipeline's parent run when there is one."""
    import mlflow

    exp_id = setup(experiment)
    tags = {"sslvision.stage": stage, **owner_tags()}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags) as run:
        if params:
            flat = {k: (str(v)[:500]) for k, v in flatten(params).items()}
            mlflow.log_params(flat)
        yield run
