"""Data safety (issue 20, items 5-7): an output never replaces someone's directory, a batch joins the pool
with exactly the files that were evaluated, and an ad-hoc ingest writes only where it was told."""

import hashlib
import io as _io
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from sslvision import io
from sslvision.batches import read_batch_files
from sslvision.cli import app
from sslvision.ingest import IngestParams, run_ingest
from sslvision.stages.ingest import write_reports
from sslvision.trigger import Decision, admit_batch

SECRET = b"TOP SECRET: the password is hunter2\n"


def _png(value: int, size: int = 8) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _snapshot(root, skip=()):
    """{relative path: content hash or "dir"/"link"} of everything under ``root`` but ``skip``."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(dirpath, d), root) not in skip]
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if rel in skip:
                continue
            if os.path.islink(path):
                out[rel] = "link"
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                with open(path, "rb") as fh:
                    out[rel] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


# --- item 5: --out never wipes a directory that is not an earlier output of the same kind ----------------------


def test_output_dir_refuses_a_directory_of_someone_elses_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(io.OutputError, match=f"{mine}: refusing to replace .* not an sslvision output"):
        with io.output_dir(mine, "synthetic"):
            raise AssertionError("the body must not run: the refusal comes before any work")
    with pytest.raises(io.OutputError, match=str(mine)):  # atomic_path alone refuses it too
        with io.atomic_path(mine) as tmp:
            tmp.mkdir()
            (tmp / "x.npy").write_bytes(b"new")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "temporary directories were left behind"


def test_output_dir_replaces_an_earlier_output_of_its_kind_only(tmp_path):
    out = tmp_path / "synthetic"
    out.mkdir()  # an empty directory is fine
    for n in (1, 2):
        with io.output_dir(out, "synthetic") as tmp:
            (tmp / "images.npy").write_text(str(n))
    assert (out / "images.npy").read_text() == "2" and io.output_kind(out) == "synthetic"
    with pytest.raises(io.OutputError, match=f"{out}: .* it is an earlier synthetic output"):
        with io.output_dir(out, "classifier"):
            pass
    assert (out / "images.npy").read_text() == "2"

    # what this version's DVC stages and CLIs wrote before the marker existed is still theirs to replace...
    legacy = tmp_path / "classifier"
    legacy.mkdir()
    (legacy / "classifier.safetensors").write_bytes(b"weights")
    (legacy / "config.json").write_text("{}")
    with io.output_dir(legacy, "classifier") as tmp:
        (tmp / "config.json").write_text('{"new": true}')
    assert sorted(p.name for p in legacy.iterdir()) == [io.OUTPUT_MARKER, "config.json"]
    # ... but not once someone's file is among them
    (legacy / io.OUTPUT_MARKER).unlink()
    (legacy / "classifier.safetensors").write_bytes(b"weights")
    (legacy / "notes.txt").write_text("mine")
    with pytest.raises(io.OutputError, match=str(legacy)):
        with io.output_dir(legacy, "classifier"):
            pass
    assert (legacy / "notes.txt").read_text() == "mine"


def _synthesize_project(root):
    """The tiny synthesize inputs of test_synthesize: ingested images, audited manifest, encoder, embeddings."""
    from sslvision.models import save_encoder
    from tests.test_synthesize import CLASSES, _real, _resnet

    encoder = _resnet()
    real = _real(encoder)
    ing = root / "data/ingested"
    ing.mkdir(parents=True)
    np.save(ing / "images.npy", real.images)
    (ing / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    manifest = pd.DataFrame({"index": np.arange(len(real.labels)), "id": real.ids, "split": "train",
                             "label": real.labels, "label_name": [CLASSES[y] for y in real.labels]})
    manifest.to_parquet(ing / "manifest.parquet")
    (root / "data/audit").mkdir(parents=True)
    manifest.to_parquet(root / "data/audit/manifest_clean.parquet")
    (root / "data/embeddings").mkdir(parents=True)
    np.save(root / "data/embeddings/embeddings.npy", real.embeddings)
    save_encoder(root / "models/encoder", encoder)
    (root / "params.yaml").write_text(
        "synthesize:\n  generator: feature_interp\n  grid_columns: 3\n  cache_dir: ''\n"
        "  feature_interp: {steps: 2, batch_size: 8, width: 8}\n"
        "  filter: {min_confidence: 0.0, max_source_similarity: 2.0}\n")


def test_synthesize_out_refuses_a_users_directory_and_replaces_its_own(workdir):
    _synthesize_project(workdir)
    mine = workdir / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    result = CliRunner().invoke(app, ["synthesize", "--out", "mine", "--reports", "reports/s"])
    assert result.exit_code == 2, result.output
    assert "mine: refusing to replace" in result.output
    assert (mine / "thesis.tex").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    assert not (workdir / "reports/s").exists(), "the refusal must come before the work"

    for _ in range(2):  # a previous synthesize output is replaced
        result = CliRunner().invoke(app, ["synthesize", "--out", "synthetic", "--reports", "reports/s"])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (workdir / "synthetic").iterdir()) == [io.OUTPUT_MARKER, "images.npy",
                                                                          "manifest.parquet"]
    assert io.output_kind(workdir / "synthetic") == "synthetic"


# --- item 6: a batch joins the pool with exactly the files that were evaluated ---------------------------------


def test_only_the_evaluated_bytes_of_a_batch_join_the_pool(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(SECRET)
    (outside / "photo.png").write_bytes(_png(200))  # a real image, outside the batch
    batch = tmp_path / "inbox/drifted"
    batch.mkdir(parents=True)
    (batch / "one.png").write_bytes(_png(10))
    (batch / "two.png").write_bytes(_png(20))
    (batch / "leak.png").symlink_to(outside / "secret.png")
    (batch / "elsewhere.png").symlink_to(outside / "photo.png")

    images, labels, evaluated = read_batch_files(batch, ["a", "b"], channels=1, size=8)
    assert len(images) == 2 and set(evaluated) == {"one.png", "two.png"}, "links are never evaluated"
    assert evaluated["two.png"] == hashlib.sha256(_png(20)).hexdigest()

    (batch / "late.png").write_bytes(_png(30))  # written after the evaluation
    (batch / "one.png").write_bytes(_png(40))  # changed after the evaluation
    pool = tmp_path / "pool"
    admitted = admit_batch(batch, Decision(stage="pretrain"), pool, evaluated)

    assert admitted.dest == pool / "drifted" and admitted.files == ["two.png"]
    assert sorted(p.name for p in admitted.dest.iterdir()) == ["two.png"]
    assert (admitted.dest / "two.png").read_bytes() == _png(20)
    assert set(admitted.skipped) == {"one.png", "late.png", "leak.png", "elsewhere.png"}
    assert "symbolic link" in admitted.skipped["leak.png"] and "changed" in admitted.skipped["one.png"]
    assert not any(p.is_symlink() for p in pool.rglob("*"))
    assert sorted(p.name for p in pool.iterdir()) == ["drifted"], "no temporary copy left behind"


def test_a_batch_with_nothing_evaluated_left_adds_nothing_to_the_pool(tmp_path):
    batch = tmp_path / "b"
    batch.mkdir()
    (batch / "x.png").write_bytes(_png(1))
    evaluated = {"x.png": hashlib.sha256(_png(1)).hexdigest()}
    (batch / "x.png").write_bytes(_png(2))
    admitted = admit_batch(batch, Decision(stage="pretrain"), tmp_path / "pool", evaluated)
    assert admitted.dest is None and admitted.files == [] and "changed" in admitted.skipped["x.png"]
    assert list((tmp_path / "pool").iterdir()) == []


def test_quarantine_reasons_never_echo_file_contents(tmp_path):
    source = tmp_path / "raw"
    for label, value in (("a", 10), ("b", 200)):
        (source / label).mkdir(parents=True)
        (source / label / f"{label}.png").write_bytes(_png(value))
    (source / "a" / "notes.png").write_bytes(SECRET)
    out = tmp_path / "ingested"
    metrics = run_ingest(IngestParams(workers=0, size=8, cache_dir=""), source, out)
    write_reports(metrics, out, tmp_path / "reports")
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    assert quarantine["reason"].tolist() == ["not an image"]
    card = (tmp_path / "reports/dataset_card.md").read_text()
    for text in (" ".join(quarantine["detail"]), card, (tmp_path / "reports/metrics.json").read_text()):
        assert "SECRET" not in text and "hunter2" not in text


# --- item 7: an ad-hoc ingest writes only under --out ----------------------------------------------------------


@pytest.mark.parametrize("source", ["elsewhere", None])
def test_an_ad_hoc_ingest_writes_only_under_its_out(workdir, source):
    (workdir / "params.yaml").write_text(
        "ingest:\n  source: data/raw\n  pool: data/pool\n  workers: 0\n  size: 8\n"
        "  cache_dir: data/.ingest_cache\n")
    for root, value in (("data/raw", 10), ("elsewhere", 100)):
        for label in ("a", "b"):
            (workdir / root / label).mkdir(parents=True)
            (workdir / root / label / f"{label}.png").write_bytes(_png(value + (label == "b")))
    (workdir / "data/pool/batch1").mkdir(parents=True)
    (workdir / "data/pool/batch1/y.png").write_bytes(_png(50))
    (workdir / "reports/ingest").mkdir(parents=True)
    (workdir / "reports/ingest/dataset_card.md").write_text("the project's card")
    # MLflow's store records the run (it is the tracking server's place, not the project's data)
    untouched = {"X", "mlflow.db", "mlartifacts"}
    before = _snapshot(workdir, untouched)

    result = CliRunner().invoke(app, ["ingest", *([source] if source else []), "--out", "X"])
    assert result.exit_code == 0, result.output
    assert _snapshot(workdir, untouched) == before
    metrics = json.loads((workdir / "X/reports/metrics.json").read_text())
    assert metrics["pool_batches"] == 0 and metrics["images"] == 2
    assert f"Source `{source or 'data/raw'}`" in (workdir / "X/reports/dataset_card.md").read_text()
    assert (workdir / "X/.ingest_cache").is_dir()
