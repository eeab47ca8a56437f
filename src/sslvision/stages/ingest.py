"""DVC stage ``ingest``: decode the source named in params.yaml (``ingest.source``, plus the batches
under ``ingest.pool``) into ``data/ingested/``; metrics and plots in ``reports/ingest/``; one MLflow run.

Run from the project root (``dvc repro ingest``). All logic is in ``sslvision.ingest``. Before any work
it says which paths the pipeline's later stages read that do not exist, naming the params key (under
``dvc repro`` this is the first stage: better told now than after pretraining).
"""

import logging
import sys
from pathlib import Path

from sslvision.ingest import IngestParams, ingest_cli
from sslvision.params import load_section, params_path, require_sections
from sslvision.stages import check_code_version

log = logging.getLogger("sslvision.stages.ingest")


def _warn_missing_inputs() -> None:
    from sslvision.stages.preflight import missing_inputs

    if Path("dvc.yaml").exists():
        for problem in missing_inputs("."):
            log.warning("%s", problem)


def main() -> None:
    try:
        require_sections("ingest", path=params_path())
        check_code_version()
        p = load_section("ingest", IngestParams, params_path())
        for key, value in (("source", p.source), ("pool", p.pool), ("manifest_root", p.manifest_root)):
            if value and not Path(value).exists():
                raise FileNotFoundError(f"{params_path()}: ingest.{key}: {value} does not exist")
        _warn_missing_inputs()
        ingest_cli(source=None, out=Path("data/ingested"), params=params_path())
    except (ValueError, OSError) as err:
        sys.exit(f"ingest: error: {err}")


if __name__ == "__main__":
    main()
