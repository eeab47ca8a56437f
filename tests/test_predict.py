"""`sslvision predict`: files, folders and manifests in, one row per file out, each converted exactly as
ingest converted the model's training images; bad files get their row; what was predicted can become a
production batch in the monitor's inbox."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from sslvision import ingest
from sslvision.finetune import Classifier, load_classifier, save_classifier
from sslvision.models import Encoder, EncoderConfig
from sslvision.predict import InboxBatch, list_inputs, predict_files

CLASSES = ["cat", "dog house", "T-shirt/top"]  # a space and a slash: names, not identifiers
RGB_ENCODER = EncoderConfig(backbone="resnet18", stem_stride=2, img_size=32, in_chans=3,
                            backbone_args={"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128],
                                           "zero_init_last": False})


def tiny_rgb_classifier(directory: Path) -> Path:
    """A random 32x32 RGB classifier saved under ``directory`` (a head with large weights: the class
    predicted changes with the image)."""
    torch.manual_seed(0)
    clf = Classifier(Encoder(RGB_ENCODER), CLASSES)
    torch.nn.init.normal_(clf.head.weight, std=1.0)
    save_classifier(directory, clf)
    return directory


def _save(image: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kw)
    return path


def write_images(root: Path) -> dict[str, Path]:
    """The kinds of file a user's photo folder holds, and a broken one."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (60, 90, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees
    files = {
        "jpeg": _save(photo, root / "photo.jpg", "JPEG"),
        "exif": _save(photo, root / "rotated.jpg", "JPEG", exif=exif),
        "gray": _save(Image.fromarray(rng.integers(0, 256, (20, 30), np.uint8)), root / "sub/gray.png", "PNG"),
        "16bit": _save(Image.fromarray(rng.integers(0, 65536, (40, 40)).astype(np.uint16)), root / "sub/deep.png",
                       "PNG"),
        "cmyk": _save(photo.convert("CMYK"), root / "sub/deeper/cmyk.jpg", "JPEG"),
    }
    files["broken"] = root / "broken.jpg"
    files["broken"].write_bytes(files["jpeg"].read_bytes()[:300])
    return files


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_classifier(tiny_rgb_classifier(tmp_path_factory.mktemp("model") / "classifier"))


def _as_ingest(classifier, path: Path) -> np.ndarray:
    r = ingest.decode_one(str(path), None, None, classifier.conversion)
    assert r[0] == "ok", r
    return classifier.predict_proba(r[2][None])[0]


def test_each_file_is_converted_as_ingest_did_and_a_broken_one_gets_its_reason(model, tmp_path):
    files = write_images(tmp_path)
    paths = [str(files[k]) for k in ("jpeg", "exif", "gray", "broken", "16bit", "cmyk")] + [str(tmp_path / "gone.png")]
    out = predict_files(paths, model, batch_size=2)
    assert list(out["path"]) == paths
    assert list(out.columns) == ["path", "label", "confidence", "top1", "top1_prob", "top2", "top2_prob",
                                 "top3", "top3_prob", "error"]
    good = out[out["error"].isna()]
    assert len(good) == 5
    for row in good.itertuples():
        expected = _as_ingest(model, Path(row.path))
        order = np.argsort(-expected)
        assert [row.top1, row.top2, row.top3] == [CLASSES[k] for k in order]
        np.testing.assert_allclose([row.top1_prob, row.top2_prob, row.top3_prob], expected[order], rtol=1e-4, atol=1e-6)
        assert row.label == row.top1 and row.confidence == row.top1_prob
    # the rotated copy of the photo is seen upright (as ingest and image viewers show it), not as stored
    assert not np.allclose(_as_ingest(model, files["exif"]), _as_ingest(model, files["jpeg"]))
    broken, gone = out.iloc[3], out.iloc[6]
    assert broken["error"].startswith("truncated:") and pd.isna(broken["label"]) and np.isnan(broken["confidence"])
    assert gone["error"].startswith("missing file:")


def test_the_model_converts_with_its_own_conversion_not_the_params(model, tmp_path):
    """A model trained on 32x32 RGB images converts a file to 32x32 RGB whatever params.yaml says now."""
    assert (model.conversion.channels, model.conversion.size) == (3, 32)
    files = write_images(tmp_path)
    out = predict_files([str(files["gray"])], model)
    np.testing.assert_allclose(out.loc[0, "top1_prob"], _as_ingest(model, files["gray"]).max(), rtol=1e-4)


def test_folders_recurse_and_manifests_list_files_relative_to_themselves(tmp_path):
    files = write_images(tmp_path / "photos")
    (tmp_path / "photos/.hidden.png").write_bytes(files["gray"].read_bytes())
    os.symlink(tmp_path, tmp_path / "photos/sub/loop")  # a linked folder is listed, never entered
    listed = list_inputs([tmp_path / "photos"])
    assert [Path(p).relative_to(tmp_path / "photos").as_posix() for p in listed] == [
        "broken.jpg", "photo.jpg", "rotated.jpg", "sub/deep.png", "sub/gray.png", "sub/loop", "sub/deeper/cmyk.jpg"]
    pd.DataFrame({"path": ["photo.jpg", None, "sub/gray.png", "nothing.png"]}).to_csv(tmp_path / "photos/m.csv")
    pd.DataFrame({"path": ["photos/rotated.jpg"]}).to_parquet(tmp_path / "m.parquet")
    assert list_inputs([tmp_path / "photos/m.csv", tmp_path / "m.parquet", tmp_path / "photos/photo.jpg"]) == [
        str(tmp_path / "photos/photo.jpg"), "", str(tmp_path / "photos/sub/gray.png"),
        str(tmp_path / "photos/nothing.png"), str(tmp_path / "photos/rotated.jpg"), str(tmp_path / "photos/photo.jpg")]
    (tmp_path / "bad.csv").write_text("file,label\na.png,cat\n")
    with pytest.raises(ValueError, match=r"bad\.csv: manifest without a 'path' column"):
        list_inputs([tmp_path / "bad.csv"])


def test_files_are_decoded_and_predicted_a_batch_at_a_time(model, tmp_path, monkeypatch):
    files = write_images(tmp_path)
    seen = []
    predict_proba = model.predict_proba
    monkeypatch.setattr(model, "predict_proba", lambda x, bs: seen.append(len(x)) or predict_proba(x, bs))
    out = predict_files([str(files["jpeg"])] * 5 + [str(files["broken"]), str(tmp_path), "/dev/null"], model,
                        batch_size=2)
    assert seen == [2, 2, 1]  # never more than a batch of decoded images at once
    assert out.loc[5, "error"].startswith("truncated:")
    assert out["error"].tolist()[6:] == ["not a regular file: a directory, FIFO or device"] * 2


def test_log_batch_copies_the_predicted_files_into_one_new_inbox_batch(model, tmp_path):
    files = write_images(tmp_path / "photos")
    os.symlink(files["jpeg"], tmp_path / "photos/link.jpg")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    paths = list_inputs([tmp_path / "photos"])
    with InboxBatch(inbox, model={"uri": "test"}) as batch:
        out = predict_files(paths, model, batch=batch, batch_size=3)
        assert [p.name for p in inbox.iterdir() if not p.name.startswith(".")] == []  # nothing visible yet
    assert [p.name for p in inbox.iterdir()] == [batch.path.name] and batch.path.name.startswith("predict-")
    meta = json.loads((batch.path / "batch.json").read_text())
    # every file predicted, byte for byte, except the link (read, never copied) and the broken file
    copied = {name: Path(src) for name, src in meta["files"].items()}
    assert sorted(p.name for p in copied.values()) == sorted(
        Path(p).name for p, e in zip(out["path"], out["error"], strict=True)
        if pd.isna(e) and Path(p).name != "link.jpg")
    assert out.loc[out["path"].str.endswith("link.jpg"), "error"].isna().all()
    for name, src in copied.items():
        assert (batch.path / name).read_bytes() == src.read_bytes()
    assert meta["model"] == {"uri": "test"}

    from sslvision.batches import read_batch  # what the monitor reads: every copied image, unlabelled

    images, labels = read_batch(batch.path, CLASSES, 3, 32)
    assert len(images) == len(copied) and (labels == -1).all()


def test_a_failed_prediction_leaves_nothing_in_the_inbox(model, tmp_path):
    files = write_images(tmp_path / "photos")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with pytest.raises(KeyboardInterrupt), InboxBatch(inbox) as batch:
        predict_files([str(files["jpeg"])], model, batch=batch)
        raise KeyboardInterrupt
    with InboxBatch(inbox) as batch:
        predict_files([str(files["broken"])], model, batch=batch)
    assert list(inbox.iterdir()) == [] and batch.path is None
    with pytest.raises(FileNotFoundError, match="monitor inbox does not exist"):
        InboxBatch(tmp_path / "nowhere")


def test_cli_predicts_files_writes_the_csv_and_logs_the_batch(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sslvision.cli import app

    monkeypatch.chdir(tmp_path)
    tiny_rgb_classifier(tmp_path / "models/classifier")
    files = write_images(tmp_path / "photos")
    (tmp_path / "data/inbox").mkdir(parents=True)
    # today's ingest params differ from what the model was trained on: they must not matter
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ingest": {"channels": 1, "size": 64},
                                                           "monitor": {"inbox": "data/inbox"}}))
    result = CliRunner().invoke(app, ["predict", str(files["jpeg"]), str(files["broken"]), "photos/sub",
                                      "--model", "models/classifier", "--out", "out.csv", "--log-batch"])
    assert result.exit_code == 0, result.output
    assert "5 files: 4 predicted, 1 not readable as images -> out.csv" in result.output
    out = pd.read_csv(tmp_path / "out.csv")
    assert len(out) == 5 and out["label"].notna().sum() == 4 and set(out["label"].dropna()) <= set(CLASSES)
    assert out.loc[1, "error"].startswith("truncated:")
    (batch,) = (tmp_path / "data/inbox").iterdir()
    assert "production batch: data/inbox/" + batch.name + " (4 files)" in result.output
    model = load_classifier(tmp_path / "models/classifier")
    np.testing.assert_allclose(out.loc[0, "confidence"], _as_ingest(model, files["jpeg"]).max(), rtol=1e-5)

    shown = CliRunner().invoke(app, ["predict", "photos/photo.jpg", "photos/broken.jpg",
                                     "--model", "models/classifier"])
    assert shown.exit_code == 0, shown.output
    assert "photos/photo.jpg" in shown.output and "top 3" in shown.output and "truncated" in shown.output


def test_the_classifier_config_carries_the_conversion_and_is_checked(tmp_path, caplog):
    directory = tiny_rgb_classifier(tmp_path / "clf")
    config = json.loads((directory / "config.json").read_text())
    assert config["classes"] == CLASSES
    assert config["conversion"] == {"channels": 3, "size": 32, "max_file_bytes": 20_000_000, "max_pixels": 40_000_000,
                                    "tag": ingest.Conversion(3, 32, 20_000_000, 40_000_000).tag}
    config["logit_bias"] = [0.0, 0.1, -0.1]  # a key a later sslvision adds is ignored
    (directory / "config.json").write_text(json.dumps(config))
    assert load_classifier(directory).conversion == ingest.Conversion(3, 32, 20_000_000, 40_000_000)
    for change, message in (({"channels": 1}, "conversion makes 32x32x1 images but the encoder takes 32x32x3"),
                            ({"size": 10**6}, r"conversion\.size"),
                            ({"extra": 1}, "conversion must be an object")):
        bad = {**config, "conversion": {**config["conversion"], **change}}
        (directory / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            load_classifier(directory)
    # another sslvision's conversion: a warning, not a refusal (an upgrade must not take the champion down)
    old = {**config, "conversion": {**config["conversion"], "tag": "v0-c3-s32-p40000000"}}
    (directory / "config.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="sslvision.finetune"):
        assert load_classifier(directory).conversion == ingest.Conversion(3, 32, 20_000_000, 40_000_000)
    assert "retrain it (dvc repro) to match" in caplog.text
    del config["conversion"]  # saved before the conversion was recorded: the encoder's shape, ingest's limits
    (directory / "config.json").write_text(json.dumps(config))
    assert load_classifier(directory).conversion == ingest.Conversion(3, 32, 20_000_000, 40_000_000)
    config["classes"] = [1, 2, 3]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="classes must be a list of 1 to"):
        load_classifier(directory)


def test_png_round_trip_of_converted_pixels_is_lossless():
    from sslvision import registry

    rng = np.random.default_rng(1)
    for shape in ((32, 32, 3), (28, 28, 1)):
        pixels = rng.integers(0, 256, shape, np.uint8)
        r = ingest.decode_bytes(registry.png_bytes(pixels), ingest.Conversion(shape[2], shape[0], 10**7, 10**7))
        np.testing.assert_array_equal(r[1], pixels)
