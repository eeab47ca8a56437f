"""``sslvision report``: one self-contained HTML page from what the latest run left on disk.

Every section is read from the files the stages already write (the paths ``dvc.yaml`` declares),
the monitor's decisions and the MLflow registry; nothing is recomputed except two figures, the
pretraining curves, drawn from ``reports/pretrain/history.csv``, and the label-efficiency curve, drawn from
``reports/finetune/metrics.json``. Images are embedded as base64 data
URIs and the page has no script, stylesheet link or font to fetch, so the one file can be mailed,
opened offline, or logged to MLflow as a single artifact.

A stage that has not run yet shows as "not run yet" with the command that fills the section; an
input that exists but cannot be read shows as a note naming the file and the problem. Neither stops
the report, and an image is embedded only after Pillow has decoded it, so the page never shows a
broken image. Every piece of text taken from the inputs is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sslvision import io, tracking

DEFAULT_OUT = Path("reports/index.html")
# The on-disk layout dvc.yaml declares (data.py documents the ingested files).
REPORTS = Path("reports")
QUARANTINE = Path("data/ingested/quarantine.parquet")
MAX_ROWS = 50  # longer tables (quarantined files, decisions, registry history) show the newest/first rows
IMAGE_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


class InputError(ValueError):
    """A report input exists but cannot be read (the message names the file and the problem)."""


# --- small HTML pieces (every input string goes through _esc) ---------------------------------------

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def _note(text: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{_esc(text)}</p>'


def _table(df: pd.DataFrame, max_rows: int | None = None, caption: str | None = None) -> str:
    shown = df if max_rows is None else df.head(max_rows)
    head = "".join(f"<th>{_esc(c)}</th>" for c in shown.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in shown.itertuples(index=False, name=None))
    if len(shown) < len(df):
        caption = f"{caption + '; ' if caption else ''}the first {len(shown)} of {len(df)} rows"
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _metrics(d: dict[str, Any], skip: tuple[str, ...] = (), title: str = "all metrics (metrics.json)") -> str:
    """A folded metric | value table of a (flattened) metrics.json, without the keys under ``skip``."""
    flat = tracking.flatten(d)
    rows = [(k, v) for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in skip)]
    table = _table(pd.DataFrame(rows, columns=["metric", "value"]))
    return f"<details><summary>{_esc(title)}</summary>{table}</details>"


def _key_metrics(d: dict[str, Any], keys: tuple[str, ...], caption: str) -> str:
    return _table(pd.DataFrame([(k, d[k]) for k in keys if k in d], columns=["metric", "value"]), caption=caption)


def _image(path: Path, alt: str) -> str:
    """The image embedded as a data URI, or a note when it is missing or does not decode."""
    from PIL import Image

    if not path.exists():
        return _note(f"{path}: not written by this run")
    data = path.read_bytes()
    try:
        with Image.open(_io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
    except Exception as err:  # Pillow raises many types for a bad file; any of them means "not shown"
        return _note(f"{path}: not a readable image ({type(err).__name__}: {err})", "error")
    if fmt not in IMAGE_MIME:
        return _note(f"{path}: {fmt} images cannot be embedded (PNG, JPEG, GIF or WebP only)", "error")
    return _img_tag(IMAGE_MIME[fmt], data, alt, path.name)


def _img_tag(mime: str, data: bytes, alt: str, title: str) -> str:
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<figure><img src="{uri}" alt="{_esc(alt)}"><figcaption>{_esc(title)}</figcaption></figure>'


def _figure(fig: Any, alt: str, title: str) -> str:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return _img_tag("image/png", buf.getvalue(), alt, title)


def _markdown(text: str) -> str:
    """Markdown (the dataset card) to HTML: raw HTML is escaped, links and images stay text, and
    headings move two levels down to sit under the section's heading."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table").disable(["link", "image", "autolink"])
    tokens = md.parse(text)
    for tok in tokens:
        if tok.type in ("heading_open", "heading_close"):
            tok.tag = f"h{min(6, int(tok.tag[1]) + 2)}"
    return md.renderer.render(tokens, md.options, {})


def _utc(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_s))


# --- reading inputs ----------------------------------------------------------------------------------

def _json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON: {err}") from err


def _csv(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable CSV file: {err}") from err


def _parquet(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except (ValueError, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file: {err}") from err


def _mapping(path: Path) -> dict[str, Any] | None:
    d = _json(path)
    if d is not None and not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


# --- the sections ------------------------------------------------------------------------------------
# Each returns the section's HTML pieces, or None when the stage that writes its inputs has not run.

def dataset_section() -> list[str] | None:
    d = REPORTS / "ingest"
    metrics, card = _mapping(d / "metrics.json"), d / "dataset_card.md"
    if metrics is None and not card.exists():
        return None
    out = [_image(d / "class_counts.png", "images per class")]
    if card.exists():
        out.append('<div class="card">' + _markdown(card.read_text()) + "</div>")
    else:
        out.append(_note(f"{card}: not written by this run"))
        counts = _csv(d / "class_counts.csv")
        if counts is not None:
            out.append(_table(counts, caption="train images per class (class_counts.csv)"))
    if metrics is not None:
        out.append(_metrics(metrics, skip=("class_counts",)))
    return out


def quarantine_section() -> list[str] | None:
    df = _parquet(QUARANTINE)
    if df is None:
        return None
    if df.empty:
        return [_note("no file was quarantined: every listed file decoded and was taken")]
    missing = {"source_path", "reason"} - set(df.columns)
    if missing:
        raise InputError(f"{QUARANTINE}: missing columns {sorted(missing)}")
    by_reason = df.groupby("reason", sort=False).size().rename("files").reset_index()
    by_reason = by_reason.sort_values("files", ascending=False, kind="stable")
    cols = [c for c in ("source_path", "split", "reason", "detail") if c in df.columns]
    return [f"<p>{len(df)} files were not taken.</p>", _table(by_reason, caption="by reason"),
            _table(df[cols], MAX_ROWS, caption="files")]


def pretrain_section() -> list[str] | None:
    d = REPORTS / "pretrain"
    metrics, history = _mapping(d / "metrics.json"), _csv(d / "history.csv")
    if metrics is None and history is None:
        return None
    out = []
    if history is not None:
        out.append(_pretrain_curves(history, d / "history.csv"))
    else:
        out.append(_note(f"{d / 'history.csv'}: not written by this run"))
    if metrics is not None:
        out.append(_key_metrics(metrics, ("method", "backbone", "knn_accuracy", "linear_probe_accuracy",
                                          "effective_rank", "collapsed", "train_img_s", "steps", "train_s"),
                                "kNN and linear-probe accuracy on the test split, collapse, throughput"))
        out.append(_metrics(metrics))
    return out


def _pretrain_curves(history: pd.DataFrame, path: Path) -> str:
    from matplotlib.figure import Figure

    if "loss" not in history.columns or history.empty:
        raise InputError(f"{path}: no 'loss' column or no rows")
    x = "step" if "step" in history.columns else "epoch" if "epoch" in history.columns else None
    xs = history[x] if x else history.index
    panels = [c for c in ("loss", "effective_rank", "train_img_s") if c in history.columns]
    fig = Figure(figsize=(4 * len(panels), 3.2))
    for ax, col in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        ax.plot(xs, history[col], marker="o")
        ax.set_xlabel(x or "row")
        ax.set_title(col.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure(fig, "self-supervised loss, effective rank and throughput over training", "history.csv")


def audit_section() -> list[str] | None:
    d = REPORTS / "audit"
    metrics = _mapping(d / "metrics.json")
    if metrics is None and not (d / "gallery.png").exists():
        return None
    out = [_image(d / "gallery.png", "the most likely label issues with their given and suggested labels")]
    by_class = _csv(d / "issues_by_class.csv")
    if by_class is not None:
        out.append(_table(by_class, caption="issues by class (issues_by_class.csv)"))
    if metrics is not None:
        out.insert(1, _key_metrics(metrics, ("n_audited", "n_label_issues", "issue_rate", "noise_rate_estimated",
                                             "n_outliers", "n_conflicting_duplicates"), "label audit"))
        out.append(_metrics(metrics, skip=("noise_rate_by_class", "issues_by_class", "labelled_by_class")))
    return out


def synthesize_section() -> list[str] | None:
    d = REPORTS / "synthesize"
    metrics = _mapping(d / "metrics.json")
    if metrics is None and not (d / "grid.png").exists():
        return None
    out = [_image(d / "grid.png", "synthetic images per rare class")]
    per_class = _csv(d / "per_class.csv")
    if per_class is not None:
        out.append(_table(per_class, caption="made and kept per class (per_class.csv)"))
    if metrics is not None:
        out.append(_key_metrics(metrics, ("generator", "made", "kept", "accept_rate", "all_frechet", "all_precision",
                                          "all_recall"), "all synthesised classes"))
        out.append(_metrics(metrics, skip=("classes",)))
    return out


def finetune_section() -> list[str] | None:
    d = REPORTS / "finetune"
    metrics = _mapping(d / "metrics.json")
    if metrics is None and not (d / "confusion_matrix.png").exists():
        return None
    out = []
    if metrics is not None:
        out.append(_key_metrics(metrics, ("accuracy", "balanced_accuracy", "worst_class_recall", "worst_class",
                                          "macro_f1", "ece"), "on the test split"))
        out += _baselines(metrics)
        out.append(_metrics(metrics, skip=("per_class_recall", "confusion_matrix", "promotion", "baselines",
                                           "label_efficiency")))
    recall = _csv(d / "per_class_recall.csv")
    if recall is not None:
        pixel = ((metrics or {}).get("baselines") or {}).get("pixel_logreg") or {}
        if isinstance(pixel.get("per_class_recall"), dict) and "class" in recall:
            recall["pixel baseline recall"] = recall["class"].map(pixel["per_class_recall"])
        out.append(_table(recall, caption="recall per class (per_class_recall.csv; the pixel baseline's from "
                                          "metrics.json)"))
    out.append(_image(d / "confusion_matrix.png", "confusion matrix on the test split"))
    if (d / "reliability.png").exists():
        out.append(_image(d / "reliability.png", "reliability diagram"))
    return out + _label_efficiency((metrics or {}).get("label_efficiency")) + _slices(d, metrics or {})


SLICE_COLUMNS = ("label", "kind", "size", "error", "class_error", "score", "predicted_as", "description")


def label_efficiency_axes(ax: Any, series: dict[str, tuple[list, list, list]], counts: list[int], *, xlabel: str,
                          ylabel: str, title: str) -> None:
    """Draw label-efficiency curves on ``ax``: ``series`` maps a legend label to (labels per class, means, stds),
    one error-bar line each, on a log axis ticked at ``counts`` (the report's and benchmarks/label_efficiency.py's
    figure)."""
    for label, (ns, means, stds) in series.items():
        ax.errorbar(ns, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _slices(d: Path, metrics: dict[str, Any]) -> list[str]:
    """The slices subsection: slices.csv, the gallery, and the slice_reweight decision (finetune.slices)."""
    table = _csv(d / "slices.csv")
    if table is None:
        return []
    out = ["<h3>Slices: where the classifier fails (reports/finetune/slices.csv)</h3>"]
    reweight = metrics.get("slice_reweight")
    if isinstance(reweight, dict):
        method = {"just_train_twice": "Just Train Twice", "subsample": "shortcut slices subsampled"}.get(
            reweight.get("method"), reweight.get("method"))
        out.append(_key_metrics(reweight, (
            "decision", "reason", "upweight", "error_set", "train_rows_dropped", "val_worst_slice_accuracy_first",
            "val_worst_slice_accuracy_second", "val_balanced_accuracy_first", "val_balanced_accuracy_second"),
            f"slice_reweight ({method}): decided on validation"))
    if len(table):
        out.append(_table(table[[c for c in SLICE_COLUMNS if c in table]], caption=(
            "groups of similar test images (k-means on the SSL embeddings) with an error far above their classes' "
            "average, or a shortcut: a group holding far more of a class's train images than of its test images")))
    else:
        out.append(_note("no slice: no group of test images has an error far above its class average"))
    out.append(_image(d / "slices.png", "images of each slice"))
    return out


BENCHMARK_FINETUNE = Path("benchmarks/results/finetune.json")


def _baselines(metrics: dict[str, Any]) -> list[str]:
    """The classifier beside the baselines a user could build without sslvision: the pixel baseline this run
    fitted (metrics.json ``baselines``) and, when this project has a benchmark result, the same network
    trained from scratch on the raw labels (another run: its command and machine are named)."""
    keys = ("balanced_accuracy", "worst_class", "worst_class_recall", "accuracy")
    rows = [{"model": "this run's classifier", **{k: metrics.get(k) for k in keys}, "source": "metrics.json"}]
    for name, b in (metrics.get("baselines") or {}).items():
        if isinstance(b, dict):
            rows.append({"model": b.get("model", name), **{k: b.get(k) for k in keys},
                         "source": f"metrics.json baselines.{name}"})
    bench = _mapping(BENCHMARK_FINETUNE) if BENCHMARK_FINETUNE.exists() else None
    if bench is not None:
        scratch = [r for r in bench.get("rows") or []
                   if isinstance(r, dict) and r.get("system") == bench.get("baseline")]
        by_metric = {r.get("metric"): r.get("value") for r in scratch}
        if "balanced_accuracy" in by_metric:
            rows.append({"model": f"{bench.get('baseline')} (benchmark)", **{k: by_metric.get(k) for k in keys},
                         "source": f"{BENCHMARK_FINETUNE}: {bench.get('command')} on {bench.get('machine')}"})
    if len(rows) == 1:
        return []
    return [_table(pd.DataFrame(rows), caption="the classifier beside the baselines (test split)")]


LABEL_EFFICIENCY = {"ssl_linear_probe": "SSL encoder + linear probe", "pixel_logreg": "pixel PCA + logistic regression"}


def _label_efficiency(curve: Any) -> list[str]:
    """The label-efficiency curve of this run (metrics.json ``label_efficiency``, finetune.label_efficiency): a
    table of mean ± std balanced accuracy per labels per class and system, and the plot; [] when it did not run."""
    if not isinstance(curve, dict) or not isinstance(curve.get("systems"), dict) or not curve.get("labels_per_class"):
        return []
    from matplotlib.figure import Figure

    counts = [n for n in curve["labels_per_class"] if isinstance(n, int)]
    systems = {s: v for s, v in curve["systems"].items() if s in LABEL_EFFICIENCY and isinstance(v, dict)}
    short = curve.get("short_classes") if isinstance(curve.get("short_classes"), dict) else {}
    rows = [{"labels per class": n, "training rows": (curve.get("train_rows") or {}).get(str(n)),
             **{LABEL_EFFICIENCY[s]: _mean_std(v.get(str(n))) for s, v in systems.items()},
             "classes with fewer rows": short.get(str(n))} for n in counts]
    if not rows or not systems:
        return []
    title = ("Label efficiency on this project (linear probe on the SSL encoder vs pixel PCA + logistic "
             "regression)")
    fig = Figure(figsize=(6.4, 4.0))
    series = {}
    for s, v in systems.items():
        points = [(n, v[str(n)]) for n in counts if isinstance(v.get(str(n)), dict)]
        series[LABEL_EFFICIENCY[s]] = ([n for n, _ in points], [m.get("mean") for _, m in points],
                                       [m.get("std") or 0 for _, m in points])
    label_efficiency_axes(fig.subplots(), series, counts, xlabel="labels per class",
                          ylabel="balanced accuracy, test split", title=title)
    fig.tight_layout()
    draws = curve.get("seeds")
    caption = (f"balanced accuracy on {curve.get('test_rows')} test images, mean ± std over {draws} draw"
               f"{'s' if draws != 1 else ''} of the labelled rows (label_efficiency.csv); a class with fewer real "
               "training rows than the count gives all it has")
    return ["<h3>Label efficiency on this project (reports/finetune/label_efficiency.csv)</h3>",
            _table(pd.DataFrame(rows), caption=caption),
            _figure(fig, title, "label_efficiency.csv"),
            "<p>The encoder stays frozen here (a linear probe), trained on the audited labels of this project; the "
            "fine-tuned encoder against the same pixel baseline and a network trained from scratch is in "
            "benchmarks/README.md (label_efficiency, on Fashion-MNIST).</p>"]


def _mean_std(v: Any) -> str:
    if not isinstance(v, dict) or not isinstance(v.get("mean"), int | float):
        return "n/a"
    std = v.get("std")
    return f"{v['mean']:.3f} ± {std:.3f}" if isinstance(std, int | float) else f"{v['mean']:.3f}"


def drift_section() -> list[str] | None:
    d = REPORTS / "drift"
    trigger = _mapping(d / "trigger.json")
    plots = sorted(d.glob("*.png"))
    if trigger is None and not plots:
        return None
    out = []
    if trigger is not None:
        out.append(f"<p>Batch <code>{_esc(trigger.get('batch'))}</code>: {_esc(_fmt(trigger.get('n_images')))} "
                   f"images, {'labeled' if trigger.get('labeled') else 'unlabeled'}.</p>")
        rows = [{"metric": name, **{k: m.get(k) for k in ("value", "threshold", "direction", "stage", "failed")}}
                for name, m in (trigger.get("metrics") or {}).items()]
        out.append(_table(pd.DataFrame(rows), caption="monitored metrics (trigger.json)") if rows
                   else _note(f"{d / 'trigger.json'}: no monitored metrics"))
    out += [_image(p, p.stem.replace("_", " ")) for p in plots]
    return out


def _monitor_reports() -> Path:
    from sslvision.flows.monitor import MonitorParams
    from sslvision.params import load_section, params_path

    return Path(load_section("monitor", MonitorParams).reports if params_path().exists() else MonitorParams().reports)


def decisions_section() -> list[str] | None:
    root = _monitor_reports()
    files = sorted(root.glob("*/decision.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not files:
        return None
    rows = []
    for f in files[:MAX_ROWS]:
        o = _mapping(f) or {}
        d = o.get("decision") or {}
        ran = o.get("ran") or {}
        promotion = o.get("promotion")
        rows.append({
            "evaluated": _utc(f.stat().st_mtime),
            "batch": d.get("batch", f.parent.name),
            "outcome": f"re-run from {d.get('stage')}" if d.get("degraded") else "healthy",
            "reasons": "; ".join(d.get("reasons") or []),
            "joined pool": o.get("joined_pool"),
            "re-ran": ", ".join(s for s, r in ran.items() if r) or None,
            "promotion": promotion.get("decision") if isinstance(promotion, dict) else promotion,
        })
    return [f"<p>{len(files)} production batches evaluated (<code>{_esc(root)}/*/decision.json</code>), "
            "newest first.</p>", _table(pd.DataFrame(rows), caption=None if len(files) <= MAX_ROWS
                                        else f"the newest {MAX_ROWS} of {len(files)}")]


def promotion_section() -> list[str] | None:
    path = REPORTS / "finetune" / "promotion.json"
    latest = _mapping(path)
    registry = _registry()
    if latest is None and registry is None:
        return None
    out = ["<h3>Latest decision (reports/finetune/promotion.json)</h3>"]
    out += _promotion_decision(latest) if latest is not None else [_note(f"{path}: not written by this run")]
    out += ["<h3>MLflow registry</h3>"]
    out += registry if registry is not None else [_note(f"no MLflow store at {tracking.tracking_uri()}")]
    return out


def _promotion_decision(p: dict[str, Any]) -> list[str]:
    keys = ("model", "decision", "challenger", "champion_before", "champion", "previous", "golden_size", "reason")
    out = [_table(pd.DataFrame([(k, p[k]) for k in keys if k in p], columns=["field", "value"]))]
    ours, theirs, limits = (p.get(k) or {} for k in ("challenger_metrics", "champion_metrics", "thresholds"))
    names = list(dict.fromkeys([*ours, *theirs, *limits]))
    if names:
        out.append(_table(pd.DataFrame({"metric": names, "challenger": [ours.get(n) for n in names],
                                        "champion": [theirs.get(n) for n in names],
                                        "threshold": [limits.get(n) for n in names]}),
                          caption="evaluated on the golden set"))
    for metric, why in (p.get("failed") or {}).items():
        out.append(_note(f"failed {metric}: {why}", "error"))
    return out


def _registry() -> list[str] | None:
    """Registered models (versions, aliases) and the promote/rollback runs, from the MLflow store;
    None when the embedded store does not exist yet (reading must not create it)."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    models = client.search_registered_models()
    out = [f"<p>Store <code>{_esc(uri)}</code>.</p>"]
    if not models:
        out.append(_note("no registered model yet"))
    for rm in models:
        by_version: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        name = rm.name.replace("'", "\\'")
        versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True)
        rows = []
        for v in versions[:MAX_ROWS]:
            m = client.get_run(v.run_id).data.metrics if v.run_id else {}
            rows.append({"version": v.version, "aliases": ", ".join(sorted(by_version.get(str(v.version), []))),
                         "registered": _utc(v.creation_timestamp / 1000),
                         "promotion": (v.tags or {}).get("sslvision.promotion"),
                         "balanced_accuracy": m.get("balanced_accuracy"),
                         "worst_class_recall": m.get("worst_class_recall"), "ece": m.get("ece"),
                         "run": v.run_id})
        out.append(f"<h4>{_esc(rm.name)}</h4>")
        out.append(_table(pd.DataFrame(rows), caption="versions, newest first (metrics of the finetune run)")
                   if rows else _note("no version registered"))
    out.append(_history(client))
    return out


# what registry.promote_cli and registry.rollback_cli log in their runs
DECISION_ARTIFACT = {"promote": "promotion.json", "rollback": "rollback.json"}


def _history(client: Any) -> str:
    """Every promote and rollback run (newest first) with the decision it logged."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = [] if not exp_ids else [
        r for stage in ("promote", "rollback")
        for r in client.search_runs(exp_ids, f"tags.`sslvision.stage` = '{stage}'", max_results=MAX_ROWS,
                                    order_by=["attributes.start_time DESC"])]
    runs = sorted(runs, key=lambda r: r.info.start_time, reverse=True)[:MAX_ROWS]
    if not runs:
        return _note("no promote or rollback run yet")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            stage = r.data.tags.get("sslvision.stage")
            d = _logged_decision(client, r.info.run_id, DECISION_ARTIFACT[stage], Path(tmp))
            why = "; ".join(f"{k}: {v}" for k, v in (d.get("failed") or {}).items()) or d.get("reason")
            rows.append({"started": _utc(r.info.start_time / 1000), "action": stage,
                         "decision": d.get("decision", r.data.tags.get("sslvision.decision")),
                         "model": d.get("model"), "challenger": d.get("challenger"),
                         "champion before": d.get("champion_before", d.get("demoted")),
                         "champion after": d.get("champion"), "why": why, "run": r.info.run_id,
                         "status": r.info.status})
    return _table(pd.DataFrame(rows), caption="promote and rollback runs, newest first")


def _logged_decision(client: Any, run_id: str, name: str, tmp: Path) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # one small file per run: no progress bars
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        path = Path(client.download_artifacts(run_id, name, str(tmp)))
    except (MlflowException, OSError):  # a run that failed before logging its decision
        return {}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return _mapping(path) or {}


# --- the page ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SectionSpec:
    id: str
    title: str
    filled_by: str  # the command that writes the section's inputs
    build: Callable[[], list[str] | None]


SECTIONS = (
    SectionSpec("dataset", "Dataset card", "dvc repro ingest", dataset_section),
    SectionSpec("quarantine", "Quarantine", "dvc repro ingest", quarantine_section),
    SectionSpec("pretrain", "Self-supervised pretraining", "dvc repro pretrain", pretrain_section),
    SectionSpec("audit", "Label issues", "dvc repro audit", audit_section),
    SectionSpec("synthesize", "Synthetic images", "dvc repro synthesize", synthesize_section),
    SectionSpec("finetune", "Classifier: per-class metrics", "dvc repro finetune", finetune_section),
    SectionSpec("drift", "Drift", "dvc repro drift_eval", drift_section),
    SectionSpec("decisions", "Trigger decisions", "sslvision monitor BATCH", decisions_section),
    SectionSpec("promotion", "Promotion history", "dvc repro finetune", promotion_section),
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1150px;padding:1em 2em;
color:#222;line-height:1.4}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav ul{columns:3;padding-left:1.2em} .ran{color:#1a7f37} .notrun{color:#888}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em} caption{text-align:left;color:#555;padding:.2em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top} th{background:#f4f4f4}
figure{margin:1em 0} img{max-width:100%;height:auto;border:1px solid #eee} figcaption{color:#666;font-size:.85em}
.note{color:#666;font-style:italic} .error{color:#b42318}
.card{background:#fafafa;padding:.2em 1em;border:1px solid #eee}
code{background:#f4f4f4;padding:0 .2em} summary{cursor:pointer;color:#555;margin:.5em 0}
"""


@dataclass(frozen=True)
class Report:
    path: Path
    ran: tuple[str, ...]  # ids of the sections that have data
    total: int


def build_report(out: str | Path = DEFAULT_OUT) -> Report:
    """Write the page to ``out`` (atomically) from the files in the working directory (the project root)."""
    out = Path(out)
    parts, ran = [], []
    for spec in SECTIONS:
        try:
            body = spec.build()
        except Exception as err:  # one unreadable input must not cost the rest of the report
            body = [_note(f"this section could not be built: {type(err).__name__}: {err}", "error")]
        if body is None:
            body = [f'<p class="notrun">not run yet: <code>{_esc(spec.filled_by)}</code> writes it.</p>']
        else:
            ran.append(spec.id)
        parts.append(f'<section id="{spec.id}"><h2>{_esc(spec.title)}</h2>{"".join(body)}</section>')
    nav = "".join(f'<li><a href="#{s.id}">{_esc(s.title)}</a> '
                  + ('<span class="ran">&#10003;</span>' if s.id in ran else '<span class="notrun">not run yet</span>')
                  + "</li>" for s in SECTIONS)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>sslvision report</title><style>{CSS}</style></head><body>"
            f"<h1>sslvision report</h1><p class=\"note\">{_esc(Path.cwd())}, generated {_utc(time.time())}; "
            f"{len(ran)} of {len(SECTIONS)} sections have data.</p><nav><ul>{nav}</ul></nav>"
            + "".join(parts) + "</body></html>\n")
    io.write_text(out, page)
    return Report(path=out, ran=tuple(ran), total=len(SECTIONS))


def log_report(path: str | Path) -> str:
    """Log the page as the artifact of an MLflow run named ``report``; return the run id."""
    import mlflow

    with tracking.stage_run("report", {"out": str(path)}) as run:
        mlflow.log_artifact(str(path))
    return run.info.run_id
