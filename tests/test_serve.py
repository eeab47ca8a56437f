"""The registered model takes images: base64 image files in, class names out, through MLflow's own
loader (from any directory), through sslvision's digest-checked loader, and through a real
`mlflow models serve` on loopback answering a POST of a JPEG."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from sslvision import registry, tracking
from sslvision.finetune import load_classifier
from tests import servers
from tests.test_predict import CLASSES, tiny_rgb_classifier, write_images

NAME = "photos"
pytestmark = pytest.mark.slow  # logging a model takes 20-40 s on a busy 2-core machine


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny RGB classifier registered as the champion of NAME in a SQLite store; photos beside it."""
    import mlflow

    root = tmp_path_factory.mktemp("project")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        tiny_rgb_classifier(root / "models/classifier")
        files = write_images(root / "photos")
        with tracking.stage_run("finetune"):
            version = registry.log_and_register(root / "models/classifier", NAME, np.zeros((1, 32, 32, 3), np.uint8))
        mlflow.MlflowClient().set_registered_model_alias(NAME, registry.CHAMPION, version)
        uri = tracking.tracking_uri()
    finally:
        os.chdir(cwd)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return {"root": root, "uri": uri, "files": files, "version": version,
            "classifier": load_classifier(root / "models/classifier")}


def _expected(registered, key: str) -> str:
    from sslvision.predict import predict_files

    return predict_files([str(registered["files"][key])], registered["classifier"]).loc[0, "label"]


def test_pyfunc_loads_from_any_directory_and_answers_images_with_class_names(registered, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # not the project: only the tracking URI says where the model is
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    files = registered["files"]
    frame = registry.image_frame([files[k].read_bytes() for k in ("jpeg", "exif", "16bit", "broken")])
    frame.loc[4, "image"] = "not base64!"
    out = model.predict(frame)
    assert out["label"].tolist()[:3] == [_expected(registered, k) for k in ("jpeg", "exif", "16bit")]
    assert out["prediction"].tolist()[3:] == [-1, -1] and out["label"].tolist()[3:] == [None, None]
    assert out.loc[3, "error"].startswith("image: truncated") and out.loc[4, "error"].startswith("image: not base64")
    probs = out.loc[:2, [f"prob_{k}" for k in range(len(CLASSES))]].to_numpy(float)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-6)
    # converted pixels still work, in the `pixels` column
    pixels = np.zeros((2, 32, 32, 3), np.uint8)
    out = model.predict(registry.pixel_frame(pixels))
    expected = registered["classifier"].predict_proba(pixels).argmax(1)
    np.testing.assert_array_equal(out["prediction"].to_numpy(), expected)


def test_logged_signature_and_example_take_base64_images(registered, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.signature.inputs.input_names() == ["image", "pixels"]
    assert info.signature.outputs.input_names()[:3] == ["prediction", "label", "confidence"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    example = json.loads((local / "serving_input_example.json").read_text())["dataframe_split"]
    assert example["columns"] == ["image"] and base64.b64decode(example["data"][0][0]).startswith(b"\x89PNG")
    config = json.loads((local / "artifacts/classifier/config.json").read_text())
    assert config["classes"] == CLASSES and config["conversion"]["size"] == 32


def test_sslvision_predict_reads_the_champion_through_its_digests(registered, tmp_path, monkeypatch):
    from sslvision.predict import load_model, predict_files

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    classifier, source = load_model(f"models:/{NAME}@champion")
    assert source["version"] == registered["version"]
    out = predict_files([str(registered["files"]["jpeg"])], classifier)
    assert out.loc[0, "label"] == _expected(registered, "jpeg")
    with pytest.raises(registry.RegistryError, match="has no 'nothing' version"):
        load_model(f"models:/{NAME}@nothing")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no MLflow store"):
        load_model(f"models:/{NAME}@champion")


def test_mlflow_models_serve_answers_a_jpeg_with_its_class_name(registered, tmp_path):
    port = servers.free_port()
    bindir = str(Path(sys.executable).parent)  # `mlflow models serve` runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PATH": bindir + os.pathsep + os.environ["PATH"]}
    proc = servers.start([str(Path(bindir) / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                          "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                         f"http://127.0.0.1:{port}/ping", timeout_s=240, cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        files = registered["files"]
        body = {"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(files["jpeg"].read_bytes()).decode()],
            [base64.b64encode(files["broken"].read_bytes()).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            text = r.read().decode()
        answer = json.loads(text, parse_constant=lambda c: pytest.fail(f"not valid JSON: {c}"))["predictions"]
        assert answer[0]["label"] == _expected(registered, "jpeg") and answer[0]["error"] is None
        assert answer[1]["prediction"] == -1 and answer[1]["label"] is None and answer[1]["confidence"] is None
        assert answer[1]["error"].startswith("image: truncated")
    finally:
        servers.stop(proc)
