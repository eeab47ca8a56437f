"""Every benchmark, one after the other, then one comparison table: sslvision against each peer, same
machine, same run. Writes ``benchmarks/results/summary.json`` (the usual ``{"machine", "command",
"rows"}`` format; each row also names its ``benchmark``, its results file and, when it came from an earlier
run, says so) and rewrites the results table of benchmarks/README.md between its markers.

    .venv/bin/python benchmarks/run_all.py                  # all of them (hours on 2 CPU cores)
    .venv/bin/python benchmarks/run_all.py --only drift finetune
    .venv/bin/python benchmarks/run_all.py --summary-only   # runs nothing: table from the committed results

synthesize, finetune, default_recipe, drift and retrain reuse the demo pipeline's outputs (``make demo``
first); the others build their own data. gpu_profile needs a CUDA GPU: without one it is reported as skipped,
not run. A benchmark that fails is reported and the others still run; the exit status is non-zero when any
failed. Each one's own ``results/NAME.json`` keeps its full table (variants:
``results/variants/BENCHMARK/NAME.json``); the summary keeps the headline rows.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _common import command_line, find_results, machine, report  # noqa: E402

# name -> arguments of the run that produced the committed results (the settings benchmarks/README.md quotes)
BENCHMARKS: dict[str, list[str]] = {
    "ingest": [],
    "pretrain": ["--budget-s", "150", "--batch-size", "128"],
    "audit": ["--epochs", "10", "--steps-per-epoch", "30"],  # the demo's pretrain (params.yaml)
    # the finetune stage as the classifier (the benchmark's default --eval); the cross-entropy probe runs of the
    # generator variants are results/variants/synthesize/synthesize_probe.json and synthesize_run*.json
    # oracle: unseen real images of the planned classes, the ceiling of any generator (demo scenario only)
    "synthesize": ["--generators", "augment", "mae_inpaint", "feature_interp", "oracle", "--synth-seeds", "0", "1", "2",
                   "--probe-seeds", "3"],
    # the committed finetune results come from a demo project whose encoder was pretrained with
    # profiles/cpu.yaml's pretrain.epochs (50); on `make demo`'s 300-step encoder expect ~2 points less
    "finetune": ["--epochs", "16", "--full-finetune"],
    # the candidates for the demo's finetune recipe, trained on this project's audited data
    "default_recipe": ["."],
    # the defaults: 10,000 unlabelled images, 10 / 25 / 100 labels per class, seeds 0 1 2, 200 steps of 64; the
    # committed run cached its encoder with --cache /tmp/...: here the default, benchmarks/.cache/ (git-ignored)
    "label_efficiency": [],
    # on one H100 (profiles/gpu.yaml), trimmed to an 8-minute device slot; the committed run wrote to
    # --out $OUT and read --fmnist from a local copy: here the defaults, benchmarks/results/ and the system dataset
    "gpu_profile": ["--pretrain-seconds", "180", "--finetune-seconds", "40"],
    "drift": [],
    "retrain": [],
    # bf16 autocast vs fp32 pretraining on this CPU; small runs so that it fits a shared 2-core machine
    "precision": ["--batch-size", "32", "--windows", "8", "--window-steps", "4", "--acc-steps", "60",
                  "--vit-acc-steps", "30", "--train-images", "4000"],
    # seed 0, both tail orders, 200 steps of 64 (the defaults); seeds 1 2 are the variant temperature_seeds12
    "temperature": [],
    # seed 0, natural tail, 200 steps in all (the defaults); seeds 1 2 are the variant mae_prepretrain_seeds12
    "mae_prepretrain": [],
    # both recipes: the linear probe and the demo's full fine-tune (first, JTT, subsample: 3 trainings of minutes
    # each), as the committed run; it kept its scenario, encoder and audit in --workdir /tmp/...: here the default,
    # a temporary directory
    "confounders": ["--recipes", "probe", "demo", "--mitigations", "jtt"],
}
NEEDS_DEMO = {"synthesize", "finetune", "default_recipe", "drift", "retrain"}
# run only where torch sees a CUDA GPU; elsewhere reported as skipped (not failed), their committed results kept
NEEDS_CUDA = {"gpu_profile"}

Row = dict
Pick = Callable[[list[Row]], list[Row]]


def _head(rows: list[Row], ours: Callable[[str], bool], metrics: dict[str, str],
          systems: Callable[[str], bool] = lambda s: True, by_setting: bool = False) -> list[Row]:
    """Headline rows: ``metrics`` maps a benchmark's metric name to the summary's (peers' variants of one
    measurement may be named differently); ``ours`` tells sslvision's systems from the peers'."""
    out = []
    for r in rows:
        if r["metric"] in metrics and systems(r["system"]):
            out.append({"metric": metrics[r["metric"]], "system": r["system"], "value": r["value"], "unit": r["unit"],
                        "setting": r.get("setting", "") if by_setting else "", "ours": ours(r["system"])})
    return out


def _startswith(*prefixes: str) -> Callable[[str], bool]:
    return lambda s: s.startswith(prefixes)


def _seeds(row: Row) -> str:
    """``seed 0`` / ``seeds 0, 1, 2``: the seeds a row's ``setting`` names (``..., seeds [0]; ...``)."""
    m = re.search(r"seeds \[([^\]]*)\]", row.get("setting", ""))
    if not m:
        return ""
    seeds = [s.strip() for s in m.group(1).split(",") if s.strip()]
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}"


def _label_efficiency(rows: list[Row]) -> list[Row]:
    """Balanced accuracy (mean over the seeds) per system, one line per number of labels per class; the SSL
    encoder (probe, fine-tune) against the pixel regression and the same network from scratch."""
    return [{"metric": f"balanced accuracy, mean of {r.get('seed', 'the seeds')}", "system": r["system"],
             "value": r["value"], "unit": r["unit"], "setting": f"{r['labels_per_class']} labels per class",
             "ours": r["system"].startswith("ssl_")}
            for r in rows if r["metric"] == "balanced_accuracy_mean"]


def _temperature(rows: list[Row]) -> list[Row]:
    """kNN recall of the 3 rarest classes per τ setting, and the cosine schedule's gain over the best fixed τ,
    per tail order; the cosine schedule is the option measured, the fixed τ its baselines."""
    out = []
    for order in ("natural", "hard_rare"):
        picked = _head(rows, _startswith("cosine"), {
            f"kNN recall, 3 rarest classes ({order})": "kNN recall, 3 rarest classes",
            f"kNN recall, 3 rarest classes gain ({order})": "cosine schedule - best fixed τ, kNN recall, 3 rarest"})
        for r in picked:
            seeds = next((_seeds(x) for x in rows if x["metric"].endswith(f"({order})") and _seeds(x)), "")
            r["setting"] = f"{order} tail{', ' + seeds if seeds else ''}"
        out += picked
    return out


def _mae_prepretrain(rows: list[Row]) -> list[Row]:
    """``pretrain.init_from``: MAE then SimCLR from its weights (the option measured) against SimCLR alone, the
    same SimCLR steps from random weights, cl_mim and MAE alone, at equal total steps."""
    picked = _head(rows, lambda s: s == "mae → simclr", {"kNN accuracy": "kNN accuracy",
                                                         "linear probe accuracy": "linear probe accuracy"})
    for r in picked:
        r["setting"] = next((_seeds(x) for x in rows if _seeds(x)), "")
    return picked


def _confounders(rows: list[Row]) -> list[Row]:
    """Slice discovery (find_slices against plain k-means) and the slice_reweight mitigations as the stage gates
    them (subsample, the head; Just Train Twice) against the classifier without one and the oracle re-weighting."""
    names = {"without": "without slice_reweight", "JTT (gated by the stage)": "slice_reweight: jtt (gated)",
             "subsample (gated by the stage)": "slice_reweight: subsample (gated)"}
    picked = _head(rows, lambda s: s in ("sslvision find_slices", "subsample (gated by the stage)"), {
        "rank of the planted slice (target 1)": "rank of the planted slice, target 1",
        "worst-group accuracy (class x mark), test": "worst-group accuracy (class x mark), test",
        "balanced accuracy, test": "balanced accuracy, test"},
        lambda s: s in ("sslvision find_slices", "plain k-means (error-ranked)", "without",
                        "JTT (gated by the stage)", "subsample (gated by the stage)") or s.startswith("oracle"),
        by_setting=True)
    return [{**r, "system": names.get(r["system"], r["system"])} for r in picked]


def _gpu_profile(rows: list[Row]) -> list[Row]:
    """bf16 / fp32 SimCLR throughput, the fine-tuned champion against scratch and the pixel baseline, and the
    embeddings' kNN and linear probe (all sslvision's)."""
    embeddings = ("ssl kNN k=200", "ssl linear probe")
    return (_head(rows, lambda s: True, {"speedup": "bf16 / fp32 SimCLR throughput, ResNet-18 batch 512 (GPU)"})
            + _head(rows, _startswith("ssl"), {"balanced_accuracy": "balanced accuracy, test split, audited labels"},
                    lambda s: s not in embeddings)
            + _head(rows, lambda s: True, {"balanced_accuracy": "SSL embeddings' balanced accuracy, test split"},
                    lambda s: s in embeddings))


def _ladder(metric: str) -> Pick:
    """The fine-tune ladder's balanced accuracy per rung; the scratch baselines are the peers."""
    return lambda rows: _head(rows, _startswith("+", "full pipeline", "noise-aware"), {"balanced_accuracy": metric})


# what each results file contributes to the comparison table, in the table's order; a variant
# (results/variants/BENCHMARK/NAME.json, e.g. synthesize_probe) is read from the committed results, never run here
HEADLINES: dict[str, Pick] = {
    "ingest": lambda rows: _head(rows, _startswith("sslvision", "read ingested"), {
        "read back as float32": "reading the images back",
        "throughput, 60,000 PNGs": "throughput, 60,000 PNGs",
        "throughput, 60,000 PNGs (one epoch)": "throughput, 60,000 PNGs",
        "peak RSS, 60,000 images, main + workers": "peak RSS, 60,000 images"}),
    "pretrain": lambda rows: _head(rows, _startswith("sslvision"), {
        "train throughput": "SimCLR ResNet-18 train throughput (same budget)",
        "linear probe accuracy (test, 2-fold)": "linear probe accuracy"}, lambda s: "/" not in s),
    "audit": lambda rows: _head(rows, _startswith("sslvision"), {"f1": "label-error F1"},
                                lambda s: "ablation" not in s, by_setting=True),
    "synthesize": lambda rows: _head(rows, lambda s: s.startswith(("mae_inpaint", "feature_interp")), {
        "mean tail recall (3 rarest)": "mean tail-class recall (3 rarest), finetune stage",
        "balanced accuracy": "balanced accuracy, finetune stage",
        "tail recall gain over none": "tail-recall gain over none (target >= 5; oracle: the ceiling)"}),
    # the earlier protocol (a cross-entropy probe at fixed steps), kept for comparison; run with --eval probe
    "synthesize_probe": lambda rows: _head(rows, lambda s: s.startswith(("mae_inpaint", "feature_interp")),
                                           {"mean tail recall (3 rarest)":
                                            "mean tail-class recall (3 rarest), cross-entropy probe"}),
    "finetune": _ladder("balanced accuracy"),
    # the same ladder on the scenario with symmetric noise (the reference scenario); its project is built
    # by hand (see the file's command and benchmarks/README.md)
    "finetune_symmetric": _ladder("balanced accuracy (symmetric noise)"),
    # the same ladder (asymmetric noise) on an encoder pretrained twice as long (pretrain.epochs 100, 3,000 steps):
    # what more CPU pretraining buys; built by hand like finetune_symmetric
    "finetune_3000": _ladder("balanced accuracy (3,000-step encoder)"),
    # the same ladder on the scenario whose rarest classes are the hard ones (demo.long_tail_order: hard_rare)
    "finetune_hard_rare": _ladder("balanced accuracy (hard classes rare)"),
    # the natural order's rungs that the label-smoothing fix changed, with the true-label ceilings (--oracle)
    "finetune_natural_oracle": _ladder("balanced accuracy (natural order, after the label-smoothing fix)"),
    # the candidates for the demo's default recipe; pixel_logreg is the baseline the promotion gate asks it to beat
    "default_recipe": lambda rows: _head(rows, lambda s: s != "pixel_logreg", {
        "balanced_accuracy": "balanced accuracy, test split (demo project)",
        "worst_class_recall": "worst-class recall, test split (demo project)"}),
    "label_efficiency": _label_efficiency,
    # profiles/gpu.yaml on one GPU (the file names it)
    "gpu_profile": _gpu_profile,
    "drift": lambda rows: _head(rows, _startswith("sslvision"), {
        "re-run from pretrain (false alarm)": "clean batches re-run from pretrain (false alarm)",
        "BBSD reports drift": "clean batches re-run from pretrain (false alarm)",
        "label-shift batches routed to prior correction": "label-shift batches routed to prior correction",
        "corruption power (re-run from pretrain)": "corruption power",
        "detects corruption": "corruption power",
        "accuracy estimate MAE (no labels used)": "accuracy estimate MAE (no labels used)",
        "prior estimate TV error (bbse_soft)": "prior estimate TV error"}, by_setting=True),
    "retrain": lambda rows: _head(rows, lambda s: True, {"wall time": "wall time"}, by_setting=True),
    "precision": lambda rows: _head(rows, lambda s: True, {
        "throughput ratio": "bf16 / fp32 pretrain throughput (>= 1.3 adopts bf16)",
        "kNN accuracy difference": "bf16 - fp32 kNN accuracy, equal steps"}, lambda s: "/" in s),
    # the same throughput at the stage's batch of 256 (throughput only: --acc-steps 0 --name precision_batch256)
    "precision_batch256": lambda rows: _head(rows, lambda s: True, {
        "throughput ratio": "bf16 / fp32 pretrain throughput, batch 256"}, lambda s: "/" in s),
    "temperature": _temperature,
    "mae_prepretrain": _mae_prepretrain,
    "confounders": _confounders,
}


def run_one(name: str, extra: list[str]) -> tuple[bool, float]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *BENCHMARKS[name], *extra]
    print(f"\n>> {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    ok = subprocess.run(cmd, cwd=REPO).returncode == 0
    return ok, time.perf_counter() - t0


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def summarize(ran: dict[str, tuple[bool, float]], skipped: dict[str, str] | None = None
              ) -> tuple[list[Row], dict[str, str]]:
    """The headline rows of every results file in ``HEADLINES`` (each row names its file, relative to
    benchmarks/), and the machine each ran on; ``skipped`` (name -> why) are benchmarks this run did not start."""
    out: list[Row] = []
    machines: dict[str, str] = {}
    for name, pick in HEADLINES.items():
        path = find_results(name)
        if path is None:
            out.append({"benchmark": name, "system": "-", "metric": "not run yet", "value": None, "unit": "",
                        "setting": "", "ours": False})
            continue
        res = json.loads(path.read_text())
        machines[name] = res["machine"]
        fresh = name in ran and ran[name][0]
        file = path.relative_to(HERE).as_posix()
        for r in pick(res["rows"]):
            out.append({"benchmark": name, **r, "file": file, "run": "this run" if fresh else "earlier run"})
    for name, (ok, seconds) in ran.items():
        out.append({"benchmark": name, "system": "run_all", "metric": "benchmark wall time" if ok else "FAILED",
                    "value": round(seconds, 1), "unit": "s", "setting": "", "ours": False})
    for name, why in (skipped or {}).items():
        out.append({"benchmark": name, "system": "run_all", "metric": f"skipped: {why}", "value": None, "unit": "",
                    "setting": "", "ours": False})
    return out, machines


def results_table(rows: list[Row]) -> str:
    """Markdown: one line per (results file, metric, setting), sslvision's systems first, the peers after; the
    first column links the results file (relative to benchmarks/)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r["system"] == "run_all" or r["value"] is None:
            continue
        groups.setdefault((r["benchmark"], r["file"], r["metric"], r.get("setting", "")), []).append(r)

    def fmt(r: Row) -> str:
        v = r["value"]
        if isinstance(v, float):
            v = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        unit = {"fraction": "", "images/s": "img/s", "rank": ""}.get(r["unit"], r["unit"])
        unit = "" if unit.startswith("share of") else unit
        return f"{r['system']}: **{v}** {unit}".rstrip()

    lines = ["| results | metric | sslvision | peers / baselines |", "|---|---|---|---|"]
    for (name, file, metric, setting), rs in groups.items():
        label = f"{metric} ({setting})" if setting else metric
        ours = "<br>".join(fmt(r) for r in rs if r["ours"])
        theirs = "<br>".join(fmt(r) for r in rs if not r["ours"])
        lines.append(f"| [{name}]({file}) | {label} | {ours} | {theirs} |")
    return "\n".join(lines)


def update_results_section(rows: list[Row], machines: dict[str, str], readme: Path = HERE / "README.md") -> None:
    """Rewrite the part of ``readme`` between ``<!-- results:start -->`` and ``<!-- results:end -->``."""
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: markers {start} / {end} not found; add them where the table belongs")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    where = sorted(set(machines.values())) or [machine()]
    body = (f"\nMachines: {'; '.join(where)}. Generated by `python benchmarks/run_all.py --summary-only` from "
            "`benchmarks/results/` (each file names its machine and command).\n\n" + results_table(rows) + "\n")
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(head + start + body + end + tail)
    tmp.replace(readme)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    ap.add_argument("--skip", nargs="+", choices=list(BENCHMARKS), default=[], help="do not run these")
    ap.add_argument("--summary-only", action="store_true",
                    help="run no benchmark; summarise the existing results and rewrite benchmarks/README.md's table")
    args = ap.parse_args(argv)

    names = [] if args.summary_only else [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    if NEEDS_DEMO & set(names) and not (REPO / "models" / "encoder").exists():
        raise SystemExit(f"{sorted(NEEDS_DEMO & set(names))} reuse the demo pipeline's outputs and "
                         f"{REPO / 'models' / 'encoder'} does not exist: run `make demo` first")
    skipped = {n: "needs a CUDA GPU" for n in names if n in NEEDS_CUDA and not cuda_available()}
    for name in skipped:
        print(f"\n>> {name}: skipped ({skipped[name]}; its committed results stay in the table)", flush=True)
    ran: dict[str, tuple[bool, float]] = {}
    for name in names:
        if name not in skipped:
            ran[name] = run_one(name, [])
    rows, machines = summarize(ran, skipped)
    report("summary", rows, command=command_line(script=Path(sys.argv[0]).as_posix()),
           extra={"machines": machines})
    update_results_section(rows, machines)
    failed = [n for n, (ok, _) in ran.items() if not ok]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
