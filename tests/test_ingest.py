"""The ingest stage: sources, quarantine, cache, duplicates, reports, and `dvc repro ingest` for real."""

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from sslvision import ingest
from sslvision.idx import read_idx
from sslvision.ingest import IngestParams, run_ingest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fmnist():
    """The first 60 train and 20 test Fashion-MNIST images with their labels."""
    return {
        "train": (read_idx(FMNIST / "train-images-idx3-ubyte.gz")[:60],
                  read_idx(FMNIST / "train-labels-idx1-ubyte.gz")[:60]),
        "test": (read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:20],
                 read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:20]),
    }


def params(tmp_path, **kw) -> IngestParams:
    kw.setdefault("workers", 0)
    kw.setdefault("chunk_size", 16)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return IngestParams(**kw)


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def image_folder(root: Path, data: dict) -> Path:
    """train/<label>/<i>.png and test/<label>/<i>.png: ids train/00000 ... as the IDX source gives."""
    for split, (images, labels) in data.items():
        for i, (x, y) in enumerate(zip(images, labels, strict=True)):
            d = root / split / str(y)
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.png").write_bytes(png_bytes(x))
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_idx_imagefolder_and_manifest_give_the_same_arrays(tmp_path, fmnist):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    for split, stem in (("train", "train"), ("test", "t10k")):
        write_idx(idx_dir / f"{stem}-images-idx3-ubyte.gz", fmnist[split][0])
        write_idx(idx_dir / f"{stem}-labels-idx1-ubyte.gz", fmnist[split][1])
    folder = image_folder(tmp_path / "folder", fmnist)
    rows = []
    for split, (images, labels) in fmnist.items():
        for i, (x, y) in enumerate(zip(images, labels, strict=True)):
            (tmp_path / "flat" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "flat" / split / f"{i:05d}.png").write_bytes(png_bytes(x))
            rows.append({"path": f"{split}/{i:05d}.png", "label": int(y), "split": split})
    manifest = tmp_path / "flat" / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)

    got = {}
    for name, source, workers in (("idx", idx_dir, 2), ("folder", folder, 0), ("manifest", manifest, 0)):
        out = tmp_path / f"out_{name}"
        metrics = run_ingest(params(tmp_path, workers=workers, cache_dir=""), source, out)
        assert metrics["images"] == 80 and metrics["quarantined"] == 0
        m = pd.read_parquet(out / "manifest.parquet")
        got[name] = (np.load(out / "images.npy"), m["label"].to_numpy(), m["split"].tolist(),
                     json.loads((out / "classes.json").read_text())["classes"])
    ref = np.concatenate([fmnist["train"][0], fmnist["test"][0]])[..., None]
    for name, (images, labels, splits, classes) in got.items():
        assert images.shape == (80, 28, 28, 1) and images.dtype == np.uint8, name
        np.testing.assert_array_equal(images, ref, err_msg=name)
        np.testing.assert_array_equal(labels, np.concatenate([fmnist["train"][1], fmnist["test"][1]]))
        assert splits == ["train"] * 60 + ["test"] * 20
        assert classes == [str(i) for i in range(10)]


def broken_tree(root: Path, good: np.ndarray) -> dict[str, str]:
    """An ImageFolder with one file of every broken kind; returns {source_path: expected reason}."""
    ok = png_bytes(good)
    for d in ("train/a", "train/b", "test/a", "test/zzz"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "train/a/good.png").write_bytes(ok)
    (root / "train/b/good2.png").write_bytes(png_bytes(255 - good))
    (root / "test/a/good3.png").write_bytes(png_bytes(good // 2))
    (root / "train/a/wrong_mode_size.png").write_bytes(png_bytes(np.full((40, 50, 3), 90, np.uint8)))
    (root / "train/b/good.png").write_bytes(png_bytes(good[::-1]))  # the name of train/a/good.png: kept too
    expected = {
        "train/a/empty.png": (b"", ingest.EMPTY),
        "train/a/truncated.png": (ok[: len(ok) // 2], ingest.TRUNCATED),
        "train/a/header_only.png": (ok[:30], ingest.TRUNCATED),
        "train/a/text.png": (b"this is a text file, not an image\n", ingest.NOT_IMAGE),
        "train/a/huge.png": (png_bytes(np.zeros((300, 300), np.uint8)), ingest.TOO_LARGE),
        "train/a/padded.png": (ok + b"\0" * 5000, ingest.TOO_LARGE),
        "test/zzz/unknown.png": (ok, ingest.UNKNOWN_LABEL),
    }
    corrupt = bytearray(ok)
    corrupt[corrupt.index(b"IDAT") + 8] ^= 0xFF  # breaks the chunk's CRC
    expected["train/b/bad_crc.png"] = (bytes(corrupt), ingest.UNREADABLE)
    for rel, (data, _) in expected.items():
        (root / rel).write_bytes(data)
    outside = root.parent / "outside.png"
    outside.write_bytes(ok)
    os.symlink(outside, root / "train/a/link.png")
    expected["train/a/link.png"] = (None, ingest.OUTSIDE)
    return {rel: reason for rel, (_, reason) in expected.items()}


def test_every_broken_kind_is_quarantined_with_its_reason_and_nothing_is_lost(tmp_path, fmnist):
    root = tmp_path / "data"
    expected = broken_tree(root, fmnist["train"][0][0])
    out = tmp_path / "out"
    metrics = run_ingest(params(tmp_path, workers=2, max_pixels=200 * 200, max_file_bytes=4000), root, out)

    q = pd.read_parquet(out / "quarantine.parquet")
    assert dict(zip(q["source_path"], q["reason"], strict=True)) == expected
    assert q["detail"].str.len().min() > 0
    assert "Truncated" in q.set_index("source_path").loc["train/a/truncated.png", "detail"]
    assert "cannot identify image file" in q.set_index("source_path").loc["train/a/text.png", "detail"]
    m = pd.read_parquet(out / "manifest.parquet")
    assert sorted(m["source_path"]) == ["test/a/good3.png", "train/a/good.png", "train/a/wrong_mode_size.png",
                                        "train/b/good.png", "train/b/good2.png"]
    odd = m.set_index("source_path").loc["train/a/wrong_mode_size.png"]
    assert (odd["orig_width"], odd["orig_height"], odd["orig_mode"]) == (50, 40, "RGB")
    # nothing lost: every file on disk is in exactly one of the two tables
    assert sorted([*m["source_path"], *q["source_path"]]) == sorted(files_under(root))
    assert metrics["images"] + metrics["quarantined"] == metrics["listed"] == len(files_under(root))
    assert metrics["quarantine"][ingest.TRUNCATED] == 2 and metrics["quarantine"][ingest.TOO_LARGE] == 2
    assert np.load(out / "images.npy").shape == (5, 28, 28, 1)


def test_manifest_paths_outside_the_root_missing_files_and_unknown_labels_are_refused(tmp_path, fmnist):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    x = fmnist["train"][0]
    for i in range(3):
        (root / "img" / f"{i}.png").write_bytes(png_bytes(x[i]))
    (tmp_path / "secret.png").write_bytes(png_bytes(x[3]))
    manifest = root / "manifest.parquet"
    pd.DataFrame({
        "path": ["img/0.png", "img/1.png", "img/2.png", "../secret.png", str(tmp_path / "secret.png"),
                 "img/../../secret.png", "img/nope.png", "img/2.png"],
        "label": ["shirt", "bag", "", "bag", "bag", "bag", "bag", "bag"],
        "split": ["train", "train", "train", "train", "train", "train", "train", "test"],
    }).to_parquet(manifest)
    out = tmp_path / "out"
    run_ingest(params(tmp_path), manifest, out)
    q = pd.read_parquet(out / "quarantine.parquet")
    assert (q["reason"] == ingest.OUTSIDE).sum() == 3
    assert q.loc[q["reason"] == ingest.OUTSIDE, "detail"].str.contains("outside").all()
    assert q.set_index("source_path").loc["img/nope.png", "reason"] == ingest.MISSING
    assert q.set_index("source_path").loc["img/2.png", "reason"] == ingest.UNKNOWN_LABEL
    m = pd.read_parquet(out / "manifest.parquet")
    digest = {i: hashlib.sha256((root / f"img/{i}.png").read_bytes()).hexdigest()[:8] for i in range(3)}
    assert m["id"].tolist() == [f"train/0-{digest[0]}", f"train/1-{digest[1]}", f"test/2-{digest[2]}"]
    assert json.loads((out / "classes.json").read_text())["classes"] == ["bag", "shirt"]
    assert m["label_name"].tolist() == ["shirt", "bag", "bag"]
    assert pd.read_parquet(out / "eval_labels.parquet")["id"].tolist() == [f"test/2-{digest[2]}"]


def test_cache_decodes_only_new_pool_files_and_survives_damage(tmp_path, fmnist):
    source = image_folder(tmp_path / "src", {"train": fmnist["train"]})
    pool = tmp_path / "pool"
    pool.mkdir()
    p = params(tmp_path, workers=2)
    first = run_ingest(p, source, tmp_path / "out1", pool)
    assert first["decode"]["decoded"] == 60 and first["decode"]["cache_hits"] == 0

    (pool / "batch1").mkdir()
    (pool / "batch1" / "batch.json").write_text("{}")
    for i in range(3):
        (pool / "batch1" / f"p{i}.png").write_bytes(png_bytes(fmnist["test"][0][i]))
    (pool / "batch2" / "0").mkdir(parents=True)
    (pool / "batch2" / "0" / "q.png").write_bytes(png_bytes(fmnist["test"][0][5]))
    second = run_ingest(p, source, tmp_path / "out2", pool)
    assert second["decode"]["decoded"] == 4 and second["decode"]["cache_hits"] == 60
    assert second["by_split"]["pool"] == 4 and second["pool_batches"] == 2
    a1, a2 = np.load(tmp_path / "out1/images.npy"), np.load(tmp_path / "out2/images.npy")
    np.testing.assert_array_equal(a1, a2[:60])
    m = pd.read_parquet(tmp_path / "out2/manifest.parquet")
    pooled = m[m["split"] == "pool"]
    assert pooled["batch"].tolist() == ["batch1"] * 3 + ["batch2"] and pooled["label"].tolist() == [-1, -1, -1, 0]

    # A damaged shard (pixels no longer match their hash) and then a garbage index are both survived.
    cache_dir = next((tmp_path / "cache").iterdir())
    biggest = max(cache_dir.glob("shard-*.npy"), key=lambda f: f.stat().st_size)
    raw = bytearray(biggest.read_bytes())
    raw[-100:] = bytes(255 - b for b in raw[-100:])
    biggest.write_bytes(bytes(raw))
    third = run_ingest(p, source, tmp_path / "out3", pool)
    assert 0 < third["decode"]["decoded"] < 64
    np.testing.assert_array_equal(np.load(tmp_path / "out3/images.npy"), a2)
    (cache_dir / "index.parquet").write_bytes(b"not parquet")
    fourth = run_ingest(p, source, tmp_path / "out4", pool)
    assert fourth["decode"]["decoded"] == 64
    np.testing.assert_array_equal(np.load(tmp_path / "out4/images.npy"), a2)


def test_duplicates_conflicting_labels_and_leakage_are_flagged_and_kept(tmp_path, fmnist):
    x = fmnist["train"][0]
    root = tmp_path / "src"
    for d in ("train/a", "train/b", "test/a"):
        (root / d).mkdir(parents=True)
    for i in range(8):
        (root / "train/a" / f"u{i}.png").write_bytes(png_bytes(x[10 + i]))
    (root / "train/a/a_orig.png").write_bytes(png_bytes(x[0]))
    (root / "train/b/copy.png").write_bytes(png_bytes(x[0]))  # exact copy, other label
    (root / "test/a/leak.png").write_bytes(png_bytes(x[0]))  # exact copy in test
    brighter = np.clip(x[1].astype(int) + 1, 0, 255).astype(np.uint8)
    (root / "train/a/near.png").write_bytes(png_bytes(x[1]))
    (root / "train/a/near2.png").write_bytes(png_bytes(brighter))
    out = tmp_path / "out"
    metrics = run_ingest(params(tmp_path), root, out)
    d = metrics["duplicates"]
    assert d["exact"] == 2 and d["exact_groups"] == 1
    assert d["near"] == 1 and d["near_groups"] == 1
    assert d["conflicting_label_groups"] == 1 and d["leakage_groups"] == 1 and d["leaked_test_images"] == 1
    m = pd.read_parquet(out / "manifest.parquet").set_index("source_path")
    assert len(m) == 13  # duplicates are kept
    assert m.loc["train/b/copy.png", "exact_duplicate_of"] == m.loc["train/a/a_orig.png", "id"]
    assert m.loc["test/a/leak.png", "exact_duplicate_of"] == m.loc["train/a/a_orig.png", "id"]
    assert m.loc["train/a/near2.png", "near_duplicate_of"] == m.loc["train/a/near.png", "id"]
    assert pd.isna(m.loc["train/a/u0.png", "exact_duplicate_of"])
    report = pd.read_parquet(out / "duplicates.parquet")
    exact = report[report["kind"] == "exact"]
    assert set(exact["source_path"]) == {"train/a/a_orig.png", "train/b/copy.png", "test/a/leak.png"}
    assert exact["conflicting_labels"].all() and exact["leakage"].all()


def test_near_duplicates_within_hamming_bits(tmp_path):
    hashes = np.array([0b0, 0b111, 0b1, 1 << 63, (1 << 63) | 0b11], dtype=np.uint64)
    assert ingest._near_groups(hashes, 0).tolist() == [0, 1, 2, 3, 4]
    assert ingest._near_groups(hashes, 1).tolist() == [0, 1, 0, 0, 4]  # bit 63 alone differs from 0
    assert ingest._near_groups(hashes, 2).tolist() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize("make, problem", [
    (lambda p: p / "nowhere", "source not found"),
    (lambda p: (p / "notes.txt", (p / "notes.txt").write_text("x"))[0], "unknown source layout"),
    (lambda p: (p / "flat", (p / "flat").mkdir(), (p / "flat" / "a.png").write_bytes(b"x"))[0],
     "unknown source layout"),
    (lambda p: (p / "empty", (p / "empty" / "train" / "cls").mkdir(parents=True))[0], "empty dataset"),
    (lambda p: (p / "bad", (p / "bad" / "c").mkdir(parents=True), (p / "bad" / "c" / "x.png").write_bytes(b""))[0],
     r"empty dataset: none of the 1 files could be used \(quarantined by reason: \{'empty': 1\}\)"),
])
def test_errors_name_the_path_and_the_problem(tmp_path, make, problem):
    source = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=problem) as err:
        run_ingest(params(tmp_path), source, tmp_path / "out")
    assert str(source) in str(err.value)


def test_manifest_errors_name_the_file(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("file,label\na.png,1\n")
    with pytest.raises(ValueError, match=r"m.csv: manifest lacks column\(s\) \['path'\]"):
        run_ingest(params(tmp_path), bad, tmp_path / "out")
    bad.write_text("path,label,split\na.png,1,val\n")
    with pytest.raises(ValueError, match=r"m.csv: row 2: unknown split 'val'"):
        run_ingest(params(tmp_path), bad, tmp_path / "out")


def _reproduce(repo: Path) -> list[str]:
    """``dvc repro ingest`` through DVC's Python API; the names of the stages that ran."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        return [stage.addressing for stage in dvc.reproduce("ingest")]


def _lock_md5(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for o in lock["stages"]["ingest"]["outs"]}


@pytest.mark.slow  # three real `dvc repro` runs, each starting Python + MLflow (~15 s each on 2 busy cores)
def test_dvc_repro_ingest_runs_then_is_a_no_op_and_a_label_change_keeps_the_images(tmp_path, fmnist, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    (repo / "src/sslvision").mkdir(parents=True)
    # The real stage definition and script; the code itself runs from the installed package.
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["ingest"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": stage}}, sort_keys=False))
    shutil.copy(REPO / "stages/ingest.py", repo / "stages/ingest.py")
    for dep in stage["deps"]:
        if dep.startswith("src/"):
            (repo / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / dep, repo / dep)
    raw = repo / "data/raw"
    (raw / "img").mkdir(parents=True)
    (repo / "data/pool").mkdir()
    images, labels = fmnist["train"]
    for i in range(12):
        (raw / "img" / f"{i:02d}.png").write_bytes(png_bytes(images[i]))
    rows = pd.DataFrame({"path": [f"img/{i:02d}.png" for i in range(12)], "label": labels[:12],
                         "split": ["train"] * 9 + ["test"] * 3})
    rows.to_csv(raw / "manifest.csv", index=False)
    section = yaml.safe_load((REPO / "params.yaml").read_text())["ingest"]
    section.update(source="data/raw/manifest.csv", pool="data/pool", workers=1)
    (repo / "params.yaml").write_text(yaml.safe_dump({"ingest": section}))

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # `python`
    monkeypatch.chdir(repo)  # DVC's API resolves stage addresses against the working directory
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    from dvc.repo import Repo

    Repo.init(str(repo)).close()
    assert _reproduce(repo) == ["ingest"]
    first = _lock_md5(repo)
    assert np.load(repo / "data/ingested/images.npy").shape == (12, 28, 28, 1)
    metrics = json.loads((repo / "reports/ingest/metrics.json").read_text())
    assert metrics["images"] == 12 and metrics["by_split"]["test"] == 3

    assert _reproduce(repo) == []  # nothing changed: a no-op
    assert _lock_md5(repo) == first

    rows.loc[0, "label"] = (rows.loc[0, "label"] + 1) % 10  # one label changes
    rows.to_csv(raw / "manifest.csv", index=False)
    assert _reproduce(repo) == ["ingest"]
    third = _lock_md5(repo)
    for name in ("images.npy", "images.parquet", "eval_labels.parquet"):
        assert third[f"data/ingested/{name}"] == first[f"data/ingested/{name}"], name
    assert third["data/ingested/manifest.parquet"] != first["data/ingested/manifest.parquet"]
    digest = hashlib.md5((repo / "data/ingested/images.npy").read_bytes()).hexdigest()
    assert digest == first["data/ingested/images.npy"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sslvision").experiment_id])
    assert len(runs) == 2 and {r.info.run_name for r in runs} == {"ingest"}
    assert all(r.info.status == "FINISHED" and r.data.metrics["images"] == 12 for r in runs)
    assert runs[0].data.params["source"] == "data/raw/manifest.csv"
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "ingest")}
    assert {"ingest/dataset_card.md", "ingest/class_counts.png", "ingest/metrics.json"} <= artifacts


def test_cli_reports_a_missing_source(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sslvision.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("ingest:\n  workers: 0\n")
    result = CliRunner().invoke(app, ["ingest", "missing_dir", "--out", "out"])
    assert result.exit_code == 2
    assert "missing_dir: source not found" in result.output
