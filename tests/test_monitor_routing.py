"""Each routing decision of the monitor flow on a real project (tests/test_pipeline_flow.py's model_project:
real drift_eval on Fashion-MNIST images, real DVC, MLflow registry and Prefect): a clean batch is healthy,
a class-mix change is a prior correction (a new registered version, gated), a corrupted batch re-runs from
pretrain, --no-retrain changes nothing, and test-split images never join the pool."""

import numpy as np
import pytest

from tests.test_drift import unseen_images, write_batch
from tests.test_pipeline_flow import MODEL, _aliases, model_project  # noqa: F401  (the fixture)


def _versions():
    import mlflow

    return sorted(str(v.version) for v in mlflow.MlflowClient().search_model_versions(f"name='{MODEL}'"))


def _dvc_status(root):
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status()


def _test_images(root, prior, n, seed=0):
    """Test-split images of the project drawn (without repeats) at class prior ``prior``."""
    from sslvision.data import Ingested
    from sslvision.drift import resample_to_prior

    data = Ingested.load(root / "data/ingested")
    test = data.split("test")
    rows = resample_to_prior(test["label"].to_numpy(), np.asarray(prior), n, seed)
    return np.asarray(data.images[test["index"].to_numpy()[rows]])[..., 0]


@pytest.fixture
def champion_project(model_project, prefect_harness):  # noqa: F811
    from sslvision.flows.train import train

    (model_project / "candidate.txt").write_text("strong")
    assert all(train(root=str(model_project), promote=True).values())
    assert _aliases() == {"champion": "1"}
    return model_project


@pytest.mark.slow
def test_clean_and_class_mix_batches_route_to_nothing_and_to_a_prior_correction(champion_project):
    """A clean batch at the training mix: healthy, nothing changes. The test images re-sampled to a mix of
    three classes: only the class mix changed, so no stage re-runs, the pool is untouched, and the champion
    with its prior corrected is registered as version 2 and gated at that mix (decision, tags, MLflow)."""
    import json

    import mlflow

    from sslvision.flows.monitor import monitor
    from sslvision.flows.train import train

    root = champion_project
    write_batch(root / "incoming/clean", unseen_images(30000))
    mix = np.array([0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.31, 0.31, 0.31])  # the rarest training classes
    write_batch(root / "incoming/mix", _test_images(root, mix, 100))
    status = _dvc_status(root)

    (clean,) = monitor(batch=str(root / "incoming/clean"), root=str(root))
    assert clean["decision"]["action"] is None and not clean["decision"]["degraded"], clean["decision"]
    assert _versions() == ["1"]

    (shifted,) = monitor(batch=str(root / "incoming/mix"), root=str(root))
    d = shifted["decision"]
    assert d["action"] == "prior_correction" and d["stage"] is None and not d["degraded"], d
    assert "class_prior_shift_pvalue" in d["reasons"][0]
    correction = shifted["prior_correction"]
    assert correction["version"] == "2" and correction["base"] == "1"
    assert correction["promotion"]["decision"] in ("promoted", "refused")
    assert set(correction["promotion"]["thresholds"]) >= {"accuracy", "ece", "balanced_accuracy"}
    assert "ran" not in shifted and not (root / "data/pool").exists()
    assert _dvc_status(root) == status  # no stage re-ran, no data changed
    saved = json.loads((root / "reports/monitor/mix/decision.json").read_text())
    assert saved["decision"]["action"] == "prior_correction" and saved["prior_correction"]["version"] == "2"
    trigger = json.loads((root / "reports/monitor/mix/trigger.json").read_text())
    assert trigger["decision"]["action"] == "prior_correction"
    runs = mlflow.search_runs(experiment_names=["sslvision"], filter_string="tags.`sslvision.kind` = 'monitor'")
    assert sorted(runs["tags.sslvision.trigger.action"]) == ["none", "prior_correction"]

    # version 2 carries the correction in its config; the network is the champion's
    from sslvision import registry
    from sslvision.finetune import load_classifier

    with registry.verified_copy(MODEL, "2") as local:
        corrected = load_classifier(next(local.rglob("config.json")).parent)
    assert corrected.prior_correction["batch"] == "mix"
    assert corrected.prior_correction["prior"][9] > 0.2
    assert max(map(abs, corrected.prior_correction["adjustment"])) > 0.5
    assert train(root=str(root)) == {s: False for s in ("ingest", "pretrain", "audit", "synthesize", "finetune")}


@pytest.mark.slow
def test_no_retrain_changes_nothing_and_test_images_never_join_the_pool(champion_project):
    """A corrupted batch with some test-split images in it: --no-retrain decides "pretrain" and changes
    nothing (pool, DVC status, registry); with a retrain the batch joins the pool without the test images
    (named, with why) and the pipeline re-runs from pretrain."""
    from sslvision.flows.monitor import main, monitor

    root = champion_project
    batch = root / "incoming/noisy_1"
    leaked = _test_images(root, np.full(10, 0.1), 5, seed=1)
    for i, im in enumerate(leaked):
        from PIL import Image

        Image.fromarray(im).save(batch / f"leak_{i}.png")
    status, versions = _dvc_status(root), _versions()

    main([str(batch), "--root", str(root), "--no-retrain"])
    (outcome,) = monitor(batch=str(batch), root=str(root), retrain=False)
    assert outcome["decision"]["stage"] == "pretrain" and outcome["decision"]["action"] == "retrain"
    assert "joined_pool" not in outcome and "ran" not in outcome
    assert not (root / "data/pool").exists() and _dvc_status(root) == status and _versions() == versions

    (outcome,) = monitor(batch=str(batch), root=str(root))
    assert outcome["joined_pool"].endswith("noisy_1") and outcome["ran"]["pretrain"]
    refused = {f: why for f, why in outcome["not_admitted"].items() if "held-out test split" in why}
    assert sorted(refused) == [f"leak_{i}.png" for i in range(5)]
    pooled = sorted(p.name for p in (root / "data/pool/noisy_1").iterdir())
    assert not any(name.startswith("leak_") for name in pooled) and len(pooled) == len(unseen_images(30000))
