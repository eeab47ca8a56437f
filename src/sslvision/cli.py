"""The ``sslvision`` command line: one command per capability, thin wrappers over the library.

Heavy imports (torch, mlflow, ...) happen inside the commands so that ``sslvision --help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

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

    Console(stderr=True).print(f"[bold red]error:[/] {err}")
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


# --- ingest ----------------------------------------------------------------------------------------
@app.command("ingest")
def ingest(
    source: Path | None = typer.Argument(
        None, help="ImageFolder directory, CSV/Parquet manifest (path,label[,split]) or IDX directory "
        "(default: params.yaml ingest.source)."),
    out: Path = typer.Option(Path("data/ingested"), "--out", help="Output directory."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with an `ingest` section."),
) -> None:
    """Decode, validate and convert every image once; quarantine what cannot be used, with the reason."""
    from sslvision.ingest import ingest_cli

    try:
        ingest_cli(source=source, out=out, params=params)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(err)


# --- pretrain --------------------------------------------------------------------------------------
@app.command("pretrain")
def pretrain(
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `pretrain` section."),
    method: str | None = typer.Option(None, "--method", help="Override pretrain.method "
                                         "(simclr|vicreg|dino|mae|cl_mim)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override pretrain.epochs."),
    ingested: Path = typer.Option(Path("data/ingested"), "--ingested", help="Ingested data directory."),
) -> None:
    """Self-supervised pretraining on the ingested images; writes the encoder, embeddings and metrics.

    Runs DistributedDataParallel when launched with `torchrun --nproc_per_node=N stages/pretrain.py`.
    """
    from sslvision.pretrain import NonFiniteLossError, pretrain_cli

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
    ingested: Path = typer.Option(Path("data/ingested"), "--ingested", help="Ingested data directory."),
) -> None:
    """Short pretrains at several temperatures; writes reports/pretrain/temperature_sweep.{csv,png}.

    The same sweep through DVC experiments: `dvc exp run --queue -S pretrain.temperature=0.05` (one per
    value), then `dvc queue start` and `dvc exp show`.
    """
    from sslvision.pretrain import NonFiniteLossError, sweep_temperature as sweep

    try:
        temps = [float(v) for v in values.split(",") if v.strip()]
        df = sweep(temps, params=params, epochs=epochs, ingested=ingested)
    except (ValueError, FileNotFoundError, OSError, NonFiniteLossError) as err:
        _fail(err)
    typer.echo(df.to_string(index=False))


# --- audit -----------------------------------------------------------------------------------------


# --- drift-eval ------------------------------------------------------------------------------------
@app.command("drift-eval")
def drift_eval(
    batch: Path | None = typer.Argument(
        None, help="Production batch directory: flat images (unlabeled) or class subdirectories (labeled) "
        "(default: params.yaml drift_eval.batch)."),
    out: Path = typer.Option(Path("reports/drift"), "--out", help="Report directory (trigger.json and plots)."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `drift_eval` section."),
) -> None:
    """Compare a production batch with the training reference: input drift, prediction shift, accuracy
    (estimated without labels), label noise; write trigger.json with each metric's threshold and stage."""
    from sslvision.drift import drift_eval_cli

    try:
        result = drift_eval_cli(batch=batch, params=params, reports=out)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(err)
    for name, m in result["metrics"].items():
        value = "n/a" if m["value"] is None else f"{m['value']:.4g}"
        status = "FAILED" if m["failed"] else "ok"
        typer.echo(f"{name:24s} {value:>8s}  threshold {m['threshold']:<8g} {m['stage']:10s} {status}")


# --- synthesize ------------------------------------------------------------------------------------
@app.command("synthesize")
def synthesize(
    generator: str | None = typer.Option(
        None, "--generator", help="mae_inpaint | feature_interp | augment (default: params.yaml synthesize.generator)."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `synthesize` section."),
    out: Path = typer.Option(Path("data/synthetic"), "--out", help="Output directory (images.npy, manifest.parquet)."),
    reports: Path = typer.Option(Path("reports/synthesize"), "--reports", help="Metrics, plots and sample grid."),
) -> None:
    """Make rare-class images from the clean data, keep those the SSL embedding finds class-consistent
    and novel; print made/kept and fidelity per class."""
    from sslvision.synthesize import synthesize_cli

    try:
        metrics = synthesize_cli(params=params, out=out, reports=reports,
                                 overrides={"generator": generator} if generator else None)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(err)
    for name, m in metrics["classes"].items():
        typer.echo(f"{name:16s} real {m['real']:5d}  made {m['made']:5d}  kept {m['kept']:5d}  "
                   f"Fréchet {m['frechet']:.3f}  precision {m['precision']:.2f}  recall {m['recall']:.2f}")
    typer.echo(f"{'total':16s} made {metrics['made']} kept {metrics['kept']} ({metrics['generator']})")


# --- run (the train flow) --------------------------------------------------------------------------
@app.command("run")
def run(
    from_stage: str | None = typer.Option(
        None, "--from", help="Force this stage and everything downstream of it (default: what is out of date)."),
    root: Path = typer.Option(Path("."), "--root", help="Project root (where dvc.yaml is)."),
    wait: float = typer.Option(600, "--wait", help="Seconds to wait for another run to finish before refusing."),
) -> None:
    """Run the pipeline as the Prefect `train` flow: DVC stages as tasks, one MLflow parent run."""
    from pipelines.train import train
    from sslvision.pipeline import PipelineBusy

    try:
        ran = train(from_stage=from_stage, root=str(root), wait_s=wait)
    except (PipelineBusy, ValueError) as err:
        _fail(err)
    for stage, did in ran.items():
        typer.echo(f"{stage:12s} {'ran' if did else 'up to date'}")


# --- monitor / serve (the monitor flow and the deployments) ----------------------------------------
@app.command("monitor")
def monitor_cmd(
    batch: Path | None = typer.Argument(None, help="Production batch directory (default: pending inbox batches)."),
    root: Path = typer.Option(Path("."), "--root", help="Project root (where dvc.yaml is)."),
    retrain: bool = typer.Option(True, "--retrain/--no-retrain", help="Re-run from the failed stage and promote."),
) -> None:
    """Evaluate a production batch; on degradation re-run only the stages downstream of the failure."""
    from pipelines.monitor import monitor
    from sslvision.pipeline import PipelineBusy

    try:
        outcomes = monitor(batch=str(batch) if batch else None, root=str(root), retrain=retrain)
    except (PipelineBusy, ValueError, FileNotFoundError) as err:
        _fail(err)
    for o in outcomes:
        d = o["decision"]
        typer.echo(f"{d['batch']}: " + ("healthy, nothing re-runs" if not d["degraded"] else
                                       f"degraded -> re-run from {d['stage']}: " + "; ".join(d["reasons"])))
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

    from pipelines.deployments import build_deployments
    from pipelines.monitor import MonitorParams
    from sslvision.params import load_section

    prefect_serve(*build_deployments(load_section("monitor", MonitorParams).cron))


def main() -> None:  # pragma: no cover - console entry point
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
