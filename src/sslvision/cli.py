"""The ``sslvision`` command line: one command per capability, thin wrappers over the library.

Heavy imports (torch, mlflow, ...) happen inside the commands so that ``sslvision --help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from sslvision.data import EMBEDDINGS, INGESTED

app = typer.Typer(
    name="sslvision",
    help="Self-supervised learning for messy real-world image data: ingest, pretrain, audit, "
    "synthesize, finetune, watch for drift, re-run what degraded.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(err: Exception) -> None:
    from rich.console import Console
    from rich.markup import escape

    # soft_wrap: a long path stays on one line; escape: "[...]" in a message is text, not markup
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}")
    raise typer.Exit(code=2)


# --- demo-data -------------------------------------------------------------------------------------
@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(Path("data/raw"), "--out", help="Directory the scenario is written to."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: params.yaml demo.seed)."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `demo` section."),
    fmnist: Path | None = typer.Option(
        None, "--fmnist", help="Directory with the Fashion-MNIST IDX files (default: the Debian package's)."),
) -> None:
    """Build the realistic Fashion-MNIST scenario: long tail, label noise, duplicates, broken files, drift."""
    from sslvision.demo import build_scenario_cli
    from sslvision.io import OutputError

    try:
        build_scenario_cli(out=out, seed=seed, params=params, fmnist=fmnist)
    except (ValueError, FileNotFoundError, OSError, OutputError) as err:
        _fail(err)


# --- init ------------------------------------------------------------------------------------------
@app.command("init")
def init(
    directory: Path = typer.Argument(..., help="The new project's directory (absent or empty)."),
    data: Path = typer.Option(..., "--data", help="Your labelled images: an ImageFolder directory (class "
                              "directories, optionally under train/ and test/) or a CSV/Parquet manifest "
                              "(path,label[,split]). Read where they are, never copied."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", min=0.01, max=0.9,
                                        help="Share of each class held out for testing when the data has no test "
                                        "split."),
    max_size: int | None = typer.Option(None, "--max-size", min=8, max=4096,
                                        help="Largest image size to choose (default: 64 on a CPU, 128 with a GPU)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the held-out split and the image sample."),
) -> None:
    """Make a ready project for your labelled images: inspect them (layout, classes, channels, size, a
    held-out test split when there is none), write params.yaml (choices explained in comments), dvc.yaml
    and prefect.yaml, initialise git and DVC. Then `cd DIRECTORY && sslvision run` (or `dvc repro`)."""
    from sslvision.project import create_project, default_max_size, inspect_data

    try:
        found = inspect_data(data, test_fraction=test_fraction, seed=seed, max_size=max_size or default_max_size())
        root = create_project(directory, found)
    except (ValueError, OSError) as err:
        _fail(err)
    typer.echo(f"data:     {found.data}")
    for key in ("layout", "split", "channels", "size"):
        if key in found.why:
            value = {"channels": f"{found.channels} ({found.why['channels']})",
                     "size": f"{found.size} ({found.why['size']})"}.get(key, found.why[key])
            typer.echo(f"{key + ':':9s} {value}")
    typer.echo(f"classes:  {', '.join(f'{c} ({n})' for c, n in found.counts.items())}   (images)")
    typer.echo(f"project:  {root}   (params.yaml says why for each choice; production batches go in data/inbox/)")
    typer.echo(f"next:     cd {root} && sslvision run")


# --- ingest ----------------------------------------------------------------------------------------
@app.command("ingest")
def ingest(
    source: Path | None = typer.Argument(
        None, help="ImageFolder directory, CSV/Parquet manifest (path,label[,split]) or IDX directory "
        "(default: params.yaml ingest.source)."),
    out: Path = typer.Option(
        INGESTED, "--out", help="Output directory. With a SOURCE or another --out than the project's "
        "data/ingested the ingest is ad hoc: everything it writes (reports, decode cache) goes under --out."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with an `ingest` section."),
    pool: Path | None = typer.Option(
        None, "--pool", help="Also ingest the production batches under this directory (default: ingest.pool "
        "for the project's ingest, none for an ad-hoc one)."),
) -> None:
    """Decode, validate and convert every image once; quarantine what cannot be used, with the reason."""
    from sslvision.stages.ingest import ingest_cli

    try:
        ingest_cli(source=source, out=out, params=params, pool=pool)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(err)


# --- pretrain --------------------------------------------------------------------------------------
@app.command("pretrain")
def pretrain(
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `pretrain` section."),
    method: str | None = typer.Option(None, "--method", help="Override pretrain.method "
                                         "(simclr|vicreg|dino|mae|cl_mim, or an installed plugin's)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override pretrain.epochs."),
    ingested: Path = typer.Option(INGESTED, "--ingested", help="Ingested data directory."),
) -> None:
    """Self-supervised pretraining on the ingested images; writes the encoder, embeddings and metrics.

    Runs DistributedDataParallel when launched with `torchrun --nproc_per_node=N stages/pretrain.py`.
    """
    from sslvision.pretrain import NonFiniteLossError
    from sslvision.stages.pretrain import pretrain_cli

    overrides = {k: v for k, v in {"method": method, "epochs": epochs}.items() if v is not None}
    try:
        metrics = pretrain_cli(params=params, overrides=overrides, ingested=ingested)
    except (ValueError, FileNotFoundError, OSError, NonFiniteLossError) as err:
        _fail(err)
    typer.echo(f"kNN accuracy {metrics['knn_accuracy']:.4f}, linear probe {metrics['linear_probe_accuracy']:.4f}, "
               f"effective rank {metrics['effective_rank']:.1f}" + (" (COLLAPSED)" if metrics["collapsed"] else ""))


@app.command("sweep-temperature")
def sweep_temperature(
    values: str = typer.Option("0.05,0.1,0.2,0.5", "--values", help="Comma-separated InfoNCE temperatures."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs per run (default: pretrain.epochs)."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `pretrain` section."),
    ingested: Path = typer.Option(INGESTED, "--ingested", help="Ingested data directory."),
) -> None:
    """Short pretrains at several temperatures; writes reports/pretrain/temperature_sweep.{csv,png}.

    The same sweep through DVC experiments: `dvc exp run --queue -S pretrain.temperature=0.05` (one per
    value), then `dvc queue start` and `dvc exp show`.
    """
    from sslvision.pretrain import NonFiniteLossError
    from sslvision.stages.pretrain import sweep_temperature as sweep

    try:
        temps = [float(v) for v in values.split(",") if v.strip()]
        df = sweep(temps, params=params, epochs=epochs, ingested=ingested)
    except (ValueError, FileNotFoundError, OSError, NonFiniteLossError) as err:
        _fail(err)
    typer.echo(df.to_string(index=False))


# --- audit -----------------------------------------------------------------------------------------
@app.command("audit")
def audit(
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with an `audit` section."),
    policy: str | None = typer.Option(None, "--policy", help="Override audit.policy (drop|relabel|keep)."),
    truth: Path | None = typer.Option(
        None, "--truth", help="A scenario truth.parquet: also score the detection (precision/recall/F1/AUROC)."),
    ingested: Path = typer.Option(INGESTED, "--ingested", help="Ingested data directory."),
    embeddings: Path = typer.Option(EMBEDDINGS, "--embeddings", help="Embeddings directory."),
) -> None:
    """Find wrong labels, near-duplicates and outliers with the SSL embeddings; write the cleaned manifest,
    label_issues.parquet and a gallery of the top flagged images (reports/audit/gallery.png)."""
    from sslvision.stages.audit import audit_cli

    overrides = {k: v for k, v in {"policy": policy, "truth": str(truth) if truth else None}.items()
                 if v is not None}
    try:
        m = audit_cli(params=params, ingested=ingested, embeddings=embeddings, overrides=overrides)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(err)
    line = (f"{m['n_label_issues']} label issues in {m['n_audited']} labelled images (estimated noise rate "
            f"{m['noise_rate_estimated']:.3f}), {m['n_outliers']} outliers, {m['n_conflicting_duplicates']} "
            f"conflicting duplicates; actions {m['actions']}")
    if "truth" in m:
        t = m["truth"]
        line += f"\nagainst the truth: precision {t['precision']:.3f}, recall {t['recall']:.3f}, F1 {t['f1']:.3f}, " \
                f"AUROC {t['auroc']:.3f}"
    typer.echo(line)


# --- drift-eval ------------------------------------------------------------------------------------
@app.command("drift-eval")
def drift_eval(
    batch: Path | None = typer.Argument(
        None, help="Production batch directory: flat images (unlabeled) or class subdirectories (labeled) "
        "(default: params.yaml drift_eval.batch)."),
    out: Path | None = typer.Option(
        None, "--out", help="Report directory (trigger.json and plots); default reports/drift-eval/BATCH for a batch "
        "given here (reports/drift is the drift_eval stage's DVC output: evaluating a batch must not change it), "
        "reports/drift without one."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `drift_eval` section."),
) -> None:
    """Compare a production batch with the training reference: input drift, prediction shift, accuracy
    (estimated without labels), label noise; write trigger.json with each metric's threshold and stage."""
    from sslvision.registry import RegistryError
    from sslvision.stages.drift_eval import drift_eval_cli

    try:
        out = out or (Path("reports/drift-eval") / batch.resolve().name if batch else Path("reports/drift"))
        result = drift_eval_cli(batch=batch, params=params, reports=out)
    except (RegistryError, ValueError, FileNotFoundError, OSError) as err:
        _fail(err)
    for name, m in result["metrics"].items():
        value = "n/a" if m["value"] is None else f"{m['value']:.4g}"
        status = "FAILED" if m["failed"] else "ok"
        typer.echo(f"{name:24s} {value:>8s}  threshold {m['threshold']:<8g} {m['stage']:10s} {status}")


# --- synthesize ------------------------------------------------------------------------------------
@app.command("synthesize")
def synthesize(
    generator: str | None = typer.Option(
        None, "--generator",
        help="mae_inpaint | feature_interp | augment, or an installed plugin's (default: params.yaml "
             "synthesize.generator)."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `synthesize` section."),
    out: Path = typer.Option(Path("data/synthetic"), "--out", help="Output directory (images.npy, manifest.parquet); "
                             "an existing non-empty one is replaced only when it is an earlier synthesize output."),
    reports: Path = typer.Option(Path("reports/synthesize"), "--reports", help="Metrics, plots and sample grid."),
) -> None:
    """Make rare-class images from the clean data, keep those the SSL embedding finds class-consistent
    and novel; print made/kept and fidelity per class."""
    from sslvision.stages.synthesize import synthesize_cli

    try:
        metrics = synthesize_cli(params=params, out=out, reports=reports,
                                 overrides={"generator": generator} if generator else None)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(err)
    for name, m in metrics["classes"].items():
        typer.echo(f"{name:16s} real {m['real']:5d}  made {m['made']:5d}  kept {m['kept']:5d}  "
                   f"Fréchet {m['frechet']:.3f}  precision {m['precision']:.2f}  recall {m['recall']:.2f}")
    typer.echo(f"{'total':16s} made {metrics['made']} kept {metrics['kept']} ({metrics['generator']})")


# --- finetune / promote / rollback ----------------------------------------------------------------
@app.command("finetune")
def finetune(
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `finetune` section."),
) -> None:
    """Train the classifier on the SSL encoder, evaluate it on the test split, register it as
    `challenger` and (finetune.registry.auto_promote) run the gated promotion."""
    from sslvision.stages.finetune import finetune_cli

    try:
        m = finetune_cli(params)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(err)
    for key in ("accuracy", "balanced_accuracy", "worst_class_recall", "macro_f1", "ece"):
        typer.echo(f"{key:20s} {m[key]:.4f}")
    typer.echo(f"{'worst class':20s} {m['worst_class']}")
    typer.echo(f"{'promotion':20s} {_decision_line(m['promotion'])}")


def _decision_line(d: dict) -> str:
    line = f"{d['decision']}"
    if d.get("champion") is not None:
        line += f" (champion: version {d['champion']})"
    if d.get("reason"):
        line += f": {d['reason']}"
    for metric, why in (d.get("failed") or {}).items():
        line += f"\n  failed {metric}: {why}"
    return line


@app.command("promote")
def promote(
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `finetune` section "
                                "(registry.model_name, promotion thresholds)."),
    wait: float = typer.Option(600, "--wait", help="Seconds to wait for a pipeline run to finish before refusing."),
) -> None:
    """Gated promotion: evaluate `challenger` and `champion` on the golden set (the test split) with MLflow,
    check the thresholds; if all pass, `champion` moves and the former one stays reachable as `previous`.
    Exits with 1 when the challenger is refused (the failed thresholds are printed). Holds the project
    lock (of the working directory) throughout, as pipeline runs do: no run registers a challenger
    while this one is evaluated."""
    from sslvision.pipeline import PipelineBusy, pipeline_lock
    from sslvision.registry import RegistryError, promote_cli

    try:
        with pipeline_lock(".", wait_s=wait):
            decision = promote_cli(params)
    except (PipelineBusy, RegistryError, ValueError, FileNotFoundError, OSError) as err:
        _fail(err)
    typer.echo(_decision_line(decision))
    if decision["decision"] == "refused":
        raise typer.Exit(code=1)


@app.command("rollback")
def rollback(
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `finetune` section."),
    wait: float = typer.Option(600, "--wait", help="Seconds to wait for a pipeline run to finish before refusing."),
) -> None:
    """Move `champion` back to the `previous` version (the champion before the last promotion), under the
    project lock as `promote`."""
    from sslvision.pipeline import PipelineBusy, pipeline_lock
    from sslvision.registry import RegistryError, rollback_cli

    try:
        with pipeline_lock(".", wait_s=wait):
            decision = rollback_cli(params)
    except (PipelineBusy, RegistryError, ValueError, FileNotFoundError, OSError) as err:
        _fail(err)
    typer.echo(_decision_line(decision))


# --- run (the train flow) --------------------------------------------------------------------------
@app.command("run")
def run(
    from_stage: str | None = typer.Option(
        None, "--from", help="Force this stage and everything downstream of it (default: what is out of date)."),
    root: Path = typer.Option(Path("."), "--root", help="Project root (where dvc.yaml is)."),
    wait: float = typer.Option(600, "--wait", help="Seconds to wait for another run to finish before refusing."),
    summary: bool = typer.Option(True, "--summary/--no-summary", help="Print the key metrics at the end."),
) -> None:
    """Run the pipeline as the Prefect `train` flow: DVC stages as tasks, one MLflow parent run.

    The stages' progress (their log, on stdout) shows as it happens; stderr (Prefect's log, warnings,
    tracebacks) goes to a file named first: a failed stage then ends the run with its cause as the first
    line on stderr, not after hundreds of lines of tracebacks. The file is kept when the run fails."""
    import tempfile

    from sslvision.flows.train import train
    from sslvision.pipeline import PipelineBusy, StageFailed, pipeline_lock, stderr_to

    try:
        # Wait for the project (or be refused) before a flow run starts: a refusal is then one line,
        # not a failed flow run and its traceback.
        with pipeline_lock(root, wait_s=wait):
            fd, log = tempfile.mkstemp(prefix="sslvision-run-", suffix=".log")
            typer.echo(f"log: {log}")
            with open(fd, "wb") as handle, stderr_to(handle.fileno()):
                ran = train(from_stage=from_stage, root=str(root), lock=False)
    except StageFailed as err:
        _fail(StageFailed(f"{err}\nthe run's log: {log}"))
    except (PipelineBusy, ValueError) as err:
        _fail(err)
    Path(log).unlink()
    for stage, did in ran.items():
        typer.echo(f"{stage:12s} {'ran' if did else 'up to date'}")
    if summary:
        _print_summary(root)


def _print_summary(root: Path) -> None:
    from sslvision.summary import latest_pipeline_seconds, render

    report = root / "reports" / "index.html"
    typer.echo(render(root, latest_pipeline_seconds(root), str(report) if report.exists() else None))


@app.command("summary")
def summary_cmd(root: Path = typer.Option(Path("."), "--root", help="Project root (where dvc.yaml is).")) -> None:
    """Key metrics of every stage, the latest pipeline run's stage times, where the report is, and how to
    open the MLflow and Prefect UIs."""
    _print_summary(root)


# --- profile (named params overrides, e.g. the GPU profile) ------------------------------------------
@app.command("profile")
def profile(path: Path = typer.Argument(..., help="Profile file, e.g. profiles/gpu.yaml.")) -> None:
    """Validate a params profile against every stage and print it as `dvc exp run` flags:
    `dvc exp run $(sslvision profile profiles/gpu.yaml)`."""
    from sslvision.params import ParamsError
    from sslvision.profiles import dvc_set_params, load_profile

    try:
        overrides = load_profile(path)
    except ParamsError as err:
        _fail(err)
    typer.echo(" ".join(dvc_set_params(overrides)))


# --- params (params.yaml generated from the settings classes) ---------------------------------------
@app.command("params")
def params_cmd(
    out: Path | None = typer.Option(None, "--out", help="Write the file here (default: print it)."),
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 when --out's file is not the output."),
) -> None:
    """The demo project's params.yaml, generated from the stages' settings classes: every key with its default
    and its description as a comment, and the demo's overrides with their reasons (`sslvision params --out
    params.yaml` rewrites this repository's)."""
    from sslvision.io import OutputError, write_text
    from sslvision.project import demo_params_text

    text = demo_params_text()
    if out is None:
        typer.echo(text, nl=False)
    elif check:
        if not out.is_file() or out.read_text() != text:
            typer.echo(f"{out}: not the generated params.yaml; run `sslvision params --out {out}`", err=True)
            raise typer.Exit(code=1)
    else:
        try:
            write_text(out, text)
        except OutputError as err:
            _fail(err)


# --- monitor / serve (the monitor flow and the deployments) ----------------------------------------
@app.command("monitor")
def monitor_cmd(
    batch: Path | None = typer.Argument(None, help="Production batch directory (default: pending inbox batches)."),
    root: Path = typer.Option(Path("."), "--root", help="Project root (where dvc.yaml is)."),
    retrain: bool = typer.Option(True, "--retrain/--no-retrain", help="Re-run from the failed stage and promote."),
) -> None:
    """Evaluate a production batch; on degradation re-run only the stages downstream of the failure."""
    from sslvision.flows.monitor import monitor
    from sslvision.pipeline import PipelineBusy

    try:
        outcomes = monitor(batch=str(batch) if batch else None, root=str(root), retrain=retrain)
    except (PipelineBusy, ValueError, FileNotFoundError) as err:
        _fail(err)
    for o in outcomes:
        d = o["decision"]
        typer.echo(f"{d['batch']}: " + (f"degraded -> re-run from {d['stage']}: " if d["degraded"] else
                                       "class mix changed -> prior correction: " if d.get("action") else
                                       "healthy, nothing re-runs")
                   + ("; ".join(d["reasons"]) if d.get("action") else ""))
        if "prior_correction" in o:
            typer.echo(f"  prior correction: version {o['prior_correction']['version']}, "
                       f"{o['prior_correction']['promotion']['decision']}")
        ran = o.get("ran")
        if ran:
            typer.echo("  re-ran: " + (", ".join(s for s, r in ran.items() if r) or "nothing"))
        if "promotion" in o:
            typer.echo(f"  promotion: {o['promotion']}")


@app.command("serve")
def serve() -> None:
    """Serve the `monitor` (scheduled, cron from params.yaml) and `train` (started by the degradation
    event) deployments against a Prefect server: start one with `prefect server start` and set
    PREFECT_API_URL=http://127.0.0.1:4200/api first."""
    from prefect import serve as prefect_serve

    from sslvision.flows.deployments import build_deployments
    from sslvision.flows.monitor import MonitorParams
    from sslvision.params import ParamsError, load_section

    try:
        cron = load_section("monitor", MonitorParams).cron
    except ParamsError as err:
        _fail(err)
    prefect_serve(*build_deployments(cron))


# --- predict ---------------------------------------------------------------------------------------
@app.command("predict")
def predict(
    paths: list[Path] = typer.Argument(..., help="Image files, folders (recursively) or CSV/Parquet manifests "
                                       "with a `path` column."),
    model: str | None = typer.Option(None, "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a "
                                     "classifier directory (default: "
                                     "models:/<finetune.registry.model_name>@champion)."),
    out: Path | None = typer.Option(None, "--out", help="Write the rows to this CSV (.parquet: Parquet) file "
                                    "instead of printing them."),
    log_batch: bool = typer.Option(False, "--log-batch", help="Also copy the files predicted into the monitor "
                                   "inbox (params.yaml monitor.inbox) as one new batch, for the scheduled monitor."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, max=65536, help="Files decoded and predicted at a time."),
    top_k: int = typer.Option(3, "--top-k", min=1, max=100, help="Classes listed per file, most probable first."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file (the default model's name, "
                                "the inbox)."),
) -> None:
    """Predict the class of each image with the registered champion (or --model), converting each file
    exactly as ingest converted the model's training images. One row per file: path, label, confidence,
    the top classes with their probabilities, and the reason when a file could not be used."""
    import contextlib

    from sslvision.finetune import FinetuneParams
    from sslvision.io import OutputError, write_csv, write_parquet
    from sslvision.params import ParamsError, load_section
    from sslvision.predict import InboxBatch, list_inputs, load_model, predict_files
    from sslvision.registry import RegistryError

    try:
        if model is None:
            model = f"models:/{load_section('finetune', FinetuneParams, params).registry.model_name}@champion"
        files = list_inputs(paths)
        if not files:
            raise ValueError(f"no files in {', '.join(map(str, paths))}")
        classifier, source = load_model(model)
        batch = None
        if log_batch:
            from sslvision.flows.monitor import MonitorParams

            batch = InboxBatch(load_section("monitor", MonitorParams, params).inbox, model=source)
        with batch or contextlib.nullcontext():
            frame = predict_files(files, classifier, batch_size=batch_size, top_k=top_k, batch=batch, progress=True)
        if out is not None:
            (write_parquet if out.suffix.lower() == ".parquet" else write_csv)(out, frame)
    except (ParamsError, RegistryError, OutputError, ValueError, OSError) as err:
        _fail(err)
    failed = int(frame["error"].notna().sum())
    if out is None:  # one line per file, the full path first (a table would cut long paths)
        width = min(max(map(len, frame["path"]), default=0), 60)
        for r in frame.itertuples(index=False):
            tops = ", ".join(f"{getattr(r, f'top{k}')} {getattr(r, f'top{k}_prob'):.2f}" for k in range(1, top_k + 1)
                             if getattr(r, f"top{k}", None) is not None)
            typer.echo(f"{r.path:{width}s}  " + (f"error: {r.error}" if r.error else
                                                  f"{r.label}  {r.confidence:.3f}  (top {top_k}: {tops})"))
    where = f" -> {out}" if out is not None else ""
    typer.echo(f"{len(frame)} files: {len(frame) - failed} predicted, {failed} not readable as images{where} "
               f"(model: {source.get('uri', source.get('path'))}"
               + (f" version {source['version']})" if "version" in source else ")"))
    if batch is not None:
        typer.echo(f"production batch: {batch.path} ({len(batch.files)} files)" if batch.path else
                   "production batch: none written (no file could be predicted)")


# --- report ----------------------------------------------------------------------------------------
@app.command("report")
def report(
    out: Path = typer.Option(Path("reports/index.html"), "--out", help="HTML file to write."),
    log_mlflow: bool = typer.Option(True, "--log-mlflow/--no-log-mlflow",
                                    help="Also log the page as the artifact of an MLflow run named `report`."),
) -> None:
    """One self-contained HTML page (images embedded, no scripts) from the latest run: dataset card,
    quarantine, SSL curves, label issues, synthetic images, per-class metrics, drift, trigger decisions
    and promotion history. Run it from the project root; a stage not run yet shows as "not run yet"."""
    from sslvision.io import OutputError
    from sslvision.report import build_report, log_report

    try:
        result = build_report(out)
    except (OutputError, OSError) as err:
        _fail(err)
    typer.echo(f"report: {result.path.resolve()} ({len(result.ran)} of {result.total} sections have data)")
    typer.echo(f"open it: {result.path.resolve().as_uri()}")
    if log_mlflow:
        from mlflow.exceptions import MlflowException

        try:
            run_id = log_report(result.path)
        except (MlflowException, OSError) as err:
            _fail(err)
        typer.echo(f"logged to MLflow: artifact {result.path.name} of run {run_id} (run name `report`)")


def main() -> None:  # pragma: no cover - console entry point
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
