"""SimCLR's temperature schedule (``pretrain.temperature_schedule``) and starting from another encoder
(``pretrain.init_from``, MAE pre-pretraining), on tiny arrays and a tiny ingested project."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from sslvision import objectives
from sslvision.models import Encoder, load_encoder, save_encoder, to_input
from sslvision.pretrain import PretrainParams, load_init, pretrain_encoder, train
from sslvision.ssl import build_method, cosine_cycle, in_fp32
from sslvision.ssl.methods import temperatures
from tests.test_pretrain import FAST, TINY_RESNET, TINY_VIT, write_ingested

TINY = {**TINY_RESNET, **FAST, "epochs": 2, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0}
VIT = {**TINY_VIT, **FAST, "epochs": 1, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0}


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 14, 14), dtype=np.uint8)


# --- the schedule --------------------------------------------------------------------------------


def test_cosine_cycle_starts_high_reaches_low_half_a_period_later_and_repeats():
    t = cosine_cycle(1.0, 0.1, 100, 40)
    assert len(t) == 100 and t[0] == pytest.approx(1.0) and t[20] == pytest.approx(0.1)
    assert t[40] == pytest.approx(1.0) and t[60] == pytest.approx(0.1) and t[80] == pytest.approx(1.0)
    assert t.min() >= 0.1 - 1e-12 and t.max() <= 1.0 + 1e-12
    np.testing.assert_allclose(t[:40], t[40:80])  # periodic
    assert np.all(np.diff(t[:21]) < 0) and np.all(np.diff(t[20:41]) > 0)  # down, then up
    with pytest.raises(ValueError, match="period"):
        cosine_cycle(1.0, 0.1, 10, 0)
    with pytest.raises(ValueError, match="must not exceed"):
        cosine_cycle(0.1, 1.0, 10, 5)


def test_the_pretrain_schedule_takes_its_bounds_and_period_from_the_params():
    p = PretrainParams(temperature_schedule="cosine", temperature_min=0.2, temperature_max=0.8, temperature_period=10)
    t = temperatures(p, 30)
    assert t[0] == pytest.approx(0.8) and t[5] == pytest.approx(0.2) and t[10] == pytest.approx(0.8)
    whole = temperatures(p.model_copy(update={"temperature_period": 0}), 30)  # 0: one cycle over the run
    assert whole[0] == pytest.approx(0.8) and whole[15] == pytest.approx(0.2) and whole.min() == pytest.approx(0.2)
    constant = temperatures(PretrainParams(temperature=0.3, temperature_min=0.05), 7)
    assert constant.tolist() == [0.3] * 7
    with pytest.raises(ValueError, match="temperature_min"):
        PretrainParams(temperature_min=0.5, temperature_max=0.4)


def test_constant_is_the_loss_with_the_fixed_temperature_and_ignores_the_cosine_settings(images):
    """constant (the default) is NT-Xent at pretrain.temperature at every step, as before the schedule existed;
    the cosine's bounds and period change neither the weights nor the checkpoint fingerprint."""
    torch.set_num_threads(1)
    p = PretrainParams(**TINY, temperature=0.3)
    torch.manual_seed(0)
    model = build_method(p, Encoder(p.encoder_config(14, 1)), total_steps=4, steps_per_epoch=2)
    x = to_input(torch.from_numpy(images[:16, :, :, None].copy()))
    views = [x, torch.flip(x, dims=[3])]
    for step in range(4):
        expected = in_fp32(objectives.nt_xent, model.head(model.encoder(views[0])), model.head(model.encoder(views[1])),
                           0.3)
        assert torch.equal(model(views, step), expected)
        assert model.scheduled(step) == {"temperature": 0.3}
    other = {"temperature_min": 0.05, "temperature_max": 2.0, "temperature_period": 3}
    assert PretrainParams(**TINY, **other).fingerprint() == PretrainParams(**TINY).fingerprint()
    assert (PretrainParams(**TINY, temperature_schedule="cosine").fingerprint()
            != PretrainParams(**TINY).fingerprint())
    a = pretrain_encoder(images, seed=2, **TINY)
    b = pretrain_encoder(images, seed=2, **TINY, **other)
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), name


def test_cosine_trains_logs_its_temperature_per_epoch_and_differs_from_constant(images):
    torch.set_num_threads(1)
    kw = {**TINY, "epochs": 3, "temperature_schedule": "cosine", "temperature_period": 4}
    p = PretrainParams(**kw, seed=1, device="cpu")
    result = train(p, images[..., None], np.arange(len(images)), progress=False, checkpoints=False)
    schedule = cosine_cycle(1.0, 0.1, 6, 4)  # 64 images / 32 = 2 steps per epoch, 3 epochs
    assert [r["temperature"] for r in result.history] == pytest.approx([schedule[1], schedule[3], schedule[5]])
    assert all(np.isfinite(r["loss"]) for r in result.history)
    constant = train(p.model_copy(update={"temperature_schedule": "constant"}), images[..., None],
                     np.arange(len(images)), progress=False, checkpoints=False)
    assert [r["temperature"] for r in constant.history] == [0.1, 0.1, 0.1]
    assert not torch.equal(result.encoder.backbone.conv1.weight, constant.encoder.backbone.conv1.weight)


def test_cl_mim_schedules_its_simclr_term_only():
    p = PretrainParams(**VIT, method="cl_mim", temperature_schedule="cosine", temperature_period=4)
    model = build_method(p, Encoder(p.encoder_config(14, 1)), total_steps=8, steps_per_epoch=4)
    assert model.scheduled(2) == {"temperature": pytest.approx(0.1)} and model.cl.temperature(0) == 1.0
    dino = build_method(p.model_copy(update={"cl_mim_cl": "dino"}), Encoder(p.encoder_config(14, 1)), 8, 4)
    assert dino.scheduled(2) == {}


# --- init_from -----------------------------------------------------------------------------------


def test_init_from_starts_from_the_saved_weights(images, tmp_path):
    torch.set_num_threads(1)
    source = pretrain_encoder(images, seed=5, **TINY)
    save_encoder(tmp_path / "src", source, extra={"method": "simclr"})
    fresh = Encoder(PretrainParams(**TINY).encoder_config(14, 1))
    rng = torch.get_rng_state()
    lineage = load_init(fresh, tmp_path / "src")
    assert torch.equal(torch.get_rng_state(), rng), "loading draws no random numbers (the heads init as before)"
    for (name, a), b in zip(source.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert lineage["method"] == "simclr" and len(lineage["sha256"]) == 64 and lineage["path"] == str(tmp_path / "src")

    # a run from it with a vanishing learning rate ends where it started; from scratch it does not
    tiny_lr = {**TINY, "epochs": 1, "lr": 1e-12}
    started = pretrain_encoder(images, seed=0, init_from=str(tmp_path / "src"), **tiny_lr)
    scratch = pretrain_encoder(images, seed=0, **tiny_lr)
    before = dict(source.named_parameters())
    for name, value in started.named_parameters():
        torch.testing.assert_close(value, before[name], atol=1e-8, rtol=0)
    assert not torch.allclose(scratch.backbone.conv1.weight, before["backbone.conv1.weight"])


def test_init_from_another_architecture_or_nothing_is_a_clear_error(images, tmp_path):
    torch.set_num_threads(1)
    save_encoder(tmp_path / "vit", Encoder(PretrainParams(**VIT).encoder_config(14, 1)))
    with pytest.raises(ValueError, match=r"the encoder there is vit_tiny_patch16_224 .* this run builds resnet18 "):
        pretrain_encoder(images, init_from=str(tmp_path / "vit"), **TINY)
    save_encoder(tmp_path / "narrow", Encoder(PretrainParams(**TINY).encoder_config(14, 1)))
    wider = {**TINY, "backbone_args": {**TINY["backbone_args"], "channels": [8, 16, 16, 32]}}
    with pytest.raises(ValueError, match=r"16, 16, 16\].*this run builds resnet18 .*16, 16, 32\].*same architecture"):
        pretrain_encoder(images, init_from=str(tmp_path / "narrow"), **wider)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pretrain_encoder(images, init_from=str(tmp_path / "nowhere"), **TINY)


def test_mae_then_simclr_records_the_lineage_in_the_encoder_and_mlflow(workdir):
    """The two-step recipe through the stage: MAE into models/encoder, copied to models/mae, then SimCLR from it;
    config.json and the MLflow run name the source encoder and its sha256."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from sslvision.io import file_sha256
    from sslvision.stages.pretrain import pretrain_cli

    torch.set_num_threads(1)
    ingested = write_ingested(workdir / "data/ingested", n_train=32, n_test=40, n_pool=0)
    base = {**TINY_VIT, **FAST, "batch_size": 16, "epochs": 1, "lr": 1e-3, "warmup_epochs": 0, "knn_k": 5,
            "checkpoint_dir": "checkpoints/pretrain"}
    (workdir / "params.yaml").write_text(yaml.safe_dump({"pretrain": {**base, "method": "mae"}}))
    try:
        pretrain_cli(params=workdir / "params.yaml", ingested=ingested, encoder_dir=workdir / "models/encoder",
                     reports=workdir / "reports/pretrain")
        shutil.copytree(workdir / "models/encoder", workdir / "models/mae")
        (workdir / "params.yaml").write_text(yaml.safe_dump({"pretrain": {**base, "method": "simclr",
                                                                          "init_from": "models/mae"}}))
        metrics = pretrain_cli(params=workdir / "params.yaml", ingested=ingested,
                               encoder_dir=workdir / "models/encoder", reports=workdir / "reports/pretrain")
    finally:
        mlflow.disable_system_metrics_logging()  # pretrain_cli turns it on process-wide
    assert metrics["method"] == "simclr"
    digest = file_sha256(workdir / "models/mae/encoder.safetensors")
    config = json.loads((workdir / "models/encoder/config.json").read_text())
    assert config["init_from"] == {"path": "models/mae", "sha256": digest, "method": "mae"}
    assert load_encoder(workdir / "models/encoder").dim == 32
    runs = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}").search_runs(
        [mlflow.get_experiment_by_name("sslvision").experiment_id], order_by=["attributes.start_time DESC"])
    tags, params = runs[0].data.tags, runs[0].data.params
    assert tags["sslvision.init_from.sha256"] == digest and tags["sslvision.init_from.method"] == "mae"
    assert params["init_from"] == "models/mae" and "sslvision.init_from.path" not in runs[1].data.tags
