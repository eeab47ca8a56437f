"""Bad input that used to cost memory, time or the whole run (issue 20, items 8-10):

- tiny files that expand: a stray integer label making millions of classes, a "billion laughs"
  ``params.yaml`` of nested anchors, a huge value echoed back in an error, absurd sizes;
- images and paths that decode or list wrongly: 16-bit samples, EXIF orientation, symlink loops, file
  names too long for the file system, NUL bytes in a manifest path;
- params that pass validation and go wrong later: a missing stage section, training on the test
  split, seeds numpy refuses.
"""

from __future__ import annotations

import io
import os
import runpy
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from sslvision import ingest
from sslvision.params import ParamsError, load_section, validate_section

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def _manifest(root: Path, paths: list[str], labels: list[str], splits: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": paths, "label": labels, "split": splits or ["train"] * len(paths)}).to_csv(
        root / "manifest.csv", index=False)
    return root / "manifest.csv"


def _section_models() -> dict[str, type]:
    from sslvision.audit import AuditParams
    from sslvision.demo import DemoParams
    from sslvision.drift import DriftParams
    from sslvision.finetune import FinetuneParams
    from sslvision.flows.monitor import MonitorParams
    from sslvision.ingest import IngestParams
    from sslvision.pretrain import PretrainParams
    from sslvision.synthesize import SynthesizeParams

    return {"demo": DemoParams, "ingest": IngestParams, "pretrain": PretrainParams, "audit": AuditParams,
            "synthesize": SynthesizeParams, "finetune": FinetuneParams, "drift_eval": DriftParams,
            "monitor": MonitorParams}


# --- 8. memory and time from tiny files ----------------------------------------------------------

@pytest.mark.parametrize("stray", ["20000", "100000000"])
def test_a_stray_integer_label_does_not_make_a_class_per_integer(tmp_path, stray):
    """Two rows used to make ``stray + 1`` classes (a MemoryError for 100000000); integer labels that are
    not class indices are each a class, by value."""
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    listing = ingest.list_source(_manifest(tmp_path, ["a.png", "b.png"], ["0", stray]))
    assert listing.classes == ["0", stray]
    assert [it.label for it in listing.items] == [0, 1]


def test_integer_labels_that_are_class_indices_keep_their_empty_classes(tmp_path):
    """The positive control: 0 and 2 are indices into 0..2, and class 1 (no images yet) stays a class."""
    for name in "abc":
        _png(tmp_path / f"{name}.png")
    listing = ingest.list_source(_manifest(tmp_path, ["a.png", "b.png", "c.png"], ["0", "2", "-1"]))
    assert listing.classes == ["0", "1", "2"]
    assert [it.label for it in listing.items] == [0, 2]
    assert [q["reason"] for q in listing.quarantine] == [ingest.UNKNOWN_LABEL]


def test_more_classes_than_max_classes_stops_ingest_naming_the_key(tmp_path):
    names = [f"c{i}" for i in range(5)]
    for n in names:
        _png(tmp_path / f"{n}.png")
    with pytest.raises(ValueError, match=r"manifest\.csv: 5 classes, more than ingest\.max_classes \(3\)"):
        ingest.list_source(_manifest(tmp_path, [f"{n}.png" for n in names], names), max_classes=3)


def test_an_unknown_label_does_not_repeat_the_whole_class_list(tmp_path):
    names = [f"class{i:03d}" for i in range(200)]
    for n in names:
        _png(tmp_path / f"{n}.png")
    listing = ingest.list_source(_manifest(tmp_path, [*(f"{n}.png" for n in names), "class000.png"],
                                           [*names, "x" * 10_000], ["train"] * len(names) + ["test"]))
    (refused,) = listing.quarantine
    assert refused["reason"] == ingest.UNKNOWN_LABEL and len(refused["detail"]) < 400, refused["detail"]


def _laughs(levels: int, width: int = 10) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\npretrain:\n  epochs: *l{levels - 1}\n"


def test_a_billion_laughs_params_file_is_refused_before_it_expands(tmp_path):
    """A million values from 600 bytes: refused at once, in a short message (it used to be echoed whole)."""
    path = tmp_path / "params.yaml"
    path.write_text(_laughs(6))
    model = _section_models()["pretrain"]
    start = time.perf_counter()
    with pytest.raises(ParamsError) as err:
        load_section("pretrain", model, path)
    assert time.perf_counter() - start < 5
    assert "YAML aliases (*name) expand to more than" in str(err.value) and len(str(err.value)) < 300, \
        str(err.value)[:300]


def test_a_few_yaml_aliases_still_work(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("common: &common {epochs: 2, batch_size: 8}\npretrain:\n  <<: *common\n  seed: 3\n")
    p = load_section("pretrain", _section_models()["pretrain"], path)
    assert (p.epochs, p.batch_size, p.seed) == (2, 8, 3)


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("loop: &loop [*loop]\npretrain: {epochs: *loop}\n")
    with pytest.raises(ParamsError, match="expand to more than"):
        load_section("pretrain", _section_models()["pretrain"], path)


def test_a_huge_bad_value_is_echoed_short():
    with pytest.raises(ParamsError) as err:
        validate_section("pretrain", _section_models()["pretrain"], {"epochs": "x" * 100_000})
    said = str(err.value)
    assert said.startswith("params.yaml: pretrain.epochs: Input should be a valid integer") and "(got 'xxx" in said
    assert len(said) < 400, len(said)


# key -> an absurd value that used to pass validation; the message must name the key
ABSURD = [
    ("ingest", {"workers": 10**6}), ("ingest", {"chunk_size": 10**9}), ("ingest", {"max_pixels": 10**15}),
    ("pretrain", {"epochs": 10**9}), ("pretrain", {"batch_size": 10**9}), ("pretrain", {"steps_per_epoch": 10**12}),
    ("pretrain", {"workers": 10**5}), ("pretrain", {"embed_batch_size": 10**9}),
    ("finetune", {"epochs": 10**9}), ("finetune", {"batch_size": 10**9}), ("finetune", {"eval_batch_size": 10**9}),
    ("synthesize", {"mae_inpaint": {"steps": 10**12}}), ("synthesize", {"batch_size": 10**9}),
    ("synthesize", {"max_per_class": 10**12}),
    ("audit", {"folds": 10**6}), ("drift_eval", {"permutations": 10**12}), ("drift_eval", {"batch_size": 10**9}),
    ("demo", {"max_per_class": 10**12}),
]


@pytest.mark.parametrize("section,value", ABSURD, ids=[f"{s}-{next(iter(v))}" for s, v in ABSURD])
def test_sizes_have_upper_bounds_naming_the_key(section, value):
    key = next(iter(value))
    dotted = f"{section}.{key}" + (f".{next(iter(value[key]))}" if isinstance(value[key], dict) else "")
    with pytest.raises(ParamsError, match=rf"^params\.yaml: {dotted}: Input should be less than or equal to "):
        validate_section(section, _section_models()[section], value)


def test_the_shipped_params_and_profiles_are_within_the_bounds():
    from sslvision.profiles import load_profile

    for name, model in _section_models().items():
        load_section(name, model, REPO / "params.yaml")
    for profile in sorted((REPO / "profiles").glob("*.yaml")):
        load_profile(profile, REPO / "params.yaml")


# --- 9. decoding ----------------------------------------------------------------------------------

def _decode(data: bytes, tmp_path: Path, channels: int = 1, size: int = 8) -> np.ndarray:
    path = tmp_path / "image"
    path.write_bytes(data)
    r = ingest.decode_one(str(path), None, None, ingest.Conversion(channels, size, 10**7, 10**7))
    assert r[0] == "ok", r
    return r[2]


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit grey ramp (0..65535) used to come out white from 255/65535 up."""
    ramp = np.tile(np.linspace(0, 65535, 8).astype(np.uint16), (8, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    pixels = _decode(buf.getvalue(), tmp_path)[..., 0]
    np.testing.assert_array_equal(pixels[0], ramp[0] >> 8)
    rgb = _decode(buf.getvalue(), tmp_path, channels=3)
    np.testing.assert_array_equal(rgb[0, :, 1], ramp[0] >> 8)


def test_exif_orientation_is_applied_as_viewers_do(tmp_path):
    """Left half dark, right half light, stored with orientation 3 (shown rotated 180 degrees)."""
    stored = np.zeros((8, 8), np.uint8)
    stored[:, 4:] = 255
    exif = Image.Exif()
    exif[0x0112] = 3
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "PNG", exif=exif)
    pixels = _decode(buf.getvalue(), tmp_path)[..., 0]
    assert pixels[:, :4].mean() > 200 and pixels[:, 4:].mean() < 50, pixels


def test_a_symlink_loop_in_an_image_folder_is_quarantined(tmp_path):
    _png(tmp_path / "data/train/cat/0.png")
    _png(tmp_path / "data/train/dog/0.png")
    os.symlink("loop", tmp_path / "data/train/cat/loop")
    listing = ingest.list_source(tmp_path / "data")
    assert [it.source_path for it in listing.items] == ["train/cat/0.png", "train/dog/0.png"]
    (refused,) = listing.quarantine
    assert refused["source_path"] == "train/cat/loop" and "symlink loop" in refused["detail"], refused


def test_unusable_manifest_paths_are_quarantined_naming_the_row(tmp_path, monkeypatch):
    """A symlink loop, a name longer than the file system allows and a NUL byte used to stop the whole
    ingest (RuntimeError, OSError, "embedded null byte" naming neither row nor file)."""
    root = tmp_path / "src"
    _png(root / "img/ok.png")
    _png(root / "img/other.png", 10)
    os.symlink("loop", root / "img/loop")
    long_name = "img/" + "x" * 300 + ".png"
    manifest = _manifest(root, ["img/ok.png", "img/loop", long_name, "img/a\0b.png", "img/other.png"],
                         ["cat", "cat", "cat", "dog", "dog"])
    monkeypatch.chdir(tmp_path)
    metrics = ingest.run_ingest(ingest.IngestParams(workers=1, cache_dir="cache"), manifest, tmp_path / "out")
    assert metrics["images"] == 2
    q = pd.read_parquet(tmp_path / "out/quarantine.parquet").set_index("source_path")
    assert set(q.index) == {"img/loop", long_name, "img/a\\0b.png"}
    assert (q["reason"] == ingest.UNREADABLE).all()
    for path, row in (("img/loop", 3), (long_name, 4), ("img/a\\0b.png", 5)):
        assert q.loc[path, "detail"].startswith(f"manifest.csv row {row}: "), q.loc[path, "detail"]
    assert "File name too long" in q.loc[long_name, "detail"]
    assert "null byte" in q.loc["img/a\\0b.png", "detail"]


def test_a_16_bit_image_comes_back_scaled_from_the_decode_cache(tmp_path, monkeypatch):
    """The conversion changed, so its cache key did: pixels cached by an earlier version are not reused,
    and a second run serves the scaled pixels from the cache."""
    root = tmp_path / "src"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(root / "deep.png")
    _png(root / "plain.png")
    manifest = _manifest(root, ["deep.png", "plain.png"], ["a", "b"])
    monkeypatch.chdir(tmp_path)
    params = ingest.IngestParams(workers=1, size=8, cache_dir="cache")
    for hits in (0, 2):
        metrics = ingest.run_ingest(params, manifest, tmp_path / "out")
        assert metrics["decode"]["cache_hits"] == hits
        assert np.load(tmp_path / "out/images.npy")[0].max() == 128


# --- 10. params -------------------------------------------------------------------------------------

STAGE_SECTIONS = {"ingest": "ingest", "pretrain": "pretrain", "embed": "pretrain", "audit": "audit",
                  "synthesize": "synthesize", "finetune": "finetune", "drift_eval": "drift_eval"}


@pytest.mark.parametrize("stage", list(STAGE_SECTIONS))
def test_a_stage_refuses_a_params_file_without_its_section(workdir, stage):
    """It used to run on every default, whatever the user meant."""
    section = STAGE_SECTIONS[stage]
    others = {s: {} for s in STAGE_SECTIONS.values() if s != section}
    Path("params.yaml").write_text(yaml.safe_dump(others))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "stages" / f"{stage}.py"), run_name="__main__")
    said = str(exit_.value.code)
    assert said.startswith(f"{stage}: error: params.yaml: {section}: section missing; "), said
    assert not Path("mlflow.db").exists()


def test_a_library_call_without_the_section_still_uses_the_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("ingest: {}\n")
    assert load_section("demo", _section_models()["demo"], path, overrides={"seed": 4}).seed == 4


@pytest.mark.parametrize("section", ["finetune", "audit"])
def test_training_on_the_test_split_is_refused(section):
    with pytest.raises(ParamsError, match=rf"params\.yaml: {section}\.splits: Value error, test is the held-out"):
        validate_section(section, _section_models()[section], {"splits": ["train", "test"]})
    with pytest.raises(ParamsError, match=rf"{section}\.splits\.0: Input should be 'train' or 'pool'"):
        validate_section(section, _section_models()[section], {"splits": ["trian"]})


SEEDED = ["demo", "pretrain", "audit", "synthesize", "finetune", "drift_eval"]


@pytest.mark.parametrize("section", SEEDED)
@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_seeds_outside_numpys_range_are_refused_naming_the_key(section, seed):
    with pytest.raises(ParamsError, match=rf"^params\.yaml: {section}\.seed: Input should be "):
        validate_section(section, _section_models()[section], {"seed": seed})
    assert validate_section(section, _section_models()[section], {"seed": 2**32 - 1}).seed == 2**32 - 1
