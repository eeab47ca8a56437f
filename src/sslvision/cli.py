"""The ``sslvision`` command line: one command per capability, thin wrappers over the library.

Heavy imports (torch, mlflow, ...) happen inside the commands so that ``sslvision --help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

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
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: params.yaml demo.seed)."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Params file with a `demo` section."),
    fmnist: Optional[Path] = typer.Option(
        None, "--fmnist", help="Directory with the Fashion-MNIST IDX files (default: the Debian package's)."),
) -> None:
    """Build the realistic Fashion-MNIST scenario: long tail, label noise, duplicates, broken files, drift."""
    from sslvision.demo import build_scenario_cli

    try:
        build_scenario_cli(out=out, seed=seed, params=params, fmnist=fmnist)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(err)


# --- ingest ----------------------------------------------------------------------------------------
@app.command("ingest")
def ingest(
    source: Optional[Path] = typer.Argument(
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


# --- audit -----------------------------------------------------------------------------------------


def main() -> None:  # pragma: no cover - console entry point
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
