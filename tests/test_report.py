"""`sslvision report`: the page built from stage outputs and a real MLflow registry, rendered in headless Chromium.

The inputs are the files the stages write (same names, same columns and keys, tiny values) and a SQLite
MLflow store with registered versions, promote runs and a real rollback. Chromium (the Debian package,
driven by Playwright) loads the page from disk: every image must decode, nothing may be fetched from
outside the file, every link must land on an element of the page, and no input text may become markup.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from sslvision import registry, tracking
from sslvision.cli import app
from sslvision.io import write_csv, write_json, write_parquet, write_text
from sslvision.report import SECTIONS

CLASSES = ["0_t-shirt_top", "1_trouser", "2_pullover"]
NAME = "tiny-classifier"
INJECTION = "<img src=x onerror=alert(1)>"  # input text that would be markup if it were not escaped
SCRIPT = "<script>document.title='pwned'</script>"


# --- headless Chromium -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium")
    if exe is None:
        if os.geteuid() == 0:
            pytest.fail("chromium is not installed: run `apt-get install chromium` "
                        "(make install does on a fresh checkout)")
        pytest.skip("chromium is not installed and this user is not root: `sudo apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe)
        yield b
        b.close()


def render(browser, path: Path) -> tuple[Any, dict[str, list]]:
    """Open the page from disk; return it and what went wrong while loading (requests, console errors)."""
    page = browser.new_page()
    seen: dict[str, list] = {"requests": [], "failed": [], "errors": []}
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("requestfailed", lambda r: seen["failed"].append((r.url[:80], r.failure)))
    page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, seen


def assert_self_contained(page, seen: dict[str, list], path: Path) -> list[dict]:
    """No failed or outside request, no console error, every image decoded, every link resolves."""
    assert seen["failed"] == [] and seen["errors"] == []
    outside = [u for u in seen["requests"] if not (u.startswith("data:") or u == path.resolve().as_uri())]
    assert outside == [], "the page fetched something besides itself"
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({alt: e.alt, ok: e.complete && e.naturalWidth > 0, "
               "src: e.getAttribute('src').slice(0, 22), section: e.closest('section').id}))")
    assert [i for i in images if not i["ok"]] == [], "broken images"
    assert all(i["src"].startswith("data:image/") for i in images)
    links = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
    assert links and all(h.startswith("#") and page.query_selector(h) is not None for h in links), links
    assert page.eval_on_selector_all("script, iframe, object, embed, link", "els => els.length") == 0
    assert page.title() == "sslvision report"
    return images


def section_text(page, sid: str) -> str:
    return page.inner_text(f"section#{sid}")


# --- the inputs the stages write -------------------------------------------------------------------

def png(path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5), dpi=40)
    fig.subplots().bar(range(3), [3, 2, 1])
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def write_stage_outputs(root: Path) -> dict[str, Any]:
    r = root / "reports"
    counts = dict(zip(CLASSES, [50, 12, 3], strict=True))
    write_json(r / "ingest/metrics.json", {
        "source": "data/demo/images", "layout": "imagefolder", "listed": 128, "images": 125,
        "by_split": {"train": 65, "test": 60, "pool": 0}, "classes": 3,
        "class_counts": {"train": counts, "test": dict.fromkeys(CLASSES, 20)}, "imbalance_ratio": 16.667,
        "quarantined": 60, "quarantine": {"truncated": 30, "empty": 30}, "duplicates": {"exact": 2, "near": 1}})
    write_text(r / "ingest/dataset_card.md",
               "# Dataset card\n\nSource `data/demo/images`: 128 files listed.\n\n| class | train | test |\n"
               "|---|---|---|\n" + "".join(f"| {c} | {n} | 20 |\n" for c, n in counts.items())
               + f"\nA caption with {SCRIPT} and a [link](http://example.invalid/x) that must stay text.\n")
    write_csv(r / "ingest/class_counts.csv", pd.DataFrame({"class": CLASSES, "count": list(counts.values())}))
    png(r / "ingest/class_counts.png", "class counts")
    write_parquet(root / "data/ingested/quarantine.parquet", pd.DataFrame({
        "source_path": [f"train/{CLASSES[i % 3]}/broken_{i:03d}.png" for i in range(60)],
        "split": "train", "reason": ["truncated", "empty"] * 30,
        "detail": [INJECTION if i == 0 else "OSError: Truncated File Read" for i in range(60)]}))

    write_csv(r / "pretrain/history.csv", pd.DataFrame({
        "epoch": [1, 2, 3], "step": [20, 40, 60], "loss": [6.1, 5.8, 5.6], "lr": [1e-3, 5e-4, 1e-5],
        "effective_rank": [128.2, 129.5, 129.4], "train_img_s": [51.8, 55.5, 46.5]}))
    write_json(r / "pretrain/metrics.json", {
        "method": "simclr", "backbone": "resnet18", "effective_rank": 146.47, "collapsed": False,
        "knn_accuracy": 0.4321, "linear_probe_accuracy": 0.6543, "final_loss": 5.6, "steps": 60,
        "train_img_s": 46.49})

    png(r / "audit/gallery.png", "gallery")
    write_json(r / "audit/metrics.json", {
        "n_audited": 65, "n_label_issues": 9, "issue_rate": 0.138, "noise_rate_estimated": 0.2,
        "issues_by_class": dict(zip(CLASSES, [5, 3, 1], strict=True)), "n_outliers": 1,
        "n_conflicting_duplicates": 0, "actions": {"keep": 56, "relabel": 4, "drop": 5}})
    write_csv(r / "audit/issues_by_class.csv", pd.DataFrame(
        {"class": CLASSES, "issues": [5, 3, 1], "noise_rate_estimated": [0.1, 0.25, 0.333]}))

    png(r / "synthesize/grid.png", "grid")
    write_csv(r / "synthesize/per_class.csv", pd.DataFrame(
        {"class": ["2_pullover"], "real": [3], "need": [9], "made": [27], "passed": [11], "kept": [9]}))
    write_json(r / "synthesize/metrics.json", {"generator": "augment", "made": 27, "kept": 9, "accept_rate": 0.333,
                                               "classes": {"2_pullover": {"real": 3, "made": 27, "kept": 9}}})

    recall = dict(zip(CLASSES, [0.9, 0.75, 0.35], strict=True))
    write_json(r / "finetune/metrics.json", {
        "accuracy": 0.6667, "balanced_accuracy": 0.6667, "worst_class_recall": 0.35, "worst_class": "2_pullover",
        "macro_f1": 0.65, "ece": 0.04, "per_class_recall": recall, "confusion_matrix": [[18, 1, 1], [2, 15, 3],
                                                                                       [6, 7, 7]]})
    write_csv(r / "finetune/per_class_recall.csv", pd.DataFrame({"class": CLASSES, "recall": list(recall.values())}))
    png(r / "finetune/confusion_matrix.png", "confusion")
    write_json(r / "finetune/promotion.json", {
        "model": NAME, "challenger": "2", "champion_before": "1", "decision": "promoted", "champion": "2",
        "previous": "1", "challenger_metrics": {"balanced_accuracy": 0.66, "ece": 0.04},
        "champion_metrics": {"balanced_accuracy": 0.61, "ece": 0.05},
        "thresholds": {"balanced_accuracy": "Threshold: 0.5. Greater value is better."}, "golden_size": 60})

    write_json(r / "drift/trigger.json", {
        "batch": "data/demo/incoming/clean_01", "n_images": 500, "labeled": False, "failed": [],
        "metrics": {"embedding_mmd_pvalue": {"value": 0.0958, "threshold": 0.01, "direction": "max",
                                             "stage": "pretrain", "failed": False},
                    "label_noise_rate": {"value": None, "threshold": 0.15, "direction": "min", "stage": "audit",
                                         "failed": False}}})
    png(r / "drift/mmd.png", "mmd")
    png(r / "drift/prediction_shift.png", "shift")
    (r / "drift/embeddings_pca.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # must not be embedded

    write_json(r / "monitor/clean_01/decision.json", {"decision": {
        "stage": None, "reasons": ["every monitored metric is within its threshold"], "failed": {},
        "batch": "clean_01", "degraded": False}})
    write_json(r / "monitor/noisy_labels/decision.json", {
        "decision": {"stage": "audit", "reasons": ["label_noise_rate = 0.512 > threshold 0.15 (owned by audit)"],
                     "failed": {}, "batch": "noisy_labels", "degraded": True},
        "joined_pool": "data/pool/noisy_labels", "ran": {"audit": True, "synthesize": True, "finetune": True},
        "promotion": {"decision": "refused"}})
    os.utime(r / "monitor/clean_01/decision.json", (1_700_000_000, 1_700_000_000))  # the older decision
    return {"counts": counts}


def registry_history() -> dict[str, str]:
    """Two registered versions in a real SQLite store: v1 promoted, v2 promoted over it, then a real rollback."""
    import mlflow

    versions = {}
    for ba in (0.61, 0.66):
        with tracking.stage_run("finetune") as run:
            mlflow.log_metrics({"balanced_accuracy": ba, "worst_class_recall": 0.3, "ece": 0.05})
            client = mlflow.MlflowClient()
            if not client.search_registered_models(f"name='{NAME}'"):
                client.create_registered_model(NAME)
            v = client.create_model_version(NAME, f"{run.info.artifact_uri}/classifier", run.info.run_id).version
        before = registry.alias_version(client, NAME, registry.CHAMPION)
        with tracking.stage_run("promote"):  # what registry.promote_cli logs for an accepted challenger
            if before:
                client.set_registered_model_alias(NAME, registry.PREVIOUS, before)
            client.set_registered_model_alias(NAME, registry.CHAMPION, v)
            client.set_model_version_tag(NAME, v, "sslvision.promotion", "promoted")
            decision = {"model": NAME, "challenger": v, "champion_before": before, "decision": "promoted",
                        "champion": v, "previous": before}
            mlflow.set_tag("sslvision.decision", "promoted")
            mlflow.log_dict(decision, "promotion.json")
        versions[f"v{len(versions) + 1}"] = str(v)
    with tracking.stage_run("rollback"):  # registry.rollback_cli without loading the finetune params
        mlflow.log_dict(registry.rollback(NAME), "rollback.json")
    return versions


# --- tests -----------------------------------------------------------------------------------------

def test_report_of_a_full_run_renders_in_chromium(workdir, browser):
    import mlflow

    write_stage_outputs(workdir)
    versions = registry_history()

    result = CliRunner().invoke(app, ["report", "--out", "out/report.html"])
    assert result.exit_code == 0, result.output
    out = workdir / "out/report.html"
    assert f"report: {out}" in result.output and "9 of 9 sections have data" in result.output

    page, seen = render(browser, out)
    images = assert_self_contained(page, seen, out)
    by_section = pd.Series([i["section"] for i in images]).value_counts().to_dict()
    # the corrupt embeddings_pca.png is named in a note instead of being shown as a broken image
    assert by_section == {"dataset": 1, "pretrain": 1, "audit": 1, "synthesize": 1, "finetune": 1, "drift": 2}
    assert "embeddings_pca.png: not a readable image" in section_text(page, "drift")
    assert page.eval_on_selector_all(".error", "els => els.length") == 1
    body = page.inner_text("body")
    assert "not run yet" not in body

    # text from the inputs is shown as text, never as markup
    assert INJECTION in section_text(page, "quarantine") and SCRIPT in section_text(page, "dataset")
    assert "[link](http://example.invalid/x)" in section_text(page, "dataset")

    assert "60 files were not taken" in section_text(page, "quarantine")
    assert "the first 50 of 60 rows" in section_text(page, "quarantine")
    assert page.eval_on_selector_all("section#quarantine table:last-of-type tbody tr", "els => els.length") == 50
    pretrain = section_text(page, "pretrain")
    assert "0.6543" in pretrain and "0.4321" in pretrain and "146.5" in pretrain
    assert "0.6667" in section_text(page, "finetune") and "re-run from audit" in section_text(page, "decisions")
    decisions = page.eval_on_selector_all("section#decisions tbody tr td:nth-child(2)",
                                          "els => els.map(e => e.innerText)")
    assert decisions == ["noisy_labels", "clean_01"]  # newest first

    # the registry: v2 was rolled back, v1 is champion again; history newest first
    rows = page.eval_on_selector_all(
        "section#promotion table", "ts => ts.map(t => [...t.querySelectorAll('tbody tr')].map("
        "r => [...r.cells].map(c => c.innerText)))")
    versions_table, history = rows[-2], rows[-1]
    assert [(r[0], r[1], r[3]) for r in versions_table] == [(versions["v2"], "", "rolled back"),
                                                         (versions["v1"], "champion", "promoted")]
    assert [(r[1], r[2]) for r in history] == [("rollback", "rolled_back"), ("promote", "promoted"),
                                                ("promote", "promoted")]
    assert history[0][6] == versions["v1"] and history[1][6] == versions["v2"]
    page.close()

    # the page is logged as the artifact of a `report` run
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             "tags.`sslvision.stage` = 'report'")[0]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.html"]


def test_report_with_no_run_says_not_run_yet(workdir, browser):
    result = CliRunner().invoke(app, ["report", "--no-log-mlflow"])
    assert result.exit_code == 0, result.output
    out = workdir / "reports/index.html"
    assert "0 of 9 sections have data" in result.output and out.as_uri() in result.output
    assert not (workdir / "mlflow.db").exists()  # reading the registry does not create a store

    page, seen = render(browser, out)
    assert assert_self_contained(page, seen, out) == []
    for spec in SECTIONS:
        text = section_text(page, spec.id)
        assert "not run yet" in text and spec.filled_by in text, spec.id
    assert page.eval_on_selector_all(".error", "els => els.length") == 0
    page.close()


def test_unreadable_input_is_named_and_the_rest_still_renders(workdir):
    from sslvision.report import build_report

    write_stage_outputs(workdir)
    (workdir / "reports/finetune/metrics.json").write_text("{not json")
    write_json(workdir / "reports/audit/metrics.json", ["a", "list"])
    report = build_report()
    page = report.path.read_text()
    assert "reports/finetune/metrics.json: not valid JSON" in page
    assert "reports/audit/metrics.json: expected a JSON object, got list" in page
    assert set(report.ran) == {s.id for s in SECTIONS}
    assert "0.6543" in page and "no MLflow store at sqlite:///" in page  # the other sections are intact


def test_finetune_section_shows_the_label_efficiency_curve(workdir):
    """metrics.json label_efficiency (the finetune stage's curve): a mean ± std table per labels per class, the plot,
    and the pointer to the fine-tuned comparison; a malformed record is left out, not an error."""
    from sslvision.report import finetune_section

    curve = {"labels_per_class": [10, 25, 100], "seeds": 3, "test_rows": 2000,
             "train_rows": {"10": 100, "25": 250, "100": 940}, "short_classes": {"10": 0, "25": 0, "100": 2},
             "systems": {"ssl_linear_probe": {n: {"mean": m, "std": 0.012} for n, m in
                                              (("10", 0.612), ("25", 0.703), ("100", 0.75))},
                         "pixel_logreg": {n: {"mean": m, "std": 0.0} for n, m in
                                          (("10", 0.601), ("25", 0.68), ("100", 0.742))}}}
    metrics = {"balanced_accuracy": 0.75, "worst_class": "Shirt", "worst_class_recall": 0.4, "ece": 0.03,
               "accuracy": 0.76, "label_efficiency": curve}
    write_json(workdir / "reports/finetune/metrics.json", metrics)
    page = "".join(finetune_section())
    assert "Label efficiency on this project" in page and "benchmarks/README.md" in page
    assert "0.612 ± 0.012" in page and "0.742 ± 0.000" in page and page.count("data:image/png") == 1
    assert "label_efficiency.systems" not in page  # not repeated in the folded metrics table
    write_json(workdir / "reports/finetune/metrics.json", {**metrics, "label_efficiency": {"systems": "broken"}})
    assert "Label efficiency" not in "".join(finetune_section())
