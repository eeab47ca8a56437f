"""DVC stage ``synthesize``: new images for the rare classes of ``data/audit/manifest_clean.parquet``,
made from their real images (``data/ingested/images.npy``) with the generator named in params.yaml and
filtered in the SSL space of ``models/encoder``; writes ``data/synthetic/`` (images + manifest) and
``reports/synthesize/`` (metrics, per-class counts, filter scores, sample grid); one MLflow run.

Run from the project root (``dvc repro synthesize``). All logic is in ``sslvision.synthesize``.
"""

import sys

from sslvision.params import params_path, require_sections
from sslvision.stages import check_code_version
from sslvision.synthesize import synthesize_cli


def main() -> None:
    try:
        require_sections("synthesize", path=params_path())
        check_code_version()
        synthesize_cli(params=params_path())
    except (ValueError, OSError) as err:
        sys.exit(f"synthesize: error: {err}")


if __name__ == "__main__":
    main()
