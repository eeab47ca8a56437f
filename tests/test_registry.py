"""MLflow registry and gated promotion against real MLflow stores: a SQLite file, and one `mlflow server`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sslvision import registry, tracking
from sslvision.finetune import PromotionParams, load_classifier, load_params, run_finetune, save_classifier
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
    out = model.predict(registry.flatten(golden[0]))
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
    np.testing.assert_array_equal(model.predict(registry.flatten(golden[0]))["prediction"].to_numpy(), expected)
    assert _aliases() == {"champion": version}
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server


def test_cli_rollback_without_previous_names_the_problem(store):
    from typer.testing import CliRunner

    from sslvision.cli import app

    (store / "params.yaml").write_text(yaml.safe_dump({"finetune": {"registry": {"model_name": NAME}}}))
    result = CliRunner().invoke(app, ["rollback", "--params", str(store / "params.yaml")])
    assert result.exit_code == 2
    assert "no 'previous' version" in result.output
