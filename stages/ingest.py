"""DVC stage ``ingest``: decode the source named in params.yaml (``ingest.source``, plus the batches
under ``ingest.pool``) into ``data/ingested/``; metrics and plots in ``reports/ingest/``; one MLflow run.

Run from the project root (``dvc repro ingest``). All logic is in ``sslvision.ingest``.
"""

import sys
from pathlib import Path

from sslvision.ingest import ingest_cli
from sslvision.params import params_path, require_sections

if __name__ == "__main__":
    try:
        require_sections("ingest", path=params_path())
        ingest_cli(source=None, out=Path("data/ingested"), params=params_path())
    except (ValueError, OSError) as err:
        sys.exit(f"ingest: error: {err}")
