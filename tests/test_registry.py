"""MLflow registry and gated promotion against real MLflow stores: a SQLite file, and one `mlflow server`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sslvision import registry, tracking
from sslvision.finetune import PromotionParams, load_classifier, save_classifier
from sslvision.models import embed, load_encoder
from sslvision.stages.finetune import load_params, run_finetune
from tests.finetune_project import make_project

torch.set_num_threads(1)
NAME = "tiny-classifier"
PROMOTION = PromotionParams(min_balanced_accuracy=0.3, max_ece=0.3, min_improvement=0.02, worst_class_tolerance=0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three classifiers on the same tiny data: weak (2 epochs), strong (15 epochs) and broken (random head)."""
    root = tmp_path_factory.mktemp("project")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = make_project(root, test_per_class=20)
        base = load_params(params)
        out = {}
        for name, update in {"weak": {"epochs": 2}, "strong": {}}.items():
            clf, data, *_ = run_finetune(base.model_copy(update=update))
            save_classifier(root / name, clf)
            out[name] = root / name
        torch.manual_seed(1)
        torch.nn.init.normal_(clf.head.weight, std=1.0)
        save_classifier(root / "broken", clf)
        out["broken"] = root / "broken"
        out["golden"] = (data.test.images, data.test.labels)
        (root / "data/embeddings").mkdir(parents=True)  # what pretrain writes: drift_eval's input-drift reference
        images = np.load(root / "data/ingested/images.npy")
        np.save(root / "data/embeddings/embeddings.npy", embed(load_encoder(root / "models/encoder"), images))
        out["root"] = root
    finally:
        os.chdir(cwd)
    return out


@pytest.fixture
def store(workdir, monkeypatch):
    """A fresh SQLite store in the test's directory (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI,
    which would otherwise keep every later test on the first test's store)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return workdir


def _register(path: Path, golden) -> str:
    import mlflow

    with tracking.stage_run("finetune"):
        version = registry.log_and_register(path, NAME, golden[0][:3])
    assert str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "challenger").version) == version
    return version


def _promote(golden) -> dict:
    with tracking.stage_run("promote"):
        return registry.promote(NAME, *golden, PROMOTION)


def _aliases() -> dict[str, str]:
    import mlflow

    return {a: str(v) for a, v in mlflow.MlflowClient().get_registered_model(NAME).aliases.items()}


def test_promotion_refusal_and_rollback(trained, store):
    import mlflow

    golden = trained["golden"]
    v1 = _register(trained["weak"], golden)
    first = _promote(golden)  # no champion yet: promoted on the absolute thresholds alone
    assert first["decision"] == "promoted" and first["champion_before"] is None
    assert _aliases() == {"champion": v1}

    v2 = _register(trained["broken"], golden)
    refused = _promote(golden)
    assert refused["decision"] == "refused"
    assert "balanced_accuracy" in refused["failed"]  # below the minimum and no improvement: both named
    assert "threshold check failed" in refused["failed"]["balanced_accuracy"]
    assert "minimum absolute change check failed" in refused["failed"]["balanced_accuracy"]
    assert _aliases() == {"champion": v1, "challenger": v2}  # nothing moved

    v3 = _register(trained["strong"], golden)
    better = _promote(golden)
    assert better["decision"] == "promoted", better
    assert better["challenger_metrics"]["balanced_accuracy"] >= better["champion_metrics"]["balanced_accuracy"] + 0.02
    assert _aliases() == {"champion": v3, "previous": v1}

    # the champion loads back through the registry and predicts what the trained classifier predicts
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict(registry.pixel_frame(golden[0]))
    expected = load_classifier(trained["strong"]).predict_proba(golden[0])
    np.testing.assert_array_equal(out["prediction"].to_numpy(), expected.argmax(1))
    np.testing.assert_allclose(out[[f"prob_{k}" for k in range(10)]].to_numpy(), expected, rtol=1e-5, atol=1e-7)

    # pickle-free: the MLmodel loads from code, and no file in the logged model is a pickle
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "signature" in yaml.safe_load((local / "MLmodel").read_text())
    assert (local / "input_example.json").exists()
    files = [p for p in local.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".pkl", ".pickle", ".pt", ".pth", ".joblib"}]
    assert {p.name for p in files} >= {"classifier.safetensors", "config.json", "pyfunc_classifier.py"}

    rolled = registry.rollback(NAME)
    assert rolled["champion"] == v1 and _aliases() == {"champion": v1}
    with pytest.raises(registry.RegistryError, match="previous"):
        registry.rollback(NAME)


def test_interrupted_promotion_is_completed_by_running_it_again(trained, store):
    import mlflow

    golden = trained["golden"]
    v1 = _register(trained["weak"], golden)
    assert _promote(golden)["decision"] == "promoted"
    v2 = _register(trained["strong"], golden)
    # crash after the first alias move: `previous` set, `champion` not yet moved
    mlflow.MlflowClient().set_registered_model_alias(NAME, "previous", v1)
    assert _aliases()["champion"] == v1  # still serving a validated model
    completed = _promote(golden)
    assert completed["decision"] == "promoted", completed
    assert _aliases() == {"champion": v2, "previous": v1}


@pytest.mark.slow  # the session's mlflow server (conftest) takes 20-100 s to start on a busy 2-core machine
def test_against_a_real_mlflow_server(trained, mlflow_server, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.chdir(tmp_path)
    golden = trained["golden"]
    version = _register(trained["strong"], golden)
    assert _promote(golden)["decision"] == "promoted"
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    expected = load_classifier(trained["strong"]).predict_proba(golden[0]).argmax(1)
    np.testing.assert_array_equal(model.predict(registry.pixel_frame(golden[0]))["prediction"].to_numpy(), expected)
    assert _aliases() == {"champion": version}
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server


def test_cli_rollback_without_previous_names_the_problem(store):
    from typer.testing import CliRunner

    from sslvision.cli import app

    (store / "params.yaml").write_text(yaml.safe_dump({"finetune": {"registry": {"model_name": NAME}}}))
    result = CliRunner().invoke(app, ["rollback", "--params", str(store / "params.yaml")])
    assert result.exit_code == 2
    assert "no 'previous' version" in result.output


# --- issue 20: the champion is what monitoring scores; model files are checked; interrupted runs; promote races


def _accuracy(path: Path, golden) -> float:
    return float(np.mean(load_classifier(path).predict_proba(golden[0]).argmax(1) == golden[1]))


def test_drift_eval_scores_the_champion_not_the_file_a_refused_retrain_left(trained, store):
    """After a refused challenger, models/classifier is the refused model; drift_eval (which the monitor
    runs on every batch) must score the registered champion, from the registry, and say which version."""
    import json
    import shutil

    import mlflow

    from sslvision.drift import DriftParams
    from sslvision.finetune import FinetuneParams
    from sslvision.stages.drift_eval import drift_eval_cli, scored_classifier

    golden, root = trained["golden"], trained["root"]
    finetune = {"ingested": str(root / "data/ingested"), "manifest": str(root / "data/audit/manifest_clean.parquet"),
                "encoder": str(root / "models/encoder"), "registry": {"model_name": NAME}}
    drift = {"ingested": str(root / "data/ingested"), "embeddings": str(root / "data/embeddings"),
             "encoder": str(root / "models/encoder"), "classifier": "models/classifier", "reference_size": 100,
             "calibration_size": 1000, "permutations": 20}
    (store / "params.yaml").write_text(yaml.safe_dump({"finetune": finetune, "drift_eval": drift}))
    shutil.copytree(trained["broken"], store / "models/classifier")  # what the refused retrain left
    (store / "batch").mkdir()
    np.save(store / "batch/images.npy", golden[0][:40])

    # no champion yet: the file is scored, and the record says so and why
    tracking.setup()
    _, model = scored_classifier(DriftParams(**drift), FinetuneParams(**finetune))
    assert model["source"] == "file" and "no 'champion'" in model["reason"]

    v1 = _register(trained["weak"], golden)
    assert _promote(golden)["decision"] == "promoted"
    _register(trained["broken"], golden)
    assert _promote(golden)["decision"] == "refused"

    result = drift_eval_cli(store / "batch", store / "params.yaml", store / "reports")
    champion = {"source": "registry", "uri": f"models:/{NAME}@champion", "name": NAME, "version": v1}
    assert result["model"] == champion
    assert json.loads((store / "reports/trigger.json").read_text())["model"] == champion
    # the reference accuracy on the (whole) test split is v1's, not the refused model's
    assert result["reference"]["test_accuracy"] == pytest.approx(_accuracy(trained["weak"], golden))
    assert _accuracy(trained["weak"], golden) != pytest.approx(_accuracy(trained["broken"], golden))
    run = mlflow.search_runs(filter_string="tags.`sslvision.stage` = 'drift_eval'", output_format="list")[0]
    assert run.data.tags["sslvision.scored_model"] == f"{NAME} version {v1} (champion)"


def _stored(version: str) -> Path:
    """The version's files in the artifact store itself (a local store: no copy)."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}"))


def test_model_files_changed_in_the_artifact_store_are_refused(trained, store):
    golden = trained["golden"]
    v1 = _register(trained["weak"], golden)
    assert _promote(golden)["decision"] == "promoted"  # untampered: evaluated (loaded) and promoted
    assert registry.load_champion_classifier(NAME)[1] == v1
    v2 = _register(trained["strong"], golden)

    with (_stored(v2) / "pyfunc_classifier.py").open("a") as f:  # the python_model file: runs on load
        f.write("import os  # planted\n")
    with pytest.raises(registry.RegistryError, match=r"pyfunc_classifier\.py \(modified\)"):
        _promote(golden)
    assert _aliases() == {"champion": v1, "challenger": v2}  # nothing moved

    with (_stored(v1) / "code/sslvision/finetune.py").open("a") as f:  # the code copy, on sys.path on load
        f.write("\nprint('planted')\n")
    (_stored(v1) / "code/sslvision/sitecustomize.py").write_text("print('planted')\n")
    with pytest.raises(registry.RegistryError, match=r"code/sslvision/finetune\.py \(modified\)") as err:
        registry.load_champion_classifier(NAME)
    assert "code/sslvision/sitecustomize.py (added)" in str(err.value)
    with pytest.raises(registry.RegistryError, match="finetune.py"):
        registry.load_version(NAME, v1)


def test_classifier_config_is_checked_before_the_network_is_built(trained, tmp_path):
    import json
    import shutil
    import time

    for key, value, message in (
            ("in_chans", 10**9, r"config\.json: encoder\.in_chans = 1000000000 is out of bounds"),
            ("backbone_args", {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 50000]},
             r"config\.json: describes a network that does not fit classifier\.safetensors")):
        shutil.rmtree(tmp_path / "clf", ignore_errors=True)
        shutil.copytree(trained["weak"], tmp_path / "clf")
        config = json.loads((tmp_path / "clf/config.json").read_text())
        config["encoder"][key] = value
        (tmp_path / "clf/config.json").write_text(json.dumps(config))
        start = time.perf_counter()
        with pytest.raises(ValueError, match=message):
            load_classifier(tmp_path / "clf")
        assert time.perf_counter() - start < 5  # refused up front, not after building a huge network


def test_recover_closes_killed_runs_and_gates_the_pending_challenger(trained, store):
    """A run killed after registering: its MLflow run stays RUNNING and its challenger ungated. The next
    pipeline run's recovery closes the run as FAILED and gates the challenger."""
    import subprocess
    import sys

    import mlflow

    from sslvision.finetune import FinetuneParams, RegistryParams

    golden = trained["golden"]
    v1 = _register(trained["weak"], golden)
    assert _promote(golden)["decision"] == "promoted"
    v2 = _register(trained["strong"], golden)  # registered, then the process was killed before its gate
    killed = subprocess.run(
        [sys.executable, "-c", "import os; from sslvision import tracking\n"
         "stage = tracking.stage_run('finetune'); run = stage.__enter__()\n"
         "print(run.info.run_id, flush=True); os._exit(9)"],
        cwd=store, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr
    run_id = killed.stdout.split()[-1]
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).info.status == "RUNNING"

    p = FinetuneParams(ingested=str(trained["root"] / "data/ingested"), promotion=PROMOTION,
                       registry=RegistryParams(model_name=NAME))
    recovered = registry.recover(p)
    assert recovered["orphaned_runs"] == [run_id]
    assert client.get_run(run_id).info.status == "FAILED"
    assert "sslvision.orphaned" in client.get_run(run_id).data.tags
    assert recovered["promotion"]["challenger"] == v2 and recovered["promotion"]["decision"] == "promoted"
    assert _aliases() == {"champion": v2, "previous": v1}
    assert client.get_model_version(NAME, v2).tags["sslvision.promotion"].startswith("promoted")
    # a refused challenger is decided, not pending: a second recovery has nothing to do
    v3 = _register(trained["broken"], golden)
    assert registry.recover(p)["promotion"]["decision"] == "refused"
    assert registry.recover(p) == {"orphaned_runs": [], "promotion": None}
    assert _aliases() == {"champion": v2, "previous": v1, "challenger": v3}


def test_a_challenger_registered_during_promotion_is_not_dropped(trained, store, monkeypatch):
    """A writer registers v3 while v2 is evaluated (simulated from inside the gate: MLflow stays real).
    Moving the aliases then would promote v2 and delete the `challenger` alias, dropping v3 unevaluated."""
    golden = trained["golden"]
    v1 = _register(trained["weak"], golden)
    assert _promote(golden)["decision"] == "promoted"
    v2 = _register(trained["strong"], golden)
    checked = registry.check
    registered = []

    def check_then_register(*args):
        if not registered:
            registered.append(registry.log_and_register(trained["broken"], NAME, golden[0][:3]))
        return checked(*args)

    monkeypatch.setattr(registry, "check", check_then_register)
    with pytest.raises(registry.RegistryError, match=rf"changed during the evaluation .*challenger: {v2} -> ") as err:
        _promote(golden)
    assert f"-> {registered[0]}" in str(err.value)
    assert _aliases() == {"champion": v1, "challenger": registered[0]}  # v3 waits for its own evaluation


def test_cli_promote_holds_the_project_lock(store):
    from typer.testing import CliRunner

    from sslvision.cli import app
    from sslvision.pipeline import pipeline_lock

    (store / "params.yaml").write_text(yaml.safe_dump({"finetune": {"registry": {"model_name": NAME}}}))
    with pipeline_lock(store):  # a pipeline run in progress
        result = CliRunner().invoke(app, ["promote", "--params", "params.yaml", "--wait", "0"])
    assert result.exit_code == 2
    assert "another sslvision pipeline run holds" in result.output


def test_promotion_refuses_a_challenger_below_the_pixel_baseline_or_the_worst_class_floor(trained, store):
    """The gate reads the pixel baseline recorded with the version at registration (so a later `sslvision
    promote` compares with the same number), only when it was measured on the same golden set."""
    golden = trained["golden"]
    digest = registry.golden_digest(*golden)
    v1 = _register(trained["strong"], golden)

    registry.record_pixel_baseline(NAME, v1, {"golden_balanced_accuracy": 0.3,
                                              "golden_sha256": registry.golden_digest(golden[0][:10], golden[1][:10])})
    elsewhere = _promote(golden)
    assert elsewhere["decision"] == "refused" and "another golden set" in elsewhere["failed"]["pixel_baseline"]

    registry.record_pixel_baseline(NAME, v1, {"golden_balanced_accuracy": 0.99, "golden_sha256": digest})
    below = _promote(golden)
    assert below["decision"] == "refused" and set(below["failed"]) == {"pixel_baseline"}, below
    assert "does not beat the pixel baseline's 0.9900" in below["failed"]["pixel_baseline"]
    assert below["pixel_baseline"] == {"balanced_accuracy": 0.99, "source": f"recorded with version {v1}"}
    assert _aliases() == {"challenger": v1}  # nothing moved

    registry.record_pixel_baseline(NAME, v1, {"golden_balanced_accuracy": 0.3, "golden_sha256": digest})
    assert _promote(golden)["decision"] == "promoted"

    # a version registered outside the finetune stage has no baseline of its own: the champion's applies
    v2 = _register(trained["weak"], golden)
    with tracking.stage_run("promote"):
        floor = registry.promote(NAME, *golden, PROMOTION.model_copy(update={
            "min_worst_class_recall": 0.99, "baseline_margin": 0.6, "min_improvement": 0.001}))
    assert floor["decision"] == "refused" and floor["pixel_baseline"]["source"] == f"recorded with version {v1}"
    assert {"pixel_baseline", "worst_class_floor", "worst_class_recall"} <= set(floor["failed"]), floor
    assert floor["challenger_metrics"]["worst_class_recall"] < floor["champion_metrics"]["worst_class_recall"] - 0.05
    assert _aliases() == {"champion": v1, "challenger": v2}
