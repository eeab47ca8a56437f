import pytest

from sslvision.io import file_sha256
from sslvision.trigger import Decision, admit_batch, decide


def m(value, threshold, stage, direction="max"):
    return {"value": value, "threshold": threshold, "stage": stage, "direction": direction}


HEALTHY = {
    "embedding_mmd_pvalue": m(0.40, 0.01, "pretrain"),
    "label_noise_rate": m(0.05, 0.15, "audit", "min"),
    "tail_class_recall": m(0.70, 0.50, "synthesize"),
    "estimated_accuracy": m(0.88, 0.80, "finetune"),
}


def test_clean_batch_reruns_nothing():
    d = decide(HEALTHY)
    assert d.stage is None and not d.degraded


@pytest.mark.parametrize("metric,value,stage", [
    ("embedding_mmd_pvalue", 0.001, "pretrain"),
    ("label_noise_rate", 0.35, "audit"),
    ("tail_class_recall", 0.20, "synthesize"),
    ("estimated_accuracy", 0.60, "finetune"),
])
def test_each_rule_maps_to_its_stage(metric, value, stage):
    metrics = {**HEALTHY, metric: {**HEALTHY[metric], "value": value}}
    d = decide(metrics)
    assert d.stage == stage
    assert metric in d.reasons[0] and "threshold" in d.reasons[0]


def test_earliest_failed_stage_wins_and_all_reasons_are_kept():
    metrics = {**HEALTHY,
               "estimated_accuracy": m(0.5, 0.8, "finetune"),
               "embedding_mmd_pvalue": m(0.0, 0.01, "pretrain")}
    d = decide(metrics)
    assert d.stage == "pretrain"
    assert [r.split(" ")[0] for r in d.reasons] == ["embedding_mmd_pvalue", "estimated_accuracy"]


def test_explicit_failed_flag_wins_and_unknown_stage_is_an_error():
    assert decide({"x": {**m(1, 0, "audit"), "failed": True}}).stage == "audit"
    with pytest.raises(ValueError, match="names stage 'pretrian'"):
        decide({"x": m(1, 0, "pretrian")})


def _batch(root, labeled):
    b = root / ("labeled" if labeled else "unlabeled")
    target = b / "0_a" if labeled else b
    target.mkdir(parents=True)
    (target / "x.png").write_bytes(b"png")
    return b


@pytest.mark.parametrize("labeled,stage,joins", [
    (False, "pretrain", True), (False, "finetune", False), (False, None, False),
    (True, "audit", True), (True, "finetune", True), (True, None, False),
])
def test_what_joins_the_pool(tmp_path, labeled, stage, joins):
    batch = _batch(tmp_path, labeled)
    evaluated = {p.relative_to(batch).as_posix(): file_sha256(p) for p in batch.rglob("*.png")}
    admitted = admit_batch(batch, Decision(stage=stage), tmp_path / "pool", evaluated)
    assert (admitted is not None) == joins
    if joins:
        dest = admitted.dest
        assert sorted(p.name for p in dest.rglob("*.png")) == ["x.png"]
        assert admit_batch(batch, Decision(stage=stage), tmp_path / "pool", evaluated).dest == dest
        assert [p.name for p in (tmp_path / "pool").iterdir()] == [batch.name]


def test_a_class_mix_change_alone_is_a_prior_correction_not_a_retrain():
    metrics = {**HEALTHY, "class_prior_shift_pvalue": m(1e-9, 0.01, "prior_correction")}
    d = decide(metrics)
    assert d.stage is None and d.action == "prior_correction" and not d.degraded
    assert d.to_dict()["action"] == "prior_correction" and "class_prior_shift_pvalue" in d.reasons[0]
    assert "no retraining" in d.reasons[-1]
    assert decide(HEALTHY).action is None


def test_drift_the_prior_cannot_explain_still_retrains():
    metrics = {**HEALTHY, "class_prior_shift_pvalue": m(1e-9, 0.01, "prior_correction"),
               "embedding_mmd_pvalue": m(0.001, 0.01, "pretrain")}
    d = decide(metrics)
    assert d.stage == "pretrain" and d.action == "retrain" and d.degraded
    assert [r.split(" ")[0] for r in d.reasons] == ["embedding_mmd_pvalue", "class_prior_shift_pvalue"]


def test_held_out_images_never_join_the_pool(tmp_path):
    batch = _batch(tmp_path, labeled=False)
    (batch / "y.png").write_bytes(b"png2")
    evaluated = {p.relative_to(batch).as_posix(): file_sha256(p) for p in batch.rglob("*.png")}
    admitted = admit_batch(batch, Decision(stage="pretrain"), tmp_path / "pool", evaluated,
                           held_out={"y.png": "identical to an image of the held-out test split"})
    assert admitted.files == ["x.png"] and "held-out test split" in admitted.skipped["y.png"]
    assert sorted(p.name for p in admitted.dest.rglob("*.png")) == ["x.png"]
