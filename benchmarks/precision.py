"""bf16 autocast against fp32 for pretraining, on this machine's CPU: throughput and accuracy at equal steps.

Two paths, each with the project's params.yaml ``pretrain`` defaults (the demo's settings) except the
overrides below:

- ``resnet``: SimCLR on the demo's small ResNet (params.yaml ``backbone`` / ``backbone_args`` / ``stem_stride``);
- ``vit``: MAE (or ``--vit-method cl_mim``) on ``vit_tiny_patch16_224`` with params.yaml's ``patch_size``
  (28 / 4 = 7x7 tokens), the backbone params.yaml names for the ViT methods.

Throughput: one batch of real views (``ViewDataset``, Fashion-MNIST training images), two copies of the
same initial model, one per precision; after ``--warmup`` steps each, ``--windows`` timed windows of
``--window-steps`` training steps (forward under autocast as ``pretrain.train`` runs it, backward, AdamW
step), alternating fp32, bf16, fp32, bf16 ... so that the load of the other users of the machine falls on
both alike; img/s is the median over the windows, and the ratio the median of each bf16 window's img/s over
that of the fp32 window next to it. The 1-minute load average is sampled around each window.

Accuracy at equal steps: ``pretrain.train`` for ``--acc-steps`` steps in each precision and each of
``--seeds`` (runs interleaved too), then the stage's 2-fold weighted kNN (k=200, T=0.1) on a stratified
subset of the Fashion-MNIST test set. "Equal accuracy" = the precisions' mean kNN accuracies differ by no
more than the larger spread between seeds of one precision.

bf16 is worth adopting for a path (``pretrain.BF16_FASTER``, what ``precision: auto`` uses) when the
ratio is >= 1.3 at equal accuracy.

    .venv/bin/python benchmarks/precision.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parent.parent


def path_params(path: str, args: argparse.Namespace, work: Path):
    """params.yaml's pretrain section with the benchmark's overrides for one path."""
    from sslvision.params import load_section
    from sslvision.pretrain import PretrainParams

    steps = args.vit_acc_steps if path == "vit" and args.vit_acc_steps else args.acc_steps
    overrides = {"batch_size": args.batch_size, "epochs": 1, "steps_per_epoch": steps, "workers": 0,
                 "threads": args.threads, "device": "cpu", "checkpoint_every": 10**7,
                 "checkpoint_dir": str(work / f"ckpt-{path}")}
    p = load_section("pretrain", PretrainParams, REPO / "params.yaml", overrides)
    if path == "vit":  # overrides merge into backbone_args: the ResNet's must go, not merge
        p = PretrainParams.model_validate({**p.model_dump(by_alias=True), "method": args.vit_method,
                                           "backbone": "vit_tiny_patch16_224", "backbone_args": {}})
    return p


def load_avg() -> float:
    return os.getloadavg()[0]


def throughput(p, images_path: Path, n_train: int, args: argparse.Namespace) -> tuple[dict, list[float]]:
    """Median img/s per precision over alternating timed windows; the load averages seen."""
    import copy

    import torch

    from sslvision.augment import ViewMaker
    from sslvision.models import Encoder, to_input
    from sslvision.pretrain import ViewDataset, _optimizer
    from sslvision.ssl import build_method

    torch.set_num_threads(args.threads)
    dataset = ViewDataset(images_path, np.arange(n_train), ViewMaker(p.augment_config(28, 1), seed=p.seed))
    views = [to_input(v) for v in dataset.__getitems__([(0, i) for i in range(p.batch_size)])["views"]]
    torch.manual_seed(p.seed)
    base = build_method(p, Encoder(p.encoder_config(28, 1)), 10**6, 10**6)
    models = {prec: copy.deepcopy(base).train() for prec in ("fp32", "bf16")}
    optims = {prec: _optimizer(m, p) for prec, m in models.items()}
    step_no = {"fp32": 0, "bf16": 0}

    def run(prec: str, steps: int) -> None:
        model, opt = models[prec], optims[prec]
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = model(views, step_no[prec])
            if not torch.isfinite(loss):
                raise SystemExit(f"{prec}: non-finite loss at step {step_no[prec]}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.after_step(step_no[prec])
            step_no[prec] += 1

    for prec in models:
        run(prec, args.warmup)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    loads = []
    for w in range(args.windows):
        for prec in ("fp32", "bf16") if w % 2 == 0 else ("bf16", "fp32"):
            loads.append(load_avg())
            t0 = time.perf_counter()
            run(prec, args.window_steps)
            rates[prec].append(args.window_steps * p.batch_size / (time.perf_counter() - t0))
            print(f"  window {w} {prec}: {rates[prec][-1]:.1f} img/s (load {loads[-1]:.2f})", flush=True)
    loads.append(load_avg())
    return rates, loads


def accuracy(p, images_path: Path, n_train: int, test_x: np.ndarray, test_y: np.ndarray,
             args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """kNN accuracy per precision and seed after ``--acc-steps`` steps of ``pretrain.train``; its model img/s."""
    from sslvision.models import embed
    from sslvision.pretrain import evaluate, train

    acc: dict[str, list[float]] = {"fp32": [], "bf16": []}
    model_rate: dict[str, list[float]] = {"fp32": [], "bf16": []}
    loads = []
    for seed in args.seeds:
        for prec in ("fp32", "bf16"):
            q = p.model_copy(update={"precision": prec, "seed": seed,
                                     "checkpoint_dir": f"{p.checkpoint_dir}-{prec}-{seed}"})
            loads.append(load_avg())
            result = train(q, images_path, np.arange(n_train), progress=False)
            assert result.precision == prec
            feats = embed(result.encoder, test_x, 512)
            acc[prec].append(evaluate(feats, test_y, 10, linear=False)["knn_accuracy"])
            model_rate[prec].append(result.throughput["model_img_s"])
            print(f"  seed {seed} {prec}: kNN {acc[prec][-1]:.4f}, final loss {result.history[-1]['loss']:.4f}, "
                  f"model {model_rate[prec][-1]:.1f} img/s", flush=True)
    return acc, model_rate, loads


def cpu_info() -> dict:
    from sslvision.pretrain import cpu_flags

    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    flags = cpu_flags()
    return {"model": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", nargs="+", choices=["resnet", "vit"], default=["resnet", "vit"])
    ap.add_argument("--vit-method", choices=["mae", "cl_mim"], default="mae")
    ap.add_argument("--batch-size", type=int, default=64,
                    help="smaller than the demo's 256 so that the accuracy runs fit a shared 2-core machine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per precision before the windows")
    ap.add_argument("--windows", type=int, default=6, help="timed windows per precision (median reported)")
    ap.add_argument("--window-steps", type=int, default=3)
    ap.add_argument("--acc-steps", type=int, default=300,
                    help="training steps of each accuracy run (0: throughput only)")
    ap.add_argument("--vit-acc-steps", type=int, help="the ViT path's accuracy runs (default: --acc-steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--eval-images", type=int, default=2000, help="stratified Fashion-MNIST test subset for kNN")
    ap.add_argument("--name", default="precision", help="results/NAME.json")
    args = ap.parse_args()

    from sslvision.idx import read_idx

    train_x = read_idx(FMNIST / "train-images-idx3-ubyte.gz")[: args.train_images]
    test_x = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    subset = np.sort(np.concatenate([np.flatnonzero(test_y == c)[: args.eval_images // 10] for c in range(10)]))
    test_x, test_y = test_x[subset][..., None], test_y[subset]
    cpu = cpu_info()
    rows: list[dict] = []
    all_loads: list[float] = []
    decisions = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images_path = work / "train.npy"
        np.save(images_path, train_x[..., None])
        for path in args.paths:
            p = path_params(path, args, work)
            name = f"{p.method} {p.backbone}" + (" (demo args)" if path == "resnet" else f" patch {p.patch_size}")
            print(f">> {path}: {name}, batch {p.batch_size}", flush=True)
            rates, loads = throughput(p, images_path, len(train_x), args)
            acc, model_rate, acc_loads = (accuracy(p, images_path, len(train_x), test_x, test_y, args)
                                          if p.steps_per_epoch else ({}, {}, []))
            all_loads += loads + acc_loads
            med = {k: float(np.median(v)) for k, v in rates.items()}
            # each bf16 window against the fp32 window next to it: the other users' load, which changes over
            # tens of seconds, falls on both alike
            paired = np.array(rates["bf16"]) / np.array(rates["fp32"])
            ratio = float(np.median(paired))
            q1, q3 = np.percentile(paired, [25, 75])
            mean_acc = {k: float(np.mean(v)) for k, v in acc.items()}
            noise = max((float(np.ptp(v)) for v in acc.values()), default=0.0)
            equal = abs(mean_acc["bf16"] - mean_acc["fp32"]) <= noise if acc else None
            decisions[path] = {"ratio": ratio, "ratio_iqr": [float(q1), float(q3)], "equal_accuracy": equal,
                               "adopt_bf16": bool(ratio >= 1.3 and equal)}
            setting = (f"batch {p.batch_size}, {args.threads} threads, median of {args.windows} windows x "
                       f"{args.window_steps} steps, load avg {np.mean(loads):.1f}")
            acc_setting = (f"{p.steps_per_epoch} steps x batch {p.batch_size}, seeds {args.seeds}, kNN on "
                           f"{len(test_y)} test images (2-fold)")
            for prec in ("fp32", "bf16"):
                rows.append({"system": f"{path} {prec}", "metric": "train step throughput", "value": med[prec],
                             "unit": "img/s", "setting": setting, "windows": rates[prec]})
                if not acc:
                    continue
                rows += [
                    {"system": f"{path} {prec}", "metric": "model throughput during the accuracy runs",
                     "value": float(np.median(model_rate[prec])), "unit": "img/s", "setting": acc_setting},
                    {"system": f"{path} {prec}", "metric": "kNN accuracy (mean of seeds)", "value": mean_acc[prec],
                     "unit": "fraction", "setting": acc_setting, "per_seed": acc[prec]},
                ]
            rows += [
                {"system": f"{path} bf16 / fp32", "metric": "throughput ratio", "value": ratio, "unit": "x",
                 "setting": f"{name}; median of adjacent-window ratios (IQR {q1:.2f}-{q3:.2f}); {setting}"},
                {"system": f"{path} bf16 / fp32", "metric": "ratio of median throughputs",
                 "value": med["bf16"] / med["fp32"], "unit": "x", "setting": f"{name}; {setting}"},
            ]
            if not acc:
                continue
            rows += [
                {"system": f"{path} bf16 / fp32", "metric": "kNN accuracy difference", "value":
                 mean_acc["bf16"] - mean_acc["fp32"], "unit": "fraction",
                 "setting": f"seed spread (noise) {noise:.4f}; {acc_setting}"},
            ]
    rows.append({"system": "machine", "metric": "1-min load average during the run (mean)",
                 "value": float(np.mean(all_loads)), "unit": "load", "setting": f"max {max(all_loads):.1f}"})
    for path, d in decisions.items():
        print(f"{path}: bf16 {d['ratio']:.2f}x fp32, equal accuracy {d['equal_accuracy']} -> "
              f"{'adopt bf16' if d['adopt_bf16'] else 'keep fp32'} for precision: auto")
    report(args.name, rows, extra={"cpu": cpu, "decisions": decisions})


if __name__ == "__main__":
    main()
