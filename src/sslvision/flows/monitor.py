"""Prefect flow ``monitor``: production batch -> drift_eval -> trigger -> train from the failed stage -> promote.

Run it directly on one batch (ephemeral Prefect, nothing to start)::

    sslvision monitor data/demo/incoming/gaussian_noise_s3
    python -m sslvision.flows.monitor data/demo/incoming/gaussian_noise_s3

or with no batch, on every batch in ``monitor.inbox`` not seen before (what the scheduled deployment
does). The batch is scored with the registered ``champion`` (its files checked against their
registration digests), never the ``models/classifier`` a refused retrain left: see
``sslvision.stages.drift_eval.scored_classifier``; the version scored is in ``decision.json`` (``model``) and in the
MLflow run (tag ``sslvision.scored_model``). Each decision is written to
``reports/monitor/<batch>/decision.json`` next to the batch's drift report, logged as an MLflow run,
and emitted as a Prefect event ``sslvision.degradation`` that can start the ``train`` deployment (see
``prefect.yaml``). With ``retrain`` (the default for direct runs) the flow
re-runs the pipeline itself from the decided stage and offers the new model for gated promotion; when only
the class mix changed (action ``prior_correction``) it registers the champion with its prior corrected and
gates it at that mix (``sslvision.actions.correct_prior``): nothing is retrained. Without ``retrain``
(``--no-retrain``) it decides and reports only: no batch joins the pool, no version is registered, DVC's
state is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from pydantic import Field

from sslvision import actions, pipeline, tracking, trigger
from sslvision.flows import DEGRADATION_EVENT, PIPELINE_RESOURCE
from sslvision.flows.train import promote_challenger, train
from sslvision.ingest import IngestParams
from sslvision.io import write_json
from sslvision.params import Section, load_section, params_path
from sslvision.stages.drift_eval import drift_eval_cli, scored_model_name


class MonitorParams(Section):
    """The scheduled watch over production batches (`sslvision monitor`, the `monitor` flow)."""

    inbox: str = Field("data/demo/incoming", description=(
        "directory of production batch directories; each is evaluated once"))
    cron: str = Field("0 * * * *", description=(
        "schedule of the `monitor` deployment (`sslvision serve`; keep prefect.yaml's cron equal to it)"))
    retrain: bool = Field(True, description=(
        "on degradation, re-run the pipeline from the failed stage right away (false: only report and emit the "
        "`sslvision.degradation` event, which starts the `train` deployment when served)"))
    promote: bool = Field(True, description="offer the retrained model to gated promotion")
    reports: str = Field("reports/monitor", description=(
        "per-batch drift report, decision.json, and the processed-batch ledger"))


def _ledger(p: MonitorParams) -> Path:
    return Path(p.reports) / "processed.json"


def pending_batches(p: MonitorParams) -> list[Path]:
    """Batch directories in the inbox that no monitor run has evaluated yet, in name order."""
    inbox = Path(p.inbox)
    if not inbox.is_dir():
        raise FileNotFoundError(f"{inbox}: monitor inbox not found (params.yaml monitor.inbox)")
    done = set(json.loads(_ledger(p).read_text())) if _ledger(p).exists() else set()
    return [b for b in sorted(inbox.iterdir()) if b.is_dir() and not b.name.startswith(".") and b.name not in done]


def _mark_processed(p: MonitorParams, batch: Path) -> None:
    done = json.loads(_ledger(p).read_text()) if _ledger(p).exists() else []
    write_json(_ledger(p), sorted(set(done) | {batch.name}))


@task(task_run_name="drift_eval {batch.name}")
def evaluate_batch(batch: Path, reports: Path) -> dict[str, Any]:
    return drift_eval_cli(batch=batch, params=params_path(), reports=reports)


def _emit(decision: trigger.Decision) -> None:
    from prefect.events import emit_event

    emit_event(event=DEGRADATION_EVENT,
               resource={"prefect.resource.id": PIPELINE_RESOURCE},
               payload={"stage": decision.stage, "batch": decision.batch, "reasons": decision.reasons})


@flow(name="monitor", log_prints=True)
def monitor(batch: str | None = None, root: str = ".", retrain: bool | None = None,
            promote: bool | None = None, wait_s: float = 600) -> list[dict[str, Any]]:
    """Evaluate one batch (or every pending inbox batch) and act on the trigger's decision.

    Each batch is handled under the project lock (``wait_s``: how long to wait for it), from its
    evaluation to the promotion: no pipeline run sees the pool change half-way (DVC would record a
    pool its ingest never read), and a second monitor run that waited finds the batch processed and
    leaves it. A batch is marked processed only once everything it triggered has finished."""
    import mlflow

    logger = get_run_logger()
    root_path = Path(root).resolve()
    batch_path = Path(batch).resolve() if batch else None
    cwd = os.getcwd()
    os.chdir(root_path)
    try:
        p = load_section("monitor", MonitorParams)
        pool = Path(load_section("ingest", IngestParams).pool)
        retrain = p.retrain if retrain is None else retrain
        promote = p.promote if promote is None else promote
        batches = [batch_path] if batch_path else pending_batches(p)
        outcomes = []
        for b in batches:
            reports = Path(p.reports) / b.name
            with pipeline.pipeline_lock(root_path, wait_s=wait_s):
                if batch_path is None and b not in pending_batches(p):
                    logger.info("batch %s: processed meanwhile by another monitor run", b.name)
                    continue
                result = evaluate_batch(b, reports)
                decision = trigger.decide(result["metrics"], pipeline.stage_order(root_path), batch=b.name)
                logger.info("batch %s: %s", b.name, describe(decision))
                logger.info("batch %s: scored %s", b.name, scored_model_name(result["model"]))
                outcome: dict[str, Any] = {"decision": decision.to_dict(), "model": result["model"],
                                           "class_prior": result["class_prior"]}
                if decision.action == trigger.PRIOR_CORRECTION and retrain:
                    outcome["prior_correction"] = actions.correct_prior(result, params_path(), b.name)
                elif decision.degraded:
                    _emit(decision)
                    if retrain:  # the batch joins only a retrain that runs now
                        admitted = trigger.admit_batch(b, decision, pool, result["evaluated_files"],
                                                       result["held_out_files"])
                        outcome["joined_pool"] = str(admitted.dest) if admitted and admitted.dest else None
                        if admitted and admitted.skipped:
                            outcome["not_admitted"] = admitted.skipped
                        outcome["ran"] = train(from_stage=decision.stage, root=str(root_path), lock=False)
                        if promote:
                            outcome["promotion"] = promote_challenger(str(root_path))
                write_json(reports / "decision.json", outcome)
                exp_id = tracking.setup()
                with mlflow.start_run(experiment_id=exp_id, run_name=f"monitor {b.name}",
                                      tags={"sslvision.kind": "monitor", "sslvision.batch": b.name,
                                            "sslvision.trigger.stage": decision.stage or "none",
                                            "sslvision.trigger.action": decision.action or "none",
                                            "sslvision.trigger.reasons": "; ".join(decision.reasons)[:5000],
                                            "sslvision.scored_model": scored_model_name(result["model"]),
                                            **tracking.owner_tags()}):
                    mlflow.log_dict(outcome, "decision.json")
                    mlflow.log_metric("degraded", float(decision.degraded))
                _mark_processed(p, b)
            outcomes.append(outcome)
        return outcomes
    finally:
        os.chdir(cwd)


def describe(decision: trigger.Decision) -> str:
    """One line for a decision: healthy, prior correction or the stage to re-run from, and why."""
    if decision.action == trigger.PRIOR_CORRECTION:
        return "class mix changed, correct the champion's prior (no retraining): " + "; ".join(decision.reasons)
    if decision.degraded:
        return f"degraded, re-run from {decision.stage}: " + "; ".join(decision.reasons)
    return "healthy, nothing re-runs"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("batch", nargs="?", default=None,
                    help="production batch directory (default: pending inbox batches)")
    ap.add_argument("--root", default=".", help="project root (where dvc.yaml is)")
    ap.add_argument("--no-retrain", action="store_true", help="decide and report only")
    args = ap.parse_args(argv)
    for o in monitor(batch=args.batch, root=args.root, retrain=False if args.no_retrain else None):
        d = o["decision"]
        print(f"{d['batch']}: " + (f"re-run from {d['stage']}" if d["degraded"] else d["action"] or "healthy"))


if __name__ == "__main__":
    main()
