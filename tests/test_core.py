import json
import os

import pandas as pd
import pytest

from sslvision import io, tracking
from sslvision.params import ParamsError, Section, load_section


class Demo(Section):
    size: int = 28
    rate: float = 0.2


def test_params_error_names_file_and_key(workdir):
    (workdir / "params.yaml").write_text("demo:\n  size: -3x\n")
    with pytest.raises(ParamsError, match=r"params.yaml: demo.size: .*'-3x'"):
        load_section("demo", Demo)


def test_params_unknown_key_is_an_error(workdir):
    (workdir / "params.yaml").write_text("demo:\n  sise: 3\n")
    with pytest.raises(ParamsError, match=r"demo.sise: Extra inputs"):
        load_section("demo", Demo)


def test_params_overrides_and_defaults(workdir):
    (workdir / "params.yaml").write_text("demo:\n  size: 32\n")
    p = load_section("demo", Demo, overrides={"rate": 0.4})
    assert (p.size, p.rate) == (32, 0.4)


def test_params_not_yaml(workdir):
    (workdir / "params.yaml").write_text("demo: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_section("demo", Demo)


def test_atomic_write_keeps_old_file_on_failure(workdir):
    target = workdir / "out.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in workdir.iterdir()] == ["out.json"]


def test_atomic_directory_replace(workdir):
    target = workdir / "d"
    for n in (1, 2):
        with io.output_dir(target, "unit") as tmp:
            (tmp / "x.txt").write_text(str(n))
    assert (target / "x.txt").read_text() == "2"
    assert sorted(p.name for p in workdir.iterdir()) == ["d"]


def test_unwritable_output_is_a_clear_error(workdir):
    if os.geteuid() == 0:
        target = "/proc/sslvision-cannot-write/out.json"
    else:
        ro = workdir / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "out.json"
    with pytest.raises(io.OutputError, match="cannot write"):
        io.write_json(target, {"a": 1})


def test_stage_run_lands_in_sqlite_store(workdir):
    import mlflow

    with tracking.stage_run("unit", {"a": {"b": 1}}) as run:
        mlflow.log_metric("m", 0.5)
    assert (workdir / "mlflow.db").exists()
    got = mlflow.get_run(run.info.run_id)
    assert got.data.params == {"a.b": "1"}
    assert got.data.metrics["m"] == 0.5
    assert got.data.tags["sslvision.stage"] == "unit"
    df = pd.DataFrame([{"x": 1}])
    io.write_parquet(workdir / "t.parquet", df)
    assert pd.read_parquet(workdir / "t.parquet").equals(df)


def test_default_store_follows_the_working_directory(tmp_path, monkeypatch):
    import mlflow

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        with tracking.stage_run("unit"):
            mlflow.log_metric("m", 1.0)
        assert (tmp_path / name / "mlflow.db").exists(), "mlflow's exported URI must not pin the first store"
