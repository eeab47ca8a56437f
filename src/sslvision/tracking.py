"""MLflow tracking with embedded defaults.

Default store: a SQLite file ``mlflow.db`` in the project (the working directory), artifacts under
``mlartifacts/``; ``MLFLOW_TRACKING_URI`` points everything at a tracking server instead. A pipeline
run (Prefect flow) opens a parent run and exports its id as ``SSLVISION_PARENT_RUN_ID``; every stage
run started here then becomes its nested child, even from a separate ``dvc repro`` process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXPERIMENT = os.environ.get("SSLVISION_EXPERIMENT", "sslvision")
PARENT_ENV = "SSLVISION_PARENT_RUN_ID"


_DEFAULT_MARK = "_SSLVISION_DEFAULT_TRACKING_URI"


def _user_uri() -> str | None:
    """The user's ``MLFLOW_TRACKING_URI``; ``mlflow.set_tracking_uri`` exports that variable too, so a
    value equal to the default this module set is not the user's."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env and env != os.environ.get(_DEFAULT_MARK) else None


def tracking_uri() -> str:
    return _user_uri() or f"sqlite:///{Path('mlflow.db').resolve()}"


def setup(experiment: str | None = None) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; return its id."""
    import mlflow

    uri = tracking_uri()
    user = _user_uri()
    if not user:
        os.environ[_DEFAULT_MARK] = uri
    mlflow.set_tracking_uri(uri)
    name = experiment or EXPERIMENT
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = None
        if not user:
            location = Path("mlartifacts").resolve().as_uri()
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


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None, experiment: str | None = None) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the pipeline's parent run when there is one."""
    import mlflow

    exp_id = setup(experiment)
    tags = {"sslvision.stage": stage}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags) as run:
        if params:
            flat = {k: (str(v)[:500]) for k, v in flatten(params).items()}
            mlflow.log_params(flat)
        yield run
