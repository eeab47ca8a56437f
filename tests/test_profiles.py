"""Params profiles (profiles/gpu.yaml, profiles/cpu.yaml): validated against every stage, applied the way
`dvc exp run -S` applies them (DVC's own override code), comments of params.yaml kept."""

import shutil
from pathlib import Path

import pytest
import yaml

from sslvision.params import SECTIONS, ParamsError, read_params, section_class
from sslvision.profiles import dvc_set_params, load_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["gpu.yaml", "cpu.yaml"])
def test_profile_applies_through_dvc_and_stays_valid(tmp_path, name):
    from dvc.utils.hydra import apply_overrides

    overrides = load_profile(ROOT / "profiles" / name, ROOT / "params.yaml")
    assert overrides["pretrain.epochs"] > read_params(ROOT / "params.yaml")["pretrain"]["epochs"]
    flags = dvc_set_params(overrides)
    assert flags[::2] == ["-S"] * len(overrides)
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overrides(params, flags[1::2])  # what `dvc exp run -S ...` does to params.yaml
    applied = read_params(params)
    for key, value in overrides.items():
        node = applied
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    for section in SECTIONS:  # every stage still accepts the file
        section_class(section).model_validate(applied.get(section) or {})
    assert "THE parameter to tune" in params.read_text()  # params.yaml's comments survive


@pytest.mark.parametrize("profile, key", [
    ({"pretrain.epochs": "many"}, "pretrain.epochs"),
    ({"pretrain.nope": 1}, "pretrain.nope"),
    ({"nosection.x": 1}, "nosection.x"),
    ({"finetune.mode": "magic"}, "finetune.mode"),
])
def test_a_bad_profile_names_the_key(tmp_path, profile, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")) as err:
        load_profile(path, ROOT / "params.yaml")
    assert str(path) in str(err.value)
