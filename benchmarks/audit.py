"""Label audit: this stage against cleanlab baselines on the demo scenario, symmetric and asymmetric noise.

The demo scenario (``sslvision.demo.build_scenario``: Fashion-MNIST, long tail of ratio 100, 20% label
noise, 20 exact duplicates of which 10 carry a conflicting label, broken files) is built twice, once
with symmetric and once with asymmetric noise (same seed: the same train images), each ingested with
``sslvision.ingest.run_ingest``. Self-supervised pretraining (``sslvision.stages.pretrain.run_stage``,
``params.yaml``'s ``pretrain`` section with ``--epochs`` / ``--steps-per-epoch``) runs once, on the
symmetric scenario's images (it never sees a label, so the encoder serves both); the asymmetric
scenario's images are embedded with that encoder. Every detector then scores the same audited rows
(the labelled train images), against the scenario's ``truth.parquet`` (``is_noisy``: given != true):

- ``sslvision audit``: ``sslvision.audit.run_audit`` with ``params.yaml``'s ``audit`` section: the SSL
  embeddings with PCA-64 pixel features appended (+ ablations: the embeddings alone, class-balanced
  probe weights, one cleaning round);
- ``cleanlab CV-LR PCA-64 pixels``: cleanlab's ``find_label_issues`` (defaults) on 5-fold
  cross-validated logistic regression over PCA-64 pixel features;
- ``cleanlab Datalab PCA-64 pixels``: cleanlab's ``Datalab`` label check given those features only;
- ``cleanlab defaults on SSL embeddings``: ``find_label_issues`` (defaults) on 5-fold CV
  ``LogisticRegression()`` (defaults) over the same SSL embeddings the stage uses.

F1, precision and recall of the flags, AUROC of the score (cleanlab's label quality score for the
baselines), and the detection time (features given; pretraining reported separately). BLAS is limited
to one thread for every detector (a fair comparison on a shared machine).

    .venv/bin/python benchmarks/audit.py                        # ~15-25 min on 2 CPU cores
    .venv/bin/python benchmarks/audit.py --epochs 2 --max-per-class 600   # smoke test

Needs the ``bench`` extra (``pip install -e .[bench]``) for cleanlab's Datalab.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.audit")


def build(root: Path, noise_type: str, max_per_class: int):
    """Scenario + ingest; returns (ingested dir, truth)."""
    from sslvision.demo import DemoParams, build_scenario
    from sslvision.ingest import IngestParams, run_ingest

    raw, ing = root / f"raw_{noise_type}", root / f"ingested_{noise_type}"
    if (ing / "manifest.parquet").exists():  # --workdir from an earlier run
        return ing, pd.read_parquet(raw / "truth.parquet")
    # the audit reads only the train split: keep the test split small (pretrain's evaluation) and
    # the production batches minimal
    demo = DemoParams(noise_type=noise_type, max_per_class=max_per_class, test_per_class=100,
                      incoming_batch_size=50, clean_batches=0, corruptions=[], severities=[1])
    build_scenario(raw, demo, progress=False)
    # the scenario's ImageFolder root (train/, test/ of class dirs) is its images/ directory
    run_ingest(IngestParams(workers=1, cache_dir=str(root / "cache")), raw / "images", ing, None)
    return ing, pd.read_parquet(raw / "truth.parquet")


def pretrain(root: Path, ingested: Path, epochs: int, steps_per_epoch: int) -> tuple[Path, dict]:
    from sslvision.params import load_section
    from sslvision.pretrain import PretrainParams
    from sslvision.stages.pretrain import run_stage

    done = root / "pretrain_metrics.json"
    if done.exists():  # --workdir from an earlier run
        return root / "encoder", json.loads(done.read_text())
    p = load_section("pretrain", PretrainParams, REPO / "params.yaml",
                     overrides={"epochs": epochs, "steps_per_epoch": steps_per_epoch,
                                "checkpoint_dir": str(root / "checkpoints")})
    t0 = time.perf_counter()
    metrics = run_stage(p, ingested, root / "encoder", root / f"emb_{ingested.name}", root / "reports_pretrain")
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    metrics["wall_s"] = time.perf_counter() - t0
    done.write_text(json.dumps(metrics))
    return root / "encoder", metrics


def embeddings_for(encoder_dir: Path, ingested: Path, root: Path) -> np.ndarray:
    from sslvision.data import load_embeddings
    from sslvision.models import embed, load_encoder

    done = root / f"emb_{ingested.name}"
    if (done / "embeddings.npy").exists():
        return np.asarray(load_embeddings(done))
    images = np.load(ingested / "images.npy", mmap_mode="r")
    return embed(load_encoder(encoder_dir), images, 512)


def scores(flagged: np.ndarray, score: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    p, r, f, _ = precision_recall_fscore_support(noisy, flagged, average="binary", zero_division=0)
    return {"f1": float(f), "precision": float(p), "recall": float(r), "auroc": float(roc_auc_score(noisy, score))}


def cv_logreg_cleanlab(x: np.ndarray, labels: np.ndarray, **lr) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's standard recipe: 5-fold CV predicted probabilities, then find_label_issues defaults."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    probs = cross_val_predict(LogisticRegression(**lr), x, labels, method="predict_proba",
                              cv=StratifiedKFold(5, shuffle=True, random_state=0))
    return find_label_issues(labels, probs), 1.0 - get_label_quality_scores(labels, probs)


def datalab(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from cleanlab import Datalab

    lab = Datalab(data={"label": labels}, label_name="label", verbosity=0)
    lab.find_issues(features=x, issue_types={"label": {}})
    issues = lab.get_issues("label")
    return issues["is_label_issue"].to_numpy(), 1.0 - issues["label_score"].to_numpy()


def run_scenario(noise_type: str, ingested: Path, truth: pd.DataFrame, emb: np.ndarray) -> list[dict]:
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    from sslvision.audit import AuditParams, audited_rows, match_truth, run_audit
    from sslvision.data import Ingested
    from sslvision.params import load_section

    ing = Ingested.load(ingested)
    p = load_section("audit", AuditParams, REPO / "params.yaml", overrides={"splits": ["train"], "truth": None})
    sub = ing.manifest.iloc[audited_rows(ing.manifest, p.splits)].reset_index(drop=True)
    noisy = match_truth(sub, truth)
    if (noisy < 0).any():
        raise ValueError(f"{(noisy < 0).sum()} audited rows have no truth row")
    noisy = noisy.astype(bool)
    labels = sub["label"].to_numpy()
    pixels = np.asarray(ing.images[sub["index"].to_numpy()], dtype=np.float32).reshape(len(sub), -1) / 255.0
    feats = np.asarray(emb[sub["index"].to_numpy()], dtype=np.float32)
    log.info("%s: %d audited rows, %d noisy (%.3f)", noise_type, len(sub), noisy.sum(), noisy.mean())
    rows: list[dict] = []

    def add(system: str, fn) -> None:
        with threadpool_limits(limits=1), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            m = fn()
            m = {k: m[k] for k in ("f1", "precision", "recall", "auroc")} | {"time": time.perf_counter() - t0}
        log.info("%s / %s: %s", noise_type, system, {k: round(v, 3) for k, v in m.items()})
        for metric, value in m.items():
            rows.append({"system": system, "setting": f"{noise_type} 20%", "metric": metric,
                         "value": round(value, 4), "unit": "s" if metric == "time" else ""})

    def stage(**update):
        return lambda: run_audit(p.model_copy(update=update), ing.manifest, emb, ing.classes, truth,
                                 ing.images)[2]["truth"]

    def baseline(fn, *a, **kw):
        return lambda: scores(*fn(*a, **kw), noisy)

    add("sslvision audit (SSL embeddings + pixels)", stage())
    add("sslvision audit, SSL embeddings alone (ablation)", stage(pixel_pca=0))
    add("sslvision audit, class-balanced probe (ablation)", stage(class_balanced=True))
    add("sslvision audit, 1 round (ablation)", stage(rounds=1))
    add("cleanlab defaults on SSL embeddings", baseline(cv_logreg_cleanlab, feats, labels))
    pca_s = time.perf_counter()
    with threadpool_limits(limits=1):
        pca = PCA(64, random_state=0).fit_transform(pixels)
    pca_s = time.perf_counter() - pca_s
    add("cleanlab CV-LR PCA-64 pixels", baseline(cv_logreg_cleanlab, pca, labels, max_iter=1000))
    add("cleanlab Datalab PCA-64 pixels", baseline(datalab, pca, labels))
    rows.append({"system": "PCA-64 of pixels (shared by the pixel baselines)", "setting": f"{noise_type} 20%",
                 "metric": "time", "value": round(pca_s, 2), "unit": "s"})
    rows.append({"system": "scenario", "setting": f"{noise_type} 20%", "metric": "noisy_share",
                 "value": round(float(noisy.mean()), 4), "unit": "", "n_audited": int(len(sub))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=8, help="pretrain epochs (full passes over train images)")
    ap.add_argument("--steps-per-epoch", type=int, default=0, help="pretrain steps per epoch (0 = full pass)")
    ap.add_argument("--max-per-class", type=int, default=5000, help="head-class size of the scenario")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the scenarios, ingested data and encoder here and reuse them on the next run "
                         "(same --epochs/--max-per-class!); default: a temporary directory")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy_logger in ("sslvision.audit", "cleanlab"):
        logging.getLogger(noisy_logger).setLevel(logging.WARNING)
    scratch = (contextlib.nullcontext(str(args.workdir)) if args.workdir
               else tempfile.TemporaryDirectory(prefix="audit_bench_"))
    with scratch as tmp:
        root = Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        built = {t: build(root, t, args.max_per_class) for t in ("symmetric", "asymmetric")}
        encoder, pm = pretrain(root, built["symmetric"][0], args.epochs, args.steps_per_epoch)
        rows = [{"system": "SSL pretrain (once, shared by both settings)", "setting": "", "metric": "time",
                 "value": round(pm["wall_s"], 1), "unit": "s", "knn_accuracy": round(pm.get("knn_accuracy", 0), 4),
                 "linear_probe_accuracy": round(pm.get("linear_probe_accuracy", 0), 4),
                 "method": pm.get("method"), "epochs": args.epochs}]
        for t, (ing, truth) in built.items():
            rows += run_scenario(t, ing, truth, embeddings_for(encoder, ing, root))
    report("audit", rows, command=command_line(script="benchmarks/audit.py"),
           extra={"pretrain": pm})


if __name__ == "__main__":
    main()
