"""A tiny finetune project on real Fashion-MNIST images (shared by test_finetune and test_registry)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from sslvision.demo import load_fashion_mnist
from sslvision.models import Encoder, EncoderConfig, save_encoder

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TINY_ENCODER = EncoderConfig(backbone="resnet18", stem_stride=2,
                             backbone_args={"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128],
                                            "zero_init_last": False})
_FMNIST: dict[str, np.ndarray] = {}


def fmnist() -> dict[str, np.ndarray]:
    if not _FMNIST:
        _FMNIST.update(load_fashion_mnist())
    return _FMNIST


def long_tail_indices(labels: np.ndarray, head: int, ratio: float) -> np.ndarray:
    counts = [max(2, int(head * ratio ** (-c / 9))) for c in range(10)]
    return np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)])


def tiny_encoder() -> Encoder:
    """A random tiny ResNet whose BatchNorm statistics are those of Fashion-MNIST (a stand-in for a
    pretrained encoder: random convolutions with calibrated normalisation give usable features)."""
    import torch

    from sslvision.models import to_input

    torch.manual_seed(0)
    encoder = Encoder(TINY_ENCODER)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    encoder.train()
    with torch.no_grad():
        for s in range(0, 1000, 250):
            encoder(to_input(torch.from_numpy(fmnist()["train_images"][-1000:][s:s + 250][..., None])))
    return encoder.eval()


def make_project(root: Path, head: int = 200, ratio: float = 10, test_per_class: int = 30,
                 synthetic_per_class: int = 0, finetune: dict | None = None) -> Path:
    """Ingested data, a clean manifest, a random tiny encoder and params.yaml under ``root``."""
    data = fmnist()
    tr = long_tail_indices(data["train_labels"], head, ratio)
    te = np.concatenate([np.flatnonzero(data["test_labels"] == c)[:test_per_class] for c in range(10)])
    images = np.concatenate([data["train_images"][tr], data["test_images"][te]])[..., None]
    labels = np.concatenate([data["train_labels"][tr], data["test_labels"][te]])
    split = ["train"] * len(tr) + ["test"] * len(te)
    ing = root / "data/ingested"
    ing.mkdir(parents=True)
    np.save(ing / "images.npy", images)
    manifest = pd.DataFrame({"index": np.arange(len(images)), "id": [f"img{i}" for i in range(len(images))],
                             "split": split, "label": labels, "label_name": [CLASSES[c] for c in labels]})
    manifest.to_parquet(ing / "manifest.parquet", index=False)
    (ing / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    (root / "data/audit").mkdir(parents=True)
    clean = manifest[manifest["split"] == "train"].assign(label_given=lambda d: d["label"], audit_action="keep")
    clean.to_parquet(root / "data/audit/manifest_clean.parquet", index=False)
    if synthetic_per_class:
        syn = root / "data/synthetic"
        syn.mkdir(parents=True)
        pick = np.concatenate([np.flatnonzero(data["train_labels"] == c)[-synthetic_per_class:] for c in range(10)])
        np.save(syn / "images.npy", data["train_images"][pick][..., None])
        pd.DataFrame({"index": np.arange(len(pick)), "id": [f"syn/test/{i}" for i in range(len(pick))],
                      "label": data["train_labels"][pick], "split": "synthetic"}).to_parquet(
            syn / "manifest.parquet", index=False)
    save_encoder(root / "models/encoder", tiny_encoder())
    params = {"finetune": {"epochs": 15, "batch_size": 64, "lr": 0.01, "threads": 1, "eval_batch_size": 256,
                           "registry": {"enabled": False}, **(finetune or {})}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"
