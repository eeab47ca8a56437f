"""Does rare-class synthesis help the tail? The classifier trained with no synthetic data, with the
``augment`` baseline and with each learned generator.

Inputs: the outputs of a pipeline run under ``--root`` (``data/audit/manifest_clean.parquet``,
``data/ingested/``, ``models/encoder/``, ``data/embeddings/``, as ``dvc repro audit`` leaves them), or,
when they are absent, the demo scenario built here under ``--work`` with the libraries:
``sslvision.demo.build_scenario`` (params.yaml ``demo`` defaults: Fashion-MNIST, long tail of ratio
100, 20% asymmetric label noise; no production batches), ``sslvision.ingest.run_ingest``,
``sslvision.stages.pretrain.run_stage`` (params.yaml ``pretrain``; ``--epochs`` / ``--steps-per-epoch``
override it) and ``sslvision.audit.run_audit`` (params.yaml ``audit``).

Each system: ``sslvision.synthesize.synthesize`` with params.yaml's ``synthesize`` section and the
generator named (``none``: no synthesis), then a classifier on real + kept synthetic data, by ``--eval``:

- ``finetune`` (default): the finetune stage itself (``sslvision.finetune.run_finetune`` with
  params.yaml's ``finetune`` section, ``--finetune-set`` overrides, registry off): what the pipeline
  deploys. With the demo defaults that is a linear probe on the frozen encoder trained with the
  logit-adjusted loss, whose prior counts the synthetic images; ``--finetune-set mode='"finetune"'`` etc.
  give the full fine-tune of ``profiles/cpu.yaml``. Compute is the stage's: epochs over real +
  synthetic images (up to ~14% more steps with synthesis on the demo);
- ``probe``: a plain cross-entropy softmax probe on standardised embeddings, trained for the same number
  of steps and batch size whatever the training-set size (equal compute), the protocol of the runs
  made before the finetune stage existed. With no prior correction, much of what synthesis adds there is
  rebalancing (compare the ``none (class-balanced sampler)`` row).

Results are averaged over ``--probe-seeds`` classifier seeds and, for a generator, over its runs with each
of ``--synth-seeds`` (one synthesis seed moves mean tail recall by up to ~1 point; the per-seed values and
their standard deviation are reported too). Evaluation: the clean, balanced ``test`` split. Reported:
recall of each of the 3 rarest classes (clean train counts) and their mean, balanced accuracy, and the
fidelity metrics of the synthetic set (per tail class: kept, Fréchet distance, k-NN precision/recall in
SSL space). Reference row ``none (class-balanced sampler)``: no synthesis, every class drawn equally
often (what rebalancing alone gives).

Target (issue 5): the best generator adds >= 5 points of mean tail recall over ``none`` and beats ``augment``.

The ``oracle`` system is the ceiling of that target: instead of synthetic images it adds, at the counts the
plan asks for, real Fashion-MNIST train images of the planned classes that the demo scenario never used (read
from its ``truth.parquet``), correctly labelled. No generator can do better than new real images of the class,
so when the oracle's gain over ``none`` is below 5 points the target is out of reach of every generator on that
encoder and classifier (``verdict.target_reachable_by_any_generator``). Demo scenario only.

    nice -n 10 .venv/bin/python benchmarks/synthesize.py            # reuses ./data when a dvc repro made it
    .venv/bin/python benchmarks/synthesize.py --synth-seeds 0 1 2 --generators augment mae_inpaint
    .venv/bin/python benchmarks/synthesize.py --generators augment --probe-seeds 1   # quick look
    .venv/bin/python benchmarks/synthesize.py --eval probe --name synthesize_probe   # the older protocol
    .venv/bin/python benchmarks/synthesize.py --generators augment mae_inpaint mae_inpaint@pre_augment=true
                                                    # GENERATOR@KEY=JSON: a variant of that generator
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, results_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.synthesize")


@dataclass
class Inputs:
    manifest: Path
    ingested: Path
    encoder: Path
    embeddings: Path
    origin: str
    truth: Path  # the demo scenario's truth.parquet (the oracle system's record of which images are used)


def find_or_build(root: Path, work: Path, epochs: int | None, steps_per_epoch: int | None) -> Inputs:
    """The pipeline outputs under ``root``, or the demo scenario built (once) under ``work``."""
    have = Inputs(root / "data/audit/manifest_clean.parquet", root / "data/ingested", root / "models/encoder",
                  root / "data/embeddings", f"pipeline outputs under {root}", root / "data/demo/truth.parquet")
    if all(p.exists() for p in (have.manifest, have.ingested / "images.npy", have.encoder / "config.json",
                                have.embeddings / "embeddings.npy")):
        return have
    from sslvision.audit import AuditParams, run_audit
    from sslvision.data import Ingested, load_embeddings
    from sslvision.demo import DemoParams, build_scenario
    from sslvision.ingest import IngestParams, run_ingest
    from sslvision.params import load_section
    from sslvision.pretrain import PretrainParams
    from sslvision.stages.pretrain import run_stage

    built = Inputs(work / "manifest_clean.parquet", work / "ingested", work / "encoder", work / "embeddings",
                   f"demo scenario built in {work}", work / "raw/truth.parquet")
    if built.manifest.exists():
        return built
    log.info("building the demo scenario in %s (scenario, ingest, pretrain, audit; finished steps are reused)", work)
    params = REPO / "params.yaml"
    if not (work / "raw/scenario.json").exists():
        demo = load_section("demo", DemoParams, params,
                            overrides={"clean_batches": 0, "corruptions": [], "severities": [1]})
        build_scenario(work / "raw", demo, progress=False)
    if not (built.ingested / "manifest.parquet").exists():
        run_ingest(IngestParams(workers=1, cache_dir=str(work / "cache")), work / "raw/images", built.ingested, None)
    if not (built.embeddings / "embeddings.npy").exists():
        over = {"checkpoint_dir": str(work / "checkpoints")}
        if epochs:
            over["epochs"] = epochs
        if steps_per_epoch:
            over["steps_per_epoch"] = steps_per_epoch
        run_stage(load_section("pretrain", PretrainParams, params, overrides=over), built.ingested, built.encoder,
                  built.embeddings, work / "reports_pretrain")
    ing = Ingested.load(built.ingested)
    _, clean, _ = run_audit(load_section("audit", AuditParams, params), ing.manifest,
                            load_embeddings(built.embeddings), ing.classes, images=ing.images)
    clean.to_parquet(built.manifest, index=False)
    return built


def test_split(inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and clean labels of the ``test`` split."""
    from sslvision.data import load_embeddings

    images = pd.read_parquet(inputs.ingested / "images.parquet")
    labels = pd.read_parquet(inputs.ingested / "eval_labels.parquet")
    test = images[images["split"] == "test"].merge(labels[["id", "label"]], on="id").sort_values("index")
    emb = load_embeddings(inputs.embeddings)
    return np.asarray(emb[test["index"].to_numpy()], dtype=np.float32), test["label"].to_numpy().astype(np.int64)


def linear_probe(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, num_classes: int, mean: np.ndarray,
                 std: np.ndarray, steps: int, batch_size: int, seed: int, balanced: bool = False) -> np.ndarray:
    """Test predictions of a softmax probe trained ``steps`` steps of ``batch_size`` samples (equal compute)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y)
    head = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = torch.from_numpy(1.0 / counts[y] if balanced else np.ones(len(y)))
    for _ in range(steps):
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=g)
        loss = torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return head(torch.from_numpy((x_test - mean) / std)).argmax(1).numpy()


def unseen_images(truth: Path) -> tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST train images (and true labels) that the demo scenario never wrote: in no split, no
    production batch, no duplicate. What the ``oracle`` system draws from."""
    from sslvision.demo import load_fashion_mnist

    if not truth.exists():
        raise FileNotFoundError(f"{truth}: the oracle system needs the demo scenario's truth.parquet (which "
                                "Fashion-MNIST images it used); it only exists for the demo scenario")
    t = pd.read_parquet(truth, columns=["source_file", "source_index"])
    fm = load_fashion_mnist()
    unseen = ~np.isin(np.arange(len(fm["train_labels"])), t.loc[t["source_file"] == "train", "source_index"])
    return fm["train_images"][unseen], fm["train_labels"][unseen]


def oracle_images(unseen: tuple[np.ndarray, np.ndarray], plans, shape: tuple[int, ...],
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """What a perfect generator would add: for each planned class, ``need`` of the ``unseen`` images of that
    class with their true labels. New i.i.d. draws of the class, each one novel and correctly labelled, so the
    classifier's gain from them bounds what any generator can add at the same count, on the same encoder."""
    x, y = unseen
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for plan in plans:
        of_class = np.flatnonzero(y == plan.label)
        if len(of_class) < plan.need:
            raise ValueError(f"only {len(of_class)} unseen {plan.name} images for the {plan.need} wanted")
        pick = rng.choice(of_class, size=plan.need, replace=False)
        images.append(np.broadcast_to(x[pick][..., None], (plan.need, *shape)).copy())
        labels.append(np.full(plan.need, plan.label, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def recalls(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    return np.array([(y_pred[y_true == c] == c).mean() for c in range(num_classes)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=REPO, help="project root whose data/ and models/ to reuse")
    ap.add_argument("--work", type=Path, default=None, help="where to build the demo pipeline when --root has none")
    ap.add_argument("--generators", nargs="+", default=["augment", "mae_inpaint", "mae_inpaint@pre_augment=true",
                                                             "feature_interp", "oracle"],
                    help="generators (GENERATOR@KEY=JSON: a variant) and 'oracle': unseen real images of the planned "
                         "classes at the planned counts (demo scenario only), the ceiling of any generator")
    ap.add_argument("--epochs", type=int, default=None, help="pretrain epochs when building (default: params.yaml)")
    ap.add_argument("--steps-per-epoch", type=int, default=None, help="pretrain steps per epoch when building")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    ap.add_argument("--probe-steps", type=int, default=2000)
    ap.add_argument("--probe-batch", type=int, default=256)
    ap.add_argument("--probe-seeds", type=int, default=3)
    ap.add_argument("--synth-seeds", type=int, nargs="+", default=None,
                    help="synthesis seeds (synthesize.seed) each generator runs with; its recalls are averaged over "
                         "them (one seed's tail recall moves by ~1 point). Default: params.yaml's seed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a synthesize param for every generator, e.g. --set filter.min_confidence=0.3")
    ap.add_argument("--eval", choices=["finetune", "probe"], default="finetune",
                    help="finetune: the finetune stage with params.yaml's finetune section (what the pipeline "
                         "deploys; its seed varies with --probe-seeds) | probe: a plain cross-entropy softmax probe "
                         "on the embeddings at a fixed step count (the protocol of the runs before the stage existed)")
    ap.add_argument("--finetune-set", action="append", default=[], metavar="KEY=JSON",
                    help="--eval finetune: override a finetune param, e.g. --finetune-set mode='\"finetune\"'")
    ap.add_argument("--name", default="synthesize", help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from sslvision.models import embed, load_encoder
    from sslvision.params import load_section
    from sslvision.stages.synthesize import load_real
    from sslvision.synthesize import SynthesizeParams, load_pretrain_decoder, plan_classes, synthesize

    work = args.work or Path(tempfile.mkdtemp(prefix="synth-bench-"))
    inputs = find_or_build(args.root, work, args.epochs, args.steps_per_epoch)
    log.info("inputs: %s", inputs.origin)
    real = load_real(inputs.manifest, inputs.ingested, inputs.embeddings)
    encoder = load_encoder(inputs.encoder)
    decoder, norm_pix = load_pretrain_decoder(inputs.encoder)
    x_test, y_test = test_split(inputs)
    k = len(real.classes)
    counts = np.bincount(real.labels, minlength=k)
    tail = [int(c) for c in np.argsort(counts, kind="stable")[:3]]
    tail_names = [real.classes[c] for c in tail]
    mean, std = real.embeddings.mean(0), real.embeddings.std(0) + 1e-6
    overrides = _nested(args.set)
    finetune_overrides = _nested(args.finetune_set)

    rows: list[dict] = []
    summary: dict[str, dict] = {}
    synth_seeds: list[int | None] = list(args.synth_seeds) if args.synth_seeds else [None]
    systems = [("none", None, False), ("none (class-balanced sampler)", None, True)]
    systems += [(_system_name(g), g, False) for g in args.generators]
    for system, spec, balanced in systems:
        extra_rows: list[dict] = []
        if not spec:
            runs = [(real.embeddings, real.labels, None)]
        elif spec == "oracle":  # unseen real images at the plan's counts: the ceiling of any generator
            runs = []
            unseen = unseen_images(inputs.truth)
            for synth_seed in synth_seeds:
                p = load_section("synthesize", SynthesizeParams, REPO / "params.yaml",
                                 overrides={**overrides, **({"seed": synth_seed} if synth_seed is not None else {})})
                images, labels = oracle_images(unseen, plan_classes(real.labels, real.classes, p),
                                               real.images.shape[1:], p.seed)
                if args.eval == "probe":  # the probe trains on embeddings; the finetune stage embeds by itself
                    runs.append((np.concatenate([real.embeddings, embed(encoder, images)]),
                                 np.concatenate([real.labels, labels]), None))
                else:
                    runs.append((None, None, (images, labels)))
            extra_rows.append({"system": system, "metric": "synthetic kept (all classes)", "value": len(labels),
                               "unit": "images"})
        else:
            generator, *variant = spec.split("@")
            runs = []
            for seed_i, synth_seed in enumerate(synth_seeds):
                over = copy.deepcopy(overrides)
                for item in variant:  # GENERATOR@KEY=JSON: that generator with its section's KEY set
                    key, value = _split_setting(item, f"{generator}@")
                    over.setdefault(generator, {})[key] = value
                if synth_seed is not None:
                    over["seed"] = synth_seed
                p = load_section("synthesize", SynthesizeParams, REPO / "params.yaml",
                                 overrides={**over, "generator": generator})
                t0 = time.perf_counter()
                result = synthesize(real, encoder, p, decoder, norm_pix)
                seconds = time.perf_counter() - t0
                runs.append((np.concatenate([real.embeddings, result.embeddings]),
                             np.concatenate([real.labels, result.manifest["label"].to_numpy()]),
                             (result.images, result.manifest["label"].to_numpy()) if args.eval == "finetune" else None))
                if seed_i == 0:  # the fidelity rows and the grid: the first synthesis seed's
                    extra_rows += _fidelity_rows(system, result.metrics, tail_names, seconds)
                    _save_grid(result, real, p, results_dir(args.name) /
                               f"{args.name}_grid_{generator}{'-variant' if variant else ''}.png")
        if args.eval == "probe":
            per_run = [np.mean([recalls(y_test, linear_probe(x, y, x_test, k, mean, std, args.probe_steps,
                                                             args.probe_batch, seed, balanced), k)
                                for seed in range(args.probe_seeds)], axis=0) for x, y, _ in runs]
        else:
            per_run = [np.mean([stage_recalls(inputs, synthetic, seed, balanced, finetune_overrides, real.classes)
                                for seed in range(args.probe_seeds)], axis=0) for _, _, synthetic in runs]
        rec = np.mean(per_run, axis=0)
        per_seed = [float(r[tail].mean()) for r in per_run]  # mean tail recall of each synthesis seed
        if spec and len(per_run) > 1:
            tails = [100 * t for t in per_seed]
            extra_rows += [{"system": system, "metric": f"mean tail recall (synthesis seed {sd})", "value": round(t, 2),
                            "unit": "%"} for sd, t in zip(synth_seeds, tails, strict=True)]
            extra_rows.append({"system": system, "metric": "mean tail recall, std over synthesis seeds",
                               "value": round(float(np.std(tails, ddof=1)), 2), "unit": "points"})
        tail_mean = float(rec[tail].mean())
        summary[system] = {"tail_recall": tail_mean, "balanced_accuracy": float(rec.mean()),
                           "per_seed": per_seed}
        log.info("%s: tail recall %.1f%%, balanced accuracy %.1f%%", system, 100 * tail_mean, 100 * rec.mean())
        rows += [{"system": system, "metric": f"recall/{real.classes[c]}", "value": round(100 * float(rec[c]), 2),
                  "unit": "%"} for c in tail]
        rows += [{"system": system, "metric": "mean tail recall (3 rarest)", "value": round(100 * tail_mean, 2),
                  "unit": "%"},
                 {"system": system, "metric": "balanced accuracy", "value": round(100 * float(rec.mean()), 2),
                  "unit": "%"}]
        rows += extra_rows

    gens = [s for s, g, _ in systems[2:] if not g.startswith(("augment", "oracle"))]
    best = max(gens, key=lambda g: summary[g]["tail_recall"]) if gens else None
    verdict = None
    if best:
        gain = 100 * (summary[best]["tail_recall"] - summary["none"]["tail_recall"])
        verdict = {"best_generator": best, "tail_recall_gain_points": round(gain, 2)}
        if "augment" in summary:
            # "beats" only beyond the synthesis-seed noise: a margin of more than two standard errors of the
            # difference of the two seed means (with a single seed there is no noise estimate: any margin)
            a, b = np.array(summary[best]["per_seed"]), np.array(summary["augment"]["per_seed"])
            margin = 100 * (a.mean() - b.mean())
            se = (100 * float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
                  if min(len(a), len(b)) > 1 else 0.0)
            beats = margin > 2 * se
            verdict |= {"margin_over_augment_points": round(margin, 2), "margin_standard_error": round(se, 2)}
        else:
            beats = True
        verdict |= {"beats_augment": bool(beats), "target_met": bool(gain >= 5 and beats)}
        rows.append({"system": best, "metric": "tail recall gain over none", "value": round(gain, 2), "unit": "points"})
    if "oracle" in summary:  # the ceiling: what a perfect generator adds at the same counts
        ceiling = 100 * (summary["oracle"]["tail_recall"] - summary["none"]["tail_recall"])
        verdict = (verdict or {}) | {
            "oracle_tail_recall_gain_points": round(ceiling, 2),
            "oracle_balanced_accuracy_gain_points": round(
                100 * (summary["oracle"]["balanced_accuracy"] - summary["none"]["balanced_accuracy"]), 2),
            "target_reachable_by_any_generator": bool(ceiling >= 5)}
        rows.append({"system": "oracle", "metric": "tail recall gain over none", "value": round(ceiling, 2),
                     "unit": "points"})
    report(args.name, rows, extra={
        "evaluation": (f"finetune stage ({_finetune_setting(finetune_overrides)}), seeds 0..{args.probe_seeds - 1}"
                       if args.eval == "finetune" else
                       f"cross-entropy softmax probe, {args.probe_steps} steps of {args.probe_batch}, "
                       f"seeds 0..{args.probe_seeds - 1}"),
        "inputs": inputs.origin, "tail_classes": tail_names,
        "real_train_counts": {n: int(c) for n, c in zip(real.classes, counts, strict=True)},
        "probe": {"steps": args.probe_steps, "batch_size": args.probe_batch, "seeds": args.probe_seeds},
        "synthesis_seeds": synth_seeds,
        "overrides": overrides, "verdict": verdict,
        "encoder": json.loads((inputs.encoder / "config.json").read_text()).get("method", "?"),
    })


def _split_setting(item: str, where: str = "") -> tuple[str, object]:
    """``"KEY=JSON"`` -> ``(KEY, value)``; a clear error for a missing ``=`` or a value that is not JSON
    (strings need JSON quotes, which the shell removes unless the whole setting is quoted)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"{where}{item}: expected KEY=JSON, e.g. epochs=16 or 'mode=\"finetune\"'")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        raise SystemExit(f"{where}{item}: {value!r} is not JSON; quote a string for the shell and for JSON, "
                         f"e.g. '{key}=\"{value}\"'") from None


def _nested(items: list[str]) -> dict:
    """``["a.b=1", "c=2"]`` -> ``{"a": {"b": 1}, "c": 2}`` (values are JSON)."""
    out: dict = {}
    for item in items:
        key, value = _split_setting(item)
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _finetune_params(overrides: dict):
    from sslvision.finetune import FinetuneParams
    from sslvision.stages.finetune import load_params

    base = load_params(REPO / "params.yaml").model_dump()
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return FinetuneParams.model_validate(base)


def _finetune_setting(overrides: dict) -> str:
    p = _finetune_params(overrides)
    return (f"mode {p.mode}, loss {p.loss}, sampler {p.sampler}, epochs {p.epochs}, select {p.select_epoch}, "
            f"calibrate {p.calibrate}, synthetic_weight {p.synthetic_weight}")


def stage_recalls(inputs: Inputs, synthetic: tuple[np.ndarray, np.ndarray] | None, seed: int, balanced: bool,
                  overrides: dict, classes: list[str]) -> np.ndarray:
    """Per-class test recall of the finetune stage (``sslvision.finetune.run_finetune``: params.yaml's finetune
    section with ``overrides``, registry off) trained on the audited manifest plus ``synthetic`` (images, labels),
    written where the stage reads them; ``balanced`` uses the stage's class-balanced sampler."""
    from sslvision.stages.finetune import run_finetune

    with tempfile.TemporaryDirectory(prefix="synth-bench-ft-") as tmp:
        synth_dir = Path(tmp) / "synthetic"
        if synthetic is not None and len(synthetic[1]):
            synth_dir.mkdir()
            np.save(synth_dir / "images.npy", synthetic[0])
            pd.DataFrame({"index": np.arange(len(synthetic[1]), dtype=np.int64),
                          "label": synthetic[1].astype(np.int64)}).to_parquet(synth_dir / "manifest.parquet")
        over = copy.deepcopy(overrides)
        over |= {"encoder": str(inputs.encoder), "ingested": str(inputs.ingested), "manifest": str(inputs.manifest),
                 "synthetic": str(synth_dir), "out": str(Path(tmp) / "classifier"), "seed": seed,
                 "registry": {**over.get("registry", {}), "enabled": False}}
        if balanced:
            over["sampler"] = "class_balanced"
        _, _, _, m, _ = run_finetune(_finetune_params(over))
    return np.array([m["per_class_recall"][c] for c in classes], dtype=np.float64)


def _fidelity_rows(system: str, m: dict, tail_names: list[str], seconds: float) -> list[dict]:
    """Rows of one synthesis run's metrics: kept, accept rate, time, fidelity overall and per tail class."""
    rows = [{"metric": "synthetic kept (all classes)", "value": m["kept"], "unit": "images"},
            {"metric": "filter accept rate", "value": m["accept_rate"], "unit": ""},
            {"metric": "synthesis time", "value": seconds, "unit": "s"},
            {"metric": "Fréchet distance (all synthesised classes)", "value": m["all_frechet"], "unit": ""},
            {"metric": "k-NN precision (all)", "value": m["all_precision"], "unit": ""},
            {"metric": "k-NN recall (all)", "value": m["all_recall"], "unit": ""}]
    for name in tail_names:
        c = m["classes"].get(name)
        if c is not None:
            rows += [{"metric": f"kept/{name}", "value": c["kept"], "unit": "images"},
                     {"metric": f"Fréchet/{name}", "value": c["frechet"], "unit": ""},
                     {"metric": f"k-NN precision/{name}", "value": c["precision"], "unit": ""},
                     {"metric": f"k-NN recall/{name}", "value": c["recall"], "unit": ""}]
    return [{"system": system, **r} for r in rows]


def _system_name(spec: str) -> str:
    """``mae_inpaint@pre_augment=true`` -> ``mae_inpaint (pre_augment=true)``."""
    generator, *variant = spec.split("@")
    return f"{generator} ({', '.join(variant)})" if variant else generator


def _save_grid(result, real, params, path: Path) -> None:
    """The sample grid as ``path``, unless a PNG beside it has the same bytes (a run that changes only the
    classifier draws the same images again): then it is not written twice, and the log names the copy."""
    import io

    import matplotlib.pyplot as plt

    from sslvision.stages.synthesize import sample_grid

    fig = sample_grid(result, real, params.grid_columns)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    same = [q for q in sorted(path.parent.glob("*.png")) if q != path and q.read_bytes() == data]
    if same:
        log.info("sample grid: the same images as %s (not written again as %s)", same[0], path.name)
        return
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


if __name__ == "__main__":
    main()
