"""Slice discovery (sslvision.slices) on tiny generated embeddings, and the finetune stage's slices and Just Train
Twice on a tiny project."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from sslvision.slices import (
    COLUMNS,
    find_slices,
    jtt_weights,
    mitigation_decision,
    shifted_scores,
    shortcut_groups,
    slice_gallery,
    slice_groups,
    subsample_shortcuts,
    wilson_lower,
    worst_slice_accuracy,
)

DIM = 16
MARK = 8  # the embedding direction a "mark" adds


def blobs(n_per_class: list[int], marked_share: list[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class c around 4 e_c (unit noise); a ``marked_share[c]`` of class c also moved 4 along e_MARK."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class)
    x = rng.normal(size=(len(labels), DIM)).astype(np.float32)
    x[np.arange(len(labels)), labels] += 4.0
    marked = np.zeros(len(labels), dtype=bool)
    for c, share in enumerate(marked_share):
        members = np.flatnonzero(labels == c)
        marked[rng.choice(members, size=round(share * len(members)), replace=False)] = True
    x[marked, MARK] += 4.0
    return x, labels, marked


def test_the_planted_slice_ranks_first():
    """Errors on the marked images of class 1 (80 %) against 10 % everywhere else: the slice found first is them,
    not the hardest class as a whole."""
    rng = np.random.default_rng(0)
    x, y, marked = blobs([300, 300, 300], [0.0, 0.2, 0.0], seed=0)
    pred = y.copy()
    wrong = np.where(marked, rng.random(len(y)) < 0.8, rng.random(len(y)) < 0.1)
    wrong |= (y == 2) & (rng.random(len(y)) < 0.25)  # a harder class, uniformly hard: no slice
    pred[wrong] = (y[wrong] + 1) % 3
    slices = find_slices(x, y, pred, n_slices=5, min_size=20, seed=0, classes=["a", "b", "c"])
    assert list(slices.columns) == COLUMNS and len(slices) >= 1
    top = slices.iloc[0]
    members = np.asarray(top["members"])
    assert top["rank"] == 1 and top["kind"] == "error" and top["label"] == "1: b"
    assert marked[members].mean() > 0.9 and marked[members].sum() > 0.8 * marked.sum()
    assert top["error"] > 0.6 and top["class_error"] < top["error"] and top["score"] > 0
    assert top["classes"] == "b 100%" and top["predicted_as"].startswith("c ")
    assert "mistaken for c" in top["description"]
    assert (slices["score"].diff().dropna() <= 0).all()  # worst first
    # deterministic for a seed
    again = find_slices(x, y, pred, n_slices=5, min_size=20, seed=0, classes=["a", "b", "c"])
    pd.testing.assert_frame_equal(slices.drop(columns="members"), again.drop(columns="members"))


def test_a_shortcut_in_train_is_found_and_described():
    """The mark on 90 % of class 0 in train and on none of it held out (on 20 % of the others instead): a cluster
    of marked train images holds a large share of class 0's train images and none of its held-out ones."""
    train_x, train_y, train_marked = blobs([600, 300, 300], [0.9, 0.05, 0.05], seed=1)
    x, y, marked = blobs([200, 200, 200], [0.0, 0.2, 0.2], seed=2)
    pred = np.where(marked, 0, y)  # the model learnt the shortcut
    images = np.zeros((len(y), 6, 6), dtype=np.uint8)
    images[marked] = 200  # the marked images are brighter
    source = np.where(np.arange(len(y)) < 300, "batch_a", "batch_b")
    slices = find_slices(x, y, pred, n_slices=6, min_size=20, seed=0, train_embeddings=train_x,
                         train_labels=train_y, images=images, source=source)
    shortcut = slices[slices["kind"] == "shortcut"]
    assert len(shortcut) >= 1
    top = shortcut.iloc[0]
    assert top["label"].endswith(": 0 shortcut") and top["train_share"] > 0.3 and top["heldout_share"] < 0.1
    assert train_marked[np.asarray(top["train_members"])].mean() > 0.9 and top["train_size"] >= 20
    assert top["description"].startswith("shortcut to 0: a group of")
    assert top["rank"] == 1  # hundreds of class 0's train images: more than the held-out errors
    # the marked held-out images are the worst error slice; brighter than the split
    first = slices[slices["kind"] == "error"].iloc[0]
    assert marked[np.asarray(first["members"])].mean() > 0.9
    assert first["brightness"] > first["brightness_all"] and "from batch_" in first["description"]
    assert math.isnan(first["train_share"]) and first["train_size"] == 0
    fig = slice_gallery(slices, images, train_images=np.zeros((len(train_y), 6, 6), dtype=np.uint8), per_slice=3)
    assert "(train images)" in fig.axes[3 * int(top["rank"] - 1)].get_title(loc="left")


def test_no_slice_on_uniform_errors_and_too_few_rows():
    x, y, _ = blobs([200, 200], [0.0, 0.0], seed=3)
    rng = np.random.default_rng(3)
    pred = np.where(rng.random(len(y)) < 0.2, 1 - y, y)
    assert len(find_slices(x, y, pred, min_size=20, seed=0)) == 0  # errors at random: no group stands out
    assert len(find_slices(x, y, y, min_size=20, seed=0)) == 0  # no error at all: no slice (not one of 1e-16)
    empty = find_slices(x[:30], y[:30], pred[:30], min_size=20)
    assert list(empty.columns) == COLUMNS and len(empty) == 0
    with pytest.raises(ValueError, match="must agree"):
        find_slices(x, y[:-1], pred)
    with pytest.raises(ValueError, match="train_embeddings"):
        find_slices(x, y, pred, train_embeddings=x[:, :4], train_labels=y)


def test_groups_worst_slice_accuracy_and_the_gate():
    x, y, marked = blobs([200, 200], [0.3, 0.0], seed=4)
    groups = slice_groups(x, y, clusters=4, min_size=20, seed=0)
    assert groups and all(len(g) >= 20 for g in groups)
    assert slice_groups(x[:50], y[:50], min_size=20) == []
    pred = np.where(marked, 1 - y, y)  # every marked image wrong
    assert worst_slice_accuracy(groups, y, pred) < 0.2  # some group is (nearly) all marked images
    assert worst_slice_accuracy(groups, y, y) == 1.0 and math.isnan(worst_slice_accuracy([], y, y))

    before = {"balanced_accuracy": 0.80, "worst_slice_accuracy": 0.30}
    assert mitigation_decision(before, {"balanced_accuracy": 0.795, "worst_slice_accuracy": 0.5})[0]
    keep, why = mitigation_decision(before, {"balanced_accuracy": 0.78, "worst_slice_accuracy": 0.6})
    assert not keep and "balanced accuracy fell by 0.020" in why
    keep, why = mitigation_decision(before, {"balanced_accuracy": 0.85, "worst_slice_accuracy": 0.3})
    assert not keep and "did not rise" in why
    assert not mitigation_decision(before, {"balanced_accuracy": 0.9, "worst_slice_accuracy": math.nan})[0]
    np.testing.assert_allclose(jtt_weights(np.array([1.0, 0.5, 1.0]), np.array([True, True, False]), 6.0),
                               [6.0, 3.0, 1.0])
    assert 0 < wilson_lower(0.5, 20) < 0.5 and wilson_lower(0.5, 20) < wilson_lower(0.5, 200)


def test_subsampling_takes_the_shortcut_away_and_the_gate_reads_the_held_out_mix():
    """The mark on 90 % of class 0's train images (5 % of the others'), on none of its held-out ones: the shortcut
    slice, sharpened in its class, holds the marked class-0 rows; thinning it leaves class 0 as often marked as
    the others; validation (the training mix) re-weighted to the held-out mix scores a model that learnt the
    mark below one that learnt the classes, though plain validation ranks them the other way."""
    train_x, train_y, train_marked = blobs([600, 300, 300], [0.9, 0.05, 0.05], seed=1)
    x, y, marked = blobs([200, 200, 200], [0.0, 0.2, 0.2], seed=2)
    slices = find_slices(x, y, np.where(marked, 0, y), n_slices=6, min_size=20, seed=0, train_embeddings=train_x,
                         train_labels=train_y)
    assert (slices.loc[slices["kind"] == "shortcut", "shortcut_class"] == 0).all()
    assert (slices.loc[slices["kind"] == "error", "shortcut_class"] == -1).all()
    groups = shortcut_groups(slices, train_x, train_y, x, y, seed=0)
    assert len(groups) == 1 and groups[0].cls == 0
    g = groups[0]
    zero = train_y == 0
    assert g.inside[~zero].sum() == 0  # only its class is thinned
    # what tells class 0's train rows from its held-out ones is the mark: nearly every marked row and hardly an
    # unmarked one (k-means alone finds the marked rows by whatever else they share too)
    assert g.inside[zero & train_marked].mean() > 0.97 and g.inside[zero & ~train_marked].mean() < 0.1
    assert 0 < g.other_share < 0.15 and g.heldout_share < 0.15

    keep, records = subsample_shortcuts(groups, train_y, seed=0)
    assert keep[~zero].all() and keep[zero & ~train_marked].mean() > 0.9
    kept_zero = keep & zero
    assert train_marked[kept_zero].mean() < 0.15  # as often marked as the other classes (5 %), not 90 %
    (rec,) = records
    assert rec["class"] == 0 and rec["dropped"] == int((~keep).sum()) > 400
    assert rec["kept_in_slice"] + rec["dropped"] == rec["train_in_slice"]
    again, _ = subsample_shortcuts(groups, train_y, seed=0)
    np.testing.assert_array_equal(keep, again)  # deterministic for a seed

    val_x, val_y, val_marked = blobs([200, 100, 100], [0.9, 0.05, 0.05], seed=3)
    rng = np.random.default_rng(3)
    shortcut = np.where(val_marked, 0, np.where(val_y == 0, 1, val_y))  # the mark says class 0, nothing else does
    classes = np.where(rng.random(len(val_y)) < 0.15, (val_y + 1) % 3, val_y)  # the classes, 85 % right
    plain = [np.mean([(p[val_y == c] == c).mean() for c in range(3)]) for p in (shortcut, classes)]
    assert plain[0] > plain[1]  # the training mix rewards the shortcut
    a, b = (shifted_scores(groups, val_x, val_y, p, min_size=10) for p in (shortcut, classes))
    assert b["balanced_accuracy"] > a["balanced_accuracy"] + 0.1
    assert a["worst_slice_accuracy"] < 0.1 < 0.7 < b["worst_slice_accuracy"]
    assert mitigation_decision(a, b)[0] and not mitigation_decision(b, a)[0]
    # the marked class-0 images are a group the held-out split holds too few of (19 of 200 at its share): a model
    # wrong on them alone is judged on the groups it will meet, unless min_size lets 19 count
    unlearnt = np.where((val_y == 0) & val_marked, 1, val_y)
    assert g.heldout_n == 200 and round(g.heldout_share * 200) == 19
    assert shifted_scores(groups, val_x, val_y, unlearnt, min_size=20)["worst_slice_accuracy"] > 0.9
    assert shifted_scores(groups, val_x, val_y, unlearnt, min_size=10)["worst_slice_accuracy"] < 0.1
    # no shortcut slice: nothing to thin
    assert shortcut_groups(slices[slices["kind"] == "error"], train_x, train_y, x, y) == []


def test_gallery_draws_one_row_per_slice():
    x, y, marked = blobs([150, 150], [0.3, 0.0], seed=5)
    pred = np.where(marked, 1 - y, y)
    slices = find_slices(x, y, pred, n_slices=3, min_size=20, seed=0)
    images = np.random.default_rng(0).integers(0, 256, (len(y), 8, 8, 1), dtype=np.uint8)
    fig = slice_gallery(slices, images, per_slice=4)
    assert len(fig.axes) == 4 * len(slices)
    assert len(slice_gallery(slices.iloc[:0], images).axes) == 1


def test_stage_writes_slices_and_gates_just_train_twice(workdir, monkeypatch):
    """The finetune stage on a tiny project: slices.csv and slices.png, the summary in metrics.json and MLflow,
    and Just Train Twice's record, whose decision says which of the two classifiers was kept."""
    import mlflow
    import torch

    from sslvision.stages.finetune import check_single_process, finetune_cli, load_params
    from tests.finetune_project import make_project

    torch.set_num_threads(1)
    params = make_project(workdir, head=60, ratio=4, test_per_class=12, finetune={
        "epochs": 5, "slice_reweight": True, "jtt_upweight": 4.0, "slices": {"min_size": 5, "clusters": 3}})
    metrics = finetune_cli(params)
    reports = workdir / "reports/finetune"
    table = pd.read_csv(reports / "slices.csv")
    assert list(table.columns) == [c for c in COLUMNS if c not in ("members", "train_members")]
    assert (reports / "slices.png").stat().st_size > 0
    written = json.loads((reports / "metrics.json").read_text())
    assert written["slices"]["found"] == len(table) and "worst_slice_accuracy" in written["slices"]
    jtt = written["slice_reweight"]
    assert jtt["decision"] in ("kept", "rejected") and jtt["error_set"] > 0 and jtt["upweight"] == 4.0
    which = "second" if jtt["kept"] else "first"
    assert metrics["balanced_accuracy"] == pytest.approx(jtt[f"test_balanced_accuracy_{which}"])
    runs = mlflow.search_runs(experiment_names=["sslvision"])
    assert runs["metrics.slice_reweight/kept"].iloc[0] == float(jtt["kept"])
    assert runs["metrics.slices/found"].iloc[0] == len(table)

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process"):
        check_single_process(load_params(params))


def test_stage_subsamples_a_planted_shortcut(workdir):
    """The finetune stage with ``slice_reweight: subsample`` on a tiny project whose class-0 train images carry a
    white corner mark (90 %, against 5 % of the others, and none of its test images): the shortcut slice is found
    in the embeddings, thinned, a second classifier trained, and the record says which one the stage kept."""
    import torch

    from sslvision.stages.finetune import finetune_cli
    from tests.finetune_project import make_project

    torch.set_num_threads(1)
    params = make_project(workdir, head=120, ratio=4, test_per_class=40, finetune={
        "epochs": 3, "slice_reweight": "subsample", "label_efficiency": [], "slices": {"min_size": 5, "clusters": 3}})
    ing = workdir / "data/ingested"
    images = np.load(ing / "images.npy")
    manifest = pd.read_parquet(ing / "manifest.parquet")
    rng = np.random.default_rng(0)
    train = (manifest["split"] == "train").to_numpy()
    share = np.where(manifest["label"] == 0, np.where(train, 0.9, 0.0), np.where(train, 0.05, 0.2))
    marked = rng.random(len(images)) < share
    images[marked, 1:5, 1:5] = 255
    np.save(ing / "images.npy", images)
    # the embed stage's output, standing in for an SSL encoder that sees the mark: class and mark directions
    emb = rng.normal(size=(len(images), DIM)).astype(np.float32)
    emb[np.arange(len(images)), manifest["label"].to_numpy()] += 4.0
    emb[marked, MARK + 4] += 4.0
    (workdir / "data/embeddings").mkdir(parents=True)
    np.save(workdir / "data/embeddings/embeddings.npy", emb)

    metrics = finetune_cli(params)
    record = json.loads((workdir / "reports/finetune/metrics.json").read_text())["slice_reweight"]
    assert record["method"] == "subsample" and record["shortcut_slices"] >= 1
    (thinned,) = [t for t in record["slices"] if t["class"] == 0]
    assert thinned["dropped"] > 0.5 * thinned["train_in_slice"] and record["train_rows_dropped"] >= thinned["dropped"]
    assert record["decision"] in ("kept", "rejected") and record["reason"]
    which = "second" if record["kept"] else "first"
    assert metrics["balanced_accuracy"] == pytest.approx(record[f"test_balanced_accuracy_{which}"])
    assert all(math.isfinite(record[f"val_balanced_accuracy_{w}"]) for w in ("first", "second"))


def test_subsample_without_a_shortcut_trains_nothing(workdir):
    """No shortcut slice in a project without a confounder: the first classifier stays, no second is trained."""
    import torch

    from sslvision.stages.finetune import build_classifier, load_data, load_params, shortcut_subsampling, slice_views
    from tests.finetune_project import make_project

    torch.set_num_threads(1)
    p = load_params(make_project(workdir, head=120, ratio=4, test_per_class=40, finetune={
        "slice_reweight": "subsample", "slices": {"min_size": 5, "clusters": 3}}))
    data = load_data(p)
    first = build_classifier(p, data.classes)
    kept, result, record = shortcut_subsampling(p, data, first, slice_views(p))
    assert kept is first and result is None
    assert record == {"method": "subsample", "shortcut_slices": 0, "kept": False, "decision": "not_needed",
                      "reason": "no shortcut slice: nothing to subsample"}
