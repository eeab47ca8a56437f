"""Input-drift detection on the demo scenario: this stage's MMD test on SSL embeddings against
alibi-detect's MMDDrift (untrained-autoencoder preprocessing) and evidently's embedding drift.

Batches (500 images each, the demo's size):

- **corrupted**: the demo's own ``incoming/<corruption>_s<severity>`` batches (7 corruptions x 5
  severities, one base set of unseen train images, as CIFAR-10-C); ``--repeats R`` adds R-1 more per
  corruption and severity, made with the demo's own albumentations transforms from fresh clean batches;
- **clean**: the demo's ``clean_*`` batches plus more, up to ``--clean-batches``, drawn like them:
  Fashion-MNIST train images the pipeline never trained on (in neither the scenario's train split nor
  a pool batch), with the train split's true class prior; without replacement within a batch and
  independently across batches (the unseen head-class images are too few for 20 disjoint batches).
- the demo's ``prior_shift`` batch (reported, not part of the targets).

The reference is the stage's: a fixed random sample of ``drift_eval.reference_size`` ingested train
images (``drift_eval.seed``), the same for every system. Detectors, each at the significance level
``drift_eval.alpha`` of params.yaml:

- **sslvision**: ``sslvision.drift.mmd_permutation_test`` on the SSL embeddings of the pipeline's
  encoder (``models/encoder``, reference embeddings from ``data/embeddings``; without them, a quick
  encoder is trained with the pretrain library and the report says so), with the stage's
  ``drift_eval`` params. When ``models/classifier`` exists (finetune has run), every batch also goes
  through the stage's whole evaluation (``evaluate_batch``) and ``sslvision.trigger.decide``: the
  report adds the share of clean batches where nothing re-runs, of corrupted ones re-run from
  pretrain, and each metric's false alarms;
- **alibi-detect** 0.13 ``MMDDrift`` (PyTorch backend) on raw pixels through the untrained
  autoencoder of its documentation (three stride-2 convolutions and a linear layer to 32 dimensions,
  random weights), with its default 100 permutations (``--peer-permutations``; it re-indexes the
  whole kernel matrix once per permutation, so 500 would cost minutes per batch on 2 cores);
- **evidently** 0.7 embedding drift on the same SSL embeddings, with the method its
  ``EmbeddingsDriftMetric`` uses by default (``model``: a linear classifier tells reference from batch,
  drift when its ROC AUC exceeds 0.55); called directly, without the report's t-SNE picture.

alibi-detect pins numpy<2 and evidently's legacy API needs pandas<3, so each runs in its own virtual
environment under ``benchmarks/.venvs/`` (created on first use: ``pip install`` from the package
index), in a subprocess that exchanges ``.npy`` files with this one. alibi-detect's venv reuses this
environment's torch (a ``.pth`` line after its own site-packages) rather than downloading another;
it needs only pixels, so it runs on one core while this process embeds the batches on the other.

Targets (issue 7): power >= 0.9 for every corruption from severity 2, false-positive rate <= 0.05.

    nice -n 10 .venv/bin/python benchmarks/drift.py            # after `dvc repro` (encoder, embeddings)
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
PEERS = {"alibi": ["alibi-detect==0.13.0"], "evidently": ["evidently==0.7.23", "pandas<3"]}
SYSTEMS = {"sslvision": "sslvision MMD (SSL embeddings)", "alibi": "alibi-detect MMDDrift (UAE)",
           "evidently": "evidently embedding drift (model)"}


# --- the peers (run inside their own venvs: numpy, torch, pandas and the peer only) -----------------


def run_alibi(exchange: Path, names: list[str], alpha: float, permutations: int, seed: int) -> dict:
    from functools import partial

    import torch
    from alibi_detect.cd import MMDDrift
    from alibi_detect.cd.pytorch import preprocess_drift
    from torch import nn

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(seed)
    channels = np.load(exchange / "reference_images.npy", mmap_mode="r").shape[-1]
    # alibi-detect's documented UAE (its CIFAR-10 example), sized for 28x28: 28 -> 13 -> 5 -> 1
    encoder = nn.Sequential(
        nn.Conv2d(channels, 64, 4, stride=2), nn.ReLU(),
        nn.Conv2d(64, 128, 4, stride=2), nn.ReLU(),
        nn.Conv2d(128, 512, 4, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(512, 32)).eval()

    def pixels(name: str) -> np.ndarray:
        x = np.load(exchange / f"{name}_images.npy")
        return (x.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)

    preprocess = partial(preprocess_drift, model=encoder, device=torch.device("cpu"), batch_size=512)
    detector = MMDDrift(pixels("reference"), backend="pytorch", p_val=alpha, preprocess_fn=preprocess,
                        n_permutations=permutations, device="cpu")
    out = {}
    for name in names:
        t0 = time.perf_counter()
        r = detector.predict(pixels(name))["data"]
        out[name] = {"drift": bool(r["is_drift"]), "p_value": float(r["p_val"]), "seconds": time.perf_counter() - t0}
    return out


def run_evidently(exchange: Path, names: list[str], alpha: float, permutations: int, seed: int) -> dict:
    import pandas as pd
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model

    ref = np.load(exchange / "reference_embeddings.npy")
    columns = [f"e{i}" for i in range(ref.shape[1])]
    method = model(bootstrap=len(ref) < 1000)  # EmbeddingsDriftMetric's default
    out = {}
    for name in names:
        cur = np.load(exchange / f"{name}_embeddings.npy")
        t0 = time.perf_counter()
        score, drift, _ = method(pd.DataFrame(cur, columns=columns), pd.DataFrame(ref, columns=columns))
        out[name] = {"drift": bool(drift), "roc_auc": float(score), "seconds": time.perf_counter() - t0}
    return out


def peer_main(args: argparse.Namespace) -> None:
    exchange = Path(args.exchange)
    names = json.loads((exchange / "batches.json").read_text())
    run = {"alibi": run_alibi, "evidently": run_evidently}[args.peer]
    result = run(exchange, names, args.alpha, args.permutations, args.seed)
    (exchange / f"result_{args.peer}.json").write_text(json.dumps(result))


def peer_python(name: str) -> Path:
    """The peer's own venv (created and installed on first use)."""
    import sysconfig

    venv = VENVS / name
    python = venv / "bin" / "python"
    marker = venv / ".sslvision-requirements"
    wanted = " ".join(PEERS[name])
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f">> creating {venv} with {wanted} (once)", flush=True)
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS[name]], check=True)
    if name == "alibi":  # torch from this environment, after the venv's own packages (its numpy wins)
        site = next((venv / "lib").glob("python*/site-packages"))
        (site / "zz_sslvision_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    marker.write_text(wanted)
    return python


def start_peer(name: str, exchange: Path, args: argparse.Namespace, threads: int) -> subprocess.Popen:
    """Start the peer on the batches listed in ``exchange/batches.json``; ``finish_peer`` collects it."""
    python = peer_python(name)
    cmd = [str(python), str(Path(__file__).resolve()), "--peer", name, "--exchange", str(exchange),
           "--alpha", str(args.alpha), "--permutations", str(args.peer_permutations), "--seed", str(args.seed)]
    print(f">> {name}: {len(json.loads((exchange / 'batches.json').read_text()))} batches", flush=True)
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore", "BENCH_THREADS": str(threads)})


def finish_peer(name: str, proc: subprocess.Popen, exchange: Path) -> dict:
    if proc.wait() != 0:
        sys.exit(f"{name}: the peer failed (exit {proc.returncode})")
    return json.loads((exchange / f"result_{name}.json").read_text())


# --- the batches ------------------------------------------------------------------------------------


def unseen_indices(scenario: Path, pool: Path) -> np.ndarray:
    """Fashion-MNIST train indices in neither the scenario's train split nor a batch in the SSL pool."""
    import pandas as pd

    truth = pd.read_parquet(scenario / "truth.parquet")
    from_train = truth["source_file"] == "train"
    pooled = {d.name for d in pool.iterdir()} if pool.is_dir() else set()
    used = truth.loc[from_train & ((truth["split"] == "train") | truth["batch"].isin(pooled)), "source_index"]
    return np.setdiff1d(np.arange(60000), used.to_numpy())


def draw_clean(labels: np.ndarray, unseen: np.ndarray, prior: np.ndarray, n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` batches of ``n`` unseen train indices with class prior ``prior`` (each without replacement)."""
    from sslvision.demo import allocate

    rng = np.random.default_rng(seed)
    per_class = [unseen[labels[unseen] == c] for c in range(len(prior))]
    counts = allocate(n, prior)
    return [rng.permutation(np.concatenate([rng.choice(per_class[c], m, replace=False)
                                            for c, m in enumerate(counts) if m]))
            for _ in range(k)]


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    from sslvision.demo import corruption_transform

    transform = corruption_transform(corruption, severity, seed)
    return np.stack([transform(image=im)["image"].reshape(im.shape) for im in images])


def ensure_encoder(args: argparse.Namespace) -> str:
    """Use the pipeline's encoder and embeddings when a pretrain run left them; else train a quick SimCLR
    encoder on the ingested images with the pretrain library (``--quick-steps`` steps, stem stride 2)
    into ``benchmarks/.cache/drift/``. Returns where the encoder came from."""
    if (Path(args.encoder) / "config.json").exists() and (Path(args.embeddings) / "embeddings.npy").exists():
        return "the pretrain stage's output (dvc repro)"
    from sslvision.pretrain import PretrainParams, run_stage

    cache = Path("benchmarks/.cache/drift")
    print(f">> no {args.encoder} / {args.embeddings}: training a quick encoder ({args.quick_steps} steps)", flush=True)
    p = PretrainParams(epochs=1, steps_per_epoch=args.quick_steps, stem_stride=2, batch_size=128,
                       threads=args.threads, checkpoint_dir=str(cache / "checkpoints"))
    run_stage(p, args.ingested, cache / "encoder", cache / "embeddings", cache / "pretrain")
    args.encoder, args.embeddings = str(cache / "encoder"), str(cache / "embeddings")
    return f"a quick encoder this benchmark trained ({args.quick_steps} SimCLR steps), NOT the pipeline's"


def trigger_rows(decisions: dict[str, dict], batches: dict, clean: list[str]) -> list[dict]:
    """The trigger's decisions: nothing on clean batches, pretrain on corrupted ones (severity >= 2)."""
    label = "sslvision drift_eval + trigger"
    corrupted = [nm for nm, b in batches.items() if b[1] and b[2] >= 2]
    rows = [{"system": label, "metric": "clean batches where nothing re-runs",
             "value": float(np.mean([decisions[nm]["stage"] is None for nm in clean])),
             "unit": f"share of {len(clean)}", "setting": "clean"},
            {"system": label, "metric": "corrupted batches re-run from pretrain",
             "value": float(np.mean([decisions[nm]["stage"] == "pretrain" for nm in corrupted])),
             "unit": f"share of {len(corrupted)}", "setting": "severity >= 2"}]
    metrics = sorted({m for nm in clean for m in decisions[nm]["failed"]})
    rows += [{"system": label, "metric": f"false alarms of {m}",
              "value": float(np.mean([m in decisions[nm]["failed"] for nm in clean])),
              "unit": f"share of {len(clean)} clean batches", "setting": "clean"} for m in metrics]
    if "prior_shift" in decisions:
        rows.append({"system": label, "metric": "prior_shift batch: failed metrics",
                     "value": len(decisions["prior_shift"]["failed"]),
                     "unit": ", ".join(decisions["prior_shift"]["failed"]) or "none",
                     "setting": f"re-run from {decisions['prior_shift']['stage']}"})
    return rows


# --- the run ---------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import command_line, report

    from sslvision.data import Ingested, load_embeddings
    from sslvision.demo import load_fashion_mnist
    from sslvision.drift import DriftParams, build_reference, evaluate_batch, mmd_permutation_test, read_batch
    from sslvision.models import embed, load_encoder
    from sslvision.params import load_section
    from sslvision.trigger import decide

    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)
    p = load_section("drift_eval", DriftParams, args.params)
    args.alpha, args.permutations = p.alpha, p.permutations
    scenario_dir = Path(args.scenario)
    scenario = json.loads((scenario_dir / "scenario.json").read_text())
    data = Ingested.load(args.ingested)
    origin = ensure_encoder(args)
    all_embeddings = load_embeddings(args.embeddings)
    encoder = load_encoder(args.encoder)
    encoder_config = json.loads((Path(args.encoder) / "config.json").read_text())
    encoder_desc = (f"{args.encoder}: {encoder_config.get('method', '?')} on {encoder_config['encoder']['backbone']} "
                    f"(stem stride {encoder_config['encoder']['stem_stride']}), {origin}; reference embeddings "
                    f"{args.embeddings}")
    size, _, channels = data.images.shape[1:]
    rng = np.random.default_rng(p.seed)  # as the stage samples its reference
    train_rows = data.split("train")["index"].to_numpy()
    ref_rows = np.sort(rng.choice(train_rows, min(p.reference_size, len(train_rows)), replace=False))
    ref_emb = np.asarray(all_embeddings[ref_rows], dtype=np.float32)

    # batches: name -> (kind, corruption, severity, images)
    batches: dict[str, tuple[str, str, int, np.ndarray]] = {}
    for b in scenario["incoming"]:
        if b["labeled"]:
            continue
        images, _ = read_batch(scenario_dir / "incoming" / b["name"], data.classes, channels, size)
        batches[b["name"]] = (b["kind"], b.get("corruption") or "", b.get("severity") or 0, images)
    demo_clean = sum(k == "clean" for k, *_ in batches.values())
    fm = load_fashion_mnist()
    prior = np.array(list(scenario["train"]["counts_true"].values()), dtype=float)
    unseen = unseen_indices(scenario_dir, Path(args.pool))
    n = scenario["params"]["incoming_batch_size"]
    extra = draw_clean(fm["train_labels"], unseen, prior, n, max(0, args.clean_batches - demo_clean)
                       + args.repeats - 1, args.seed)
    for i, idx in enumerate(extra[: max(0, args.clean_batches - demo_clean)]):
        batches[f"bench_clean_{i + 1:02d}"] = ("clean", "", 0, fm["train_images"][idx][..., None])
    corruptions = scenario["params"]["corruptions"]
    severities = scenario["params"]["severities"]
    for r, idx in enumerate(extra[max(0, args.clean_batches - demo_clean):], start=2):
        base = fm["train_images"][idx]
        for c in corruptions:
            for s in severities:
                batches[f"bench_{c}_s{s}_r{r}"] = ("corrupted", c, s, corrupt(base, c, s, args.seed + r)[..., None])
    names = list(batches)
    print(f">> {len(names)} batches ({sum(k == 'clean' for k, *_ in batches.values())} clean), reference "
          f"{len(ref_rows)} train images, alpha {args.alpha}, {args.permutations} permutations", flush=True)

    # the whole drift_eval evaluation (every monitored metric, the trigger's decision) when finetune has run
    reference = classifier = None
    if args.trigger and (Path(p.classifier) / "config.json").exists():
        reference, _, classifier, _ = build_reference(p, args.params)
        if reference.embeddings.shape != ref_emb.shape or not np.allclose(reference.embeddings, ref_emb):
            sys.exit("the stage's reference sample differs from this benchmark's (same seed and size expected)")
        print(f">> trigger mode: {p.classifier} predicts every batch; decisions from sslvision.trigger.decide")

    # embeddings (the expensive part) and this stage's test
    results: dict[str, dict[str, dict]] = {"sslvision": {}}
    decisions: dict[str, dict] = {}
    t_embed, n_embedded = 0.0, 0
    with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
        exchange = Path(tmp)
        np.save(exchange / "reference_images.npy", np.asarray(data.images[ref_rows]))
        np.save(exchange / "reference_embeddings.npy", ref_emb)
        for name in names:
            np.save(exchange / f"{name}_images.npy", batches[name][3])
        (exchange / "batches.json").write_text(json.dumps(names))
        # alibi-detect needs only pixels: it runs on one core while this process embeds on the other
        peers = {"alibi": start_peer("alibi", exchange, args, threads=1)} if "alibi" in args.peers else {}
        try:
            for i, name in enumerate(names):
                images = batches[name][3]
                t0 = time.perf_counter()
                emb = embed(encoder, images, 512)
                t_embed += time.perf_counter() - t0
                n_embedded += len(images)
                if classifier is not None:  # the stage's whole evaluation; its MMD test is the one measured
                    probs = classifier.predict_proba(images, p.batch_size)
                    t0 = time.perf_counter()
                    result = evaluate_batch(reference, emb, probs, None, p)
                    decisions[name] = {"stage": decide(result["metrics"]).stage, "failed": result["failed"]}
                    p_value = result["input_drift"]["p_value"]
                else:
                    t0 = time.perf_counter()
                    p_value = mmd_permutation_test(ref_emb, emb, p.permutations, p.alpha, p.bandwidths, p.seed).p_value
                results["sslvision"][name] = {"drift": p_value < p.alpha, "p_value": p_value,
                                              "seconds": time.perf_counter() - t0}
                np.save(exchange / f"{name}_embeddings.npy", emb)
                if (i + 1) % 10 == 0 or i + 1 == len(names):
                    print(f"   embedded + tested {i + 1}/{len(names)} batches ({n_embedded / t_embed:.0f} img/s)",
                          flush=True)
            if "evidently" in args.peers:
                peers["evidently"] = start_peer("evidently", exchange, args, threads=args.threads)
            for peer, proc in peers.items():
                results[peer] = finish_peer(peer, proc, exchange)
        finally:  # never leave a peer running
            for proc in peers.values():
                if proc.poll() is None:
                    proc.kill()

    rows, summary = [], {}
    clean = [nm for nm in names if batches[nm][0] == "clean"]
    for system, res in results.items():
        label = SYSTEMS[system]
        fpr = float(np.mean([res[nm]["drift"] for nm in clean]))
        rows.append({"system": label, "metric": "false-positive rate", "value": fpr,
                     "unit": f"share of {len(clean)} clean batches", "setting": "clean"})
        powers = {}
        for c in corruptions:
            for s in severities:
                hits = [res[nm]["drift"] for nm in names if batches[nm][1:3] == (c, s)]
                rows.append({"system": label, "metric": "power", "value": float(np.mean(hits)),
                             "unit": f"share of {len(hits)} batches", "setting": f"{c} severity {s}"})
            hits = [res[nm]["drift"] for nm in names if batches[nm][1] == c and batches[nm][2] >= 2]
            powers[c] = float(np.mean(hits))
            rows.append({"system": label, "metric": "power, severity >= 2", "value": powers[c],
                         "unit": f"share of {len(hits)} batches", "setting": c})
        if "prior_shift" in batches:
            rows.append({"system": label, "metric": "detects class-prior shift", "value": int(res["prior_shift"]["drift"]),
                         "unit": "1 = drift reported", "setting": "prior_shift"})
        perms = {"alibi": args.peer_permutations, "evidently": 0}.get(system, args.permutations)
        rows.append({"system": label, "metric": "seconds per batch", "value": float(np.mean(
            [res[nm]["seconds"] for nm in names])), "unit": "s (detector only; SSL embedding not counted)",
            "setting": f"{perms} permutations" if perms else "no permutations"})
        summary[system] = {"fpr": fpr, "min_power_severity_2plus": min(powers.values()),
                           "meets_targets": fpr <= 0.05 and min(powers.values()) >= 0.9}
    if decisions:
        rows += trigger_rows(decisions, batches, clean)
    rows.append({"system": SYSTEMS["sslvision"], "metric": "embedding throughput", "value": n_embedded / t_embed,
                 "unit": "images/s (encoder forward)", "setting": "all batches"})
    report("drift", rows, command="nice -n 10 .venv/bin/" + command_line(script="benchmarks/drift.py"),
           extra={"encoder": encoder_desc, "alpha": args.alpha, "permutations": args.permutations,
                  "alibi_permutations": args.peer_permutations,
                  "reference_size": int(len(ref_rows)), "batch_size": n, "clean_batches": len(clean),
                  "repeats_per_corruption_severity": args.repeats,
                  "targets": {"power_from_severity_2": 0.9, "false_positive_rate": 0.05}, "summary": summary,
                  "per_batch": results, "trigger_decisions": decisions})
    for system, s in summary.items():
        print(f"{SYSTEMS[system]}: FPR {s['fpr']:.3f}, min power (severity >= 2) {s['min_power_severity_2plus']:.2f}"
              f" -> targets {'met' if s['meets_targets'] else 'NOT met'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="data/demo", help="demo scenario directory (scenario.json, incoming/)")
    ap.add_argument("--ingested", default="data/ingested")
    ap.add_argument("--embeddings", default="data/embeddings")
    ap.add_argument("--encoder", default="models/encoder")
    ap.add_argument("--quick-steps", type=int, default=300,
                    help="SimCLR steps of the quick encoder trained when there is no pretrain output")
    ap.add_argument("--pool", default="data/pool", help="pool batches (their images count as seen)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--clean-batches", type=int, default=24, help="clean batches in all (demo's + drawn)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="batches per corruption and severity (1 = the demo's own; more are made from fresh images)")
    ap.add_argument("--alpha", type=float, help=argparse.SUPPRESS)  # the peers get the stage's alpha
    ap.add_argument("--permutations", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--peer-permutations", type=int, default=100,
                    help="alibi-detect's permutations (its default, 100: it re-indexes the whole kernel matrix "
                         "once per permutation, about 100x slower per permutation than the stage's test)")
    ap.add_argument("--peers", nargs="*", default=["alibi", "evidently"], choices=["alibi", "evidently"])
    ap.add_argument("--no-trigger", dest="trigger", action="store_false",
                    help="skip the full drift_eval evaluation and trigger decisions (done when models/classifier exists)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer", choices=list(PEERS), help=argparse.SUPPRESS)
    ap.add_argument("--exchange", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.peer:
        peer_main(arguments)
    else:
        os.chdir(ROOT)
        main(arguments)
