"""Which finetune recipe should be the default: candidates trained on a project's audited data
(``finetune`` params of its params.yaml plus each candidate's overrides), chosen on the validation rows
carved from the training data (``val_balanced_accuracy``) and reported on the test split beside the
pixel baseline the stage fits (``baselines.pixel_logreg``).

    python benchmarks/default_recipe.py /work/main            # a project after `make demo`
    python benchmarks/default_recipe.py DIR --candidates finetune_balanced

Calls :func:`sslvision.stages.finetune.run_finetune` (no MLflow, nothing written in the project). Each row set
carries the load average before and after the run: on a shared machine the times are under that load.
Results are written after every candidate, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

# the noise-aware full fine-tune of profiles/cpu.yaml (random batches, logit-adjusted loss: the demo's recipe), and
# the same with the class-balanced sampler
FULL = {"mode": "finetune", "epochs": 16, "lr": 0.002, "layer_decay": 1.0, "label_smoothing": 0.1,
        "calibrate": True, "select_epoch": "last", "sampler": "random", "loss": "logit_adjusted",
        "synthetic_ablation": "off"}
BALANCED = {**FULL, "sampler": "class_balanced"}
PROBE = {"mode": "linear_probe", "epochs": 30, "lr": 0.003, "layer_decay": 0.75, "label_smoothing": 0.0,
         "calibrate": False, "select_epoch": "best", "sampler": "random", "synthetic_ablation": "off"}
CANDIDATES = {
    "linear_probe": {**PROBE, "synthetic_weight": 0.0},
    "linear_probe+synthetic": {**PROBE, "synthetic_weight": 1.0},
    "finetune": {**FULL, "synthetic_weight": 0.0},
    "finetune_balanced": {**BALANCED, "synthetic_weight": 0.0},
    "finetune_balanced+synthetic": {**BALANCED, "synthetic_weight": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("project", type=Path, help="project directory with data/audit, data/ingested, models/encoder")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--name", default="default_recipe")
    args = ap.parse_args()
    command = "python " + " ".join(["benchmarks/default_recipe.py", *sys.argv[1:]])
    os.chdir(args.project)

    from sslvision.finetune import FinetuneParams
    from sslvision.stages.finetune import load_params, run_finetune

    base = load_params("params.yaml").model_dump()
    rows: list[dict] = []
    for name in args.candidates:
        p = FinetuneParams.model_validate({**base, **CANDIDATES[name], "threads": args.threads})
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        _, _, result, m, _ = run_finetune(p)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        b = m["baselines"]["pixel_logreg"]
        setting = f"load average {load_before:.1f} -> {load_after:.1f} (1 min)"
        rows += [
            {"system": name, "metric": "val_balanced_accuracy",
             "value": round(100 * result.best_val_balanced_accuracy, 2), "unit": "%",
             "setting": "validation rows (audited labels)"},
            {"system": name, "metric": "balanced_accuracy", "value": round(100 * m["balanced_accuracy"], 2),
             "unit": "%", "setting": "test split"},
            {"system": name, "metric": "worst_class_recall", "value": round(100 * m["worst_class_recall"], 2),
             "unit": "%", "setting": m["worst_class"]},
            {"system": name, "metric": "ece", "value": round(m["ece"], 4), "unit": "", "setting": "test split"},
            {"system": name, "metric": "train_seconds", "value": round(result.seconds, 1), "unit": "s",
             "setting": setting},
            {"system": name, "metric": "stage_seconds", "value": round(wall, 1), "unit": "s",
             "setting": setting + "; load, train, evaluate, pixel baseline"},
            {"system": name, "metric": "synthetic_images", "value": m["synthetic_images"], "unit": "images"},
        ]
        if not any(r["system"] == "pixel_logreg" for r in rows):
            rows += [
                {"system": "pixel_logreg", "metric": "balanced_accuracy",
                 "value": round(100 * b["balanced_accuracy"], 2), "unit": "%", "setting": "test split"},
                {"system": "pixel_logreg", "metric": "worst_class_recall",
                 "value": round(100 * b["worst_class_recall"], 2), "unit": "%", "setting": b["worst_class"]},
                {"system": "pixel_logreg", "metric": "seconds", "value": round(b["seconds"], 1), "unit": "s",
                 "setting": setting},
            ]
        report(args.name, rows, command=command)


if __name__ == "__main__":
    main()
