"""Label efficiency: what the SSL encoder buys when only a few labels exist.

All of a pool of Fashion-MNIST train images (``--pool``, default 10,000) is available unlabelled; only
``--labels`` clean labels per class (10, 25, 100) are, drawn per seed from the same pool (nested: a seed's
10 labelled images of a class are among its 25, those among its 100). Four systems learn from those labels:

- ``ssl_linear_probe``: the SSL encoder frozen, :func:`sslvision.metrics.linear_probe_predict` (logistic
  regression on its standardised features);
- ``ssl_finetune``: the SSL encoder fine-tuned with the demo's recipe (``sslvision.project.DEMO_OVERRIDES``'s
  finetune section: full fine-tune, lr 2e-3, no layer decay, class-balanced sampler, label smoothing 0.1,
  last epoch);
- ``pixel_logreg``: :func:`sslvision.baselines.pixel_logreg` (logistic regression on 64 PCA components of the
  pixels), the pixel baseline the promotion gate asks a model to beat;
- ``scratch``: the same network and recipe from a random initialisation (``init: scratch``), the same number
  of epochs, so the same steps on the same batches (about the same wall time: the seconds are reported).

The encoder is pretrained once on the pool with the demo's CPU recipe (``sslvision.project.CPU_PRETRAIN``:
the half-width ResNet-10, stem stride 2, 300 SimCLR steps of 256 images at temperature 0.2; fp32) and cached
under ``--cache``, keyed by its params and the pool, so a rerun skips it. Every system is scored by balanced
accuracy on one fixed, balanced subset of the Fashion-MNIST test split (``--test-size`` images per class:
200, so 2,000 images; 0 = all 10,000).

The demo recipe's 16 epochs of 256 images are sized for ~20,000 labelled images; with 100 they would be 16
optimiser steps. Here every fine-tune and scratch run makes ``--steps`` steps of ``--batch-size`` images
(``ceil(steps / steps_per_epoch)`` epochs). :func:`sslvision.fit_classifier` always holds out at least one row
per class for validation, a tenth of the labels at 10 per class, although ``select_epoch: last`` leaves
validation unused (and ``calibrate`` only rescales the logits, never their argmax): :func:`fit_on_all_labels`
trains on every labelled row with the same code (validation: a copy of one training row per class;
``calibrate`` off), so all four systems see the same labels.

    nice -n 10 .venv/bin/python benchmarks/label_efficiency.py
    .venv/bin/python benchmarks/label_efficiency.py --labels 10 --seeds 0 --steps 20 --test-size 200 --name smoke

Writes ``results/NAME.json`` (rows per system, labels per class and seed, plus the mean and standard deviation
over the seeds) and ``results/NAME.png`` (balanced accuracy against labels per class, error bars over seeds).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command_line, report  # noqa: E402

HERE = Path(__file__).resolve().parent
SYSTEMS = ("ssl_linear_probe", "ssl_finetune", "pixel_logreg", "scratch")
LABELS = {"ssl_linear_probe": "SSL encoder + linear probe", "ssl_finetune": "SSL encoder fine-tuned",
          "pixel_logreg": "pixel PCA-64 + logistic regression", "scratch": "same network from scratch"}
NUM_CLASSES = 10
# the finetune stage's fields of the demo recipe that are not training settings, or that this benchmark sets
NOT_RECIPE = {"synthetic_weight", "epochs", "calibrate"}


def load_fashion_mnist(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): uint8 ``(N, 28, 28)`` and int64 ``(N,)``."""
    from sslvision.idx import read_idx

    def read(stem: str) -> np.ndarray:
        return read_idx(root / f"{stem}.gz" if (root / f"{stem}.gz").exists() else root / stem)

    return (read("train-images-idx3-ubyte"), read("train-labels-idx1-ubyte").astype(np.int64),
            read("t10k-images-idx3-ubyte"), read("t10k-labels-idx1-ubyte").astype(np.int64))


def per_class_rows(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """:func:`sslvision.baselines.per_class_draw` (sorted, seeded, nested in ``per_class`` for a seed), requiring
    every one of the ``NUM_CLASSES`` classes to have ``per_class`` rows: raises ``ValueError`` when one is short."""
    from sslvision.baselines import per_class_draw

    counts = np.bincount(labels, minlength=NUM_CLASSES)
    short = [c for c in range(NUM_CLASSES) if counts[c] < per_class]
    if short:
        raise ValueError(f"class {short[0]} has {counts[short[0]]} rows, {per_class} asked")
    return per_class_draw(labels, per_class, seed)


def pretrain_settings() -> dict[str, Any]:
    """The demo's CPU pretraining (``sslvision.project.CPU_PRETRAIN``), SimCLR, fp32, one DataLoader worker."""
    from sslvision.project import CPU_PRETRAIN

    return {"method": "simclr", "batch_size": 256, "workers": 1, "precision": "fp32", "seed": 0,
            **copy.deepcopy(CPU_PRETRAIN)}


def finetune_recipe() -> dict[str, Any]:
    """The demo's finetune overrides that are training settings (``sslvision.project.DEMO_OVERRIDES``), with
    ``calibrate`` off (a temperature never changes the predicted class)."""
    from sslvision.project import DEMO_OVERRIDES

    recipe = {k: v for k, (v, _) in DEMO_OVERRIDES["finetune"].items() if k not in NOT_RECIPE}
    return {**recipe, "calibrate": False}


def cached_encoder(pool_images: np.ndarray, pool_key: str, cache: Path, threads: int) -> tuple[Any, dict]:
    """The encoder pretrained on ``pool_images`` with :func:`pretrain_settings`, from ``cache`` when an earlier
    run saved it (same settings, same pool), else trained and saved there. Returns (encoder, info)."""
    from sslvision import pretrain_encoder
    from sslvision.models import load_encoder, save_encoder

    settings = pretrain_settings()
    key = hashlib.sha256(json.dumps([settings, pool_key], sort_keys=True).encode()).hexdigest()[:16]
    directory = cache / f"encoder-{key}"
    if (directory / "config.json").exists():
        info = json.loads((directory / "config.json").read_text())["pretrain"]
        logging.info("encoder from the cache: %s (pretrained in %.0f s)", directory, info["seconds"])
        return load_encoder(directory), {**info, "cached": True}
    logging.info("pretraining the encoder on %d unlabelled images (%s)", len(pool_images), settings)
    t0 = time.perf_counter()
    encoder = pretrain_encoder(pool_images, threads=threads, **settings)
    info = {"settings": settings, "pool": pool_key, "seconds": round(time.perf_counter() - t0, 1),
            "steps": settings["epochs"] * settings["steps_per_epoch"]}
    save_encoder(directory, encoder, extra={"pretrain": info})
    return encoder, {**info, "cached": False}


def fit_on_all_labels(encoder: Any, images: np.ndarray, labels: np.ndarray, *, seed: int, **overrides: Any) -> Any:
    """:func:`sslvision.fit_classifier` trained on every row: its validation split is one copy of a training row
    per class (it decides nothing with ``select_epoch: last`` and ``calibrate: false``, both required here).
    uint8 ``(N, H, W)`` images, labels in ``0..NUM_CLASSES-1``; returns the classifier in eval mode."""
    from sslvision.finetune import (
        FinetuneData,
        FinetuneParams,
        Split,
        init_classifier,
        train_classifier,
    )

    p = FinetuneParams(seed=seed, device="cpu", **overrides)
    if p.select_epoch != "last" or p.calibrate:
        raise ValueError("fit_on_all_labels: validation rows that are training rows need select_epoch: last and "
                         "calibrate: false")
    x = images[..., None]
    first = np.array([np.flatnonzero(labels == c)[0] for c in range(NUM_CLASSES)])
    names = [str(c) for c in range(NUM_CLASSES)]
    data = FinetuneData(train=Split.of(x, labels), val=Split.of(x[first], labels[first]),
                        test=Split.of(x[:0], labels[:0]), classes=names)
    classifier = init_classifier(copy.deepcopy(encoder), names, p)
    train_classifier(classifier, data, p)
    return classifier.eval()


def epochs_for(rows: int, steps: int, batch_size: int) -> int:
    """Epochs that make at least ``steps`` optimiser steps over ``rows`` training rows."""
    return max(1, math.ceil(steps / max(1, math.ceil(rows / batch_size))))


def one_hot(predicted: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES)[predicted]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation (ddof 1) over the seeds of every (system, labels per class, metric)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["labels_per_class"], r["metric"], r["unit"]), []).append(r["value"])
    out = []
    for (system, n, metric, unit), values in groups.items():
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out += [{"system": system, "metric": f"{metric}_mean", "value": round(float(np.mean(values)), 4),
                 "unit": unit, "labels_per_class": n, "seed": f"{len(values)} seeds"},
                {"system": system, "metric": f"{metric}_std", "value": round(std, 4), "unit": unit,
                 "labels_per_class": n, "seed": f"{len(values)} seeds"}]
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = {(r["system"], r["labels_per_class"]): r["value"] for r in rows if r["metric"] == "balanced_accuracy_mean"}
    std = {(r["system"], r["labels_per_class"]): r["value"] for r in rows if r["metric"] == "balanced_accuracy_std"}
    from sslvision.report import label_efficiency_axes

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series = {}
    for system in SYSTEMS:
        ns = sorted(n for s, n in mean if s == system)
        if ns:
            series[LABELS[system]] = (ns, [100 * mean[system, n] for n in ns], [100 * std[system, n] for n in ns])
    label_efficiency_axes(ax, series, sorted({n for _, n in mean}), xlabel="clean labels per class",
                          ylabel="balanced accuracy, test split (%)", title=title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def verdict(summary: list[dict], rows: list[dict]) -> dict[str, dict]:
    """Per labels per class: the better SSL system, the better baseline (by mean), the margin between their
    means and, seed by seed (the same labelled images), between their balanced accuracies; in points."""
    mean = {(r["system"], r["labels_per_class"]): r["value"] for r in summary
            if r["metric"] == "balanced_accuracy_mean"}
    runs = {(r["system"], r["labels_per_class"], r["seed"]): r["value"] for r in rows
            if r["metric"] == "balanced_accuracy"}
    out = {}
    for n in sorted({n for _, n in mean}):
        ssl = [s for s in ("ssl_linear_probe", "ssl_finetune") if (s, n) in mean]
        base = [s for s in ("pixel_logreg", "scratch") if (s, n) in mean]
        if ssl and base:
            best_ssl, best_base = max(ssl, key=lambda s: mean[s, n]), max(base, key=lambda s: mean[s, n])
            seeds = sorted(seed for s, m, seed in runs if s == best_ssl and m == n)
            out[str(n)] = {"best_ssl": best_ssl, "best_baseline": best_base,
                           "margin_points": round(100 * (mean[best_ssl, n] - mean[best_base, n]), 2),
                           "margin_points_per_seed": {str(seed): round(100 * (runs[best_ssl, n, seed]
                                                                              - runs[best_base, n, seed]), 2)
                                                      for seed in seeds if (best_base, n, seed) in runs},
                           "ssl_ahead": mean[best_ssl, n] > mean[best_base, n]}
    return out


def write(name: str, rows: list[dict], command: str, extra: dict) -> None:
    """``results/NAME.json`` (the seeds' summary, then every run's rows) and ``results/NAME.png``."""
    summary = summarise(rows)
    path = report(name, summary + rows, command=command, extra={**extra, "ssl_vs_baselines": verdict(summary, rows)})
    p = extra["protocol"]
    seeds = f"{len(p['seeds'])} seed{'s' if len(p['seeds']) > 1 else ''}"
    plot(summary, path.with_suffix(".png"), f"Fashion-MNIST: {p['pool']:,} unlabelled, {p['test_images']:,} test "
         f"images, {p['steps']} steps; mean ± std, {seeds}")
    logging.info("wrote %s and %s", path, path.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                    help="directory of the Fashion-MNIST IDX files (.gz or plain)")
    ap.add_argument("--pool", type=int, default=10_000, help="unlabelled train images the encoder pretrains on")
    ap.add_argument("--labels", type=int, nargs="+", default=[10, 25, 100], help="clean labels per class")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="labelled draws (and training seeds)")
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps of each fine-tune and scratch run")
    ap.add_argument("--batch-size", type=int, default=64, help="images per step of the fine-tune and scratch runs")
    ap.add_argument("--test-size", type=int, default=200, help="test images per class (0 = all 1,000)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "label_efficiency",
                    help="where the pretrained encoder is kept between runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--name", default="label_efficiency", help="results file: results/NAME.json and NAME.png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = command_line(argv, "benchmarks/label_efficiency.py")

    import torch

    from sslvision import embed
    from sslvision.baselines import pixel_logreg
    from sslvision.metrics import balanced_accuracy, linear_probe_predict

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    train_x, train_y, test_x, test_y = load_fashion_mnist(args.data)
    pool = np.sort(np.random.default_rng(0).choice(len(train_x), args.pool, replace=False))
    pool_x, pool_y = train_x[pool], train_y[pool]  # pool_y only draws the labelled subsets
    if args.test_size:
        keep = per_class_rows(test_y, args.test_size, seed=0)
        test_x, test_y = test_x[keep], test_y[keep]
    encoder, encoder_info = cached_encoder(pool_x, f"fashion-mnist-train-{args.pool}-seed0", args.cache, args.threads)
    recipe = {**finetune_recipe(), "batch_size": args.batch_size}
    need_embeddings = "ssl_linear_probe" in args.systems
    pool_emb = embed(encoder, pool_x) if need_embeddings else None
    test_emb = embed(encoder, test_x) if need_embeddings else None

    rows: list[dict] = []
    for seed in args.seeds:
        for n in sorted(args.labels):
            idx = per_class_rows(pool_y, n, seed)
            x, y = pool_x[idx], pool_y[idx]
            epochs = epochs_for(len(idx), args.steps, args.batch_size)
            for system in args.systems:
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                if system == "ssl_linear_probe":
                    scores = one_hot(linear_probe_predict(pool_emb[idx], y, test_emb))
                    setting = "frozen SSL features, standardised, logistic regression C=0.1"
                elif system == "pixel_logreg":
                    scores = pixel_logreg(x[..., None], y, num_classes=NUM_CLASSES, seed=seed).predict_proba(
                        test_x[..., None])
                    setting = f"PCA {min(64, len(idx) - 1)} components, logistic regression (balanced)"
                else:
                    init = "ssl" if system == "ssl_finetune" else "scratch"
                    clf = fit_on_all_labels(encoder, x, y, seed=seed, **recipe, epochs=epochs, init=init)
                    scores = clf.logits(test_x[..., None])
                    setting = (f"init {init}, {epochs} epochs of {len(idx)} rows (>= {args.steps} steps of "
                               f"{args.batch_size}), demo recipe")
                seconds = time.perf_counter() - t0
                bacc = balanced_accuracy(test_y, scores)
                logging.info("%d labels/class, seed %d, %s: balanced accuracy %.4f (%.1f s, load %.1f)", n, seed,
                             system, bacc, seconds, load)
                common = {"labels_per_class": n, "seed": seed, "setting": setting}
                rows += [{"system": system, "metric": "balanced_accuracy", "value": round(bacc, 4),
                          "unit": "fraction", **common},
                         {"system": system, "metric": "seconds", "value": round(seconds, 1), "unit": "s",
                          **common}]
        seeds_done = args.seeds[:args.seeds.index(seed) + 1]
        protocol = {"pool": args.pool, "labels_per_class": sorted(args.labels), "seeds": seeds_done,
                    "steps": args.steps, "test_images": int(len(test_y)), "finetune_recipe": recipe,
                    "scratch": "same network, recipe and epochs as ssl_finetune (same steps), random init"}
        write(args.name, rows, command, {"protocol": protocol, "encoder": encoder_info,
                                         "total_seconds": round(time.perf_counter() - t_start, 1)})


if __name__ == "__main__":
    main()
