"""Confounders: does slice discovery find a planted confounder, and does Just Train Twice undo it?

The demo scenario (``sslvision.demo.build_scenario``, params.yaml's ``demo`` section: long tail of ratio 100,
20 % asymmetric label noise) with ``confounder: mark``: a white 4x4 square in the top-left corner of 90 % of
the T-shirt train images and 5 % of every other class's, and, in the test split, reversed: never on a T-shirt,
on 10 % of every other class's test images (``--test-rate``). The pipeline runs on it as ``make demo`` would,
from the library: ingest, self-supervised pretraining with params.yaml's recipe (300 SimCLR steps on the CPU
encoder) and the embed stage, the audit (params.yaml's ``audit``), then the finetune stage's
``run_finetune`` for each recipe (``--recipes``: ``probe``, the linear probe, the default; ``demo``, params.yaml's
noise-aware full fine-tune, which trains twice for minutes each), without and with ``slice_reweight`` (Just Train
Twice, ``--upweight``).

Measured on the test split, where the planted slice is the marked images (all of other classes than T-shirt):

- **discovery**: the rank of the first reported slice of which at least half the images carry the mark (an error
  slice judged on its test images, a shortcut slice on its train images), and the share of marked images
  (precision) and of the split's marked images (recall) of the top slice. ``sslvision find_slices`` as the
  stage runs it (with the training rows), the same with the error criterion alone (no training rows), and the
  peer, plain **k-means**: the same embeddings (L2-normalised) in as many clusters as ``find_slices`` makes
  across classes, ranked by error rate (error-slice discovery without classes or bounds), clusters of
  ``min_size`` or more;
- **mitigation**: balanced accuracy, the worst-group accuracy over the true groups (class x marked, the groups
  Just Train Twice is judged on in its paper), the accuracy on the marked images, and the worst-slice accuracy
  over the k-means slices of the test embeddings, for the classifier without, JTT ungated, the stage's gated
  choice (it keeps JTT only when validation worst-slice accuracy rises at <= 1 point of validation balanced
  accuracy), ``subsample`` as the stage gates it, and an oracle that weights the true groups of each class equally
  in the loss. Every classifier is scored on one half of the test split (each class halved at random): the
  other half is the held-out split ``subsample`` sharpens its shortcut slices with (discovery uses it all).
  Targets (issue 25): the planted slice ranks first; the mitigation raises the worst-slice accuracy by >= 10
  points at <= 1 point of balanced accuracy.

``--last-layer`` adds last-layer retraining (Deep Feature Reweighting, Kirichenko et al. 2023) of the first
classifier: a logistic regression on its penultimate features with the classes and, within each, groups weighted
equally: no groups, the true groups (an oracle), the discovered shortcut slices' training rows; on the training
rows, and on the validation rows as DFR does (:func:`last_layer`).

    nice -n 10 .venv/bin/python benchmarks/confounders.py --workdir /tmp/confounders   # ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/confounders.py --max-per-class 600 --test-per-class 100   # smaller scenario

``--confounder brightness --confounder-class C`` plants the other kind (``demo.confounder_brightness`` added to
every pixel) on another class; "marked" then means "carrying the confounder".

``--workdir`` keeps the scenario, the ingested data, the encoder and the audit between runs (default: a
temporary directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
log = logging.getLogger("benchmarks.confounders")
MIN_GROUP = 20  # true groups (class x marked) smaller than this are left out of the worst-group accuracy


def build(root: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """Scenario + ingest (kept in ``root``); returns (ingested dir, scenario)."""
    from sslvision.demo import CLASS_DIRS, DemoParams, build_scenario
    from sslvision.ingest import IngestParams, run_ingest
    from sslvision.params import load_section

    raw, ing = root / "raw", root / "ingested"
    if (ing / "manifest.parquet").exists():
        scenario = json.loads((raw / "scenario.json").read_text())
        kept = (scenario["confounder"]["kind"], scenario["confounder"]["class"])
        if kept != (args.confounder, CLASS_DIRS[args.confounder_class]):
            raise SystemExit(f"{root} holds a {kept[0]} confounder on {kept[1]}: use another --workdir")
        return ing, scenario
    demo = load_section("demo", DemoParams, PARAMS, overrides={
        "confounder": args.confounder, "confounder_class": args.confounder_class,
        "confounder_test_rate": args.test_rate, "max_per_class": args.max_per_class,
        "test_per_class": args.test_per_class, "incoming_batch_size": 50, "clean_batches": 0, "corruptions": [],
        "severities": [1], "workers": 2})
    t0 = time.perf_counter()
    scenario = build_scenario(raw, demo, progress=False)
    run_ingest(IngestParams(workers=2, cache_dir=str(root / "cache")), raw / "images", ing, None)
    log.info("scenario + ingest: %.0f s", time.perf_counter() - t0)
    return ing, scenario


def pretrain(root: Path, ingested: Path) -> Path:
    """params.yaml's pretrain recipe on the scenario's images; the encoder and the embeddings of every image."""
    from sslvision.params import load_section
    from sslvision.pretrain import PretrainParams
    from sslvision.stages.pretrain import run_stage

    if (root / "embeddings" / "embeddings.npy").exists():
        return root / "encoder"
    p = load_section("pretrain", PretrainParams, PARAMS, overrides={"checkpoint_dir": str(root / "checkpoints")})
    t0 = time.perf_counter()
    metrics = run_stage(p, ingested, root / "encoder", root / "embeddings", root / "reports_pretrain")
    log.info("pretrain: %d steps, kNN accuracy %.3f, %.0f s", metrics["steps"], metrics["knn_accuracy"],
             time.perf_counter() - t0)
    return root / "encoder"


def audit(root: Path, ingested: Path) -> Path:
    """params.yaml's audit on the SSL embeddings; the cleaned manifest the finetune stage trains on."""
    from sslvision.audit import AuditParams, run_audit
    from sslvision.data import Ingested, load_embeddings
    from sslvision.params import load_section

    out = root / "manifest_clean.parquet"
    if out.exists():
        return out
    ing = Ingested.load(ingested)
    p = load_section("audit", AuditParams, PARAMS)
    _, clean, metrics = run_audit(p, ing.manifest, load_embeddings(root / "embeddings"), ing.classes,
                                  images=ing.images)
    log.info("audit: %d label issues of %d", metrics["n_label_issues"], metrics["n_audited"])
    clean.to_parquet(out, index=False)
    return out


def kmeans_slices(embeddings: np.ndarray, labels: np.ndarray, pred: np.ndarray, k: int, min_size: int,
                  seed: int) -> list[np.ndarray]:
    """The peer: plain k-means on the L2-normalised embeddings, clusters ranked by error rate."""
    from sklearn.cluster import KMeans

    from sslvision.metrics import l2_normalise

    assign = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(l2_normalise(embeddings))
    wrong = pred != labels
    groups = [np.flatnonzero(assign == j) for j in range(k)]
    groups = [g for g in groups if len(g) >= min_size]
    return sorted(groups, key=lambda g: (-wrong[g].mean(), int(g[0])))


def discovery(slices: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Rank (1-based; 0 = none) of the first slice at least half of whose images carry the mark, and the share of
    marked images (precision) and of all the marked images (recall) of the top slice. ``slices``: (whether each
    image of a slice carries the mark, every image of its split that does)."""
    rank = next((i + 1 for i, (m, _) in enumerate(slices) if len(m) and m.mean() >= 0.5), 0)
    top, split = slices[0] if slices else (np.zeros(0, dtype=bool), np.zeros(1, dtype=bool))
    return {"rank": rank, "precision": float(top.mean()) if len(top) else 0.0,
            "recall": float(top.sum() / max(split.sum(), 1)), "slices": len(slices)}


def test_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the test split, each class split in two at random (``seed``): (seen, held) row indices."""
    rng = np.random.default_rng([seed, 0x7E57])
    seen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: (labels == c).sum() // 2]
                           for c in np.unique(labels)])
    return np.sort(seen), np.setdiff1d(np.arange(len(labels)), seen)


def model_scores(pred: np.ndarray, labels: np.ndarray, marked: np.ndarray, groups: list[np.ndarray],
                 num_classes: int) -> dict[str, float]:
    from sslvision.metrics import per_class_recall
    from sslvision.slices import worst_slice_accuracy

    recall, _ = per_class_recall(labels, pred, num_classes)
    correct = pred == labels
    true_groups = [np.flatnonzero((labels == c) & (marked == m)) for c in range(num_classes) for m in (False, True)]
    true_groups = [g for g in true_groups if len(g) >= MIN_GROUP]
    return {"balanced_accuracy": float(np.nanmean(recall)),
            "worst_group_accuracy": float(min(correct[g].mean() for g in true_groups)),
            "marked_accuracy": float(correct[marked].mean()) if marked.any() else float("nan"),
            "worst_slice_accuracy": worst_slice_accuracy(groups, labels, pred)}


def run_recipe(name: str, overrides: dict[str, Any], root: Path, ingested: Path, manifest: Path, paths: set[str],
               args: argparse.Namespace) -> tuple[list[dict], dict]:
    from sslvision.finetune import FinetuneData, FinetuneParams, Split, train_classifier
    from sslvision.params import load_section
    from sslvision.slices import find_slices, slice_groups
    from sslvision.stages.finetune import (
        build_classifier,
        discover_slices,
        just_train_twice,
        run_finetune,
        shortcut_subsampling,
        slice_views,
    )

    p = load_section("finetune", FinetuneParams, PARAMS, overrides={
        **overrides, "encoder": str(root / "encoder"), "ingested": str(ingested), "manifest": str(manifest),
        "synthetic": str(root / "no_synthetic"), "embeddings": str(root / "embeddings"), "out": str(root / "clf"),
        "jtt_upweight": args.upweight, "synthetic_ablation": "off", "registry": {"enabled": False}, "seed": args.seed,
        "threads": args.threads})
    from sslvision.data import Ingested
    from sslvision.finetune import train_val_rows

    test = Ingested.load(ingested).split("test")
    test = test[test["label"] >= 0]
    marked = np.array([f"images/{s}" in paths for s in test["source_path"]])
    train_rows, val_rows = train_val_rows(p)
    train_marked = np.array([f"images/{s}" in paths for s in train_rows["source_path"]])
    val_marked = np.array([f"images/{s}" in paths for s in val_rows["source_path"]])
    t0 = time.perf_counter()
    first, data, _, metrics, probs = run_finetune(p)
    views = slice_views(p)
    second, record = None, None
    if "jtt" in args.mitigations:
        second, _, record = just_train_twice(p, data, first, views)
    # subsample sharpens its slices with the test images of their class: it sees one half of the test split, and
    # every classifier is scored on the other
    seen, held = test_halves(data.test.labels, p.seed)
    thinned, _, sub_record = shortcut_subsampling(
        p, FinetuneData(train=data.train, val=data.val, test=data.test.take(seen), classes=data.classes), first,
        dataclasses.replace(views, test=views.test[seen], test_source=views.test_source[seen]))
    wall = time.perf_counter() - t0
    labels, k = data.test.labels, len(data.classes)
    s = p.slices
    slices, summary = discover_slices(p, data, probs, views)
    # an error slice is judged on its test images, a shortcut slice on its train images (where the shortcut is)
    ours = discovery([(train_marked[np.asarray(t, dtype=int)], train_marked) if kind == "shortcut"
                      else (marked[np.asarray(m, dtype=int)], marked)
                      for kind, m, t in zip(slices["kind"], slices["members"], slices["train_members"], strict=True)])
    alone = find_slices(views.test, labels, probs.argmax(1), n_slices=s.n_slices, min_size=s.min_size, seed=p.seed,
                        clusters=s.clusters)  # the error criterion alone: no training rows
    errors_only = discovery([(marked[np.asarray(m, dtype=int)], marked) for m in alone["members"]])
    n_across = min(s.clusters * k, len(labels) // (2 * s.min_size))
    peer = discovery([(marked[g], marked) for g in kmeans_slices(views.test, labels, probs.argmax(1), n_across,
                                                                  s.min_size, p.seed)])
    groups = slice_groups(views.test[held], labels[held], clusters=s.clusters, min_size=s.min_size, seed=p.seed)

    def score(pred: np.ndarray) -> dict[str, float]:  # on the held-out half of the test split
        return model_scores(pred[held], labels[held], marked[held], groups, k)

    pred0 = probs.argmax(1)
    scores = {"without": score(pred0)}
    if second is not None:
        scores["JTT (ungated)"] = score(second.predict_proba(data.test.images, p.eval_batch_size).argmax(1))
        scores["JTT (gated by the stage)"] = scores["JTT (ungated)" if record["kept"] else "without"]
    pred3 = thinned.predict_proba(data.test.images, p.eval_batch_size).argmax(1)
    scores["subsample (ungated)"] = score(pred3)
    scores["subsample (gated by the stage)"] = scores["subsample (ungated)" if sub_record["kept"] else "without"]
    # the ceiling of any re-weighting: the true groups (class x mark) of a class weighted equally
    if "oracle" in args.mitigations and len(train_marked) == len(data.train):
        weights = np.ones(len(data.train), dtype=np.float32)
        for c in range(k):
            for flag in (False, True):
                g = (data.train.labels == c) & (train_marked == flag)
                if g.any():
                    weights[g] = (data.train.labels == c).sum() / 2 / g.sum()
        oracle = build_classifier(p, data.classes)
        train = Split(data.train.images, data.train.labels, weights, data.train.synthetic)
        train_classifier(oracle, FinetuneData(train=train, val=data.val, test=data.test, classes=data.classes), p)
        pred2 = oracle.predict_proba(data.test.images, p.eval_batch_size).argmax(1)
        scores["oracle: true groups weighted equally (a ceiling)"] = score(pred2)
    if args.last_layer:
        scores.update(last_layer(first, data, p, slices, (train_marked, val_marked), score, args.last_layer_c))
    log.info("%s: top slice %s", name, slices["description"].iloc[0] if len(slices) else "none")
    rows: list[dict] = []
    setting = f"recipe {name}"
    for system, d in (("sslvision find_slices", ours), ("sslvision find_slices, error slices only", errors_only),
                      ("plain k-means (error-ranked)", peer)):
        rows += [{"system": system, "metric": "rank of the planted slice (target 1)", "value": d["rank"],
                  "unit": "rank", "setting": setting},
                 {"system": system, "metric": "top slice: share of marked images", "value": 100 * d["precision"],
                  "unit": "%", "setting": setting},
                 {"system": system, "metric": "top slice: share of the marked images it holds", "value":
                  100 * d["recall"], "unit": "%", "setting": setting}]
    for system, d in scores.items():
        for key, metric in (("worst_group_accuracy", "worst-group accuracy (class x mark), test"),
                            ("worst_slice_accuracy", "worst-slice accuracy (discovered slices), test"),
                            ("marked_accuracy", "accuracy on the marked test images"),
                            ("balanced_accuracy", "balanced accuracy, test")):
            rows.append({"system": system, "metric": metric, "value": 100 * d[key], "unit": "%", "setting": setting})
    for method, rec in (("JTT", record), ("subsample", sub_record)):
        if rec is None:
            continue
        rows.append({"system": f"{method} (gated by the stage)", "metric": "kept by the validation gate",
                     "value": int(rec["kept"]), "unit": "bool", "setting": setting})
        for system in (f"{method} (gated by the stage)", f"{method} (ungated)"):
            for key, metric in (("worst_group_accuracy", "worst-group accuracy gain (target >= 10)"),
                                ("balanced_accuracy", "balanced accuracy change (target >= -1)")):
                rows.append({"system": system, "metric": metric, "value": 100 * (scores[system][key]
                             - scores["without"][key]), "unit": "points", "setting": setting})
    detail = {"jtt": record, "subsample": sub_record,
              "slices": slices.drop(columns=["members", "train_members"]).to_dict("records"), "summary": summary,
              "scores": scores, "discovery": {"sslvision": ours, "errors_only": errors_only, "kmeans": peer},
              "wall_s": wall,
              "first_model": {k: metrics[k] for k in ("balanced_accuracy", "worst_class", "worst_class_recall")}}
    return rows, detail


def last_layer(first: Any, data: Any, p: Any, slices: Any, marks: tuple[np.ndarray, np.ndarray], score: Any,
               c: float) -> dict[str, dict[str, float]]:
    """Last-layer retraining (Deep Feature Reweighting, Kirichenko et al. 2023) on the first classifier's features:
    a logistic regression (inverse strength ``c``) on its L2-normalised penultimate features, classes weighted
    equally and, within a class, its groups weighted equally: the training rows with no groups, with the true
    groups (class x mark: an oracle), and with the groups the discovered shortcut slices give (in or out of a
    shortcut slice's training rows: no mark needed); the validation rows (held out from the first training, as
    DFR does) with no groups and with the true groups (an oracle; the slices name no validation rows)."""
    from sklearn.linear_model import LogisticRegression

    from sslvision.metrics import l2_normalise
    from sslvision.models import embed

    train_marked, val_marked = marks
    k = len(data.classes)
    first.eval()
    feats = {name: l2_normalise(embed(first.encoder, split.images, p.eval_batch_size, "cpu"))
             for name, split in (("train", data.train), ("val", data.val), ("test", data.test))}
    in_slice = np.zeros(len(data.train), dtype=bool)
    for kind, members in zip(slices["kind"], slices["train_members"], strict=True):
        if kind == "shortcut":
            in_slice[np.asarray(members, dtype=int)] = True

    def weights(labels: np.ndarray, group: np.ndarray) -> np.ndarray:
        w = np.zeros(len(labels))
        for cls in range(k):
            in_cls = labels == cls
            present = np.unique(group[in_cls])
            for g in present:
                sel = in_cls & (group == g)
                w[sel] = 1.0 / (k * len(present) * sel.sum())
        return w * len(labels)

    out = {}
    for name, split, group in (("training rows, classes only", "train", np.zeros(len(data.train), dtype=int)),
                               ("training rows, true groups (oracle)", "train", train_marked.astype(int)),
                               ("training rows, discovered shortcut slices", "train", in_slice.astype(int)),
                               ("validation rows, classes only", "val", np.zeros(len(data.val), dtype=int)),
                               ("validation rows, true groups (oracle)", "val", val_marked.astype(int))):
        labels = data.train.labels if split == "train" else data.val.labels
        model = LogisticRegression(C=c, max_iter=3000).fit(feats[split], labels, sample_weight=weights(labels, group))
        out[f"last layer retrained: {name}"] = score(model.predict(feats["test"]))
    log.info("last layer: %d training rows in shortcut slices, %.0f%% of them marked", in_slice.sum(),
             100 * train_marked[in_slice].mean() if in_slice.any() else 0.0)
    return out


PLOTTED = ("without", "JTT (gated by the stage)", "subsample (gated by the stage)",
           "oracle: true groups weighted equally (a ceiling)")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Balanced and worst-group accuracy on the test split, per recipe, for the classifier without mitigation,
    each mitigation as the stage gates it, and the oracle re-weighting: ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in rows})
    metrics = ("balanced accuracy, test", "worst-group accuracy (class x mark), test")
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        values = {(r["system"], r["metric"]): r["value"] for r in rows if r["setting"] == setting}
        systems = [s for s in PLOTTED if (s, metrics[0]) in values]
        x = np.arange(len(systems))
        for i, metric in enumerate(metrics):
            bars = ax.bar(x + (i - 0.5) * 0.38, [values[(s, metric)] for s in systems], 0.38,
                          label=metric.split(",")[0])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(x, [s.split(" (")[0].replace("oracle: true groups weighted equally", "oracle groups")
                          for s in systems], fontsize=8)
        ax.set_ylim(0, 118)
        ax.set_ylabel("% (test split)")
        ax.set_title(setting, fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else str(value)


RECIPES = {
    "probe": {"mode": "linear_probe", "epochs": 30, "lr": 0.003, "layer_decay": 0.75, "label_smoothing": 0.0,
              "calibrate": False, "select_epoch": "best", "sampler": "random"},
    "demo": {},  # params.yaml's finetune section as it is: the noise-aware full fine-tune of `make demo`
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="keep scenario, encoder and audit here")
    ap.add_argument("--max-per-class", type=int, default=5000)
    ap.add_argument("--test-per-class", type=int, default=1000)
    ap.add_argument("--test-rate", type=float, default=0.1, help="demo.confounder_test_rate")
    ap.add_argument("--confounder", choices=["mark", "brightness"], default="mark", help="demo.confounder")
    ap.add_argument("--confounder-class", type=int, default=0, help="demo.confounder_class")
    ap.add_argument("--upweight", type=float, default=5.0, help="finetune.jtt_upweight")
    ap.add_argument("--recipes", nargs="+", default=["probe"], choices=list(RECIPES))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--mitigations", nargs="+", choices=["jtt", "oracle", "none"], default=["jtt", "oracle"],
                    help="measured besides subsample (each trains one more classifier); none: subsample alone")
    ap.add_argument("--seed", type=int, default=0, help="finetune.seed (validation split, init, batches, slices)")
    ap.add_argument("--name", default="confounders")
    ap.add_argument("--last-layer", action="store_true",
                    help="also retrain the first classifier's last layer (DFR) with no, true and discovered groups")
    ap.add_argument("--last-layer-c", type=float, default=0.3, help="inverse L2 strength of that regression")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sslvision-confounders-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ingested, scenario = build(root, args)
    pretrain(root, ingested)
    manifest = audit(root, ingested)
    paths = set(scenario["confounder"]["paths"])
    log.info("%d train and %d test images carry the mark", scenario["confounder"]["train_n"],
             scenario["confounder"]["test_n"])
    rows: list[dict] = []
    details: dict[str, Any] = {}
    for name in args.recipes:
        r, details[name] = run_recipe(name, RECIPES[name], root, ingested, manifest, paths, args)
        rows += r
        extra = {"scenario": {k: v for k, v in scenario["confounder"].items() if k != "paths"}, "details": details,
                 "wall_s": time.perf_counter() - t0, "load_average": os.getloadavg()[0]}
        path = report(args.name, rows, command=command_line(), extra=json.loads(json.dumps(extra, default=_plain)))
        plot(rows, path.with_suffix(".png"), f"{scenario['confounder']['kind']} on {scenario['confounder']['class']}"
             " in train, reversed in test: the mitigations as the finetune stage gates them")


if __name__ == "__main__":
    main()
