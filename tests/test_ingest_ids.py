"""Image ids (issue 22, item 1): the same file name in two class folders is normal data.

Cameras and scrapers name files ``IMG_0001.jpg`` in every folder; ids built from the path inside the class
folder made ``cat/IMG_0001.jpg`` and ``dog/IMG_0001.jpg`` one id and quarantined all but one as "duplicate
id". Ids are now ``<split>/[<batch>/]<stem>-<8 hex of the file's sha256>``: every distinct file is kept,
and an id survives a re-ingest, a relabel and the arrival of another file of the same name.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sslvision import ingest

CLASSES = ("bird", "cat", "dog")
LABEL_FREE = ("images.npy", "images.parquet", "ssl_pool.parquet")  # what pretrain depends on


def _image(seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A distinct 16x16 image per seed (blocks of 4x4, so JPEG keeps them apart)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blocks.repeat(4, 0).repeat(4, 1)).convert(mode).save(buf, fmt)
    return buf.getvalue()


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _camera_folder(root: Path) -> Path:
    """3 classes x IMG_0001..IMG_0004.jpg, 12 distinct images."""
    return _write(root, {f"{c}/IMG_{i:04d}.jpg": _image(10 * k + i) for k, c in enumerate(CLASSES)
                         for i in range(1, 5)})


def _ingest(source: Path, out: Path, pool: Path | None = None, **kw) -> tuple[dict, pd.DataFrame]:
    kw.setdefault("cache_dir", str(out.parent / "cache"))
    params = ingest.IngestParams(workers=0, chunk_size=5, channels=3, size=16, **kw)
    metrics = ingest.run_ingest(params, source, out, pool)
    return metrics, pd.read_parquet(out / "manifest.parquet")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def test_every_class_folder_using_the_same_file_names_keeps_all_twelve_images(tmp_path):
    source = _camera_folder(tmp_path / "photos")
    metrics, m = _ingest(source, tmp_path / "out")
    assert metrics["images"] == 12 and metrics["quarantined"] == 0 and metrics["listed"] == 12
    assert m["id"].is_unique
    assert set(m["id"]) == {f"train/IMG_{i:04d}-{_digest(source / c / f'IMG_{i:04d}.jpg')}"
                            for c in CLASSES for i in range(1, 5)}
    assert not any(c in i for i in m["id"] for c in CLASSES), "an id must not name the class"
    assert (m["label_name"] == m["source_path"].str.split("/").str[0]).all()
    assert m["id"].tolist() == sorted(m["id"]), "rows are ordered by id"


@pytest.mark.parametrize("layout", ["imagefolder", "manifest"])
def test_a_png_beside_a_jpg_of_the_same_name_are_both_kept(tmp_path, layout):
    root = _write(tmp_path / "data", {"cat/a.png": _image(1, "PNG"), "cat/a.jpg": _image(2),
                                      "dog/b.png": _image(3, "PNG")})
    source = root
    if layout == "manifest":
        source = root / "labels.csv"
        pd.DataFrame({"path": ["cat/a.png", "cat/a.jpg", "dog/b.png"], "label": ["cat", "cat", "dog"]}).to_csv(
            source, index=False)
    metrics, m = _ingest(source, tmp_path / "out")
    assert metrics["images"] == 3 and metrics["quarantined"] == 0
    ids = dict(zip(m["source_path"], m["id"], strict=True))
    assert ids["cat/a.png"] == f"train/a-{_digest(root / 'cat/a.png')}"
    assert ids["cat/a.jpg"] == f"train/a-{_digest(root / 'cat/a.jpg')}"


def test_ids_survive_a_reingest_and_the_arrival_of_another_file_of_the_same_name(tmp_path):
    """An id that changed for an existing file when a new one appears would detach audit results and
    test-split membership (keyed by id) from their image."""
    source = _write(tmp_path / "photos", {"cat/IMG_0001.jpg": _image(1), "cat/IMG_0002.jpg": _image(2),
                                          "dog/IMG_0003.jpg": _image(3)})
    _, first = _ingest(source, tmp_path / "out1")
    _, again = _ingest(source, tmp_path / "out2")
    assert again["id"].tolist() == first["id"].tolist()
    _write(source, {"dog/IMG_0001.jpg": _image(4)})  # a second IMG_0001, in another class
    metrics, third = _ingest(source, tmp_path / "out3")
    assert metrics["images"] == 4 and metrics["quarantined"] == 0
    before = dict(zip(first["source_path"], first["id"], strict=True))
    after = dict(zip(third["source_path"], third["id"], strict=True))
    assert {p: after[p] for p in before} == before


def test_moving_a_file_to_another_class_folder_keeps_its_id_and_the_label_free_outputs(tmp_path):
    """A relabel (moving a file, even into a subfolder of the other class) changes its label only:
    images.npy, images.parquet and ssl_pool.parquet stay byte-identical, so pretrain does not re-run."""
    source = _camera_folder(tmp_path / "photos")
    _write(source, {"cat/IMG_0005.jpg": _image(99), "cat/2019/IMG_0006.jpg": _image(98)})
    _, first = _ingest(source, tmp_path / "out1")
    (source / "dog/2020").mkdir()
    (source / "cat/IMG_0005.jpg").rename(source / "dog/IMG_0005.jpg")
    (source / "cat/2019/IMG_0006.jpg").rename(source / "dog/2020/IMG_0006.jpg")
    _, second = _ingest(source, tmp_path / "out2")

    for name in LABEL_FREE:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name
    assert second["id"].tolist() == first["id"].tolist()
    moved = second.set_index("id").loc[first.set_index("source_path").loc[
        ["cat/IMG_0005.jpg", "cat/2019/IMG_0006.jpg"], "id"]]
    assert moved["source_path"].tolist() == ["dog/IMG_0005.jpg", "dog/2020/IMG_0006.jpg"]
    assert (moved["label_name"] == "dog").all()


def test_byte_identical_files_in_two_class_folders_are_both_kept_and_reported_as_duplicates(tmp_path):
    """The same image filed under two labels is a conflict to report, not a file to drop; which copy
    takes the ``~2`` id cannot change images.npy, since the two rows are the same."""
    same = _image(7, "PNG")
    source = _write(tmp_path / "data", {"cat/x.png": same, "dog/x.png": same, "cat/y.png": _image(8, "PNG"),
                                        "dog/z.png": _image(9, "PNG")})
    metrics, m = _ingest(source, tmp_path / "out1")
    assert metrics["images"] == 4 and metrics["quarantined"] == 0
    d = _digest(source / "cat/x.png")
    assert dict(zip(m["source_path"], m["id"], strict=True))["cat/x.png"] == f"train/x-{d}"
    assert dict(zip(m["source_path"], m["id"], strict=True))["dog/x.png"] == f"train/x-{d}~2"
    assert metrics["duplicates"]["exact"] == 1 and metrics["duplicates"]["conflicting_label_groups"] == 1
    report = pd.read_parquet(tmp_path / "out1/duplicates.parquet")
    assert set(report.loc[report["kind"] == "exact", "source_path"]) == {"cat/x.png", "dog/x.png"}

    (source / "bird").mkdir()
    (source / "cat/x.png").rename(source / "bird/x.png")  # now sorts after dog/x.png
    _, moved = _ingest(source, tmp_path / "out2")
    for name in LABEL_FREE:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name


def test_same_names_across_train_test_and_pool_batches_are_all_kept(tmp_path):
    one = "IMG_0001.jpg"
    source = _write(tmp_path / "data", {f"train/cat/{one}": _image(1), f"train/dog/{one}": _image(2),
                                        f"test/cat/{one}": _image(3), f"test/dog/{one}": _image(4)})
    pool = _write(tmp_path / "pool", {f"b1/{one}": _image(5), f"b1/cat/{one}": _image(6),  # unlabeled, labeled
                                      f"b2/cat/{one}": _image(7), f"b2/dog/{one}": _image(8)})
    metrics, m = _ingest(source, tmp_path / "out", pool)
    assert metrics["images"] == 8 and metrics["quarantined"] == 0
    assert metrics["by_split"] == {"train": 2, "test": 2, "pool": 4}
    prefixes = sorted(i.rsplit("/", 1)[0] for i in m["id"])
    assert prefixes == ["pool/b1", "pool/b1", "pool/b2", "pool/b2", "test", "test", "train", "train"]
    assert m.loc[m["source_path"] == f"pool/b1/{one}", "label"].item() == -1


def test_a_manifest_relabel_keeps_ids_and_a_file_listed_twice_is_refused(tmp_path):
    root = _write(tmp_path / "data", {"img/a.jpg": _image(1), "img/b.jpg": _image(2), "other/a.jpg": _image(3),
                                      "img/c.jpg": _image(4)})
    rows = pd.DataFrame({"path": ["img/a.jpg", "img/b.jpg", "other/a.jpg", "img/c.jpg", "img/a.jpg", "./img/a.jpg"],
                         "label": ["cat", "dog", "dog", "cat", "cat", "dog"],
                         "split": ["train", "train", "train", "test", "test", "train"]})
    rows.to_csv(root / "labels.csv", index=False)
    metrics, first = _ingest(root / "labels.csv", tmp_path / "out1")
    assert metrics["images"] + metrics["quarantined"] == metrics["listed"] == 6
    q = pd.read_parquet(tmp_path / "out1/quarantine.parquet")
    assert q[["source_path", "split", "reason"]].values.tolist() == [["img/a.jpg", "train", ingest.DUPLICATE_ID]]
    assert "already listed in the train split" in q["detail"].item()
    assert metrics["duplicates"]["leakage_groups"] == 1  # img/a.jpg in train and in test: kept, reported

    rows.loc[1, "label"] = "cat"
    rows.to_csv(root / "labels.csv", index=False)
    _, second = _ingest(root / "labels.csv", tmp_path / "out2")
    for name in LABEL_FREE:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name
    assert second["id"].tolist() == first["id"].tolist()
    assert second.set_index("source_path").loc["img/b.jpg", "label_name"] == "cat"


def test_idx_rows_keep_their_row_number_as_id(tmp_path):
    for stem, n in (("train", 3), ("t10k", 2)):
        for kind, array in (("images-idx3", np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2)),
                            ("labels-idx1", np.arange(n, dtype=np.uint8) % 2)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            with gzip.open(tmp_path / f"{stem}-{kind}-ubyte.gz", "wb") as fh:
                fh.write(header + array.tobytes())
    _, m = _ingest(tmp_path, tmp_path / "out")
    assert m["id"].tolist() == ["train/00000", "train/00001", "train/00002", "test/00000", "test/00001"]


def test_a_reingest_finds_unchanged_files_in_the_cache_without_reading_them_again(tmp_path, monkeypatch):
    """Hashing at listing is the one read of an unchanged file; decoding looks it up by that digest."""
    source = _camera_folder(tmp_path / "photos")
    _ingest(source, tmp_path / "out1")
    _write(source, {"cat/IMG_0009.jpg": _image(77)})
    read = []
    real_read = ingest.read_file
    monkeypatch.setattr(ingest, "read_file", lambda path, conv: (read.append(path), real_read(path, conv))[1])
    metrics, _ = _ingest(source, tmp_path / "out2")
    assert metrics["decode"]["cache_hits"] == 12 and metrics["decode"]["decoded"] == 1
    assert [Path(p).relative_to(source).as_posix() for p in read] == ["cat/IMG_0009.jpg"]
