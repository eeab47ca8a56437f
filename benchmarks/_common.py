"""Shared by every benchmark: describe the machine, print the table, write results/NAME.json (a variant run,
``--name`` other than the script's, writes results/variants/SCRIPT/NAME.json)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
VARIANTS = RESULTS / "variants"


def results_dir(name: str) -> Path:
    """Where the results named ``name`` go: ``results/`` for a benchmark's own run (``name`` is the running
    script's name) and for ``summary``; ``results/variants/SCRIPT/`` for a variant (another ``--name``), so
    ``results/`` keeps one file per benchmark."""
    script = Path(sys.argv[0]).stem
    if name in ("summary", script) or not (HERE / f"{script}.py").is_file():
        return RESULTS
    return VARIANTS / script


def find_results(name: str) -> Path | None:
    """The results file named ``name``: ``results/NAME.json``, else ``results/variants/*/NAME.json``."""
    top = RESULTS / f"{name}.json"
    if top.is_file():
        return top
    return next(iter(sorted(VARIANTS.glob(f"*/{name}.json"))), None)


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM{gpu}, Python {platform.python_version()}"


def command_line(argv: list[str] | None = None, script: str | None = None) -> str:
    """How the benchmark was run, quoted for a shell so it can be pasted back (a JSON value such as
    ``mode="finetune"`` or an argument with spaces keeps its quotes): ``argv`` defaults to ``sys.argv[1:]``."""
    args = sys.argv[1:] if argv is None else argv
    return "python " + shlex.join([script or sys.argv[0], *args])


def report(name: str, rows: list[dict], command: str | None = None, extra: dict | None = None) -> Path:
    """Print rows as a table and write ``NAME.json`` in :func:`results_dir` (``benchmarks/results/``, or
    ``benchmarks/results/variants/SCRIPT/`` for a variant).

    Each row: ``{"system", "metric", "value", "unit"}`` (extra keys allowed, e.g. "setting").
    """
    from rich.console import Console
    from rich.table import Table

    for r in rows:
        missing = {"system", "metric", "value", "unit"} - r.keys()
        if missing:
            raise ValueError(f"benchmark row {r} lacks {sorted(missing)}")
    base = ["system", "metric", "value", "unit"]
    keys = base + sorted({k for r in rows for k in r} - set(base))
    table = Table(title=f"{name} — {machine()}")
    for k in keys:
        table.add_column(k, justify="right" if k == "value" else "left")
    for r in rows:
        v = r.get("value")
        shown = f"{v:.4g}" if isinstance(v, float) else str(v)
        table.add_row(*[shown if k == "value" else str(r.get(k, "")) for k in keys])
    Console().print(table)
    out = {"machine": machine(), "command": command or command_line(), "rows": rows}
    if extra:
        out.update(extra)
    folder = results_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    return path
