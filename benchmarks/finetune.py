"""Fine-tune ablation ladder on the demo scenario.

Each rung adds one part of the pipeline to the one before:

1. ``scratch + CE, raw labels``: supervised from random init (the pretrain encoder's architecture +
   timm's head, full training, flips/shifts), cross-entropy on the labels as given
   (``data/ingested/manifest.parquet``): what a user does without this project;
2. ``+ SSL init``: the pretrained encoder (``models/encoder``), linear probe, still CE on raw labels;
3. ``+ audit``: train on the audited manifest (``data/audit/manifest_clean.parquet``);
4. ``+ synthetic``: add synthesize's kept images (``data/synthetic``);
5. ``+ long-tail loss``: logit-adjusted loss (without synthetic images when synthesize has not run);
6. ``+ temperature calibration``: a temperature fitted on the validation split.

With ``--full-finetune`` the ladder adds the baseline with its last epoch instead of its best validation
epoch (``select_epoch: last``; the gain is measured against the better of the two baselines), the full
pipeline as a full fine-tune with the baseline's recipe, the same with the noise-aware settings
(``noise_aware()`` below, from ``profiles/cpu.yaml``: label smoothing 0.1, last epoch, temperature
calibration), and that last rung without the synthetic images (what synthesis adds to the deployed model).

Compute: the baseline gets ``--epochs`` full passes of full training; rungs 2-6 are linear probes on the
frozen encoder (its features computed once, then ``finetune.epochs`` cheap passes of the head), so
each uses less compute than the baseline (their seconds are reported). ``--full-finetune`` adds a
rung with rung 5's data and loss as a full fine-tune with exactly the baseline's recipe (epochs, lr
2e-3, no layer-wise decay; lr 1e-3 with 0.75 decay gave 0.789 instead of 0.799-0.809 on the demo at 16
epochs): the same fine-tuning compute, plus the pretraining (not counted; the demo's takes about as long
as 16 scratch epochs take on 2 CPU cores, so ``--epochs 3`` compares the whole pipeline with a scratch
baseline of less compute and ``--epochs 16`` with one of about the pipeline's total). Rungs whose
upstream output is missing are skipped and listed.

``--oracle`` (a demo scenario's ``data/demo/truth.parquet`` needed) adds the project's own finetune recipe
(params.yaml, as the stage runs it, without synthetic images) on the audited rows, and the ceilings: the same
recipe and the scratch baseline trained on every ingested training row with its *true* label, as a perfect
audit would leave them. What the audited rows
reach against this says how much the audit leaves on the table; what the recipe reaches here bounds what any
audit could reach with this encoder and budget.
Metrics on the clean, balanced test split: balanced accuracy, worst-class recall, ECE; plus seconds.

    python benchmarks/finetune.py [--root PROJECT] [--epochs 3] [--full-finetune] [--threads 0] [--name finetune]
                                  [--rungs TEXT ... --merge]   # re-run some rungs, keep the other rows
                                  [--oracle]                   # + the true-label ceilings (demo scenarios)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command_line, report, results_dir  # noqa: E402


def ladder(p, epochs: int, full_finetune: bool, oracle: str | None = None) -> list[tuple[str, dict, str | None]]:
    """(name, overrides of the finetune params, missing input or None) for every rung; ``oracle``: a manifest
    with the true labels (:func:`oracle_manifest`) adds the two true-label ceilings."""
    off = {"registry": {"enabled": False}}
    raw = {"manifest": "data/ingested/manifest.parquet", "synthetic_weight": 0.0, "loss": "ce", "calibrate": False,
           "sampler": "random", "drw_epoch": -1, "label_smoothing": 0.0}
    full = {"mode": "finetune", "epochs": epochs, "patience": epochs, "lr": 2e-3}
    probe = {"mode": "linear_probe", "init": "ssl"}
    clean = Path(p.manifest)
    synthetic = Path(p.synthetic) / "manifest.parquet"
    weight = p.synthetic_weight or 1.0
    no_audit = None if clean.exists() else f"{clean} missing (audit stage not run)"
    no_synthetic = no_audit or (None if synthetic.exists() else f"{synthetic} missing (synthesize stage not run)")
    # the last rungs build on whatever exists: with synthetic images when synthesize has run
    best = {"manifest": p.manifest, "synthetic_weight": 0.0 if no_synthetic else weight, "loss": "logit_adjusted",
            "tau": 1.0}
    scratch = {**off, **raw, **full, "init": "scratch", "layer_decay": 1.0}
    rungs = [
        ("scratch + CE, raw labels", scratch, None),
        ("+ SSL init (linear probe)", {**off, **raw, **probe}, None),
        ("+ audit", {**off, **raw, **probe, "manifest": p.manifest}, no_audit),
        ("+ synthetic", {**off, **raw, **probe, "manifest": p.manifest, "synthetic_weight": weight}, no_synthetic),
        ("+ long-tail loss (logit-adjusted)", {**off, **raw, **probe, **best}, no_audit),
        ("+ temperature calibration", {**off, **raw, **probe, **best, "calibrate": True}, no_audit),
    ]
    if full_finetune:
        # the baseline with the last epoch as well (the noise-aware rung keeps the last one): the gain is
        # measured against the better of the two
        rungs.insert(1, ("scratch + CE, raw labels (last epoch)", {**scratch, "select_epoch": "last"}, None))
        # the baseline's recipe (epochs, lr, no layer decay): only the init, the data and the loss differ
        pipeline = {**off, **raw, **full, **best, "init": "ssl", "layer_decay": 1.0}
        rungs.append(("full pipeline, full fine-tune (scratch's recipe)", pipeline, no_audit))
        rungs.append(("+ noise-aware recipe (label smoothing 0.1, last epoch, calibrated)",
                      {**pipeline, **noise_aware()}, no_audit))
        # the same without synthesize's images: what the synthetic data adds to the model that is deployed
        rungs.append(("noise-aware full fine-tune without synthetic images",
                      {**pipeline, **noise_aware(), "synthetic_weight": 0.0}, no_synthetic))
        # every class drawn equally often instead of the prior correction of the logit adjustment (which the
        # uniform batches switch off): with a random sampler the rarest classes are seen a few dozen times an
        # epoch and the adjustment over-predicts them (results/variants/synthesize/synthesize_full_finetune.json)
        rungs.append(("+ class-balanced sampler (noise-aware recipe)",
                      {**pipeline, **noise_aware(), "sampler": "class_balanced"}, no_audit))
    if oracle:
        # the project's own recipe (what the stage deploys) on the audited rows beside the same on the true labels
        rungs.append(("the project's recipe, audited labels (no synthetic images)", {**off, "synthetic_weight": 0.0},
                      no_audit))
        rungs.append(("oracle: true labels, the project's recipe (no synthetic images)",
                      {**off, "manifest": oracle, "synthetic_weight": 0.0}, None))
        rungs.append(("oracle: true labels, scratch + CE (scratch's recipe)", {**scratch, "manifest": oracle}, None))
    return rungs


def oracle_manifest(root: Path, out: Path) -> Path:
    """The ingested manifest with every training row's label replaced by its true label from the scenario's
    ``data/demo/truth.parquet`` (matched as the audit matches it, :func:`sslvision.audit.truth_rows`); rows the
    truth file does not know are dropped. Fails when a matched row's label is not the truth file's given label
    (another scenario)."""
    import numpy as np
    import pandas as pd

    from sslvision.audit import truth_rows

    truth = pd.read_parquet(root / "data" / "demo" / "truth.parquet")
    manifest = pd.read_parquet(root / "data" / "ingested" / "manifest.parquet")
    rows = truth_rows(manifest, truth)
    known = rows >= 0
    at = truth.iloc[rows[known]]
    labelled = (manifest["label"] >= 0).to_numpy()[known]
    mismatch = labelled & (at["given_label"].to_numpy() != manifest["label"].to_numpy()[known])
    if mismatch.any():
        raise ValueError(f"{int(mismatch.sum())} manifest rows carry another label than the truth file's given "
                         f"label (first: {at['path'].iloc[int(np.argmax(mismatch))]}): not this project's scenario")
    fixed = manifest[known].copy()
    fixed["label_given"] = fixed["label"]
    fixed["label"] = at["true_label"].astype(int).to_numpy()
    if "label_name" in fixed:
        names = dict(zip(manifest["label"], manifest["label_name"], strict=False))
        fixed["label_name"] = fixed["label"].map(names)
    logging.info("oracle manifest: %d rows (%d unknown to the truth file dropped), %d labels corrected", len(fixed),
                 int((~known).sum()), int((fixed["label"] != fixed["label_given"]).sum()))
    out.parent.mkdir(parents=True, exist_ok=True)
    fixed.to_parquet(out, index=False)
    return out


# The full fine-tune's settings for labels that are audited but not clean, read from profiles/cpu.yaml (one
# source): label smoothing against the residual noise, the end of the cosine schedule instead of the best
# validation epoch (the validation rows carry the same audited labels, a handful per rare class), and a
# temperature fitted on validation. tau 0.5 instead of 1 was tried too: about the same balanced accuracy, a much
# worse shirt recall.
NOISE_AWARE_KEYS = ("label_smoothing", "select_epoch", "calibrate")


def noise_aware() -> dict:
    import yaml

    profile = yaml.safe_load((Path(__file__).resolve().parents[1] / "profiles" / "cpu.yaml").read_text())
    return {key: profile[f"finetune.{key}"] for key in NOISE_AWARE_KEYS}


def scenario(path: Path) -> dict | None:
    """What the demo scenario under the root is (noise type and rate, imbalance), when it is one."""
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    params = d.get("params", {})
    return {"noise_type": d["noise"]["type"], "noise_rate": d["noise"]["rate"],
            "realised_noise_rate": round(d["noise"]["realised_rate"], 4),
            "imbalance_ratio": params.get("imbalance_ratio"), "seed": params.get("seed")}


def encoder_info(path: Path) -> dict | None:
    """What the encoder under the root is (method, steps, kNN / linear-probe accuracy), from pretrain's metrics."""
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    return {k: d[k] for k in ("method", "backbone", "steps", "knn_accuracy", "linear_probe_accuracy") if k in d}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="project root with params.yaml and the stage outputs")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the full-training rungs")
    ap.add_argument("--full-finetune", action="store_true", help="add the equal-compute full fine-tune rung")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--name", default="finetune", help="results file: benchmarks/results/NAME.json")
    ap.add_argument("--rungs", nargs="+", default=None, metavar="TEXT",
                    help="run only the rungs whose name contains one of these texts")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the rungs not run now from the existing results/NAME.json (same root)")
    ap.add_argument("--oracle", action="store_true",
                    help="add the true-label ceilings (needs the demo scenario's data/demo/truth.parquet)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = command_line(argv, "benchmarks/finetune.py")
    os.chdir(args.root)

    from sslvision.finetune import FinetuneParams
    from sslvision.stages.finetune import load_params, run_finetune

    base = load_params()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows, skipped = [], []
    oracle = None
    if args.oracle:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="sslvision-oracle-"))
        oracle = str(oracle_manifest(Path("."), tmp / "manifest.parquet"))
    rungs = ladder(base, args.epochs, args.full_finetune, oracle)
    order = {name: i for i, (name, *_) in enumerate(rungs)}
    for name, overrides, missing in rungs:
        if args.rungs and not any(t in name for t in args.rungs):
            continue
        if missing:
            skipped.append(f"{name}: {missing}")
            logging.warning("skipping %s: %s", name, missing)
            continue
        merged = {**base.model_dump(), **overrides}
        merged["registry"] = {**base.registry.model_dump(), **overrides["registry"]}
        p = FinetuneParams.model_validate(merged)
        t0 = time.perf_counter()
        _, data, result, m, _ = run_finetune(p)
        seconds = time.perf_counter() - t0
        setting = (f"{p.mode}, init {p.init}, {p.epochs} epochs, loss {p.loss}, sampler {p.sampler}, "
                   f"label smoothing {p.label_smoothing}, select {p.select_epoch}, calibrate {p.calibrate}, "
                   f"{m['train_images']} train images ({m['synthetic_images']} synthetic)")
        for metric, value, unit in (("balanced_accuracy", m["balanced_accuracy"], "fraction"),
                                    ("worst_class_recall", m["worst_class_recall"], "fraction"),
                                    ("ece", m["ece"], "fraction"),
                                    ("seconds", seconds, "s"),
                                    *((f"recall/{c}", r, "fraction") for c, r in m["per_class_recall"].items())):
            rows.append({"system": name, "metric": metric, "value": round(float(value), 4), "unit": unit,
                         "setting": setting})
        logging.info("%s: balanced accuracy %.4f, worst class %s %.4f, ECE %.4f (%.0f s)", name,
                     m["balanced_accuracy"], m["worst_class"], m["worst_class_recall"], m["ece"], seconds)
    extra = {"skipped": skipped, "epochs": args.epochs, "test_images": len(data.test) if rows else 0,
             "scenario": scenario(Path("data/demo/scenario.json")),
             "encoder": encoder_info(Path("reports/pretrain/metrics.json"))}
    previous = results_dir(args.name) / f"{args.name}.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        ran = {r["system"] for r in rows}
        kept = [r for r in old["rows"] if r["system"] not in ran]
        rows = sorted(kept + rows, key=lambda r: order.get(r["system"], len(order)))  # ladder order (stable)
        extra["merged"] = {"rows_kept_from": old.get("merged", {}).get("rows_kept_from", []) + [old["command"]],
                           "systems_kept": sorted({r["system"] for r in kept})}
        extra["skipped"] = sorted(set(extra["skipped"]) | set(old.get("skipped", [])))
    bacc = {r["system"]: r["value"] for r in rows if r["metric"] == "balanced_accuracy"}
    names = [n for n in order if n in bacc]
    baselines = [n for n in names if n.startswith("scratch")]
    if baselines and len(names) > len(baselines):
        best = max((n for n in names if n not in baselines), key=bacc.get)
        baseline = max(baselines, key=bacc.get)
        extra["gain_over_scratch_points"] = round(100 * (bacc[best] - bacc[baseline]), 2)
        extra["best"], extra["baseline"] = best, baseline
    report(args.name, rows, command=command, extra=extra)


if __name__ == "__main__":
    main()
