"""A project directory can be moved or copied: its MLflow store follows it (issue 20, item 4)."""

import shutil

import mlflow
import pytest

from sslvision import tracking

MODEL_CODE = '''
import mlflow


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


mlflow.models.set_model(Echo())
'''


def _log_and_register(project):
    """One run with an artifact and a registered model (defined in code), in ``project``'s default store."""
    (project / "echo.py").write_text(MODEL_CODE)
    with mlflow.start_run(experiment_id=tracking.setup()) as run:
        mlflow.log_text("before the move", "notes/before.txt")
        mlflow.pyfunc.log_model(name="echo", python_model=str(project / "echo.py"), registered_model_name="echo",
                                pip_requirements=[])
    return run.info.run_id


@pytest.mark.parametrize("how", ["move", "copy"])
def test_moved_project_writes_and_loads_its_artifacts_in_the_new_place(tmp_path, monkeypatch, how):
    old, new = tmp_path / "proj", tmp_path / "proj2"
    old.mkdir()
    monkeypatch.chdir(old)
    run_before = _log_and_register(old)
    monkeypatch.chdir(tmp_path)
    if how == "move":
        old.rename(new)
    else:
        shutil.copytree(old, new)
        shutil.rmtree(old / "mlartifacts")  # what the copy reads must be its own
    monkeypatch.chdir(new)

    exp_id = tracking.setup()
    assert mlflow.get_experiment(exp_id).artifact_location == (new / "mlartifacts").as_uri()
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_text("after the move", "notes/after.txt")
    assert run.info.artifact_uri.startswith((new / "mlartifacts").as_uri() + "/")
    assert list(new.glob("mlartifacts/**/notes/after.txt"))
    assert mlflow.artifacts.load_text(f"runs:/{run_before}/notes/before.txt") == "before the move"
    assert mlflow.pyfunc.load_model("models:/echo/1").predict([1, 2]) == [1, 2]
    if how == "move":
        assert not old.exists(), "the old project directory was recreated"
    else:
        assert not (old / "mlartifacts").exists()
    assert tracking.relocate_artifacts() is None, "relocating twice must be a no-op"
