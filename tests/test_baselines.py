"""Baselines inside the product (the pixel baseline: library, finetune stage, MLflow) and the demo
scenarios where the hard classes are rare (long_tail_order) or the noise flips pairs (pairflip)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from sslvision.baselines import (
    LABEL_EFFICIENCY_COLUMNS,
    cap_per_class,
    label_efficiency,
    label_efficiency_summary,
    per_class_draw,
    pixel_logreg,
    pixel_vectors,
)
from sslvision.demo import (
    CLASS_DIRS,
    HARD_RARE_ORDER,
    PAIRFLIP_FLIPS,
    DemoParams,
    _ScenarioPlan,
    build_scenario,
    inject_noise,
    load_fashion_mnist,
    long_tail_counts,
)
from sslvision.params import ParamsError, validate_section
from tests.finetune_project import make_project

torch.set_num_threads(1)


def _stripes(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a bright horizontal band at rows 2c..2c+1 of an 8x8 image, on noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    images = rng.integers(0, 60, size=(len(labels), 8, 8, 1)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c:2 * c + 2] = 250
    return images, labels


def test_pixel_logreg_separates_separable_classes_and_keeps_absent_ones_as_columns():
    images, labels = _stripes(30)
    model = pixel_logreg(images, labels, num_classes=5, components=8)
    test_images, test_labels = _stripes(10, seed=1)
    probs = model.predict_proba(test_images)
    assert probs.shape == (30, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert (probs[:, 3:] == 0).all()  # classes 3 and 4 had no training rows
    assert (model.predict(test_images) == test_labels).all()
    again = pixel_logreg(images, labels, num_classes=5, components=8)
    np.testing.assert_array_equal(again.predict_proba(test_images), probs)  # deterministic for a seed
    with pytest.raises(ValueError, match="at least two classes"):
        pixel_logreg(images[:10], labels[:10])


def test_row_cap_trims_the_head_and_keeps_the_tail_whole():
    labels = np.repeat([0, 1, 2], [1000, 100, 5])
    rows = cap_per_class(labels, 300)
    counts = np.bincount(labels[rows])
    assert len(rows) <= 300 and counts[2] == 5 and counts[1] == 100 and counts[0] >= 190
    assert (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(cap_per_class(labels, 5000), np.arange(len(labels)))


def test_large_images_are_pooled_before_the_pca():
    images = np.full((2, 64, 96, 3), 255, np.uint8)
    x = pixel_vectors(images, side=32)
    assert x.shape == (2, 32 * 21 * 3) and x.max() == pytest.approx(1.0)


def _blobs(counts: list[int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two Gaussian blobs (class c around (2 + 3c, 2 + 3c)): features = the point and 6 noise dimensions, images =
    the point drawn as a bright spot on an 8x8 image with noise. Returns (features, images, labels)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    points = 2 + 3 * labels[:, None] + rng.normal(0, 0.8, size=(len(labels), 2))
    features = np.concatenate([points, rng.normal(size=(len(labels), 6))], axis=1).astype(np.float32)
    yy, xx = np.mgrid[:8, :8]
    spot = np.exp(-((yy[None] - points[:, :1, None]) ** 2 + (xx[None] - points[:, 1:, None]) ** 2) / 2)
    images = np.clip(200 * spot + rng.integers(0, 40, size=spot.shape), 0, 255).astype(np.uint8)[..., None]
    return features, images, labels


def test_label_efficiency_runs_both_systems_on_nested_draws_and_flags_a_short_class():
    train = _blobs([30, 4], seed=0)  # class 1 has 4 training rows: fewer than 5
    test = _blobs([50, 50], seed=1)
    table = label_efficiency(*train, *test, per_class=[5, 2, 5], seeds=2, max_test=40, seed=3)
    assert list(table.columns) == list(LABEL_EFFICIENCY_COLUMNS) and len(table) == 2 * 2 * 2  # counts x draws x systems
    assert set(table["system"]) == {"ssl_linear_probe", "pixel_logreg"} and set(table["seed"]) == {3, 4}
    by_n = table.groupby("labels_per_class")
    assert by_n["train_rows"].unique().to_dict() == {2: [4], 5: [9]}  # at 5: class 1 gives its 4 rows
    assert by_n["short_classes"].unique().to_dict() == {2: [0], 5: [1]}
    assert (table["test_rows"] == 40).all()  # a fixed balanced subset of max_test rows
    assert (table["balanced_accuracy"] > 0.75).all()  # separable blobs, in features and in pixels
    again = label_efficiency(*train, *test, per_class=[2, 5], seeds=2, max_test=40, seed=3)
    pd.testing.assert_frame_equal(table, again)  # deterministic for a seed
    for s in (3, 4):  # nested: a draw's 2 rows of a class are among its 5
        two, five = per_class_draw(train[2], 2, s), per_class_draw(train[2], 5, s)
        assert set(two) < set(five) and np.bincount(train[2][two]).tolist() == [2, 2]
    assert not np.array_equal(per_class_draw(train[2], 2, 3), per_class_draw(train[2], 2, 4))

    summary = label_efficiency_summary(table)
    assert summary["labels_per_class"] == [2, 5] and summary["seeds"] == 2 and summary["test_rows"] == 40
    assert summary["short_classes"] == {"2": 0, "5": 1} and summary["train_rows"] == {"2": 4, "5": 9}
    probe = table[(table["system"] == "ssl_linear_probe") & (table["labels_per_class"] == 5)]["balanced_accuracy"]
    assert summary["systems"]["ssl_linear_probe"]["5"] == pytest.approx(
        {"mean": probe.mean(), "std": probe.std(ddof=1)})
    assert json.loads(json.dumps(summary)) == summary  # what metrics.json stores

    with pytest.raises(ValueError, match="at least two classes"):
        label_efficiency(*(a[:30] for a in train), *test)
    with pytest.raises(ValueError, match="same rows"):
        label_efficiency(train[0][:-1], *train[1:], *test)
    with pytest.raises(ValueError, match="per_class"):
        label_efficiency(*train, *test, per_class=[0])


def test_finetune_stage_reports_the_pixel_baseline_in_metrics_json_and_mlflow(workdir, monkeypatch):
    import mlflow

    from sslvision.stages.finetune import finetune_cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = make_project(workdir, finetune={"epochs": 3, "label_efficiency": []})  # the curve skipped
    metrics = finetune_cli(params)
    report = json.loads((workdir / "reports/finetune/metrics.json").read_text())
    pixel = report["baselines"]["pixel_logreg"]
    assert pixel == json.loads(json.dumps(metrics["baselines"]["pixel_logreg"]))
    assert pixel["balanced_accuracy"] > 0.5  # real Fashion-MNIST pixels, 10 classes
    assert set(pixel["per_class_recall"]) == set(report["per_class_recall"])
    assert pixel["worst_class_recall"] == pytest.approx(min(pixel["per_class_recall"].values()))
    assert pixel["golden_balanced_accuracy"] == pytest.approx(pixel["balanced_accuracy"])  # golden = test split
    assert pixel["train_rows"] == report["train_images"]  # the rows the classifier trained on (no synthetic ones)
    assert pixel["classifier_gain"] == pytest.approx(report["balanced_accuracy"] - pixel["balanced_accuracy"])
    run = mlflow.search_runs(experiment_names=["sslvision"]).iloc[0]
    assert run["metrics.baseline/pixel_logreg/balanced_accuracy"] == pytest.approx(pixel["balanced_accuracy"])
    assert run["metrics.baseline/pixel_logreg/recall/Shirt"] == pytest.approx(pixel["per_class_recall"]["Shirt"])
    # finetune.label_efficiency empty: no curve, but the DVC output exists (an empty table)
    assert "label_efficiency" not in report
    skipped = pd.read_csv(workdir / "reports/finetune/label_efficiency.csv")
    assert skipped.empty and list(skipped.columns) == list(LABEL_EFFICIENCY_COLUMNS)


# --- the demo scenario: which classes are rare, and pair-flip noise ----------------------------------

TINY = dict(max_per_class=40, imbalance_ratio=10, test_per_class=5, incoming_batch_size=20, clean_batches=1,
            exact_duplicates=4, conflicting_duplicates=2, broken_files=1, workers=1, corruptions=[])


@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist()


def _train_counts(params: DemoParams, data) -> tuple[np.ndarray, dict]:
    plan = _ScenarioPlan(params, data)
    described = plan.train_split()
    return np.bincount(plan.true, minlength=10), described


@pytest.mark.parametrize("order", ["hard_rare", ["Shirt", "Trouser", "3_dress", "Coat", "Pullover", "Sandal",
                                                "T-shirt/top", "sneaker", "Bag", "9_ankle_boot"]])
def test_counts_follow_the_long_tail_order(order, fmnist):
    counts, described = _train_counts(DemoParams(**TINY, long_tail_order=order), fmnist)
    expected = long_tail_counts(40, 10)
    ranks = list(HARD_RARE_ORDER) if order == "hard_rare" else [6, 1, 3, 4, 2, 5, 0, 7, 8, 9]
    assert [int(counts[c]) for c in ranks] == expected
    assert described["train"]["long_tail_order"] == [CLASS_DIRS[c] for c in ranks]
    if order == "hard_rare":  # the confusable classes are the rarest three
        assert {CLASS_DIRS[c] for c in ranks[-3:]} == {"6_shirt", "2_pullover", "4_coat"}


def test_a_long_tail_order_that_is_not_the_ten_classes_is_named():
    for bad in (["Shirt", "Trouser"], ["Shirt"] * 10, "hardest_first"):
        with pytest.raises(ParamsError, match="long_tail_order"):
            validate_section("demo", DemoParams, {**TINY, "long_tail_order": bad})


def test_pairflip_moves_labels_only_to_the_paired_class_at_the_rate():
    rng = np.random.default_rng(5)
    true = rng.integers(0, 10, size=3000)
    given = inject_noise(true, 0.25, "pairflip", rng)
    assert (given != true).sum() == 750
    for c in range(10):
        members = true == c
        assert abs((given[members] != c).mean() - 0.25) <= 1 / members.sum()
        assert set(given[members & (given != c)].tolist()) == {PAIRFLIP_FLIPS[c]} == {(c + 1) % 10}


def test_scenario_json_records_the_order_and_the_pairflip_noise(tmp_path):
    scenario = build_scenario(tmp_path / "s", DemoParams(**TINY, long_tail_order="hard_rare", noise_type="pairflip"),
                              progress=False)
    on_disk = json.loads((tmp_path / "s/scenario.json").read_text())
    assert on_disk["params"]["long_tail_order"] == "hard_rare" and on_disk["params"]["noise_type"] == "pairflip"
    assert on_disk["train"]["long_tail_order"][-3:] == ["4_coat", "2_pullover", "6_shirt"]
    assert on_disk["noise"]["flips"]["6_shirt"] == "7_sneaker" and on_disk["noise"]["uniform_flips"] == []
    matrix = np.array(scenario["noise"]["transition_counts"])
    off = matrix - np.diag(np.diag(matrix))
    assert all(off[c].sum() == off[c, (c + 1) % 10] for c in range(10))
    truth = pd.read_parquet(tmp_path / "s/truth.parquet")
    train = truth[(truth.split == "train") & truth.kind.isin(["clean", "noisy"])]
    assert abs((train.given_label != train.true_label).mean() - 0.2) <= 0.5 / len(train)


# sha256 of the default scenario's truth table (as CSV), of the images and paths each write task holds, and of the
# broken files, computed with the code before long_tail_order and pairflip existed: the defaults must not move.
DEFAULT_TRUTH = "eaa889b19388d44fd649e54f5be95c128174f510eb19f1d046485a7a3e567384"
DEFAULT_TASKS = "f112a868de6cea383eaae111098e7736c73b14da54b75088a8a1688db65b31c7"


def test_the_default_scenario_is_unchanged(fmnist):
    plan = _ScenarioPlan(DemoParams(), fmnist)
    plan.train_split(), plan.duplicates(), plan.test_split(), plan.incoming(), plan.broken_files()
    assert hashlib.sha256(plan.truth().to_csv(index=False).encode()).hexdigest() == DEFAULT_TRUTH
    tasks = hashlib.sha256(b"".join(t.images.tobytes() + "|".join(t.paths).encode()
                                    + str((t.corruption, t.severity, t.seed)).encode() for t in plan.tasks))
    assert tasks.hexdigest() == DEFAULT_TASKS


def test_summary_and_report_show_the_classifier_beside_the_pixel_baseline_and_the_refusal(workdir):
    from sslvision import report, summary

    r = workdir / "reports/finetune"
    r.mkdir(parents=True)
    pixel = {"model": "logistic regression on pixels", "balanced_accuracy": 0.785, "worst_class": "6_shirt",
             "worst_class_recall": 0.31, "accuracy": 0.79, "per_class_recall": {"6_shirt": 0.31, "8_bag": 0.9}}
    (r / "metrics.json").write_text(json.dumps({
        "balanced_accuracy": 0.729, "worst_class": "6_shirt", "worst_class_recall": 0.305, "ece": 0.03,
        "accuracy": 0.73, "baselines": {"pixel_logreg": pixel}}))
    (r / "promotion.json").write_text(json.dumps({
        "model": "m", "challenger": "1", "decision": "refused", "champion": None,
        "challenger_metrics": {"balanced_accuracy": 0.729}, "pixel_baseline": {"balanced_accuracy": 0.785},
        "failed": {"pixel_baseline": "balanced accuracy 0.7290 does not beat the pixel baseline's 0.7850"}}))
    pd.DataFrame({"class": ["6_shirt", "8_bag"], "recall": [0.305, 0.95]}).to_csv(r / "per_class_recall.csv",
                                                                                  index=False)
    text = " ".join(summary.render(workdir).split())
    assert ("baseline classifier 72.9% (worst 6_shirt 30.5%) vs pixel logistic regression 78.5% (worst 6_shirt "
            "31.0%): -5.6 points, NOT BETTER than the pixel baseline") in text
    assert ("m v1: refused: pixel_baseline (balanced accuracy 72.9% on the golden set, pixel baseline 78.5%): "
            "champion none: nothing is deployed") in text
    html = "".join(report.finetune_section())
    assert "the classifier beside the baselines" in html and "logistic regression on pixels" in html
    assert "pixel baseline recall" in html and "0.785" in html
