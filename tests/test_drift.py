"""Drift checks on synthetic embeddings and probabilities: the MMD test's size and power, prior shift,
ATC, label noise, and which stage each degradation is attributed to."""

import numpy as np
import pytest
import torch
from PIL import Image

from sslvision.batches import read_batch
from sslvision.drift import (
    DriftParams,
    Reference,
    atc_estimate,
    atc_threshold,
    detect_drift,
    estimate_class_prior,
    evaluate_batch,
    mmd_permutation_test,
    prediction_shift,
    to_json,
)
from sslvision.trigger import decide

torch.set_num_threads(1)

MEANS = np.array([[3.0, 0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0, 0]])
PRIOR = np.array([0.6, 0.3, 0.1])
PARAMS = DriftParams(permutations=200, alpha=0.01, rare_class_share=0.1, rare_min_count=5)


def sample(n, rng, prior=PRIOR, offset=0.0):
    """Embeddings of a 3-class Gaussian mixture, their labels, and a fixed classifier's probabilities."""
    y = rng.choice(len(prior), size=n, p=prior)
    x = MEANS[y] + rng.normal(size=(n, MEANS.shape[1])) + offset
    return x.astype(np.float32), y, softmax_probs(x)


def softmax_probs(x, temperature=1.0):
    logits = -((x[:, None, :] - MEANS[None]) ** 2).sum(-1) / 2 / temperature
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    _, _, probs = sample(300, rng)
    calib_y = np.repeat(np.arange(3), 100)
    calib_x = MEANS[calib_y] + rng.normal(size=(300, MEANS.shape[1]))
    held_out_y = np.repeat(np.arange(3), 200)
    held_out_x = (MEANS[held_out_y] + rng.normal(size=(600, MEANS.shape[1]))).astype(np.float32)
    return Reference(embeddings=held_out_x, embedding_labels=held_out_y, probs=probs,
                     calib_probs=softmax_probs(calib_x), calib_labels=calib_y,
                     train_counts=np.array([1000, 500, 50]), classes=["a", "b", "c"])


def _naive_mmd2(x, y, bandwidth):
    def k(u, v):
        return np.exp(-((u[:, None] - v[None]) ** 2).sum(-1) / (2 * bandwidth**2))

    kxx, kyy = k(x, x), k(y, y)
    np.fill_diagonal(kxx, 0)
    np.fill_diagonal(kyy, 0)
    m, n = len(x), len(y)
    return kxx.sum() / (m * (m - 1)) + kyy.sum() / (n * (n - 1)) - 2 * k(x, y).mean()


def test_mmd_statistic_is_the_unbiased_estimator():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(25, 5)) + 0.3
    r = mmd_permutation_test(x, y, permutations=50)
    assert r.statistic == pytest.approx(_naive_mmd2(x, y, r.bandwidth), rel=1e-9)
    assert len(r.null) == 50 and 1 / 51 <= r.p_value <= 1


def test_mmd_pvalues_are_calibrated_on_same_distribution_and_small_under_shift():
    null_p, shifted_p = [], []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(200, 8)), rng.normal(size=(100, 8))
        null_p.append(mmd_permutation_test(x, y, permutations=200, seed=seed).p_value)
        shifted_p.append(mmd_permutation_test(x, y + 0.5, permutations=200, seed=seed).p_value)
    # under the null the p-value is uniform: mean near 1/2, few below 0.05
    assert 0.3 < np.mean(null_p) < 0.7, null_p
    assert sum(p < 0.05 for p in null_p) <= 2, null_p
    assert max(shifted_p) < 0.01, shifted_p


def test_detect_drift_on_two_arrays_of_embeddings():
    """The public array API: the same Gaussian is not drifted at alpha 0.01, a shifted mean is; the
    result is the MMD test's, and the same arrays and seed give the same p-value."""
    rng = np.random.default_rng(0)
    reference, same, shifted = rng.normal(size=(200, 8)), rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 0.5
    clean = detect_drift(reference, same, permutations=200, seed=0)
    assert not clean.drifted and clean.p_value >= 0.01 and clean.alpha == 0.01
    drifted = detect_drift(reference, shifted, permutations=200, seed=0)
    assert drifted.drifted and drifted.p_value == pytest.approx(1 / 201)
    assert drifted.statistic > drifted.critical_value and len(drifted.null) == 200
    expected = mmd_permutation_test(reference, shifted, permutations=200, alpha=0.01, seed=0)
    assert drifted.statistic == expected.statistic and drifted.critical_value == expected.critical_value
    assert detect_drift(reference, same, permutations=200, seed=0).p_value == clean.p_value
    with pytest.raises(ValueError, match="2-D"):
        detect_drift(reference[:, 0], same)
    with pytest.raises(ValueError, match="never give a p-value below"):
        detect_drift(reference, same, permutations=50, alpha=0.01)
    with pytest.raises(ValueError, match="NaN"):
        detect_drift(np.full((5, 2), np.nan), same[:, :2])


def test_estimate_class_prior_recovers_a_known_mix_from_posteriors():
    """Posteriors of a known mix (calibrated under a uniform source prior): EM returns that mix, a
    probability vector; BBSE with a labeled balanced reference does too."""
    rng = np.random.default_rng(6)
    mix = np.array([0.5, 0.3, 0.2])
    probs, y = _labeled(4000, mix, rng)
    truth = np.bincount(y, minlength=3) / len(y)
    q = estimate_class_prior(probs, source_prior=np.ones(3) / 3)
    assert q.shape == (3,) and q.sum() == pytest.approx(1.0) and q.min() > 0
    assert q == pytest.approx(truth, abs=0.03)
    ref_probs, ref_labels = _labeled(3000, [1 / 3] * 3, rng)
    q = estimate_class_prior(probs, reference_probs=ref_probs, reference_labels=ref_labels, method="bbse")
    assert q == pytest.approx(truth, abs=0.03)
    with pytest.raises(ValueError, match="columns"):
        estimate_class_prior(probs, reference_probs=ref_probs[:, :2], reference_labels=ref_labels, method="bbse")


def test_mmd_rejects_bad_input():
    with pytest.raises(ValueError, match="dimension"):
        mmd_permutation_test(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="identical"):
        mmd_permutation_test(np.ones((5, 3)), np.ones((5, 3)))


def test_prior_shift_is_detected_and_same_prior_is_not():
    rng = np.random.default_rng(0)
    prior = np.array([0.6, 0.3, 0.1])
    pvalues = []
    for _ in range(20):
        reference = np.bincount(rng.choice(3, size=600, p=prior), minlength=3)
        pvalues.append(prediction_shift(reference, rng.choice(3, size=300, p=prior))["pvalue"])
    assert sum(pv < 0.05 for pv in pvalues) <= 3 and np.mean(pvalues) > 0.3, pvalues
    shifted = prediction_shift(reference, rng.choice(3, size=300, p=[0.1, 0.1, 0.8]))
    assert shifted["tv"] == pytest.approx(0.7, abs=0.08) and shifted["pvalue"] < 1e-6
    assert shifted["batch"].sum() == pytest.approx(1.0) and shifted["reference"].sum() == pytest.approx(1.0)


def test_atc_estimates_accuracy_under_shift():
    """Calibrated on a labeled source sample, ATC estimates the accuracy of a harder, unlabeled target
    sample (a covariate shift: classes overlap more, p(y|x) unchanged)."""
    rng = np.random.default_rng(0)

    def draw(n, separation):
        x = separation * MEANS[rng.integers(0, 3, n)] + rng.normal(size=(n, MEANS.shape[1]))
        p = softmax_probs(x)
        y = (rng.random(n)[:, None] > p.cumsum(1)).sum(1)  # labels drawn from the posterior
        return p.max(1), p.argmax(1) == y

    conf_s, correct_s = draw(3000, 0.6)
    t = atc_threshold(conf_s, correct_s)
    assert atc_estimate(conf_s, t) == pytest.approx(correct_s.mean(), abs=0.005)
    conf_t, correct_t = draw(3000, 0.4)
    assert correct_t.mean() < correct_s.mean() - 0.04  # the target really is harder
    assert atc_estimate(conf_t, t) == pytest.approx(correct_t.mean(), abs=0.02)


def _scenario(name, rng):
    """(embeddings, probs, labels) of a batch that degrades in one way."""
    x, y, probs = sample(200, rng)
    labels = None
    if name == "drifted":
        x, _, probs = sample(200, rng, offset=1.0)
    elif name == "noisy_labels":
        labels = y.copy()
        flip = rng.random(len(y)) < 0.4
        labels[flip] = (y[flip] + rng.integers(1, 3, flip.sum())) % 3
    elif name == "rare_recall":  # the classifier misses the rare class on in-distribution images
        labels = y
        rare = y == 2
        probs = probs.copy()
        probs[rare] = [0.3, 0.45, 0.25]
    elif name == "accuracy":  # same images and predictions, far less confident
        probs = softmax_probs(x, temperature=8.0)
    elif name == "clean_labeled":
        labels = y
    return x, probs, labels


@pytest.mark.parametrize("name,metric,stage", [
    ("clean", None, None),
    ("clean_labeled", None, None),
    ("drifted", "embedding_mmd_pvalue", "pretrain"),
    ("noisy_labels", "label_noise_rate", "audit"),
    ("rare_recall", "tail_class_recall_drop", "synthesize"),
    ("accuracy", "accuracy", "finetune"),
])
def test_each_degradation_is_owned_by_its_stage(reference, name, metric, stage):
    x, probs, labels = _scenario(name, np.random.default_rng(3))
    result = evaluate_batch(reference, x, probs, labels, PARAMS)
    metrics = result["metrics"]
    assert set(metrics) == {"embedding_mmd_pvalue", "label_noise_rate", "tail_class_recall_drop", "accuracy",
                            "class_prior_shift_pvalue"}
    for m in metrics.values():
        assert set(m) == {"value", "threshold", "direction", "stage", "failed"}
        assert m["direction"] in ("max", "min")
    if metric is None:
        assert result["failed"] == []
    else:
        assert metrics[metric]["failed"] and metrics[metric]["stage"] == stage
    assert decide(metrics).stage == stage
    if labels is None:
        assert metrics["label_noise_rate"]["value"] is None and not metrics["label_noise_rate"]["failed"]
    if name == "rare_recall":
        assert not metrics["embedding_mmd_pvalue"]["failed"]
        assert result["recall"]["worst_rare_class"] == "c"
    if name == "noisy_labels":
        assert result["label_noise"]["estimate"] == pytest.approx(0.4, abs=0.1)


@pytest.mark.parametrize("shifted", [[0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
def test_a_new_class_mix_alone_routes_to_prior_correction(reference, shifted):
    """Clean images at another class mix: only the prior metric fails (input drift is tested against the
    held-out images re-sampled to the estimated prior, accuracy against the held-out accuracy at it), and
    the trigger's action is a prior correction, not a retrain."""
    x, y, probs = sample(300, np.random.default_rng(4), prior=np.array(shifted))
    result = evaluate_batch(reference, x, probs, None, PARAMS)
    m = result["metrics"]["class_prior_shift_pvalue"]
    assert m["failed"] and m["stage"] == "prior_correction"
    assert result["failed"] == ["class_prior_shift_pvalue"], result["failed"]
    estimate = np.array(list(result["class_prior"]["estimate"].values()))
    assert 0.5 * np.abs(estimate - np.bincount(y, minlength=3) / len(y)).sum() < 0.05
    d = decide(result["metrics"])
    assert d.stage is None and d.action == "prior_correction" and not d.degraded
    assert "class_prior_shift_pvalue" in d.reasons[0]


def test_result_is_json_serialisable(reference):
    import json

    x, probs, labels = _scenario("clean_labeled", np.random.default_rng(5))
    out = json.loads(json.dumps(to_json(evaluate_batch(reference, x, probs, labels, PARAMS))))
    assert out["input_drift"]["alpha"] == 0.01 and "null" not in out["input_drift"]
    assert out["accuracy"]["source"] == "labels"


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_read_batch_labels_from_class_directories(tmp_path):
    batch = tmp_path / "batch"
    _png(batch / "x0.png", 10)
    _png(batch / "b" / "x1.png", 20)
    _png(batch / "a" / "x2.png", 30)
    (batch / "broken.png").write_bytes(b"not an image")
    (batch / "batch.json").write_text("{}")
    images, labels = read_batch(batch, ["a", "b"], channels=1, size=4)
    assert images.shape == (3, 4, 4, 1) and images.dtype == np.uint8
    assert sorted(zip(labels.tolist(), images[:, 0, 0, 0].tolist(), strict=True)) == [(-1, 10), (0, 30), (1, 20)]
    _png(batch / "zebra" / "x3.png", 40)
    with pytest.raises(ValueError, match="zebra.*not a class"):
        read_batch(batch, ["a", "b"], channels=1, size=4)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_batch(tmp_path / "missing", ["a"], 1, 4)


# --- the stage, end to end on a tiny project -------------------------------------------------------


def linear_classifier(encoder, features, labels):
    """A classifier with a logistic-regression head on ``features`` (the encoder's embeddings), on its
    own copy of ``encoder`` (the classifier's head lives in the encoder)."""
    import copy

    from sklearn.linear_model import LogisticRegression

    from sslvision.finetune import Classifier
    from tests.finetune_project import CLASSES

    head = LogisticRegression(max_iter=500).fit(features, labels)
    classifier = Classifier(copy.deepcopy(encoder), CLASSES)
    with torch.no_grad():
        classifier.head.weight.copy_(torch.from_numpy(head.coef_))
        classifier.head.bias.copy_(torch.from_numpy(head.intercept_))
    return classifier


def tiny_project(root):
    """Ingested Fashion-MNIST images, their embeddings, a tiny encoder, an audit that dropped the first
    30 train rows, and a logistic-regression head trained as finetune trains (on finetune's train rows
    only: never on its validation rows nor on the rows the audit dropped). Returns the embeddings."""
    import pandas as pd
    import yaml

    from sslvision.data import Ingested
    from sslvision.finetune import FinetuneParams, save_classifier, train_val_rows
    from sslvision.models import embed, load_encoder
    from tests.finetune_project import make_project

    make_project(root, head=100, ratio=10, test_per_class=20)
    data = Ingested.load(root / "data/ingested")
    encoder = load_encoder(root / "models/encoder")
    features = embed(encoder, np.asarray(data.images))
    (root / "data/embeddings").mkdir(parents=True)
    np.save(root / "data/embeddings/embeddings.npy", features)
    audited = root / "data/audit/manifest_clean.parquet"
    pd.read_parquet(audited).iloc[30:].to_parquet(audited, index=False)
    train, _ = train_val_rows(FinetuneParams(manifest=str(audited)))
    save_classifier(root / "models/classifier", linear_classifier(encoder, features[train["index"]], train["label"]))
    (root / "params.yaml").write_text(yaml.safe_dump({"drift_eval": {
        "reference_size": 300, "calibration_size": 200, "permutations": 200, "batch_size": 128}}))
    return features


def test_reference_rows_are_the_rows_finetune_held_out(workdir):
    """The classifier reference (its predictions: prediction shift, reference accuracy) is computed on
    finetune's own validation rows plus the same share of the rows the audit dropped, never on a row
    finetune trained on; the training-row class counts are those of finetune's training labels."""
    from sslvision.data import Ingested
    from sslvision.finetune import FinetuneParams, load_classifier, train_val_rows
    from sslvision.stages.drift_eval import build_reference, classifier_reference_rows
    from sslvision.stages.finetune import load_data

    tiny_project(workdir)
    data = Ingested.load(workdir / "data/ingested")
    finetune = FinetuneParams()  # what the stage reads from params.yaml (no finetune section: the defaults)
    held_out, counts = classifier_reference_rows(finetune, data.manifest)
    train, val = train_val_rows(finetune)
    dropped = set(data.split("train")["index"][:30])
    assert set(held_out) - dropped == set(val["index"])  # exactly finetune's validation rows ...
    assert len(set(held_out) & dropped) == 3  # ... plus val_fraction (0.1) of the 30 dropped rows
    assert not set(held_out) & set(train["index"])
    assert counts.tolist() == np.bincount(np.concatenate([train["label"], val["label"]]), minlength=10).tolist()
    # finetune's data loader trains on train_val_rows' train rows and validates on its val rows
    loaded = load_data(finetune)
    np.testing.assert_array_equal(loaded.val.images, data.images[val["index"].to_numpy()])
    np.testing.assert_array_equal(loaded.train.images, data.images[train["index"].to_numpy()])
    # and the stage's reference predictions are the classifier's on exactly those rows
    reference, *_ = build_reference(DriftParams(reference_size=300, calibration_size=200), "params.yaml")
    expected = load_classifier("models/classifier").predict_proba(np.asarray(data.images[held_out]), 256)
    np.testing.assert_allclose(reference.probs, expected, rtol=1e-5, atol=1e-6)
    # the input-drift reference is the labeled test split (re-sampled per batch to its estimated prior)
    test = data.split("test")
    assert reference.embedding_labels.tolist() == test["label"].tolist() and len(reference.embeddings) == len(test)


def unseen_images(offset=30000):
    """Fashion-MNIST train images from ``offset`` on (the tiny project uses only earlier ones), with
    the project's long-tailed class prior."""
    from tests.finetune_project import fmnist, long_tail_indices

    data = fmnist()
    return data["train_images"][offset + long_tail_indices(data["train_labels"][offset:], 40, 10)]


def with_noise(images, seed=0):
    """Gaussian noise of std 60 (of 255): a corruption the embedding drift test must catch."""
    noise = np.random.default_rng(seed).normal(0, 60, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def write_batch(directory, images):
    directory.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(directory / f"img_{i:04d}.png")


def test_stage_writes_trigger_json_plots_and_an_mlflow_run(workdir):
    import json
    import re

    import mlflow
    from typer.testing import CliRunner

    from sslvision.cli import app
    from sslvision.stages.drift_eval import drift_eval_cli
    from sslvision.tracking import setup

    tiny_project(workdir)
    clean = unseen_images()
    noisy = with_noise(clean)
    write_batch(workdir / "incoming/clean", clean)
    write_batch(workdir / "incoming/noisy", noisy)

    clean_result = drift_eval_cli(workdir / "incoming/clean", "params.yaml", "reports/clean")
    cli = CliRunner().invoke(app, ["drift-eval", str(workdir / "incoming/noisy"), "--out", "reports/noisy"])
    assert cli.exit_code == 0, cli.output
    assert re.search(r"embedding_mmd_pvalue .* pretrain +FAILED", cli.output)
    noisy_result = json.loads((workdir / "reports/noisy/trigger.json").read_text())
    assert not clean_result["metrics"]["embedding_mmd_pvalue"]["failed"]
    assert noisy_result["metrics"]["embedding_mmd_pvalue"]["failed"]
    assert noisy_result["input_drift"]["statistic"] > noisy_result["input_drift"]["critical_value"]

    assert noisy_result["batch"].endswith("noisy") and noisy_result["n_images"] == len(noisy)
    assert noisy_result["metrics"]["embedding_mmd_pvalue"]["stage"] == "pretrain"
    assert noisy_result["accuracy"]["source"] == "atc_at_estimated_prior"
    assert 0 <= noisy_result["accuracy"]["value"] <= 1
    for name in ("mmd.png", "prediction_shift.png", "prediction_shift.csv", "embeddings_pca.png"):
        assert (workdir / "reports/noisy" / name).stat().st_size > 0

    setup()
    runs = mlflow.search_runs(filter_string="tags.`sslvision.stage` = 'drift_eval'")
    assert len(runs) == 2
    assert sorted(runs["tags.sslvision.drift.failed"]) == sorted(
        ",".join(r["failed"]) or "none" for r in (clean_result, noisy_result))
    assert sorted(runs["metrics.embedding_mmd_pvalue"]) == sorted(
        r["metrics"]["embedding_mmd_pvalue"]["value"] for r in (clean_result, noisy_result))


# --- label shift: the prior estimators, the correction, accuracy at any class mix ----------------


def _labeled(n, prior, rng):
    y = rng.choice(len(prior), size=n, p=prior)
    return softmax_probs(MEANS[y] + rng.normal(size=(n, MEANS.shape[1]))), y


@pytest.mark.parametrize("method", ["em", "bbse", "bbse_soft"])
@pytest.mark.parametrize("target", [[0.7, 0.2, 0.1], [0.05, 0.15, 0.8], [1 / 3, 1 / 3, 1 / 3]])
def test_prior_estimators_recover_a_known_prior(method, target):
    """Calibrated on a balanced labeled sample, both estimators recover the class prior of an unlabeled
    sample of 500 drawn at another mix within 0.05 total variation (the issue's target), on average over
    draws; plain predicted-class shares are further off (the classifier confuses the classes)."""
    rng = np.random.default_rng(0)
    ref_probs, ref_labels = _labeled(2000, [1 / 3] * 3, rng)
    errors, naive = [], []
    for _ in range(10):
        probs, y = _labeled(500, target, rng)
        truth = np.bincount(y, minlength=3) / len(y)
        q = estimate_class_prior(probs, reference_probs=ref_probs, reference_labels=ref_labels, method=method)
        assert q.sum() == pytest.approx(1.0) and q.min() > 0
        errors.append(0.5 * np.abs(q - truth).sum())
        naive.append(0.5 * np.abs(np.bincount(probs.argmax(1), minlength=3) / len(y) - truth).sum())
    assert np.mean(errors) < 0.05, errors
    if target[0] != target[1]:
        assert np.mean(errors) < np.mean(naive)


def test_em_without_a_reference_needs_the_source_prior_and_rejects_bad_input():
    rng = np.random.default_rng(1)
    probs, y = _labeled(3000, [0.6, 0.3, 0.1], rng)  # softmax_probs are posteriors under a uniform prior
    q = estimate_class_prior(probs, source_prior=np.ones(3) / 3)
    assert q == pytest.approx([0.6, 0.3, 0.1], abs=0.03)
    with pytest.raises(ValueError, match="needs"):
        estimate_class_prior(probs)
    with pytest.raises(ValueError, match="unknown method"):
        estimate_class_prior(probs, source_prior=np.ones(3) / 3, method="magic")


def test_prior_adjustment_gives_the_posteriors_at_the_new_prior():
    """Adding the adjustment to the logits makes the predictions Bayes-optimal at the new mix: accuracy at
    that mix rises, and the mean corrected posterior is the new prior (calibrated)."""
    from sslvision.drift import fit_bias_calibration, prior_adjustment

    rng = np.random.default_rng(2)
    ref_probs, ref_labels = _labeled(2000, [1 / 3] * 3, rng)
    calibration = fit_bias_calibration(ref_probs, ref_labels)
    probs, y = _labeled(3000, [0.8, 0.15, 0.05], rng)
    q = estimate_class_prior(probs, calibration=calibration)
    v = prior_adjustment(calibration, q)
    corrected = np.exp(np.log(probs) + v)
    corrected /= corrected.sum(1, keepdims=True)
    assert np.mean(corrected.argmax(1) == y) > np.mean(probs.argmax(1) == y) + 0.01
    assert corrected.mean(0) == pytest.approx(np.bincount(y) / len(y), abs=0.03)
    assert np.abs(prior_adjustment(calibration, np.array([1.0, 0.0, 0.0]), bound=5.0)).max() <= 5.0


def test_resample_to_prior_never_repeats_a_row():
    from sslvision.drift import resample_to_prior

    labels = np.repeat(np.arange(3), [100, 50, 10])
    rows = resample_to_prior(labels, np.array([0.2, 0.3, 0.5]), 1000)
    assert len(set(rows)) == len(rows) == 20  # class 2 (10 rows, half the sample) limits it
    assert np.bincount(labels[rows]).tolist() == [4, 6, 10]


def test_accuracy_estimate_holds_at_another_class_mix():
    """ATC fitted on the held-out sample re-weighted to the batch's prior estimates a batch's accuracy at a
    mix far from the held-out one, where the held-out accuracy itself is far off."""
    from sslvision.drift import accuracy_at_prior, atc_estimate, atc_threshold_at_prior
    from sslvision.metrics import per_class_recall

    rng = np.random.default_rng(3)
    means = MEANS * np.array([[1.0], [0.3], [0.3]])  # class a is easy, b and c overlap

    def posterior(x):  # under the held-out (uniform) prior
        logits = -((x[:, None, :] - means[None]) ** 2).sum(-1) / 2
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    y_ref = np.repeat(np.arange(3), 1000)
    p_ref = posterior(means[y_ref] + rng.normal(size=(3000, 6)))
    target = np.array([0.02, 0.49, 0.49])
    y = rng.choice(3, 1000, p=target)
    p = posterior(means[y] + rng.normal(size=(1000, 6)))
    truth = np.mean(p.argmax(1) == y)
    correct = p_ref.argmax(1) == y_ref
    assert abs(np.mean(correct) - truth) > 0.05  # the balanced held-out accuracy is the wrong yardstick
    t = atc_threshold_at_prior(p_ref.max(1), correct, y_ref, target)
    assert atc_estimate(p.max(1), t) == pytest.approx(truth, abs=0.03)
    recall, _ = per_class_recall(y_ref, p_ref.argmax(1), 3)
    assert accuracy_at_prior(recall, target) == pytest.approx(truth, abs=0.03)


def test_a_threshold_below_its_clean_floor_is_raised_and_reported(reference):
    """A label-noise threshold clean labels already exceed is raised to the clean floor and named in the
    warnings, so a clean labeled batch does not fail it; a really noisy batch still does."""
    strict = PARAMS.model_copy(update={"label_noise_max": 0.001})
    x, probs, labels = _scenario("clean_labeled", np.random.default_rng(5))
    result = evaluate_batch(reference, x, probs, labels, strict)
    check = result["threshold_checks"]["label_noise_rate"]
    assert not check["met"] and check["effective"] == pytest.approx(check["clean_floor"]) and check["effective"] > 0.001
    assert any(w.startswith("label_noise_rate: threshold 0.001 is below its clean floor")
               for w in result["threshold_warnings"])
    assert not result["metrics"]["label_noise_rate"]["failed"]
    x, probs, labels = _scenario("noisy_labels", np.random.default_rng(5))
    assert evaluate_batch(reference, x, probs, labels, strict)["metrics"]["label_noise_rate"]["failed"]


def test_a_prior_correction_survives_save_and_load_and_shifts_the_probabilities(tmp_path):
    """The correction lives in the classifier's config: reloaded, predict_proba adds it to the scaled logits;
    a correction out of bounds or of the wrong length is refused naming the file."""
    import json

    from sslvision.finetune import Classifier, load_classifier, save_classifier, softmax
    from tests.finetune_project import CLASSES, fmnist, tiny_encoder

    images = fmnist()["test_images"][:20][..., None]
    classifier = Classifier(tiny_encoder(), CLASSES)
    adjustment = np.linspace(-2, 2, 10)
    classifier.prior_correction = {"adjustment": adjustment.tolist(), "prior": (np.ones(10) / 10).tolist()}
    save_classifier(tmp_path / "c", classifier)
    loaded = load_classifier(tmp_path / "c")
    assert loaded.prior_correction["adjustment"] == adjustment.tolist()
    expected = softmax(loaded.logits(images) / loaded.temperature + adjustment)
    np.testing.assert_allclose(loaded.predict_proba(images), expected, rtol=1e-6)
    config = json.loads((tmp_path / "c/config.json").read_text())
    for bad in ({"adjustment": [99.0] * 10, "prior": [0.1] * 10}, {"adjustment": [0.0] * 3, "prior": [0.1] * 10}):
        (tmp_path / "c/config.json").write_text(json.dumps({**config, "prior_correction": bad}))
        with pytest.raises(ValueError, match="config.json: prior_correction"):
            load_classifier(tmp_path / "c")


def test_bbse_soft_falls_back_to_hard_bbse_when_the_probabilities_stop_behaving(reference):
    """Same images, far less confident probabilities: the soft estimate moves (it reads the probabilities), the
    hard one does not (same predicted classes); past prior_fallback_tv the hard one is used and reported."""
    assert reference.prior_method == "bbse_soft"
    _, clean_probs, _ = _scenario("clean", np.random.default_rng(3))
    _, flat_probs, _ = _scenario("accuracy", np.random.default_rng(3))
    q_clean, used_clean = reference.prior_estimate(clean_probs)
    q_flat, used_flat = reference.prior_estimate(flat_probs)
    assert used_clean == "bbse_soft" and used_flat == "bbse"
    soft = estimate_class_prior(flat_probs, reference_probs=reference.calib_probs,
                                reference_labels=reference.calib_labels, method="bbse_soft",
                                calibration=reference.calibration)
    assert 0.5 * np.abs(soft - q_flat).sum() > reference.prior_fallback_tv
    result = evaluate_batch(reference, _scenario("accuracy", np.random.default_rng(3))[0], flat_probs, None, PARAMS)
    assert result["class_prior"]["method"] == "bbse" and result["class_prior"]["configured_method"] == "bbse_soft"
