"""DVC stage ``drift_eval``: compare the production batch named in params.yaml (``drift_eval.batch``) with
the training reference; ``reports/drift/trigger.json`` (every monitored metric with its threshold, failed
flag and owning stage) and the drift plots; one MLflow run. An empty ``drift_eval.batch`` (a new project,
no production batch yet) writes a ``trigger.json`` that says so and evaluates nothing.

Run from the project root (``dvc repro drift_eval``). All logic is in ``sslvision.drift``.
"""

import sys

from sslvision.drift import drift_eval_cli
from sslvision.params import params_path, require_sections
from sslvision.registry import RegistryError
from sslvision.stages import check_code_version


def main() -> None:
    try:
        require_sections("drift_eval", path=params_path())
        check_code_version()
        result = drift_eval_cli(batch=None, params=params_path())
    except (ValueError, OSError, RegistryError) as err:
        sys.exit(f"drift_eval: error: {err}")
    if result.get("skipped"):
        print(f"drift_eval: {result['skipped']}")
    else:
        print("failed metrics:", ", ".join(result["failed"]) or "none")


if __name__ == "__main__":
    main()
