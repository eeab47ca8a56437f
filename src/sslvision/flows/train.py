"""Prefect flow ``train``: the DVC stages as tasks, in DAG order, under one MLflow parent run.

Run it directly (ephemeral Prefect, nothing to start)::

    sslvision run                              # like dvc repro: runs what is out of date
    sslvision run --from audit                 # forces audit and everything downstream of it
    python -m sslvision.flows.train --from audit   # the same flow without the CLI's lock and summary

Each stage is one task; a transient failure (DVC's lock busy, an I/O hiccup) is retried, a stage
whose script fails is not (re-running deterministic code gives the same error). The flow opens an
MLflow parent run and every stage's run is nested under it (see ``sslvision.tracking``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dvc.lock import LockError
from prefect import flow, get_run_logger, task

from sslvision import pipeline, tracking

T = TypeVar("T")


def _transient(task, task_run, state) -> bool:
    """Retry only failures that may pass on their own: DVC's repository lock or the project lock busy, a
    timeout, a dropped connection; never a stage that failed (``pipeline.StageFailed``)."""
    try:
        state.result()
    except (LockError, TimeoutError, ConnectionError, pipeline.PipelineBusy):
        return True
    except Exception:
        return False
    return False


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_transient, task_run_name="{stage}")
def run_stage(stage: str, force: bool, root: str) -> bool:
    logger = get_run_logger()
    logger.info("stage %s: %s", stage, "forced" if force else "reproducing if out of date")
    ran = pipeline.reproduce_stage(stage, force=force, root=root)
    logger.info("stage %s: %s", stage, "ran" if ran else "up to date, skipped")
    return ran


@task
def promote_challenger(root: str) -> dict:
    """Gated promotion of the model the finetune stage just registered as ``challenger``.

    With ``finetune.registry.auto_promote`` the stage ran the gate itself: its decision
    (``reports/finetune/promotion.json``) is returned instead of evaluating the challenger twice (a
    second gate would find no challenger after a promotion, and re-evaluate a refused one)."""
    from sslvision.params import params_path
    from sslvision.registry import promote_cli
    from sslvision.stages.finetune import REPORTS, load_params

    p = load_params(Path(root) / params_path().name)
    report = Path(root) / REPORTS / "promotion.json"
    if p.registry.auto_promote and report.exists():
        return json.loads(report.read_text())
    return promote_cli(params=p)


def _with_parent(run_id: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` with every stage run it opens nested under the MLflow run ``run_id``."""
    os.environ[tracking.PARENT_ENV] = run_id
    try:
        return fn()
    finally:
        os.environ.pop(tracking.PARENT_ENV, None)


@flow(name="train", log_prints=True)
def train(from_stage: str | None = None, root: str = ".", wait_s: float = 600,
          promote: bool = False, lock: bool = True) -> dict[str, bool]:
    """Reproduce the pipeline; with ``from_stage``, force that stage and everything downstream;
    with ``promote``, offer the new challenger to gated promotion afterwards. ``lock=False`` when the
    caller already holds the project lock (``sslvision run`` takes it before the flow run starts).
    Under the lock it first finishes what a killed run left (``sslvision.registry.recover``)."""
    import mlflow

    from sslvision.params import params_path
    from sslvision.registry import recover
    from sslvision.stages.preflight import check_inputs

    root = str(Path(root).resolve())
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pipeline.pipeline_lock(root, wait_s=wait_s) if lock else contextlib.nullcontext():
            # Read the DAG only under the lock: another run may be rewriting dvc.lock meanwhile.
            order = pipeline.stage_order(root)
            check_inputs(root)  # a missing production batch is reported now, not after pretraining
            forced = set(pipeline.downstream_of(from_stage, root)) if from_stage else set()
            # A killed run left MLflow runs RUNNING and maybe a challenger no gate saw: finish that first.
            recovered = recover(Path(root) / params_path().name)
            exp_id = tracking.setup()
            with mlflow.start_run(experiment_id=exp_id, run_name=f"pipeline from {from_stage or 'start'}",
                                  tags={"sslvision.kind": "pipeline", **tracking.owner_tags()}) as parent:
                if recovered["orphaned_runs"] or recovered["promotion"]:
                    mlflow.log_dict(json.loads(json.dumps(recovered, default=str)), "recovered.json")
                ran = _with_parent(parent.info.run_id, lambda: {s: run_stage(s, s in forced, root) for s in order})
                mlflow.log_dict({"from_stage": from_stage, "ran": ran}, "pipeline.json")
            if promote and ran.get("finetune"):
                # After the parent run closed (the promotion opens its own run, which MLflow refuses
                # while another is active), nested under it all the same; still under the lock.
                promotion = _with_parent(parent.info.run_id, lambda: promote_challenger(root))
                mlflow.MlflowClient().log_dict(parent.info.run_id, json.loads(json.dumps(promotion, default=str)),
                                               "promotion.json")
    finally:
        os.chdir(cwd)
    return ran


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="from_stage", default=None, help="force this stage and all downstream")
    ap.add_argument("--root", default=".", help="project root (where dvc.yaml is)")
    args = ap.parse_args(argv)
    ran = train(from_stage=args.from_stage, root=args.root)
    print({s: ("ran" if r else "skipped") for s, r in ran.items()})


if __name__ == "__main__":
    main()
