"""MAE pre-pretraining (Singh et al., ICCV 2023) on the ViT path: MAE then SimCLR from its weights
(``pretrain.init_from``), against SimCLR alone, CL+MIM (``cl_mim``) and MAE alone, at equal total steps.

Data and evaluation as ``benchmarks/temperature.py``: a long-tailed subsample of the Fashion-MNIST training
images (the demo's profile, ``--order``), a balanced test subset scored by 2-fold weighted kNN (k=200, T=0.1) and
linear probe, overall and as the mean recall of the 3 classes rarest in training.

Every system trains ``sslvision.pretrain.train`` with params.yaml's ``pretrain`` section except: the ViT
(``vit_tiny_patch16_224`` with ``--vit-args``, params.yaml's ``patch_size``), ``--batch-size``, and ``--steps``
steps in all (``--epochs`` epochs of params.yaml's warm-up and cosine lr, per run):

- ``simclr``: ``--steps`` steps of SimCLR (params.yaml's constant temperature);
- ``mae → simclr``: ``--mae-share`` of the steps MAE, saved (``sslvision.models.save_encoder``), then the rest
  SimCLR with ``init_from`` that directory (fresh projection head, fresh lr schedule);
- ``scratch → simclr``: only the SimCLR phase of ``mae → simclr``, from random weights (fewer steps in all:
  the reference that shows what the MAE phase adds);
- ``cl_mim``: ``--steps`` steps of ``lambda`` x SimCLR + (1 - ``lambda``) x MAE (params.yaml's ``lambda``);
- ``mae``: ``--steps`` steps of MAE alone.

Equal steps are not equal compute: an MAE step encodes a quarter of the patches of one view, a SimCLR step two
full views, a cl_mim step both; the wall time of each system is reported beside its accuracy.

    .venv/bin/python benchmarks/mae_prepretrain.py                   # ~20 min on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, results_dir  # noqa: E402
from temperature import CLASS_NAMES, REPO, eval_set, long_tail, scores  # noqa: E402

SYSTEMS = ("simclr", "mae → simclr", "scratch → simclr", "cl_mim", "mae")


def vit_params(args: argparse.Namespace, work: Path, method: str, steps: int, seed: int, **overrides):
    """params.yaml's pretrain section on the benchmark's ViT, ``steps`` steps of ``method``."""
    from sslvision.params import load_section
    from sslvision.pretrain import PretrainParams

    if steps % args.epochs:
        raise SystemExit(f"{method}: {steps} steps is not a multiple of --epochs ({args.epochs})")
    base = load_section("pretrain", PretrainParams, REPO / "params.yaml").model_dump(by_alias=True)
    return PretrainParams.model_validate({
        **base, "method": method, "backbone": "vit_tiny_patch16_224", "backbone_args": json.loads(args.vit_args),
        "batch_size": args.batch_size, "epochs": args.epochs, "steps_per_epoch": steps // args.epochs, "seed": seed,
        "workers": args.workers, "threads": args.threads, "device": "cpu", "checkpoint_every": 10**7,
        "checkpoint_dir": str(work / "ck"), **overrides})


def run_system(name: str, args: argparse.Namespace, work: Path, seed: int, train_x: np.ndarray) -> tuple:
    """Train one system; its encoder, wall seconds and final loss."""
    from sslvision.models import save_encoder
    from sslvision.pretrain import train

    rows = np.arange(len(train_x))
    start = time.perf_counter()
    mae_steps = int(round(args.steps * args.mae_share / args.epochs)) * args.epochs
    if name == "mae → simclr":
        first = train(vit_params(args, work, "mae", mae_steps, seed), train_x, rows, progress=False,
                      checkpoints=False)
        save_encoder(work / f"mae-{seed}", first.encoder, first.decoder, extra={"method": "mae"})
        result = train(vit_params(args, work, "simclr", args.steps - mae_steps, seed,
                                  init_from=str(work / f"mae-{seed}")), train_x, rows, progress=False,
                       checkpoints=False)
        assert result.lineage["method"] == "mae"
    elif name == "scratch → simclr":  # the SimCLR phase of mae → simclr from random weights: what MAE adds
        result = train(vit_params(args, work, "simclr", args.steps - mae_steps, seed), train_x, rows,
                       progress=False, checkpoints=False)
    else:
        result = train(vit_params(args, work, name, args.steps, seed), train_x, rows, progress=False,
                       checkpoints=False)
    return result.encoder, time.perf_counter() - start, result.history[-1]["loss"]


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("knn_accuracy", "kNN, all classes"), ("knn_rare_recall", "kNN, 3 rarest"),
               ("linear_accuracy", "linear probe, all"), ("linear_rare_recall", "linear probe, 3 rarest")]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(results)
    for i, (name, runs) in enumerate(results.items()):
        means = [100 * np.mean([r[m] for r in runs]) for m, _ in metrics]
        errs = [100 * np.std([r[m] for r in runs]) for m, _ in metrics]
        secs = np.mean([r["train_s"] for r in runs])
        ax.bar(np.arange(len(metrics)) + (i - (len(results) - 1) / 2) * width, means, width, yerr=errs, capsize=2,
               label=f"{name} ({secs:.0f} s)")
    ax.set_xticks(np.arange(len(metrics)), [label for _, label in metrics], fontsize=8)
    ax.set_ylabel("test accuracy / recall (%), 2-fold")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--order", default="natural", choices=["natural", "hard_rare"])
    ap.add_argument("--steps", type=int, default=200, help="total training steps of every system")
    ap.add_argument("--epochs", type=int, default=10, help="epochs per run (params.yaml's warm-up is 0.5 epoch)")
    ap.add_argument("--mae-share", type=float, default=0.5, help="mae → simclr: share of the steps spent on MAE")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--vit-args", default='{"embed_dim": 96, "depth": 4, "num_heads": 3}',
                    help="timm kwargs of the ViT (JSON); {} = the full vit_tiny (192 wide, 12 deep)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-per-class", type=int, default=2400, help="head class images (2400: ~6,000 in all)")
    ap.add_argument("--imbalance", type=float, default=100.0)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; on a busy 2-core machine 1 runs faster")
    ap.add_argument("--name", default="mae_prepretrain", help="results/NAME.json and NAME.png")
    args = ap.parse_args()

    from sslvision.models import embed

    train_x, train_y, classes = long_tail(args.order, args.max_per_class, args.imbalance, args.data_seed)
    rare = classes[-3:]
    counts = np.bincount(train_y, minlength=10)
    eval_x, eval_y = eval_set(args.eval_images)
    results: dict[str, list[dict]] = {name: [] for name in args.systems}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in args.systems:
                encoder, secs, loss = run_system(name, args, Path(tmp), seed, train_x)
                r = {**scores(embed(encoder, eval_x, 512), eval_y, rare), "train_s": secs, "final_loss": loss}
                results[name].append(r)
                print(f"  {name} seed {seed}: kNN {r['knn_accuracy']:.4f} (rare {r['knn_rare_recall']:.4f}), "
                      f"linear {r['linear_accuracy']:.4f} (rare {r['linear_rare_recall']:.4f}), {secs:.0f} s",
                      flush=True)
    p = vit_params(args, Path("."), "simclr", args.steps, 0)
    setting = (f"{args.order} tail ({len(train_x)} images, rarest {', '.join(CLASS_NAMES[c] for c in rare)}: "
               f"{', '.join(str(int(counts[c])) for c in rare)}); ViT {p.backbone} {args.vit_args} patch "
               f"{p.patch_size}, {args.steps} steps in all x batch {args.batch_size} (mae → simclr: "
               f"{args.mae_share:g} MAE), seeds {args.seeds}; 2-fold on {len(eval_y)} balanced test images")
    metric_names = {"knn_accuracy": "kNN accuracy", "knn_rare_recall": "kNN recall, 3 rarest classes",
                    "linear_accuracy": "linear probe accuracy",
                    "linear_rare_recall": "linear probe recall, 3 rarest classes"}
    rows: list[dict] = []
    for name, runs in results.items():
        for key, metric in metric_names.items():
            vals = [r[key] for r in runs]
            rows.append({"system": name, "metric": metric, "value": float(np.mean(vals)), "unit": "fraction",
                         "per_seed": vals, "std": float(np.std(vals)), "setting": setting})
        rows.append({"system": name, "metric": "train time", "value": float(np.mean([r["train_s"] for r in runs])),
                     "unit": "s", "setting": setting})
    folder = results_dir(args.name)
    folder.mkdir(parents=True, exist_ok=True)
    plot(results, folder / f"{args.name}.png",
         f"ViT {args.vit_args} patch {p.patch_size}, {args.steps} steps x batch {args.batch_size}, "
         f"{args.order} tail, seeds {args.seeds}")
    report(args.name, rows, extra={"plots": [f"{args.name}.png"]})


if __name__ == "__main__":
    main()
