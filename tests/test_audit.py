"""The audit stage: planted label flips rank on top, the policies do what they say, outputs and truth
metrics are right, near-duplicates and outliers are found; find_label_issues (the array API) finds
what the stage finds."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from sslvision.audit import (
    AuditParams,
    clean_manifest,
    detect_label_issues,
    find_label_issues,
    knn_probs,
    match_truth,
    nearest_neighbours,
    pixel_features,
    run_audit,
    select_lowest,
    truth_metrics,
)
from sslvision.params import ParamsError, load_section
from sslvision.stages.audit import audit_cli

CLASSES = ["a", "b", "c", "d"]
COUNTS = [160, 80, 40, 20]  # long-tailed (ratio 8)


def clusters(seed=0, noise=0.15, dim=16, spread=0.35):
    """Long-tailed Gaussian clusters on orthogonal directions, ``noise`` of the labels flipped uniformly."""
    rng = np.random.default_rng(seed)
    true = np.repeat(np.arange(len(COUNTS)), COUNTS)
    centres = np.eye(dim)[: len(COUNTS)] * 3.0
    x = centres[true] + spread * rng.standard_normal((len(true), dim))
    given = true.copy()
    flip = rng.choice(len(true), size=int(noise * len(true)), replace=False)
    given[flip] = (true[flip] + rng.integers(1, len(COUNTS), size=len(flip))) % len(COUNTS)
    return x.astype(np.float32), true, given


def fast(**kw) -> AuditParams:
    return AuditParams(**{"probe_max_iter": 100, "knn_k": 10, "consensus_k": 10, "pixel_pca": 0, **kw})


def manifest_for(given, split="train"):
    n = len(given)
    return pd.DataFrame({
        "index": np.arange(n), "id": [f"img{i:04d}" for i in range(n)], "split": split, "batch": "",
        "source_path": [f"images/train/{CLASSES[g]}/f{i:04d}.png" for i, g in enumerate(given)],
        "label": given, "label_name": [CLASSES[g] for g in given],
    })


def test_planted_flips_rank_on_top():
    x, true, given = clusters()
    noisy = given != true
    la = detect_label_issues(x, given, len(CLASSES), fast())
    assert roc_auc_score(noisy, la.score) > 0.97
    top = np.argsort(-la.score)[: noisy.sum()]
    assert noisy[top].mean() > 0.9
    flagged = la.is_label_issue
    assert (flagged & noisy).sum() / noisy.sum() > 0.9  # recall
    assert (flagged & noisy).sum() / flagged.sum() > 0.85  # precision
    # the suggestion is the true class for the flips it caught
    caught = flagged & noisy
    assert (la.suggested[caught] == true[caught]).mean() > 0.9
    # rare classes are not wholesale flagged: the clean members of the tail class survive
    tail = (given == 3) & ~noisy
    assert flagged[tail].mean() < 0.2


def test_clean_labels_give_few_flags_and_a_low_noise_estimate():
    x, true, _ = clusters(noise=0.0)
    _, _, metrics = run_audit(fast(), manifest_for(true), x, CLASSES)
    assert metrics["issue_rate"] < 0.03
    assert metrics["noise_rate_estimated"] < 0.03


def test_noise_rate_estimate_tracks_the_planted_rate():
    x, true, given = clusters(noise=0.2)
    _, _, metrics = run_audit(fast(), manifest_for(given), x, CLASSES)
    assert abs(metrics["noise_rate_estimated"] - 0.2) < 0.08
    assert abs(metrics["issue_rate"] - 0.2) < 0.05
    assert set(metrics["noise_rate_by_class"]) == set(CLASSES)


def test_knn_vote_is_leave_one_out_and_ignores_untrusted_neighbours():
    x = np.array([[1, 0], [0.99, 0.1], [0.98, 0.2], [0, 1], [0.1, 0.99]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1, 1])
    idx, sim = nearest_neighbours(x, 4)
    assert not (idx == np.arange(5)[:, None]).any()
    probs = knn_probs(idx, sim, labels, 2, k=2, temperature=0.1)
    assert probs[0].argmax() == 0 and probs[3].argmax() == 1
    trusted = np.array([True, False, True, True, True])  # row 1 no longer votes
    probs = knn_probs(idx, sim, labels, 2, k=2, temperature=0.1, trusted=trusted)
    assert probs[0, 1] > 0.99  # row 0's neighbours are rows 1 (class 0, untrusted now) and 2 (class 1)
    assert np.allclose(probs.sum(axis=1), 1)


def test_select_lowest_never_empties_a_class():
    labels = np.array([0] * 6 + [1] * 3)
    quality = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.01, 0.02, 0.03])
    flagged = select_lowest(labels, quality, n=5, min_examples_per_class=1)
    assert flagged[6:].sum() == 2 and not flagged[8]  # class 1 keeps its best row
    assert flagged.sum() == 4


@pytest.mark.parametrize("policy", ["drop", "relabel", "keep"])
def test_policies(policy):
    x, true, given = clusters(seed=1)
    manifest = manifest_for(given)
    test = manifest_for(true[:10], split="test").assign(index=np.arange(10), id=[f"t{i}" for i in range(10)])
    manifest = pd.concat([manifest, test], ignore_index=True)
    issues, clean, metrics = run_audit(fast(policy=policy, relabel_confidence=0.0), manifest, x, CLASSES)
    flagged = set(issues.loc[issues["is_label_issue"], "id"])
    assert len(flagged) == metrics["n_label_issues"] > 0
    assert set(clean.columns) == set(manifest.columns) | {"label_given", "audit_action"}
    assert (clean["split"] == "test").sum() == 10  # the clean test split is never audited
    assert (clean.loc[clean["split"] == "test", "audit_action"] == "keep").all()
    kept = clean.set_index("id")
    if policy == "drop":
        assert not flagged & set(kept.index)
        assert len(clean) == len(manifest) - len(flagged)
        assert (kept["label"] == kept["label_given"]).all()
    elif policy == "keep":
        assert len(clean) == len(manifest)
        assert (kept["label"] == kept["label_given"]).all()
        assert (kept["audit_action"] == "keep").all()
    else:  # relabel, every suggestion confident enough (relabel_confidence 0)
        assert len(clean) == len(manifest)
        changed = kept[kept["audit_action"] == "relabel"]
        assert set(changed.index) == flagged
        suggested = issues.set_index("id").loc[changed.index, "label_suggested"]
        assert (changed["label"] == suggested).all()
        assert (changed["label"] != changed["label_given"]).all()
        assert (changed["label_name"] == [CLASSES[c] for c in changed["label"]]).all()
        # most relabels are corrections to the true class
        pos = [int(i[3:]) for i in changed.index]
        assert (changed["label"].to_numpy() == true[pos]).mean() > 0.9


def test_relabel_drops_what_is_not_confident_enough():
    x, _, given = clusters(seed=2)
    issues, clean, metrics = run_audit(fast(policy="relabel", relabel_confidence=0.999), manifest_for(given),
                                       x, CLASSES)
    conf = issues.loc[issues["is_label_issue"], "suggested_confidence"]
    assert metrics["actions"]["relabel"] == int((conf >= 0.999).sum())
    assert metrics["actions"]["drop"] == int((conf < 0.999).sum()) > 0
    assert len(clean) == len(given) - metrics["actions"]["drop"]


def test_an_encoder_that_cannot_separate_the_classes_changes_no_label():
    """Embeddings with no class structure (an encoder pretrained for a few steps) make the probe disagree with
    most labels; acting on that would rewrite clean labels, so the audit keeps them all and says why."""
    rng = np.random.default_rng(0)
    _, true, _ = clusters(seed=0, noise=0.0)
    x = rng.standard_normal((len(true), 16)).astype(np.float32)  # no relation to the labels
    issues, clean, metrics = run_audit(fast(policy="relabel", relabel_confidence=0.0), manifest_for(true), x, CLASSES)
    assert metrics["n_label_issues"] > 0.3 * len(true)  # the probe is at chance: it flags many clean labels
    assert metrics["actions"] == {"keep": len(true), "relabel": 0, "drop": 0}
    assert "audit.max_change_share" in metrics["actions_withheld"]
    assert (clean["label"] == true).all() and len(clean) == len(true)
    assert issues["is_label_issue"].sum() == metrics["n_label_issues"]  # still listed
    # with class structure and 15% planted noise the same setting acts
    x, _, given = clusters(seed=0)
    _, _, metrics = run_audit(fast(policy="relabel", relabel_confidence=0.0), manifest_for(given), x, CLASSES)
    assert metrics["actions"]["relabel"] > 0 and "actions_withheld" not in metrics


def test_clean_manifest_leaves_unaudited_rows_alone():
    manifest = manifest_for(np.array([0, 1, 2, 3]))
    out = clean_manifest(manifest, np.array([1, 2]), np.array(["relabel", "drop"], dtype=object),
                         np.array([3, 0]), CLASSES)
    assert list(out["id"]) == ["img0000", "img0001", "img0003"]
    assert list(out["label"]) == [0, 3, 3] and list(out["label_given"]) == [0, 1, 3]
    assert list(out["label_name"]) == ["a", "d", "d"]
    assert list(out["audit_action"]) == ["keep", "relabel", "keep"]


def test_near_duplicates_with_conflicting_labels_and_outliers():
    x, true, _ = clusters(noise=0.0, seed=3)
    given = true.copy()
    x = np.vstack([x, x[5:6], x[7:8], 40 * np.ones((1, x.shape[1]), dtype=np.float32) * np.r_[1, -1][
        np.arange(x.shape[1]) % 2]])
    given = np.r_[given, given[5], (given[7] + 1) % 4, 0]  # exact copy; conflicting copy; far outlier
    issues, _, metrics = run_audit(fast(), manifest_for(given), x, CLASSES)
    n = len(true)
    by_id = issues.set_index("id")
    assert by_id.loc[f"img{n + 1:04d}", "is_label_issue"]  # the conflicting copy
    assert "conflicting near-duplicate" in by_id.loc[f"img{n + 1:04d}", "reason"]
    assert by_id.loc[f"img{n + 1:04d}", "duplicate_of"] == "img0007"
    assert metrics["n_conflicting_duplicates"] >= 1
    assert metrics["n_near_duplicate_groups"] >= 2
    assert by_id.loc[f"img{n + 2:04d}", "is_outlier"]
    assert metrics["n_outliers"] >= 1


def test_truth_metrics_on_a_known_case():
    sub = pd.DataFrame({"source_path": ["p0", "p1", "p2", "p3", "p4"]})
    truth = pd.DataFrame({"path": ["p0", "p1", "p2", "p3", "p4", "other"],
                          "is_noisy": [True, False, True, False, False, True]})
    flagged = np.array([True, True, False, False, False])
    score = np.array([0.9, 0.8, 0.3, 0.1, 0.5])
    m = truth_metrics(sub, truth, flagged, score)
    assert m["n_matched"] == 5 and m["n_noisy"] == 2 and m["n_flagged"] == 2
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    # noisy scores {0.9, 0.3} vs clean {0.8, 0.1, 0.5}: 4 of 6 pairs ordered right
    assert m["auroc"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="matches only"):
        truth_metrics(pd.DataFrame({"source_path": ["x", "y", "p0"]}), truth, flagged[:3], score[:3])


def test_truth_matches_a_source_that_was_a_subdirectory_of_the_scenario():
    truth = pd.DataFrame({"path": ["images/train/a/x.png", "images/train/b/y.png", "images/test/a/z.png",
                                   "other/a/z.png"], "is_noisy": [True, False, False, True]})
    sub = pd.DataFrame({"source_path": ["train/a/x.png", "images/train/b/y.png", "a/z.png", "nope.png"]})
    assert list(match_truth(sub, truth)) == [1, 0, -1, -1]  # a/z.png is ambiguous, nope.png unknown


def test_bad_params_name_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"audit": {"policy": "burn"}}))
    with pytest.raises(ParamsError, match="audit.policy"):
        load_section("audit", AuditParams, path)
    path.write_text(yaml.safe_dump({"audit": {"polcy": "drop"}}))
    with pytest.raises(ParamsError, match="audit.polcy"):
        load_section("audit", AuditParams, path)


def two_views(seed=0, noise=0.2):
    """Embeddings that tell only the class *pair* ({a, b} vs {c, d}) and 8x8 images whose pixels tell only
    the class *within* its pair (a bright left or right half): neither view alone finds every flip."""
    rng = np.random.default_rng(seed)
    counts = [120, 120, 120, 120]
    true = np.repeat(np.arange(4), counts)
    x = (np.eye(16)[true // 2] * 3.0 + 0.35 * rng.standard_normal((len(true), 16))).astype(np.float32)
    images = rng.integers(0, 60, (len(true), 8, 8, 1)).astype(np.uint8)
    left = true % 2 == 0
    images[left, :, :4] += 150
    images[~left, :, 4:] += 150
    given = true.copy()
    flip = rng.choice(len(true), size=int(noise * len(true)), replace=False)
    given[flip] = (true[flip] + rng.integers(1, 4, size=len(flip))) % 4
    return x, images, true, given


def test_pixel_features_and_embeddings_together_find_what_neither_finds_alone():
    x, images, true, given = two_views()
    noisy = given != true
    manifest = manifest_for(given)
    f1 = {}
    for name, pca in (("embeddings", 0), ("both", 8)):
        truth = pd.DataFrame({"path": manifest["source_path"], "is_noisy": noisy})
        _, _, m = run_audit(fast(pixel_pca=pca), manifest, x, CLASSES, truth, images)
        f1[name] = m["truth"]["f1"]
    # pixels alone: the same audit on embeddings that carry nothing
    blank = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    _, _, m = run_audit(fast(pixel_pca=8, pixel_weight=10.0), manifest, blank, CLASSES,
                        pd.DataFrame({"path": manifest["source_path"], "is_noisy": noisy}), images)
    f1["pixels"] = m["truth"]["f1"]
    assert f1["both"] > 0.9
    assert f1["both"] > max(f1["embeddings"], f1["pixels"]) + 0.1, f1


def test_pixel_features_pool_large_images_and_do_not_depend_on_the_chunking():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (50, 64, 64, 3), dtype=np.uint8)
    index = rng.permutation(50)[:40]
    a = pixel_features(images, index, 5, side=32)
    b = pixel_features(images, index, 5, side=32, chunk=7)
    assert a.shape == (40, 5) and np.allclose(a, b, atol=1e-5)
    # rows come back in ``index`` order (the mmap is read sorted)
    assert np.allclose(a, pixel_features(images[index], np.arange(40), 5, side=32), atol=1e-5)
    # 64x64 is area-averaged 2x2 down to 32x32: images of constant 2x2 blocks give their 32x32 subsample's
    blocks = images[:, ::2, ::2].repeat(2, axis=1).repeat(2, axis=2)
    assert np.allclose(pixel_features(blocks, index, 5, side=32),
                       pixel_features(np.ascontiguousarray(images[:, ::2, ::2]), index, 5, side=32), atol=1e-4)
    with pytest.raises(ValueError, match="pixel_pca=5 needs the ingested images"):
        x, _, given = clusters()
        run_audit(fast(pixel_pca=5), manifest_for(given), x, CLASSES)


def test_embeddings_that_do_not_cover_the_manifest_are_refused():
    x, _, given = clusters()
    with pytest.raises(ValueError, match="re-run pretrain"):
        run_audit(fast(), manifest_for(given), x[:-1], CLASSES)


def test_stage_writes_every_output_and_truth_metrics(workdir):
    import mlflow

    from sslvision import tracking

    x, true, given = clusters(seed=0)
    ing = workdir / "data/ingested"
    ing.mkdir(parents=True)
    np.save(ing / "images.npy", np.random.default_rng(0).integers(0, 255, (len(given), 8, 8, 1), dtype=np.uint8))
    manifest = manifest_for(given)
    manifest.to_parquet(ing / "manifest.parquet")
    (ing / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    (workdir / "data/embeddings").mkdir(parents=True)
    np.save(workdir / "data/embeddings/embeddings.npy", x)
    pd.DataFrame({"path": manifest["source_path"], "is_noisy": given != true}).to_parquet(workdir / "truth.parquet")
    (workdir / "params.yaml").write_text(yaml.safe_dump(
        {"audit": {"probe_max_iter": 100, "knn_k": 10, "consensus_k": 10, "gallery_size": 8,
                   "pixel_pca": 0, "truth": "truth.parquet"}}))

    metrics = audit_cli(workdir / "params.yaml")
    for path in ["data/audit/label_issues.parquet", "data/audit/manifest_clean.parquet",
                 "reports/audit/metrics.json", "reports/audit/issues_by_class.csv", "reports/audit/gallery.png"]:
        assert (workdir / path).stat().st_size > 0, path
    assert (workdir / "reports/audit/gallery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((workdir / "reports/audit/metrics.json").read_text())
    assert written["n_label_issues"] == metrics["n_label_issues"]
    assert written["truth"]["f1"] > 0.85 and written["truth"]["auroc"] > 0.95
    issues = pd.read_parquet(workdir / "data/audit/label_issues.parquet")
    assert {"id", "label_given", "label_suggested", "score", "reason"} <= set(issues.columns)
    assert issues["score"].is_monotonic_decreasing or not issues["is_outlier"].any()
    runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT],
                              filter_string="tags.`sslvision.stage` = 'audit'")
    assert len(runs) == 1 and runs["metrics.truth.f1"].iloc[0] == pytest.approx(written["truth"]["f1"])


# --- the array API: find_label_issues -------------------------------------------------------------

def blobs(seed=0, n=300, noise=0.1, dim=8, spread=0.6):
    """3 Gaussian blobs of ``n / 3`` points each, ``noise`` of the labels flipped to another class."""
    rng = np.random.default_rng(seed)
    true = np.repeat(np.arange(3), n // 3)
    x = 2.0 * np.eye(dim)[true] + spread * rng.standard_normal((n, dim))
    given = true.copy()
    flip = rng.choice(n, size=int(noise * n), replace=False)
    given[flip] = (true[flip] + rng.integers(1, 3, size=len(flip))) % 3
    return x.astype(np.float32), true, given


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_find_label_issues_finds_planted_flips(seed):
    x, true, given = blobs(seed)
    noisy = given != true
    df = find_label_issues(x, given)
    assert len(df) == len(given) and list(df.index) == list(range(len(given)))
    assert list(df.columns[:4]) == ["given_label", "suggested_label", "label_quality", "is_label_issue"]
    assert {"suggested_confidence", "self_confidence", "consensus", "duplicate_of", "is_outlier",
            "outlier_distance", "reason"} <= set(df.columns)
    dtypes = df.dtypes.astype(str).to_dict()
    assert {k: dtypes[k] for k in ("given_label", "suggested_label", "duplicate_of")} == dict.fromkeys(
        ("given_label", "suggested_label", "duplicate_of"), "int64")
    assert dtypes["label_quality"] == dtypes["suggested_confidence"] == "float64"
    assert dtypes["is_label_issue"] == dtypes["is_outlier"] == "bool"
    assert pd.api.types.is_string_dtype(df["reason"])
    assert (df["given_label"].to_numpy() == given).all()
    assert df["label_quality"].between(0, 1).all()

    flagged = df["is_label_issue"].to_numpy()
    assert (flagged & noisy).sum() / noisy.sum() > 0.8  # recall
    assert (flagged & noisy).sum() / flagged.sum() > 0.85  # precision
    assert roc_auc_score(noisy, -df["label_quality"]) > 0.95
    caught = flagged & noisy
    assert (df.loc[caught, "suggested_label"].to_numpy() == true[caught]).mean() > 0.9
    # unflagged rows keep their label and have no suggestion; flagged rows say why
    assert (df.loc[~flagged, "suggested_label"] == df.loc[~flagged, "given_label"]).all()
    assert df.loc[~flagged, "suggested_confidence"].isna().all()
    assert df.loc[flagged, "reason"].str.startswith("label:").all()
    # the core function runs without a params object (its defaults): the same flags here (no duplicates)
    assert (detect_label_issues(x, given, 3).is_label_issue == flagged).all()


@pytest.mark.parametrize("pixels", [False, True])
def test_find_label_issues_is_what_the_stage_finds(pixels):
    """The stage's run_audit and find_label_issues run the same code: the same flags, scores, suggestions."""
    x, images, _, given = two_views(seed=3)
    settings = {"probe_max_iter": 100, "knn_k": 10, "consensus_k": 10, "pixel_pca": 8 if pixels else 0}
    issues, _, metrics = run_audit(AuditParams(**settings), manifest_for(given), x, CLASSES, None, images)
    # the API takes the images as (N, H, W) too
    df = find_label_issues(x, given, pixels=images[..., 0] if pixels else None, **settings)
    assert df["is_label_issue"].sum() == metrics["n_label_issues"]
    flagged = issues[issues["is_label_issue"]]
    pos = flagged["index"].to_numpy()
    assert set(pos) == set(np.flatnonzero(df["is_label_issue"]))
    assert np.allclose(1 - df["label_quality"].to_numpy()[pos], flagged["score"].to_numpy())
    assert (df["suggested_label"].to_numpy()[pos] == flagged["label_suggested"].to_numpy()).all()
    assert df["is_outlier"].sum() == metrics["n_outliers"] == issues["is_outlier"].sum()


def test_find_label_issues_has_the_params_defaults_and_names_a_bad_setting():
    import inspect

    keywords = {name: prm.default for name, prm in inspect.signature(find_label_issues).parameters.items()
                if prm.kind is inspect.Parameter.KEYWORD_ONLY and name in AuditParams.model_fields}
    assert keywords == {name: AuditParams.model_fields[name].default for name in keywords}
    # every detection setting is a keyword; the stage's file/policy settings are not
    stage_only = {"splits", "policy", "relabel_confidence", "max_change_share", "drop_outliers", "gallery_size",
                  "truth"}
    assert set(AuditParams.model_fields) - set(keywords) == stage_only
    x, _, given = blobs()
    with pytest.raises(ParamsError, match=r"find_label_issues: audit\.knn_k"):
        find_label_issues(x, given, knn_k=0)
    with pytest.raises(ParamsError, match=r"audit\.quality"):
        find_label_issues(x, given, quality="margin")
    with pytest.raises(ValueError, match="integers"):
        find_label_issues(x, given.astype(float))
    with pytest.raises(ValueError, match="n_classes is 2"):
        find_label_issues(x, given, n_classes=2)
    with pytest.raises(ValueError, match="300 embeddings but 299 labels"):
        find_label_issues(x, given[:-1])
    with pytest.raises(ValueError, match="pixels must be the 300 images"):
        find_label_issues(x, given, pixels=np.zeros((10, 8, 8), np.uint8))
