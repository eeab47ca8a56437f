"""The GPU profile (profiles/gpu.yaml) on the demo scenario at full size, trimmed to a wall-clock budget.

What it runs, through the library API (the algorithms the DVC stages run; DVC, MLflow and Prefect are left
out so that it runs on a bare GPU machine with torch):

1. the demo scenario as arrays: Fashion-MNIST train images in the demo's long tail (``demo.max_per_class``
   5,800, imbalance 100, natural order), 20 % asymmetric label noise; the whole 60,000-image train set is the
   unlabelled pool; the 10,000 test images (1,000 per class) are the test split;
2. precision: a short SimCLR run in fp32 and in bf16 autocast (same steps), images per second of each; the
   faster one trains;
3. pretrain: SimCLR with the profile's ResNet-18 (stem stride 1, batch 512, AdamW lr 3e-3), as many epochs
   as fit ``--pretrain-seconds`` at the measured speed (the profile asks for 200);
4. kNN (k 200) and linear-probe accuracy of the embeddings on the test split (trained on the true labels of
   the labelled rows), the collapse check's effective rank;
5. audit: :func:`sslvision.find_label_issues` on the noisy labels, the audit stage's policy (relabel at
   confidence >= 0.8, else drop; nothing when more than 30 % would change); precision and recall of the
   flagged rows against the planted noise;
6. finetune: the demo recipe with the profile's fine-tune settings (full fine-tune, lr 5e-4), on the audited
   labels, epochs sized to ``--finetune-seconds``; the same network from scratch for the same epochs; the
   pixel PCA-64 logistic regression; all scored on the test split (balanced accuracy, worst class, ECE).

Every phase appends its rows to ``--out``/gpu_profile.json as soon as it ends, so a run stopped by its time
limit keeps what it measured. ``--tiny`` is a CPU smoke test of the same code (small sizes, a few steps).

    python benchmarks/gpu_profile.py --fmnist /usr/share/datasets/fashion-mnist            # on a GPU
    python benchmarks/gpu_profile.py --tiny --device cpu --out /tmp/gpu-smoke               # the smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine  # noqa: E402

log = logging.getLogger("gpu_profile")
ROOT = Path(__file__).resolve().parent.parent


class Recorder:
    """Rows and facts, rewritten to ``out/gpu_profile.json`` after every phase."""

    def __init__(self, out: Path, command: str) -> None:
        self.path = out / "gpu_profile.json"
        out.mkdir(parents=True, exist_ok=True)
        self.doc: dict[str, Any] = {"machine": machine(), "command": command, "rows": [], "facts": {}}
        self.t0 = time.perf_counter()

    def row(self, system: str, metric: str, value: float, unit: str, **extra: Any) -> None:
        value = round(float(value), 4) if isinstance(value, float | np.floating) else value
        self.doc["rows"].append({"system": system, "metric": metric, "value": value, "unit": unit, **extra})
        log.info("%-28s %-26s %s %s", system, metric, value, unit)

    def fact(self, **facts: Any) -> None:
        self.doc["facts"].update(facts)

    def save(self, phase: str) -> None:
        self.doc["facts"].setdefault("phases", []).append(
            {"phase": phase, "at_s": round(time.perf_counter() - self.t0, 1)})
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def scenario(fmnist: Path, max_per_class: int, pool_size: int, test_per_class: int, seed: int = 0) -> dict:
    """The demo's long tail and asymmetric noise drawn from Fashion-MNIST's train split, as arrays."""
    from sslvision.demo import inject_noise, long_tail_counts, tail_order
    from sslvision.idx import read_idx

    def read(stem: str) -> np.ndarray:
        return read_idx(fmnist / f"{stem}.gz" if (fmnist / f"{stem}.gz").exists() else fmnist / stem)

    x, y = read("train-images-idx3-ubyte"), read("train-labels-idx1-ubyte").astype(np.int64)
    tx, ty = read("t10k-images-idx3-ubyte"), read("t10k-labels-idx1-ubyte").astype(np.int64)
    rng = np.random.default_rng(seed)
    counts = long_tail_counts(max_per_class, 100.0)
    rows = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n]
                           for c, n in zip(tail_order("natural"), counts, strict=True)])
    rows.sort()
    given = inject_noise(y[rows], 0.2, "asymmetric", rng)
    test = np.sort(np.concatenate([np.flatnonzero(ty == c)[:test_per_class] for c in range(10)]))
    pool = np.sort(rng.permutation(len(x))[:pool_size])
    pool = np.union1d(pool, rows)  # the labelled rows are in the pool, as train is in the SSL stage's pool
    return {"pool": x[pool], "x": x[rows], "true": y[rows], "given": given, "test_x": tx[test], "test_y": ty[test],
            "counts": counts}


def step_times(p: Any, images: np.ndarray) -> tuple[float, Any]:
    """Median seconds per step of a short run (steps after the first 5), and the run's result."""
    from sslvision.pretrain import train

    stamps: list[float] = []
    result = train(p, images[..., None], np.arange(len(images)), on_step=lambda s, _l: stamps.append(
        time.perf_counter()) and None, progress=False, checkpoints=False)
    diffs = np.diff(stamps[5:])
    return float(np.median(diffs)) if len(diffs) else float("nan"), result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fmnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pretrain-seconds", type=float, default=210.0)
    ap.add_argument("--finetune-seconds", type=float, default=45.0, help="for each of fine-tune and scratch")
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=min(14, max(1, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: small sizes, a few steps")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    import torch
    import yaml

    from sslvision import embed, find_label_issues, fit_classifier
    from sslvision.audit import AuditParams, label_actions
    from sslvision.baselines import pixel_logreg
    from sslvision.metrics import classification_metrics, knn_predict, linear_probe_predict
    from sslvision.pretrain import PretrainParams, effective_rank, train
    from sslvision.project import DEMO_OVERRIDES

    rec = Recorder(args.out, command_line(argv))
    profile: dict[str, dict[str, Any]] = {}
    # yaml, not sslvision.profiles.load_profile: that validates every stage's section, importing the stage
    # runners (DVC, Prefect), which a bare GPU machine lacks; PretrainParams and fit_classifier validate these
    for key, value in yaml.safe_load((ROOT / "profiles" / "gpu.yaml").read_text()).items():  # {"section.key": v}
        section, name = key.split(".", 1)
        profile.setdefault(section, {})[name] = value
    pre_prof, ft_prof = dict(profile["pretrain"]), dict(profile["finetune"])
    rec.fact(profile=str(ROOT / "profiles" / "gpu.yaml"), torch=torch.__version__,
             device=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device)
    if args.tiny:
        data = scenario(args.fmnist, 60, 1500, 20)
        pre_prof.update(backbone_args={"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16},
                        stem_stride=2, batch_size=64)
        args.probe_steps = 8
    else:
        data = scenario(args.fmnist, int(profile["demo"]["max_per_class"]), 60_000, 1000)
    names = [str(c) for c in range(10)]
    rec.fact(labelled=len(data["x"]), pool=len(data["pool"]), test=len(data["test_x"]), class_counts=data["counts"],
             noise_rate=float((data["given"] != data["true"]).mean()))
    rec.save("data")

    # --- precision probe and pretraining ---------------------------------------------------------------
    base = {k: v for k, v in pre_prof.items()
            if k not in ("device", "workers", "checkpoint_every", "embed_batch_size", "epochs", "steps_per_epoch")}
    base.update(method="simclr", device=args.device, workers=args.workers, seed=0)
    bs = int(base["batch_size"])
    speeds = {}
    for precision in ("fp32", "bf16"):
        p = PretrainParams(**{**base, "precision": precision, "epochs": 1, "steps_per_epoch": args.probe_steps,
                              "warmup_epochs": 0})
        try:
            sec, _ = step_times(p, data["pool"])
        except Exception as err:  # bf16 unsupported: keep fp32
            log.warning("%s probe failed: %s", precision, err)
            continue
        speeds[precision] = bs / sec
        rec.row(f"simclr {precision}", "pretrain_throughput", bs / sec, "images/s",
                setting=f"ResNet-18 stem 1, batch {bs}, {args.probe_steps} steps, median after 5")
    precision = max(speeds, key=speeds.get)
    if len(speeds) == 2:
        rec.row("simclr bf16 / fp32", "speedup", speeds["bf16"] / speeds["fp32"], "x")
    rec.save("precision")

    steps_per_epoch = len(data["pool"]) // bs
    epochs = max(1, int(args.pretrain_seconds * speeds[precision] / bs / steps_per_epoch))
    if args.tiny:
        epochs, steps_per_epoch = 2, 5
    p = PretrainParams(**{**base, "precision": precision, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                          "warmup_epochs": min(float(base.get("warmup_epochs", 10)), max(0.5, epochs / 20))})
    deadline = time.perf_counter() + 1.5 * args.pretrain_seconds
    t0 = time.perf_counter()
    result = train(p, data["pool"][..., None], np.arange(len(data["pool"])), progress=False, checkpoints=False,
                   on_step=lambda s, _l: time.perf_counter() > deadline)
    pretrain_s = time.perf_counter() - t0
    encoder = result.encoder.eval()
    rec.row("simclr pretrain", "seconds", pretrain_s, "s",
            setting=f"{epochs} epochs x {steps_per_epoch} steps of {bs} ({precision}); profile asks 200 epochs")
    rec.fact(pretrain={"epochs": epochs, "steps_per_epoch": steps_per_epoch, "precision": precision,
                       "settings": {k: v for k, v in p.model_dump().items() if k in pre_prof or k == "temperature"},
                       "history_last": result.history[-1] if getattr(result, "history", None) else None})
    rec.save("pretrain")

    emb = embed(encoder, data["x"], batch_size=2048)
    test_emb = embed(encoder, data["test_x"], batch_size=2048)
    knn = knn_predict(emb, data["true"], test_emb, 10, k=200, temperature=0.1)
    probe = linear_probe_predict(emb, data["true"], test_emb)
    ty = data["test_y"]
    for system, pred in (("ssl kNN k=200", knn), ("ssl linear probe", probe)):
        m = classification_metrics(ty, np.eye(10)[pred], names)
        rec.row(system, "balanced_accuracy", m["balanced_accuracy"], "fraction", setting="true labels, test split")
    rec.row("ssl embeddings", "effective_rank", effective_rank(test_emb), "dims")
    rec.save("embed")

    # --- audit --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    issues = find_label_issues(emb, data["given"], pixels=data["x"], threads=os.cpu_count() or 1)
    flagged = issues["is_label_issue"].to_numpy()
    noisy = data["given"] != data["true"]
    action, _ = label_actions(flagged, issues["suggested_confidence"].to_numpy(), issues["is_outlier"].to_numpy(),
                              AuditParams())  # the audit stage's default policy
    keep = action != "drop"
    labels = np.where(action == "relabel", issues["suggested_label"].to_numpy(), data["given"])
    tp = int((flagged & noisy).sum())
    rec.row("audit", "seconds", time.perf_counter() - t0, "s")
    rec.row("audit", "precision", tp / max(1, flagged.sum()), "fraction", setting="flagged vs planted noise")
    rec.row("audit", "recall", tp / max(1, noisy.sum()), "fraction")
    rec.row("audit", "label_accuracy_after", float((labels[keep] == data["true"][keep]).mean()), "fraction",
            setting=f"before {1 - noisy.mean():.4f}; {int((~keep).sum())} dropped, "
                    f"{int((action == 'relabel').sum())} relabelled")
    rec.save("audit")

    # --- finetune, scratch, pixels -------------------------------------------------------------------
    recipe = {k: v for k, (v, _) in DEMO_OVERRIDES["finetune"].items() if k != "synthetic_weight"}
    recipe.update({k: v for k, v in ft_prof.items() if k not in ("device",)})
    x, y = data["x"][keep], labels[keep].astype(np.int64)
    t0 = time.perf_counter()
    fit_classifier(encoder, x, y, classes=names, device=args.device, **{**recipe, "epochs": 1, "patience": 1})
    epoch_s = time.perf_counter() - t0
    ft_epochs = 2 if args.tiny else max(1, min(int(recipe["epochs"]), int(args.finetune_seconds / epoch_s)))
    rec.fact(finetune={"recipe": recipe, "epochs": ft_epochs, "one_epoch_s": round(epoch_s, 2),
                       "train_rows": int(len(y))})
    for system, init in (("ssl fine-tune (champion recipe)", "ssl"), ("same network from scratch", "scratch")):
        t0 = time.perf_counter()
        clf = fit_classifier(encoder, x, y, classes=names, device=args.device,
                             **{**recipe, "epochs": ft_epochs, "init": init})
        seconds = time.perf_counter() - t0
        m = classification_metrics(ty, clf.predict_proba(data["test_x"][..., None]), names)
        setting = f"{ft_epochs} epochs, audited labels, recipe of DEMO_OVERRIDES + profiles/gpu.yaml"
        rec.row(system, "balanced_accuracy", m["balanced_accuracy"], "fraction", setting=setting)
        rec.row(system, "worst_class_recall", m["worst_class_recall"], "fraction", worst_class=m["worst_class"])
        rec.row(system, "ece", m["ece"], "fraction")
        rec.row(system, "seconds", seconds, "s")
        rec.save(f"finetune {init}")
        del clf
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    for system, lab, rows in (("pixel PCA-64 logistic regression", y, keep),
                              ("pixel PCA-64 logistic regression, raw labels", data["given"], slice(None))):
        t0 = time.perf_counter()
        base_model = pixel_logreg(data["x"][rows][..., None], lab, num_classes=10)
        m = classification_metrics(ty, base_model.predict_proba(data["test_x"][..., None]), names)
        rec.row(system, "balanced_accuracy", m["balanced_accuracy"], "fraction")
        rec.row(system, "worst_class_recall", m["worst_class_recall"], "fraction", worst_class=m["worst_class"])
        rec.row(system, "seconds", time.perf_counter() - t0, "s")
    rec.save("done")
    log.info("total %.0f s -> %s", time.perf_counter() - rec.t0, rec.path)


if __name__ == "__main__":
    main()
