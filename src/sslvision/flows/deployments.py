"""The ``monitor`` and ``train`` deployments, built in code for ``sslvision serve`` (``prefect.yaml``
declares the same two for ``prefect deploy`` with a work pool)."""

from __future__ import annotations

from typing import Any

from sslvision.flows import DEGRADATION_EVENT, PIPELINE_RESOURCE
from sslvision.flows.monitor import monitor
from sslvision.flows.train import train


def build_deployments(cron: str) -> list[Any]:
    """Scheduled ``monitor`` (reports and emits the degradation event) and event-triggered ``train``."""
    from prefect.events import DeploymentEventTrigger

    on_degradation = DeploymentEventTrigger(
        expect={DEGRADATION_EVENT},
        match={"prefect.resource.id": PIPELINE_RESOURCE},
        parameters={"from_stage": "{{ event.payload.stage }}", "promote": True},
    )
    return [
        monitor.to_deployment(name="monitor", cron=cron, parameters={"retrain": False}, concurrency_limit=1,
                              description="Evaluate new production batches; emit sslvision.degradation."),
        train.to_deployment(name="train", triggers=[on_degradation], concurrency_limit=1,
                            description="Re-run the pipeline from a stage, then gated promotion."),
    ]
