"""DVC stage ``drift_eval``: compare the production batch named in params.yaml (``drift_eval.batch``) with
the training reference; ``reports/drift/trigger.json`` (every monitored metric with its threshold, failed
flag and owning stage) and the drift plots; one MLflow run.

Run from the project root (``dvc repro drift_eval``). All logic is in ``sslvision.drift``.
"""

import sys

from sslvision.drift import drift_eval_cli
from sslvision.params import params_path, require_sections
from sslvision.registry import RegistryError

if __name__ == "__main__":
    try:
        require_sections("drift_eval", path=params_path())
        result = drift_eval_cli(batch=None, params=params_path())
    except (ValueError, OSError, RegistryError) as err:
        sys.exit(f"drift_eval: error: {err}")
    print("failed metrics:", ", ".join(result["failed"]) or "none")
