"""SimCLR's temperature on long-tailed data: fixed τ against the cosine schedule (Kukleva et al., ICLR 2023), at
equal steps, on both tail orders; and the best fixed τ as the number of classes changes.

Data: a long-tailed subsample of the Fashion-MNIST training images, the demo's profile
(``sslvision.demo.long_tail_counts``: ``--max-per-class`` images for the head class, ``--imbalance`` times fewer
for the rarest, exponential in between; ~6,000 images by default), in each tail order of the demo
(``sslvision.demo.tail_order``): ``natural`` (sandal ... ankle boot rarest) and ``hard_rare`` (shirt, pullover,
coat rarest). The images are drawn once (``--data-seed``), the same for every run.

Training: ``sslvision.pretrain.train`` with params.yaml's ``pretrain`` section (the demo's small CPU ResNet,
28 px, its lr schedule and warm-up of half an epoch) except ``--steps`` steps (``--epochs`` epochs) of
``--batch-size``.
Systems: ``temperature`` 0.1, 0.2, 0.5 (``temperature_schedule: constant``) and ``cosine`` (between
``temperature_min`` 0.1 and ``temperature_max`` 1.0, ``--period`` steps per cycle), each for every seed of
``--seeds`` (the training seed: weights, batch order, views).

Evaluation (the stage's protocol, :func:`sslvision.pretrain.evaluate`): a balanced subset of the Fashion-MNIST
test set (``--eval-images``), 2-fold stratified cross-validation, weighted kNN (k=200, T=0.1) and a linear probe
(logistic regression on standardised features); accuracy overall and the mean recall of the 3 classes rarest in
the training data. The number of classes: the same query/bank folds scored by kNN with the labels grouped into 5
classes (T-shirt+shirt, pullover+coat, trouser+dress, sandal+sneaker+ankle boot, bag) and 2 (clothes, shoes+bag).
Only the evaluation labels change: the pretraining data is the same, so this measures which τ suits a coarser or
finer task on the same images, not a dataset with fewer classes.

    .venv/bin/python benchmarks/temperature.py                       # ~20 min on 2 shared CPU cores
    .venv/bin/python benchmarks/temperature.py --seeds 0 1 2 --steps 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, results_dir  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parent.parent
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# the same images under coarser labels: number of classes -> class index -> group
GROUPS: dict[int, list[int]] = {
    10: list(range(10)),
    5: [0, 2, 1, 2, 1, 3, 0, 3, 4, 3],  # T-shirt+shirt, pullover+coat, trouser+dress, footwear, bag
    2: [0, 0, 0, 0, 0, 1, 0, 1, 1, 1],  # clothes / shoes and bags
}
FIXED = (0.1, 0.2, 0.5)


def long_tail(order: str, max_per_class: int, imbalance: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Long-tailed training images and labels (the demo's profile and tail order); the classes, rarest last."""
    from sslvision.demo import long_tail_counts, tail_order
    from sslvision.idx import read_idx

    x = read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    y = read_idx(FMNIST / "train-labels-idx1-ubyte.gz").astype(np.int64)
    classes = tail_order(order)
    counts = long_tail_counts(max_per_class, imbalance)
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False)
                                  for c, n in zip(classes, counts, strict=True)]))
    return x[idx][..., None], y[idx], classes


def eval_set(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A balanced subset of the Fashion-MNIST test set: the first ``n // 10`` images of each class."""
    from sslvision.idx import read_idx

    x = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    y = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    keep = np.sort(np.concatenate([np.flatnonzero(y == c)[: n // 10] for c in range(10)]))
    return x[keep][..., None], y[keep]


def scores(features: np.ndarray, labels: np.ndarray, rare: list[int], seed: int = 0,
           k: int = 200, temperature: float = 0.1) -> dict[str, float]:
    """2-fold kNN and linear-probe accuracy (as :func:`sslvision.pretrain.evaluate`), their mean recall on the
    ``rare`` classes, and kNN accuracy with the labels grouped (:data:`GROUPS`) on the same folds."""
    from sklearn.model_selection import StratifiedKFold

    from sslvision.metrics import knn_predict, linear_probe_predict

    knn = np.empty_like(labels)
    lin = np.empty_like(labels)
    grouped = {g: np.empty_like(labels) for g in GROUPS if g != 10}
    for bank, query in StratifiedKFold(n_splits=2, shuffle=True, random_state=seed).split(features, labels):
        knn[query] = knn_predict(features[bank], labels[bank], features[query], 10, k, temperature)
        lin[query] = linear_probe_predict(features[bank], labels[bank], features[query])
        for g in grouped:
            to = np.asarray(GROUPS[g])
            grouped[g][query] = knn_predict(features[bank], to[labels[bank]], features[query], g, k, temperature)
    out = {}
    for name, pred in (("knn", knn), ("linear", lin)):
        out[f"{name}_accuracy"] = float((pred == labels).mean())
        out[f"{name}_rare_recall"] = float(np.mean([(pred[labels == c] == c).mean() for c in rare]))
    out["knn_accuracy_10"] = out["knn_accuracy"]
    for g, pred in grouped.items():
        out[f"knn_accuracy_{g}"] = float((pred == np.asarray(GROUPS[g])[labels]).mean())
    return out


def base_params(args: argparse.Namespace, work: Path, **overrides):
    """params.yaml's pretrain section (the demo's CPU ResNet) with the benchmark's run length."""
    from sslvision.params import load_section
    from sslvision.pretrain import PretrainParams

    if args.steps % args.epochs:
        raise SystemExit(f"--steps ({args.steps}) must be a multiple of --epochs ({args.epochs})")
    over = {"batch_size": args.batch_size, "epochs": args.epochs, "steps_per_epoch": args.steps // args.epochs,
            "workers": args.workers,
            "threads": args.threads, "device": "cpu", "checkpoint_every": 10**7, "checkpoint_dir": str(work / "ck"),
            **overrides}
    return load_section("pretrain", PretrainParams, REPO / "params.yaml", over)


def systems(args: argparse.Namespace) -> dict[str, dict]:
    out: dict[str, dict] = {f"τ={t:g}": {"temperature": t} for t in FIXED}
    out["cosine"] = {"temperature_schedule": "cosine", "temperature_min": 0.1, "temperature_max": 1.0,
                     "temperature_period": args.period}
    return out


def run_one(p, train_x: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray, rare: list[int]) -> dict[str, float]:
    from sslvision.models import embed
    from sslvision.pretrain import train

    start = time.perf_counter()
    result = train(p, train_x, np.arange(len(train_x)), progress=False, checkpoints=False)
    train_s = time.perf_counter() - start
    feats = embed(result.encoder, eval_x, 512)
    return {**scores(feats, eval_y, rare), "train_s": train_s, "final_loss": result.history[-1]["loss"],
            "effective_rank": result.history[-1]["effective_rank"]}


def plot(results: dict, classes: dict[str, list[int]], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("knn_accuracy", "kNN, all classes"), ("knn_rare_recall", "kNN, 3 rarest"),
               ("linear_accuracy", "linear probe, all"), ("linear_rare_recall", "linear probe, 3 rarest")]
    orders = list(results)
    fig, axes = plt.subplots(1, len(orders), figsize=(6 * len(orders), 3.8), squeeze=False)
    width = 0.8 / len(names)
    for ax, order in zip(axes[0], orders, strict=True):
        for i, name in enumerate(names):
            runs = results[order][name]
            means = [100 * np.mean([r[m] for r in runs]) for m, _ in metrics]
            errs = [100 * np.std([r[m] for r in runs]) for m, _ in metrics]
            ax.bar(np.arange(len(metrics)) + (i - (len(names) - 1) / 2) * width, means, width, yerr=errs, label=name,
                   capsize=2)
        ax.set_xticks(np.arange(len(metrics)), [label for _, label in metrics], fontsize=8)
        rare = ", ".join(CLASS_NAMES[c] for c in classes[order][-3:])
        ax.set_title(f"tail order {order} (rarest: {rare})", fontsize=9)
        ax.set_ylabel("test accuracy / recall (%), 2-fold")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_classes(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = list(results)
    fig, axes = plt.subplots(1, len(orders), figsize=(5 * len(orders), 3.6), squeeze=False)
    for ax, order in zip(axes[0], orders, strict=True):
        for g, color in zip(sorted(GROUPS), ("C0", "C1", "C2"), strict=True):
            fixed = [100 * np.mean([r[f"knn_accuracy_{g}"] for r in results[order][f"τ={t:g}"]]) for t in FIXED]
            ax.plot(FIXED, fixed, "o-", color=color, label=f"{g} classes, fixed τ")
            cos = 100 * np.mean([r[f"knn_accuracy_{g}"] for r in results[order]["cosine"]])
            ax.axhline(cos, color=color, ls="--", lw=1, label=f"{g} classes, cosine 0.1-1.0")
        ax.set_xscale("log")
        ax.set_xticks(FIXED, [f"{t:g}" for t in FIXED])
        ax.minorticks_off()
        ax.set_xlabel("InfoNCE temperature")
        ax.set_ylabel("kNN accuracy (%), grouped labels")
        ax.set_title(f"tail order {order}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--orders", nargs="+", default=["natural", "hard_rare"], choices=["natural", "hard_rare"])
    ap.add_argument("--steps", type=int, default=200, help="training steps of every run (equal steps)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of --steps / --epochs steps (params.yaml: 10 x 30)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--period", type=int, default=100, help="cosine: steps per cycle (0: one cycle over the run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-per-class", type=int, default=2400, help="head class images (2400: ~6,000 in all)")
    ap.add_argument("--imbalance", type=float, default=100.0, help="head / rarest class count (the demo's)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--eval-images", type=int, default=2000, help="balanced Fashion-MNIST test subset")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; on a busy 2-core machine 1 runs faster")
    ap.add_argument("--name", default="temperature", help="results/NAME.json and NAME.png, NAME_classes.png")
    args = ap.parse_args()

    eval_x, eval_y = eval_set(args.eval_images)
    names = list(systems(args))
    results: dict[str, dict[str, list[dict]]] = {}
    classes: dict[str, list[int]] = {}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for order in args.orders:
            train_x, train_y, classes[order] = long_tail(order, args.max_per_class, args.imbalance, args.data_seed)
            rare = classes[order][-3:]
            counts = np.bincount(train_y, minlength=10)
            print(f">> {order}: {len(train_x)} images, rarest {[CLASS_NAMES[c] for c in rare]} "
                  f"({[int(counts[c]) for c in rare]} images)", flush=True)
            results[order] = {name: [] for name in names}
            for seed in args.seeds:
                for name, over in systems(args).items():
                    p = base_params(args, Path(tmp), seed=seed, **over)
                    r = run_one(p, train_x, eval_x, eval_y, rare)
                    results[order][name].append(r)
                    print(f"  {name} seed {seed}: kNN {r['knn_accuracy']:.4f} (rare {r['knn_rare_recall']:.4f}), "
                          f"linear {r['linear_accuracy']:.4f} (rare {r['linear_rare_recall']:.4f}), "
                          f"kNN 5/2 classes {r['knn_accuracy_5']:.4f}/{r['knn_accuracy_2']:.4f}, "
                          f"{r['train_s']:.0f} s", flush=True)
            p = base_params(args, Path(tmp))
            setting = (f"{order} tail ({len(train_x)} images, rarest {', '.join(CLASS_NAMES[c] for c in rare)}: "
                       f"{', '.join(str(int(counts[c])) for c in rare)}); {p.method} {p.backbone} (params.yaml "
                       f"backbone_args), {args.steps} steps x batch {args.batch_size}, seeds {args.seeds}; 2-fold "
                       f"on {len(eval_y)} balanced test images")
            metric_names = {"knn_accuracy": "kNN accuracy", "knn_rare_recall": "kNN recall, 3 rarest classes",
                            "linear_accuracy": "linear probe accuracy",
                            "linear_rare_recall": "linear probe recall, 3 rarest classes",
                            "knn_accuracy_5": "kNN accuracy, labels grouped into 5 classes",
                            "knn_accuracy_2": "kNN accuracy, labels grouped into 2 classes"}
            for name in names:
                runs = results[order][name]
                for key, metric in metric_names.items():
                    vals = [r[key] for r in runs]
                    rows.append({"system": name, "metric": f"{metric} ({order})", "value": float(np.mean(vals)),
                                 "unit": "fraction", "per_seed": vals, "std": float(np.std(vals)),
                                 "setting": setting})
                rows.append({"system": name, "metric": f"train time ({order})",
                             "value": float(np.mean([r["train_s"] for r in runs])), "unit": "s", "setting": setting})
            for g in sorted(GROUPS):
                means = {t: np.mean([r[f"knn_accuracy_{g}"] for r in results[order][f"τ={t:g}"]]) for t in FIXED}
                best = max(means, key=means.get)
                cos = float(np.mean([r[f"knn_accuracy_{g}"] for r in results[order]["cosine"]]))
                rows.append({"system": "best fixed τ", "metric": f"best fixed τ by kNN, {g} classes ({order})",
                             "value": best, "unit": "τ", "knn_accuracy": float(means[best]),
                             "cosine_knn_accuracy": cos, "setting": setting})
            for key in ("knn_rare_recall", "linear_rare_recall", "knn_accuracy", "linear_accuracy"):
                best_fixed = max(np.mean([r[key] for r in results[order][f"τ={t:g}"]]) for t in FIXED)
                cos = float(np.mean([r[key] for r in results[order]["cosine"]]))
                rows.append({"system": "cosine - best fixed τ", "metric": f"{metric_names[key]} gain ({order})",
                             "value": 100 * (cos - best_fixed), "unit": "points", "setting": setting})
    title = (f"SimCLR, demo CPU ResNet, {args.steps} steps x batch {args.batch_size}, seeds {args.seeds}; "
             f"cosine 0.1-1.0, period {args.period} steps")
    folder = results_dir(args.name)
    folder.mkdir(parents=True, exist_ok=True)
    plot(results, classes, names, folder / f"{args.name}.png", title)
    plot_classes(results, folder / f"{args.name}_classes.png", title)
    report(args.name, rows, extra={"plots": [f"{args.name}.png", f"{args.name}_classes.png"]})


if __name__ == "__main__":
    main()
