"""prefect.yaml and the served deployments agree with params.yaml and point at real flows."""

from pathlib import Path

import yaml

from sslvision.flows import DEGRADATION_EVENT
from sslvision.flows.deployments import build_deployments

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_matches_params_and_flows():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert deps["monitor"]["schedules"][0]["cron"] == params["monitor"]["cron"]
    assert deps["train"]["triggers"][0]["expect"] == [DEGRADATION_EVENT]
    for d in deps.values():
        path, name = d["entrypoint"].split(":")
        assert load_flow_from_entrypoint(str(ROOT / path) + ":" + name).name == d["name"]


def test_served_deployments_schedule_and_trigger():
    monitor, train = build_deployments("*/5 * * * *")
    assert monitor.name == "monitor" and monitor.parameters == {"retrain": False}
    assert monitor.schedules[0].schedule.cron == "*/5 * * * *"
    (trig,) = train.triggers
    assert trig.expect == {DEGRADATION_EVENT}
    assert trig.parameters["from_stage"] == "{{ event.payload.stage }}"
