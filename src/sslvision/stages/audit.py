"""DVC stage ``audit``: find wrong labels, near-duplicates and outliers with the SSL embeddings.

Reads ``data/ingested/manifest.parquet`` (the labels), ``images.npy`` (for the gallery), ``classes.json``
and ``data/embeddings/embeddings.npy``; writes ``data/audit/label_issues.parquet``,
``data/audit/manifest_clean.parquet`` (what the next stages train on), ``reports/audit/`` (metrics,
issues by class, gallery) and one MLflow run. Depends on the labels but pretrain does not, so changing
a label re-runs this stage and what follows, never pretrain.

Run from the project root: ``dvc repro audit``. All logic is in ``sslvision.audit``.
"""

import sys

from sslvision.audit import audit_cli
from sslvision.params import params_path, require_sections
from sslvision.stages import check_code_version


def main() -> None:
    try:
        require_sections("audit", path=params_path())
        check_code_version()
        audit_cli(params=params_path())
    except (ValueError, OSError) as err:
        sys.exit(f"audit: error: {err}")


if __name__ == "__main__":
    main()
