"""Monitoring on the demo scenario at any class mix: which metrics fire, which action the trigger takes,
and how well the class prior and the accuracy are estimated without labels (issue 23).

Batches (500 images, the demo's size), all with their true labels kept aside for scoring:

- **clean** at three class mixes, ``--clean-batches`` each: the training mix (the scenario's true
  long-tailed prior), balanced, and reversed (the rarest class gets the head's share); Fashion-MNIST
  train images the pipeline never trained on (in neither the scenario's train split nor a pool batch),
  without replacement within a batch. A balanced or reversed batch IS a label shift: the right action is
  a prior correction, and "re-run from pretrain" is a false alarm at every mix;
- **label shift**: ``--shift-batches`` more at random mixes (Dirichlet(1) over the classes);
- **corrupted**: the demo's own ``incoming/<corruption>_s<severity>`` batches (7 corruptions x 5
  severities, at the training mix, as CIFAR-10-C);
- **labelled noisy**: clean batches at the training mix given to drift_eval with labels, a share
  ``rate`` of them flipped to another class (0, 0.1, 0.2, 0.3, 0.4), ``--noisy-batches`` per rate.

The unseen images are embedded and predicted once (``--per-class`` per class) and batches are drawn
from that cache, so the whole run fits in a few minutes on 2 cores. Every batch goes through the stage's
own evaluation (``sslvision.drift.evaluate_batch`` with ``stages.drift_eval.build_reference``: the champion, or
``models/classifier`` before there is one) and ``sslvision.trigger.decide``. The prior is estimated
with each estimator (soft BBSE with its fallback to BBSE, BBSE, EM) for the report; the pipeline uses
``drift_eval.prior_method``.

Peers on the same batches:

- **BBSD** (black-box shift detection, Rabanser et al. 2019): a two-sample Kolmogorov-Smirnov test on
  each class's softmax output, batch vs the classifier's held-out train images, Bonferroni-corrected
  (drift when any p-value < alpha / classes). It detects any shift and cannot say which;
- **alibi-detect** 0.13 ``MMDDrift`` on raw pixels through its documented untrained autoencoder, and its
  ``ClassifierUncertaintyDrift`` (KS test on the entropy of the same classifier's softmax, reference: the
  classifier's probabilities on unseen images at the training mix), in its own virtual environment under
  ``benchmarks/.venvs/alibi`` (created on first use, ``pip install``; ``--peers alibi``): alibi-detect pins
  numpy<2, so it runs in a subprocess that exchanges ``.npy`` files.

Targets (issue 23): "re-run from pretrain" false alarms <= 5 % over the clean batches of each mix;
label-shift batches routed to the prior correction >= 90 %; corruption power >= 0.9 from severity 2;
estimated accuracy within 5 points of the truth (mean absolute error) on labelled batches; the prior
estimate's total-variation error <= 0.05 at batch size 500.

    nice -n 10 .venv/bin/python benchmarks/drift.py            # after `make demo`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VENVS = Path(__file__).resolve().parent / ".venvs"
PEERS = {"alibi": ["alibi-detect==0.13.0"]}
LABEL = "sslvision drift_eval + trigger"


# --- alibi-detect (runs inside its own venv: numpy, torch and alibi-detect only) ---------------------


def run_alibi(exchange: Path, names: list[str], alpha: float, permutations: int, seed: int) -> dict:
    from functools import partial

    import torch
    from alibi_detect.cd import ClassifierUncertaintyDrift, MMDDrift
    from alibi_detect.cd.pytorch import preprocess_drift
    from torch import nn

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    torch.manual_seed(seed)
    channels = np.load(exchange / "reference_images.npy", mmap_mode="r").shape[-1]
    encoder = nn.Sequential(  # alibi-detect's documented UAE (its CIFAR-10 example), sized for 28x28
        nn.Conv2d(channels, 64, 4, stride=2), nn.ReLU(), nn.Conv2d(64, 128, 4, stride=2), nn.ReLU(),
        nn.Conv2d(128, 512, 4, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(512, 32)).eval()

    def pixels(name: str) -> np.ndarray:
        return (np.load(exchange / f"{name}_images.npy").transpose(0, 3, 1, 2) / 255.0).astype(np.float32)

    preprocess = partial(preprocess_drift, model=encoder, device=torch.device("cpu"), batch_size=512)
    detector = MMDDrift(pixels("reference"), backend="pytorch", p_val=alpha, preprocess_fn=preprocess,
                        n_permutations=permutations, device="cpu")
    # the classifier runs in sslvision's environment: its probabilities come precomputed, the "model" is identity
    uncertainty = ClassifierUncertaintyDrift(np.load(exchange / "reference_probs.npy"), model=lambda x: x,
                                             p_val=alpha, preds_type="probs", uncertainty_type="entropy")
    return {name: {"drift": bool(detector.predict(pixels(name))["data"]["is_drift"]),
                   "uncertainty_drift": bool(uncertainty.predict(np.load(exchange / f"{name}_probs.npy"))
                                             ["data"]["is_drift"])} for name in names}


def peer_python(name: str) -> Path:
    """The peer's own venv (created and installed on first use; torch from this environment)."""
    import sysconfig

    venv = VENVS / name
    python, marker = venv / "bin" / "python", venv / ".sslvision-requirements"
    wanted = " ".join(PEERS[name])
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f">> creating {venv} with {wanted} (once)", flush=True)
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS[name]], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "zz_sslvision_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    marker.write_text(wanted)
    return python


# --- the batches ------------------------------------------------------------------------------------


def unseen_indices(scenario: Path, pool: Path) -> np.ndarray:
    """Fashion-MNIST train indices in neither the scenario's train split nor a batch in the SSL pool."""
    import pandas as pd

    truth = pd.read_parquet(scenario / "truth.parquet")
    from_train = truth["source_file"] == "train"
    pooled = {d.name for d in pool.iterdir()} if pool.is_dir() else set()
    used = truth.loc[from_train & ((truth["split"] == "train") | truth["batch"].isin(pooled)), "source_index"]
    return np.setdiff1d(np.arange(60000), used.to_numpy())


def draw(labels: np.ndarray, prior: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rows of the cache (labels ``labels``) at class prior ``prior``, without replacement."""
    from sslvision.drift import allocate

    counts = allocate(n, prior)
    return rng.permutation(np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                                           for c, k in enumerate(counts) if k]))


def bbsd(reference_probs: np.ndarray, probs: np.ndarray, alpha: float) -> bool:
    """Rabanser et al.'s BBSD: per-class KS tests on the softmax outputs, Bonferroni over the classes."""
    from scipy.stats import ks_2samp

    c = probs.shape[1]
    return bool(min(ks_2samp(reference_probs[:, k], probs[:, k]).pvalue for k in range(c)) < alpha / c)


# --- the run ---------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import command_line, report

    from sslvision.batches import read_batch
    from sslvision.demo import load_fashion_mnist
    from sslvision.drift import DriftParams, evaluate_batch, resample_to_prior
    from sslvision.models import embed
    from sslvision.params import load_section
    from sslvision.stages.drift_eval import build_reference
    from sslvision.trigger import decide

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    p = load_section("drift_eval", DriftParams, args.params)
    scenario_dir = Path(args.scenario)
    scenario = json.loads((scenario_dir / "scenario.json").read_text())
    reference, encoder, classifier, (size, _, channels) = build_reference(p, args.params)
    classes = reference.classes
    c = len(classes)
    print(f">> scoring {reference.model}; reference: {len(reference.embeddings)} test embeddings, calibration "
          f"{len(reference.calib_labels)}", flush=True)

    # the cache: unseen clean images, embedded and predicted once
    fm = load_fashion_mnist()
    rng = np.random.default_rng(args.seed)
    unseen = unseen_indices(scenario_dir, Path(args.pool))
    pick = np.concatenate([rng.choice(unseen[fm["train_labels"][unseen] == k], args.per_class, replace=False)
                           for k in range(c)])
    cache_images = fm["train_images"][pick][..., None]
    cache_labels = fm["train_labels"][pick].astype(np.int64)
    t0 = time.perf_counter()
    cache_emb = embed(encoder, cache_images, 512)
    cache_probs = classifier.predict_proba(cache_images, 512)
    n_embedded, t_embed = len(pick), time.perf_counter() - t0

    # batches: name -> dict(kind, mix, rows | images, labels given)
    n = scenario["params"]["incoming_batch_size"]
    train_prior = np.array(list(scenario["train"]["counts_true"].values()), dtype=float)
    train_prior /= train_prior.sum()
    mixes = {"training": train_prior, "balanced": np.full(c, 1.0 / c), "reversed": train_prior[::-1].copy()}
    batches: dict[str, dict] = {}
    # the peers' reference: cached images at the training mix that no batch contains (a shared image would make
    # a batch look like its reference)
    ref_rows = resample_to_prior(cache_labels, train_prior, 1000, args.seed) if args.peers else np.zeros(0, int)
    batch_labels = cache_labels.copy()
    batch_labels[ref_rows] = -1
    for mix, prior in mixes.items():
        for i in range(args.clean_batches):
            batches[f"clean_{mix}_{i:02d}"] = {"kind": "clean", "mix": mix, "rows": draw(batch_labels, prior, n, rng)}
    for i in range(args.shift_batches):
        prior = rng.dirichlet(np.ones(c))
        batches[f"shift_{i:02d}"] = {"kind": "label_shift", "mix": "dirichlet",
                                     "rows": draw(batch_labels, prior, n, rng)}
    for rate in args.noise_rates:
        for i in range(args.noisy_batches):
            rows = draw(batch_labels, train_prior, n, rng)
            given = cache_labels[rows].copy()
            flip = rng.random(n) < rate
            given[flip] = (given[flip] + rng.integers(1, c, flip.sum())) % c
            batches[f"noisy_{rate:.1f}_{i:02d}"] = {"kind": "labelled", "mix": "training", "rows": rows,
                                                    "given": given, "rate": rate}
    import pandas as pd

    truth = pd.read_parquet(scenario_dir / "truth.parquet")
    for b in scenario["incoming"]:
        if b["kind"] != "corruption":
            continue
        images, _ = read_batch(scenario_dir / "incoming" / b["name"], classes, channels, size)
        files = sorted(f.name for f in (scenario_dir / "incoming" / b["name"]).iterdir() if f.suffix == ".png")
        t = truth[truth["batch"] == b["name"]]
        by_file = dict(zip(t["path"].map(lambda s: Path(s).name), t["true_label"], strict=True))
        true = np.array([by_file.get(f, -1) for f in files]) if len(files) == len(images) else np.full(len(images), -1)
        t0 = time.perf_counter()
        emb, probs = embed(encoder, images, 512), classifier.predict_proba(images, 512)
        n_embedded, t_embed = n_embedded + len(images), t_embed + time.perf_counter() - t0
        batches[b["name"]] = {"kind": "corrupted", "mix": "training", "corruption": b["corruption"],
                              "severity": b["severity"], "emb": emb, "probs": probs, "true": true}
    print(f">> {len(batches)} batches; {n_embedded} images embedded once ({n_embedded / t_embed:.0f} img/s)",
          flush=True)

    per_batch: dict[str, dict] = {}
    bbsd_ref = reference.probs
    for i, (name, b) in enumerate(batches.items()):
        if "rows" in b:
            emb, probs, true = cache_emb[b["rows"]], cache_probs[b["rows"]], cache_labels[b["rows"]]
        else:
            emb, probs, true = b["emb"], b["probs"], b["true"]
        given = b.get("given")
        result = evaluate_batch(reference, emb, probs, given, p)
        d = decide(result["metrics"], batch=name)
        q_true = np.bincount(true[true >= 0], minlength=c) / max(np.sum(true >= 0), 1)
        known = bool(np.all(true >= 0))
        q: dict[str, np.ndarray] = {m: np.zeros(c) for m in ("bbse_soft", "bbse", "em")}
        for m in q:
            reference.prior_method = m
            q[m] = reference.estimate_prior(probs)
        reference.prior_method = p.prior_method
        acc_true = float(np.mean(probs.argmax(1) == true)) if known else None
        per_batch[name] = {
            "kind": b["kind"], "mix": b["mix"], "corruption": b.get("corruption"), "severity": b.get("severity"),
            "rate": b.get("rate"), "failed": result["failed"], "action": d.action, "stage": d.stage,
            "accuracy_estimate": result["accuracy"]["estimate"], "accuracy_true": acc_true,
            "prior_tv_error": {m: float(0.5 * np.abs(v - q_true).sum()) for m, v in q.items()} if known else None,
            "prior_estimate": np.round(q[p.prior_method], 4).tolist(), "prior_true": np.round(q_true, 4).tolist(),
            "label_noise_estimate": result["label_noise"]["estimate"] if result["label_noise"] else None,
            "threshold_warnings": result["threshold_warnings"],
            "bbsd_drift": bbsd(bbsd_ref, probs, p.alpha)}
        if (i + 1) % 20 == 0 or i + 1 == len(batches):
            print(f"   evaluated {i + 1}/{len(batches)} batches ({time.perf_counter() - t_start:.0f} s)", flush=True)

    alibi = {}
    if "alibi" in args.peers:
        python = peer_python("alibi")
        with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
            exchange = Path(tmp)
            np.save(exchange / "reference_images.npy", np.asarray(cache_images[ref_rows]))
            np.save(exchange / "reference_probs.npy", np.asarray(cache_probs[ref_rows]))
            names = list(batches)
            for name in names:
                b = batches[name]
                np.save(exchange / f"{name}_images.npy", cache_images[b["rows"]] if "rows" in b else
                        read_batch(scenario_dir / "incoming" / name, classes, channels, size)[0])
                np.save(exchange / f"{name}_probs.npy", cache_probs[b["rows"]] if "rows" in b else b["probs"])
            (exchange / "batches.json").write_text(json.dumps(names))
            subprocess.run([str(python), str(Path(__file__).resolve()), "--peer", "alibi", "--exchange", tmp,
                            "--alpha", str(p.alpha), "--seed", str(args.seed)], check=True,
                           env={**os.environ, "PYTHONWARNINGS": "ignore", "BENCH_THREADS": str(args.threads)})
            alibi = json.loads((exchange / "result_alibi.json").read_text())

    rows, table = summarise(per_batch, alibi, p.prior_method)
    elapsed = time.perf_counter() - t_start
    rows.append({"system": LABEL, "metric": "wall time", "value": round(elapsed, 1), "unit": "s (whole benchmark)",
                 "setting": f"{len(batches)} batches"})
    report("drift", rows, command="nice -n 10 .venv/bin/" + command_line(script="benchmarks/drift.py"),
           extra={"model": reference.model, "prior_method": p.prior_method, "batch_size": n,
                  "clean_batches_per_mix": args.clean_batches, "alibi": "alibi" in args.peers,
                  "targets": {"pretrain_false_alarms_per_mix": 0.05, "label_shift_to_prior_correction": 0.9,
                              "corruption_power_from_severity_2": 0.9, "accuracy_mae": 0.05, "prior_tv_error": 0.05},
                  "per_mix": table, "per_batch": per_batch})
    print(f"\nper mix (clean batches; {n} images each):")
    print(f"{'mix':10s} {'batches':>7s} {'pretrain':>9s} {'prior corr.':>11s} {'healthy':>8s} {'acc MAE':>8s} "
          f"{'prior TV':>9s}  fired (share)")
    for mix, r in table.items():
        print(f"{mix:10s} {r['batches']:7d} {r['pretrain']:9.2f} {r['prior_correction']:11.2f} {r['healthy']:8.2f} "
              f"{r['accuracy_mae']:8.3f} {r['prior_tv']:9.3f}  {r['fired']}")


def summarise(per_batch: dict[str, dict], alibi: dict, method: str) -> tuple[list[dict], dict]:
    """The report's rows and the per-mix table."""
    rows: list[dict] = []

    def share(names: list[str], test) -> float:
        return float(np.mean([test(per_batch[nm]) for nm in names])) if names else float("nan")

    def add(metric: str, value: float, unit: str, setting: str, system: str = LABEL) -> None:
        rows.append({"system": system, "metric": metric, "value": round(float(value), 4), "unit": unit,
                     "setting": setting})

    table = {}
    for mix in ("training", "balanced", "reversed"):
        names = [nm for nm, b in per_batch.items() if b["kind"] == "clean" and b["mix"] == mix]
        fired = {}
        for nm in names:
            for m in per_batch[nm]["failed"]:
                fired[m] = fired.get(m, 0) + 1
        table[mix] = {"batches": len(names), "pretrain": share(names, lambda b: b["stage"] == "pretrain"),
                      "prior_correction": share(names, lambda b: b["action"] == "prior_correction"),
                      "healthy": share(names, lambda b: b["action"] is None),
                      "retrain_any": share(names, lambda b: b["action"] == "retrain"),
                      "accuracy_mae": float(np.mean([abs(per_batch[nm]["accuracy_estimate"] -
                                                         per_batch[nm]["accuracy_true"]) for nm in names])),
                      "prior_tv": float(np.mean([per_batch[nm]["prior_tv_error"][method] for nm in names])),
                      "fired": {m: round(k / len(names), 3) for m, k in sorted(fired.items())}}
        add("re-run from pretrain (false alarm)", table[mix]["pretrain"], f"share of {len(names)} clean batches", mix)
        add("any retrain (false alarm)", table[mix]["retrain_any"], f"share of {len(names)} clean batches", mix)
        add("prior correction", table[mix]["prior_correction"], f"share of {len(names)} clean batches", mix)
        for m, v in table[mix]["fired"].items():
            add(f"fired: {m}", v, f"share of {len(names)} clean batches", mix)
        add("BBSD reports drift", share(names, lambda b: b["bbsd_drift"]), f"share of {len(names)} clean batches",
            mix, "BBSD (KS on softmax, Bonferroni)")
        if alibi:
            add("MMD reports drift", float(np.mean([alibi[nm]["drift"] for nm in names])),
                f"share of {len(names)} clean batches", mix, "alibi-detect MMDDrift (UAE)")
            add("uncertainty drift reported", float(np.mean([alibi[nm]["uncertainty_drift"] for nm in names])),
                f"share of {len(names)} clean batches", mix, "alibi-detect ClassifierUncertaintyDrift")

    shifted = [nm for nm, b in per_batch.items() if b["kind"] == "label_shift"
               or (b["kind"] == "clean" and b["mix"] != "training")]
    add("label-shift batches routed to prior correction", share(shifted, lambda b: b["action"] == "prior_correction"),
        f"share of {len(shifted)} batches", "balanced + reversed + Dirichlet mixes")
    add("label-shift batches re-run from pretrain", share(shifted, lambda b: b["stage"] == "pretrain"),
        f"share of {len(shifted)} batches", "balanced + reversed + Dirichlet mixes")

    corrupted = [nm for nm, b in per_batch.items() if b["kind"] == "corrupted"]
    for corruption in sorted({per_batch[nm]["corruption"] for nm in corrupted}):
        for sev in range(1, 6):
            names = [nm for nm in corrupted if per_batch[nm]["corruption"] == corruption
                     and per_batch[nm]["severity"] == sev]
            add("re-run from pretrain", share(names, lambda b: b["stage"] == "pretrain"),
                f"share of {len(names)} batches", f"{corruption} severity {sev}")
    strong = [nm for nm in corrupted if per_batch[nm]["severity"] >= 2]
    add("corruption power (re-run from pretrain)", share(strong, lambda b: b["stage"] == "pretrain"),
        f"share of {len(strong)} batches", "severity >= 2")
    add("corruption power (any action)", share(strong, lambda b: b["action"] is not None),
        f"share of {len(strong)} batches", "severity >= 2")
    add("detects corruption", share(strong, lambda b: b["bbsd_drift"]), f"share of {len(strong)} batches",
        "severity >= 2", "BBSD (KS on softmax, Bonferroni)")
    if alibi:
        add("detects corruption", float(np.mean([alibi[nm]["drift"] for nm in strong])),
            f"share of {len(strong)} batches", "severity >= 2", "alibi-detect MMDDrift (UAE)")
        add("detects corruption", float(np.mean([alibi[nm]["uncertainty_drift"] for nm in strong])),
            f"share of {len(strong)} batches", "severity >= 2", "alibi-detect ClassifierUncertaintyDrift")

    labelled = [nm for nm, b in per_batch.items() if b["accuracy_true"] is not None and b["kind"] != "labelled"]
    errors = [abs(per_batch[nm]["accuracy_estimate"] - per_batch[nm]["accuracy_true"]) for nm in labelled]
    add("accuracy estimate MAE (no labels used)", np.mean(errors), f"accuracy, over {len(errors)} batches",
        "every batch with known truth")
    for kind in ("clean", "label_shift", "corrupted"):
        names = [nm for nm in labelled if per_batch[nm]["kind"] == kind]
        if names:
            add("accuracy estimate MAE (no labels used)", np.mean(
                [abs(per_batch[nm]["accuracy_estimate"] - per_batch[nm]["accuracy_true"]) for nm in names]),
                f"accuracy, over {len(names)} batches", kind)
    for m in ("bbse_soft", "bbse", "em"):
        names = [nm for nm, b in per_batch.items() if b["prior_tv_error"] and b["kind"] in ("clean", "label_shift")]
        add(f"prior estimate TV error ({m})", np.mean([per_batch[nm]["prior_tv_error"][m] for nm in names]),
            f"mean over {len(names)} clean + label-shift batches", "batch size 500")
    for rate in sorted({b["rate"] for b in per_batch.values() if b["kind"] == "labelled"}):
        names = [nm for nm, b in per_batch.items() if b["kind"] == "labelled" and b["rate"] == rate]
        add("labelled batches re-run from audit", share(names, lambda b: b["stage"] == "audit"),
            f"share of {len(names)} batches", f"label noise {rate:.1f}")
        add("label noise estimate", np.mean([per_batch[nm]["label_noise_estimate"] for nm in names]),
            "share of labels", f"label noise {rate:.1f}")
    return rows, table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="data/demo", help="demo scenario directory (scenario.json, incoming/)")
    ap.add_argument("--pool", default="data/pool", help="pool batches (their images count as seen)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--clean-batches", type=int, default=20, help="clean batches per class mix")
    ap.add_argument("--shift-batches", type=int, default=20, help="batches at random (Dirichlet) class mixes")
    ap.add_argument("--noisy-batches", type=int, default=3, help="labelled batches per label-noise rate")
    ap.add_argument("--noise-rates", type=float, nargs="*", default=[0.0, 0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--per-class", type=int, default=800,
                    help="unseen images per class embedded once (a reversed batch needs ~0.35 x 500 of one class)")
    ap.add_argument("--peers", nargs="*", default=[], choices=["alibi"],
                    help="alibi: also run alibi-detect's MMDDrift and ClassifierUncertaintyDrift in its own venv "
                    "(installed on first use)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer", choices=list(PEERS), help=argparse.SUPPRESS)
    ap.add_argument("--exchange", help=argparse.SUPPRESS)
    ap.add_argument("--alpha", type=float, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.peer:
        exchange_dir = Path(arguments.exchange)
        result = run_alibi(exchange_dir, json.loads((exchange_dir / "batches.json").read_text()), arguments.alpha,
                           100, arguments.seed)
        (exchange_dir / "result_alibi.json").write_text(json.dumps(result))
    else:
        os.chdir(ROOT)
        main(arguments)
