"""The demo scenario builder, on tiny scenarios cut from the real Fashion-MNIST files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sslvision.demo import (
    ASYMMETRIC_FLIPS,
    BROKEN_KINDS,
    CLASS_DIRS,
    SEVERITIES,
    DemoParams,
    allocate,
    build_scenario,
    inject_noise,
    load_fashion_mnist,
    long_tail_counts,
)
from sslvision.io import OutputError
from sslvision.params import ParamsError, validate_section

TINY = dict(max_per_class=40, imbalance_ratio=10, test_per_class=5, incoming_batch_size=20, clean_batches=1,
            exact_duplicates=4, conflicting_duplicates=2, broken_files=1, workers=1, noisy_batch_rate=0.4)


def tiny(**kw) -> DemoParams:
    return DemoParams(**{**TINY, **kw})


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "scenario"
    scenario = build_scenario(out, tiny(seed=0), progress=False)
    return out, scenario, pd.read_parquet(out / "truth.parquet")


def test_deterministic_per_seed_and_worker_count(built, tmp_path):
    out, _, truth = built
    again = tmp_path / "again"
    build_scenario(again, tiny(seed=0, workers=2), progress=False)
    assert file_hashes(again) == file_hashes(out)
    pd.testing.assert_frame_equal(pd.read_parquet(again / "truth.parquet"), truth)
    other = tmp_path / "other"
    build_scenario(other, tiny(seed=1), progress=False)
    assert not pd.read_parquet(other / "truth.parquet").equals(truth)
    assert file_hashes(other) != file_hashes(out)


def test_truth_covers_every_file_and_names_hide_labels(built):
    out, _, truth = built
    on_disk = {p for p in file_hashes(out) if p.startswith(("images/", "incoming/")) and p.endswith(".png")}
    assert set(truth.path) == on_disk
    names = truth.path.map(lambda p: Path(p).name)
    assert names.is_unique
    assert not any(d in n or d.split("_", 1)[1] in n for n in names for d in CLASS_DIRS)
    labeled = truth[truth.given_label >= 0]
    dirs = labeled.path.map(lambda p: Path(p).parent.name)
    assert (dirs == labeled.given_label.map(lambda g: CLASS_DIRS[g])).all()
    assert sorted(CLASS_DIRS) == list(CLASS_DIRS)


def test_long_tail_counts(built):
    _, scenario, truth = built
    assert long_tail_counts(5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    expected = long_tail_counts(40, 10)
    assert expected[0] == 40 and expected[-1] == 4
    train = truth[(truth.split == "train") & truth.kind.isin(["clean", "noisy"])]
    assert np.bincount(train.true_label, minlength=10).tolist() == expected
    assert list(scenario["train"]["counts_true"].values()) == expected
    test = truth[truth.split == "test"]
    assert (np.bincount(test.true_label, minlength=10) == 5).all()
    assert (test.given_label == test.true_label).all() and set(test.source_file) == {"t10k"}


@pytest.mark.parametrize("noise_type", ["symmetric", "asymmetric"])
def test_noise_rate_matches(noise_type):
    rng = np.random.default_rng(3)
    true = rng.integers(0, 10, size=2000)
    given = inject_noise(true, 0.3, noise_type, rng)
    assert (given != true).sum() == 600
    for c in range(10):
        members = true == c
        assert abs((given[members] != c).mean() - 0.3) <= 1 / members.sum()
        targets = set(given[members & (given != true)].tolist())
        if noise_type == "asymmetric" and c in ASYMMETRIC_FLIPS:
            assert targets == {ASYMMETRIC_FLIPS[c]}
        else:
            assert len(targets) > 3


@pytest.mark.parametrize("noise_type", ["symmetric", "asymmetric"])
def test_scenario_noise_rate(noise_type, built, tmp_path):
    if noise_type == "asymmetric":
        _, scenario, truth = built
    else:
        scenario = build_scenario(tmp_path / "s", tiny(noise_type="symmetric", corruptions=[]), progress=False)
        truth = pd.read_parquet(tmp_path / "s" / "truth.parquet")
    train = truth[(truth.split == "train") & truth.kind.isin(["clean", "noisy"])]
    realised = (train.given_label != train.true_label).mean()
    assert abs(realised - 0.2) <= 0.5 / len(train)
    assert scenario["noise"]["realised_rate"] == pytest.approx(realised)
    assert (train.is_noisy == (train.kind == "noisy")).all()
    matrix = np.array(scenario["noise"]["transition_counts"])
    assert matrix.sum() == len(train) and matrix.sum() - np.trace(matrix) == train.is_noisy.sum()
    if noise_type == "asymmetric":
        for c, partner in ASYMMETRIC_FLIPS.items():
            assert matrix[c].sum() == matrix[c, c] + matrix[c, partner]
    batch = truth[truth.batch == "noisy_labels"]
    assert abs((batch.given_label != batch.true_label).mean() - 0.4) <= 0.5 / len(batch)


def test_duplicates(built):
    out, scenario, truth = built
    dups = truth[truth.kind.isin(["duplicate", "conflicting_duplicate"])]
    assert len(dups) == 4 and (dups.kind == "conflicting_duplicate").sum() == 2
    for d in scenario["duplicates"]:
        copy = np.asarray(Image.open(out / d["path"]))
        assert np.array_equal(copy, np.asarray(Image.open(out / d["duplicate_of"])))
        assert Path(d["path"]).parent.name == CLASS_DIRS[d["given_label"]]
        assert d["conflicting"] == (d["given_label"] != d["original_given_label"])


def test_each_broken_kind_present(built):
    out, _, truth = built
    broken = truth[truth.kind.str.startswith("broken_")]
    assert sorted(broken.kind.unique()) == sorted(f"broken_{k}" for k in BROKEN_KINDS)
    assert (broken.split == "train").all() and broken.path.str.startswith("images/train/").all()
    for row in broken.itertuples():
        path = out / row.path
        if row.kind == "broken_zero":
            assert path.stat().st_size == 0
        elif row.kind == "broken_text":
            assert path.read_bytes().startswith(b"<html>")
        elif row.kind == "broken_truncated":
            assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
            with pytest.raises(OSError):
                Image.open(path).load()
        else:
            with Image.open(path) as im:
                assert (im.mode, im.size) == ("RGB", (64, 48))


def test_batches(built):
    out, scenario, truth = built
    names = {b["name"] for b in scenario["incoming"]}
    expected = {"clean_01", "prior_shift", "noisy_labels"} | {f"{c}_s{s}" for c in SEVERITIES for s in range(1, 6)}
    assert names == expected
    for name in names:
        meta = json.loads((out / "incoming" / name / "batch.json").read_text())
        assert {"kind", "corruption", "severity", "n", "labeled"} <= meta.keys() and meta["n"] == 20
        assert meta["labeled"] == (name == "noisy_labels")
        pngs = list((out / "incoming" / name).rglob("*.png"))
        assert len(pngs) == 20
        assert all(p.parent.name == name for p in pngs) != meta["labeled"]
    shift = json.loads((out / "incoming" / "prior_shift" / "batch.json").read_text())
    assert shift["class_shares"]["8_bag"] + shift["class_shares"]["9_ankle_boot"] == pytest.approx(0.8)
    # production images are unseen: none is a train or test image, and batches do not share images
    # (except the corruption batches, which corrupt one common base set)
    incoming = truth[truth.split == "incoming"]
    train_sources = set(truth[truth.source_file == "train"].query("split == 'train'").source_index)
    assert not train_sources & set(incoming.source_index)
    groups = incoming.assign(group=incoming.batch.where(incoming.corruption == "", "corrupted"))
    per_group = groups.groupby("group").source_index.apply(lambda s: frozenset(s))
    assert sum(len(s) for s in per_group) == len(frozenset().union(*per_group))
    assert (incoming[incoming.corruption != ""].groupby("batch").source_index.apply(frozenset).nunique()) == 1


def test_corruptions_grow_with_severity(built, fmnist):
    out, _, truth = built
    corrupted = truth[truth.kind == "corrupted"]
    for corruption, group in corrupted.groupby("corruption"):
        diffs = []
        for _, rows in group.groupby("severity"):
            images = np.stack([np.asarray(Image.open(out / p)) for p in rows.path]).astype(float)
            originals = fmnist["train_images"][rows.source_index.to_numpy()].astype(float)
            diffs.append(np.abs(images - originals).mean())
        assert diffs[0] > 0.5, corruption
        assert all(a < b for a, b in zip(diffs, diffs[1:], strict=False)), (corruption, diffs)


def test_existing_directories(built, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(OutputError, match="not an sslvision output"):
        build_scenario(foreign, tiny(corruptions=[]), progress=False)
    assert (foreign / "thesis.tex").read_text() == "keep me"
    previous = tmp_path / "previous"
    build_scenario(previous, tiny(corruptions=[], seed=5), progress=False)
    build_scenario(previous, tiny(corruptions=[], seed=6), progress=False)
    assert json.loads((previous / "scenario.json").read_text())["params"]["seed"] == 6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_params_are_named():
    with pytest.raises(ParamsError, match="demo"):
        validate_section("demo", DemoParams, {"exact_duplicates": 2, "conflicting_duplicates": 3})
    with pytest.raises(ParamsError, match="demo.noise_type"):
        validate_section("demo", DemoParams, {"noise_type": "random"})


def test_too_few_unseen_images(tmp_path):
    with pytest.raises(ValueError, match=r"class 0 \(T-shirt/top\).*max_per_class"):
        build_scenario(tmp_path / "s", tiny(max_per_class=6000, imbalance_ratio=6000), progress=False)
    assert not (tmp_path / "s").exists()


def test_allocate_sums_exactly():
    weights = np.array([5000, 2997, 1796, 83, 50, 1])
    for total in (0, 1, 7, 500, 9999):
        counts = allocate(total, weights)
        assert counts.sum() == total and (np.abs(counts - total * weights / weights.sum()) < 1).all()


def test_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sslvision.cli import app

    monkeypatch.chdir(tmp_path)
    section = {**TINY, "corruptions": ["jpeg"], "severities": [2]}
    Path("params.yaml").write_text("demo:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in section.items()))
    result = CliRunner().invoke(app, ["demo-data", "--out", "raw", "--seed", "7"])
    assert result.exit_code == 0, result.output
    scenario = json.loads(Path("raw/scenario.json").read_text())
    assert scenario["params"]["seed"] == 7 and (Path("raw/incoming/jpeg_s2/batch.json")).exists()
    Path("params.yaml").write_text("demo:\n  noise_rate: 2\n")
    result = CliRunner().invoke(app, ["demo-data", "--out", "raw2"])
    assert result.exit_code == 2 and "demo.noise_rate" in result.output


@pytest.mark.parametrize("kind", ["mark", "brightness"])
def test_confounder_is_planted_where_scenario_json_says(kind, tmp_path, fmnist):
    """The confounder changes exactly the files scenario.json lists (the rest is the scenario without it, byte for
    byte), on the exact share of each class: most of one class in train, none of it and some of the others in the
    reversed test split; exact duplicates of a marked image are marked too."""
    from sslvision.demo import MARK_OFFSET, MARK_SIZE

    base = dict(corruptions=[], test_per_class=10, confounder_test_rate=0.2, exact_duplicates=20,
                conflicting_duplicates=0)
    plain, confounded = tmp_path / "plain", tmp_path / "confounded"
    build_scenario(plain, tiny(**base), progress=False)
    scenario = build_scenario(confounded, tiny(**base, confounder=kind, confounder_brightness=50), progress=False)
    assert "confounder" not in json.loads((plain / "scenario.json").read_text())
    assert "confounder" not in json.loads((plain / "scenario.json").read_text())["params"]
    record = scenario["confounder"]
    marked = set(record["paths"])
    a, b = file_hashes(plain), file_hashes(confounded)
    assert a.keys() == b.keys()
    changed = {p for p in a if a[p] != b[p]} - {"scenario.json"}
    assert changed == marked
    truth = pd.read_parquet(confounded / "truth.parquet").set_index("path")
    pd.testing.assert_frame_equal(truth, pd.read_parquet(plain / "truth.parquet").set_index("path"))
    rows = truth.loc[sorted(marked)]
    train = truth[(truth.split == "train") & truth.kind.isin(["clean", "noisy"])]
    counts = np.bincount(train.true_label, minlength=10)
    picked = np.bincount(rows[(rows.split == "train") & rows.kind.isin(["clean", "noisy"])].true_label, minlength=10)
    assert picked[0] == round(0.9 * counts[0]) and all(picked[c] == round(0.05 * counts[c]) for c in range(1, 10))
    assert list(record["train_counts"].values()) == picked.tolist()
    test = rows[rows.split == "test"]
    assert np.bincount(test.true_label, minlength=10).tolist() == [0] + [2] * 9 == list(record["test_counts"].values())
    assert not (rows.split == "incoming").any()
    dups = truth[truth.kind == "duplicate"]
    assert (dups.index.isin(marked) == dups.duplicate_of.isin(marked)).all()
    for path in sorted(marked)[:40]:
        after = np.asarray(Image.open(confounded / path))
        before = np.asarray(Image.open(plain / path))
        if kind == "mark":
            square = (slice(MARK_OFFSET, MARK_OFFSET + MARK_SIZE),) * 2
            assert (after[square] == 255).all()
            rest = np.ones(after.shape, dtype=bool)
            rest[square] = False
            assert np.array_equal(after[rest], before[rest])
        else:
            assert np.array_equal(after, np.clip(before.astype(int) + 50, 0, 255))
    absent = build_scenario(tmp_path / "absent", tiny(**base, confounder=kind, confounder_test="absent"),
                            progress=False)
    assert absent["confounder"]["test_n"] == 0 and not any(p.startswith("images/test/")
                                                           for p in absent["confounder"]["paths"])
