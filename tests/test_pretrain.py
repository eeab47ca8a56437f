"""SSL pretraining on tiny Fashion-MNIST subsets: methods, resume, NaN, DDP, save/load, the stage."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sslvision import objectives
from sslvision.idx import read_idx
from sslvision.metrics import knn_predict
from sslvision.models import Encoder, EncoderConfig, embed, load_decoder, load_encoder, save_encoder, to_input
from sslvision.pretrain import NonFiniteLossError, PretrainParams, _optimizer, evaluate, train
from sslvision.ssl import build_method
from sslvision.stages.embed import embed_ingested
from sslvision.stages.pretrain import read_inputs, run_stage

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

TINY_RESNET = dict(backbone="resnet18", stem_stride=2,
                   backbone_args={"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 16], "stem_width": 8})
TINY_VIT = dict(backbone="vit_tiny_patch16_224", patch_size=7,
                backbone_args={"embed_dim": 32, "depth": 2, "num_heads": 2})
FAST = dict(workers=0, threads=1, proj_hidden_dim=32, proj_dim=16, dino_out_dim=64, decoder_dim=16,
            decoder_depth=1, decoder_heads=2, embed_batch_size=64, knn_k=10, local_crops=1)


def write_ingested(root: Path, n_train: int = 48, n_test: int = 40, n_pool: int = 16) -> Path:
    """A tiny ``data/ingested/`` as the ingest stage writes it (see ``sslvision.data``)."""
    root.mkdir(parents=True, exist_ok=True)
    train = read_idx(FMNIST / "train-images-idx3-ubyte.gz")[: n_train + n_pool]
    test_x = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:n_test]
    test_y = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:n_test].astype(np.int64)
    images = np.concatenate([train, test_x])[..., None].astype(np.uint8)
    np.save(root / "images.npy", images)
    split = ["train"] * n_train + ["pool"] * n_pool + ["test"] * n_test
    ids = [f"img{i:05d}" for i in range(len(images))]
    meta = pd.DataFrame({"index": np.arange(len(images)), "id": ids, "split": split,
                         "batch": ["b0" if s == "pool" else "" for s in split],
                         "content_hash": [hashlib.sha256(im.tobytes()).hexdigest() for im in images]})
    meta.to_parquet(root / "images.parquet", index=False)
    meta[["id", "split", "batch", "content_hash"]].to_parquet(root / "ssl_pool.parquet", index=False)
    test_ids = ids[n_train + n_pool:]
    pd.DataFrame({"id": test_ids, "label": test_y, "label_name": [CLASSES[y] for y in test_y]}).to_parquet(
        root / "eval_labels.parquet", index=False)
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    return root


@pytest.fixture
def ingested(workdir):
    return write_ingested(workdir / "data" / "ingested")


def params(method: str = "simclr", **kw) -> PretrainParams:
    base = {**(TINY_VIT if method in ("mae", "cl_mim") else TINY_RESNET), **FAST, "method": method,
            "batch_size": 16, "epochs": 1, "lr": 1e-3, "warmup_epochs": 0}
    base.update(kw)
    return PretrainParams.model_validate(base)


def _fixed_batch_losses(p: PretrainParams, steps: int = 6) -> list[float]:
    torch.manual_seed(0)
    images = read_idx(FMNIST / "train-images-idx3-ubyte.gz")[:16, :, :, None]
    x = to_input(torch.from_numpy(np.ascontiguousarray(images)))
    views = [x, torch.flip(x, dims=[3])]
    if p.method == "dino":
        views.append(torch.nn.functional.interpolate(x, size=p.local_size))
    model = build_method(p, Encoder(p.encoder_config(28, 1)), total_steps=steps, steps_per_epoch=steps)
    opt = _optimizer(model, p)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)  # the same MAE mask at every step: the loss change is the model's
        loss = model(views, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(step)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method,kw", [
    ("simclr", {}), ("simclr", {"loss": "rince"}), ("vicreg", {}), ("dino", {"teacher_momentum": 0.9}),
    ("mae", {}), ("cl_mim", {}), ("cl_mim", {"cl_mim_cl": "dino", "teacher_momentum": 0.9}),
    ("simclr", TINY_VIT),
])
def test_each_method_lowers_its_loss_on_a_fixed_batch(method, kw):
    torch.set_num_threads(1)
    losses = _fixed_batch_losses(params(method, lr=3e-3, **kw))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("lars", 0.3)])
def test_sgd_and_lars_lower_the_loss_with_one_state_buffer(optimizer, lr):
    torch.set_num_threads(1)
    p = params("simclr", optimizer=optimizer, lr=lr, weight_decay=5e-4)
    losses = _fixed_batch_losses(p)
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    model = build_method(p, Encoder(p.encoder_config(28, 1)), total_steps=1, steps_per_epoch=1)
    opt = _optimizer(model, p)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0  # biases and norms: no decay
    assert all(q.ndim <= 1 for q in no_decay["params"]) and all(q.ndim > 1 for q in decay["params"])
    x = torch.rand(4, 1, 28, 28)
    model([x, torch.flip(x, dims=[3])], 0).backward()
    opt.step()
    buffers = {k for state in opt.state.values() for k in state}
    assert buffers == {"momentum_buffer"}  # AdamW would keep exp_avg and exp_avg_sq: twice the memory


def test_nt_xent_matches_cross_entropy_definition():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    a, b = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    z = torch.cat([a, b])
    sim = z @ z.T / 0.5
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(6) + 6, torch.arange(6)])
    expected = torch.nn.functional.cross_entropy(sim, targets)
    assert torch.allclose(objectives.nt_xent(z1, z2, 0.5), expected, atol=1e-6)
    # perfectly aligned, well-separated pairs give a lower loss than random ones
    aligned = torch.eye(6, 8) * 5
    assert objectives.nt_xent(aligned, aligned, 0.5) < objectives.nt_xent(z1, z2, 0.5)
    assert objectives.rince(aligned, aligned, 0.5) < objectives.rince(z1, z2, 0.5)


def test_vicreg_penalises_collapse():
    spread = torch.randn(64, 16)
    collapsed = torch.ones(64, 16) * 0.3
    assert objectives.vicreg(collapsed, collapsed) > objectives.vicreg(spread, spread)


def test_resume_after_kill_gives_the_uninterrupted_weights(ingested, workdir):
    torch.set_num_threads(1)
    inputs = read_inputs(ingested)
    for method, extra in (("simclr", {}), ("cl_mim", {})):
        p_full = params(method, epochs=2, checkpoint_every=2, checkpoint_dir=str(workdir / f"ck_full_{method}"),
                        **extra)
        full = train(p_full, inputs.images_path, inputs.train_rows, progress=False)

        p_kill = p_full.model_copy(update={"checkpoint_dir": str(workdir / f"ck_kill_{method}")})

        class Killed(Exception):
            pass

        def kill_at_5(step: int, loss: float) -> None:  # after step 5; the last checkpoint is step 4 (epoch 2)
            if step == 5:
                raise Killed

        with pytest.raises(Killed):
            train(p_kill, inputs.images_path, inputs.train_rows, on_step=kill_at_5, progress=False)
        resumed = train(p_kill, inputs.images_path, inputs.train_rows, progress=False)
        assert resumed.resumed_from == 4 and resumed.steps == full.steps == 8
        for (name, a), b in zip(full.encoder.state_dict().items(), resumed.encoder.state_dict().values(), strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-5), (method, name)
        assert [h["loss"] for h in full.history] == pytest.approx([h["loss"] for h in resumed.history], rel=1e-5)


def test_non_finite_loss_stops_with_a_clear_message(ingested, workdir, monkeypatch):
    inputs = read_inputs(ingested)
    monkeypatch.setattr(objectives, "nt_xent", lambda z1, z2, t: (z1.sum() + z2.sum()) * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 0 .*pretrain\.lr"):
        train(params(checkpoint_dir=str(workdir / "ck")), inputs.images_path, inputs.train_rows, progress=False)


def test_save_load_roundtrip_gives_the_same_embeddings(tmp_path):
    torch.set_num_threads(1)
    images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:20, :, :, None]
    for cfg in (params("simclr"), params("mae")):
        model = build_method(cfg, Encoder(cfg.encoder_config(28, 1)), 1, 1)
        save_encoder(tmp_path / cfg.method, model.encoder, model.decoder)
        assert not list((tmp_path / cfg.method).glob("*.pt")) and not list((tmp_path / cfg.method).glob("*.pkl"))
        again = load_encoder(tmp_path / cfg.method)
        np.testing.assert_array_equal(embed(model.encoder, images, 8), embed(again, images, 8))
    decoder = load_decoder(tmp_path / "mae")
    assert decoder.pred.out_features == 7 * 7
    with pytest.raises(ValueError, match="without an MAE decoder"):
        load_decoder(tmp_path / "simclr")


def test_encoder_adapts_to_sizes_and_channels():
    for cfg in (EncoderConfig(img_size=32, in_chans=3, stem_stride=2, backbone_args=TINY_RESNET["backbone_args"]),
                EncoderConfig(backbone="vit_tiny_patch16_224", img_size=32, in_chans=3, patch_size=8,
                              backbone_args=TINY_VIT["backbone_args"])):
        enc = Encoder(cfg)
        assert enc(torch.zeros(2, 3, 32, 32)).shape == (2, enc.dim)
    with pytest.raises(ValueError, match="needs a ViT"):
        build_method(params("mae", backbone="resnet18", backbone_args=TINY_RESNET["backbone_args"]),
                     Encoder(EncoderConfig(backbone_args=TINY_RESNET["backbone_args"])), 1, 1)


def test_weighted_knn_and_two_fold_evaluation():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = np.eye(3)[labels] * 5 + rng.normal(scale=0.3, size=(60, 3))
    pred = knn_predict(features, labels, features + 0.01, num_classes=3, k=5, temperature=0.1)
    assert (pred == labels).all()
    scores = evaluate(features, labels, 3, k=10)
    assert scores["knn_accuracy"] == 1.0 and scores["linear_probe_accuracy"] == 1.0
    assert evaluate(rng.normal(size=(60, 3)), labels, 3, k=10, linear=False)["knn_accuracy"] < 0.7


def test_inputs_come_from_the_ssl_pool_fingerprint_and_are_checked(ingested):
    pool = pd.read_parquet(ingested / "ssl_pool.parquet")
    assert len(read_inputs(ingested).train_rows) == 64
    # a labeled production batch is not in the SSL pool: it is not trained on
    pool[pool["batch"] != "b0"].to_parquet(ingested / "ssl_pool.parquet", index=False)
    assert len(read_inputs(ingested).train_rows) == 48
    pool.assign(content_hash=pool["content_hash"].str[::-1]).to_parquet(ingested / "ssl_pool.parquet", index=False)
    with pytest.raises(ValueError, match="does not match ssl_pool.parquet"):
        read_inputs(ingested)


def test_stage_writes_encoder_embeddings_and_metrics_from_images_only(ingested, workdir):
    torch.set_num_threads(1)
    p = params(epochs=1, checkpoint_dir=str(workdir / "ck"))
    metrics = run_stage(p, ingested, workdir / "models/encoder", None, workdir / "reports/pretrain")
    assert not (workdir / "data/embeddings").exists()  # the embed stage's job
    embed_ingested(workdir / "models/encoder", ingested, workdir / "data/embeddings")
    emb = np.load(workdir / "data/embeddings/embeddings.npy")
    assert emb.shape[0] == len(np.load(ingested / "images.npy", mmap_mode="r")) and emb.dtype == np.float32
    info = json.loads((workdir / "data/embeddings/embeddings.json").read_text())
    assert info["rows"] == emb.shape[0]
    saved = json.loads((workdir / "reports/pretrain/metrics.json").read_text())
    for key in ("knn_accuracy", "linear_probe_accuracy", "effective_rank", "std_ratio", "collapsed",
                "data_img_s", "model_img_s", "train_img_s"):
        assert key in saved and key in metrics
    assert saved["eval_images"] == 40 and saved["train_images"] == 64  # train + pool, never test
    reloaded = load_encoder(workdir / "models/encoder")
    images = np.load(ingested / "images.npy")
    np.testing.assert_allclose(embed(reloaded, images[:8]), emb[:8], rtol=1e-4, atol=1e-5)


DDP_SCRIPT = """
import json, os, sys, torch
import torch.distributed as dist
from sslvision import objectives
from sslvision.pretrain import PretrainParams, train
from sslvision.stages.pretrain import read_inputs
torch.set_num_threads(1)
p = PretrainParams.model_validate(json.loads(sys.argv[1]))
inputs = read_inputs(sys.argv[2])
result = train(p, inputs.images_path, inputs.train_rows, progress=False)  # joins the gloo group
rank, world = dist.get_rank(), dist.get_world_size()
# parameters only: BatchNorm's running stats stay per process
torch.save({k: v.detach() for k, v in result.encoder.named_parameters()}, f"{sys.argv[3]}/rank{rank}.pt")
# NT-Xent on this rank's half of a fixed global batch, negatives gathered from the other rank
torch.manual_seed(0)
z1, z2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
n = 8 // world
l1, l2 = z1[rank * n:(rank + 1) * n].detach().requires_grad_(), z2[rank * n:(rank + 1) * n].detach().requires_grad_()
loss = objectives.nt_xent(l1, l2, 0.5)
(loss / world).backward()
full_grad = torch.cat([torch.zeros(rank * n, 4), l1.grad, torch.zeros((world - rank - 1) * n, 4)])
dist.all_reduce(loss)
dist.all_reduce(full_grad)
if rank == 0:
    torch.save({"loss": loss / world, "grad": full_grad}, f"{sys.argv[3]}/gathered.pt")
"""


@pytest.mark.slow
def test_two_process_ddp_on_cpu(ingested, workdir):
    """torchrun with 2 gloo processes: training runs and keeps the replicas identical, and NT-Xent
    with negatives gathered across processes equals the one-process loss and gradient."""
    script = workdir / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    cfg = json.dumps(params("simclr", epochs=1, checkpoint_dir=str(workdir / "ck")).model_dump(by_alias=True))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), cfg, str(ingested), str(workdir)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(workdir / "rank0.pt", weights_only=True)
    rank1 = torch.load(workdir / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert (workdir / "ck" / "last.pt").exists()

    gathered = torch.load(workdir / "gathered.pt", weights_only=True)
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    loss = objectives.nt_xent(z1, z2, 0.5)
    loss.backward()
    assert torch.allclose(gathered["loss"], loss, atol=1e-6)
    assert torch.allclose(gathered["grad"], z1.grad, atol=1e-6)


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dvc_does_not_rerun_pretrain_when_only_labels_change(ingested, workdir, monkeypatch):
    """The real ``pretrain`` stage of dvc.yaml, in a scratch DVC project: relabelling train images
    (manifest.parquet) leaves it up to date; changing its params does not."""
    import shutil

    import yaml
    from dvc.repo import Repo

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["pretrain"]
    (workdir / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": stage}}))
    for dep in stage["deps"]:
        if not dep.startswith("data/"):
            (workdir / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / dep, workdir / dep)
    tiny = params(checkpoint_dir="checkpoints/pretrain").model_dump(by_alias=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump({"pretrain": tiny}))
    manifest = pd.read_parquet(ingested / "images.parquet").assign(label=1, label_name="Trouser")
    manifest.to_parquet(ingested / "manifest.parquet", index=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    repo = Repo.init(str(workdir), no_scm=True)
    repo.reproduce("pretrain")
    assert (workdir / "models/encoder/encoder.safetensors").exists()
    assert repo.status(targets=["pretrain"]) == {}

    manifest.assign(label=2, label_name="Pullover").to_parquet(ingested / "manifest.parquet", index=False)
    assert repo.status(targets=["pretrain"]) == {}
    assert repo.reproduce("pretrain") == []  # nothing ran

    tiny["temperature"] = 0.5
    (workdir / "params.yaml").write_text(yaml.safe_dump({"pretrain": tiny}))
    assert repo.status(targets=["pretrain"]) != {}


def test_temperature_sweep_cli_writes_csv_and_plot(ingested, workdir):
    import yaml
    from typer.testing import CliRunner

    from sslvision.cli import app

    (workdir / "params.yaml").write_text(yaml.safe_dump({"pretrain": params().model_dump(by_alias=True)}))
    result = CliRunner().invoke(app, ["sweep-temperature", "--values", "0.1,0.5", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(workdir / "reports/pretrain/temperature_sweep.csv")
    assert df["temperature"].tolist() == [0.1, 0.5]
    assert df["knn_accuracy"].between(0, 1).all() and df["linear_probe_accuracy"].between(0, 1).all()
    assert (workdir / "reports/pretrain/temperature_sweep.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["sweep-temperature", "--values", "0.1,-1"])
    assert bad.exit_code == 2 and "positive" in bad.output
